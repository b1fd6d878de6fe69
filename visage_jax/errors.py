"""Bad input from the user, told apart from bugs: the CLI prints a UserError as one line and
exits 2 (`visage-jax: error: ...`); any other exception is ours and keeps its traceback."""


class UserError(ValueError):
  """A file, field, value or checkpoint that cannot be used; the message names it and says what
  was expected. A ValueError, so library callers that catch ValueError keep working."""


class MissingFileError(UserError, FileNotFoundError):
  """A path the user gave that does not exist."""


class CheckpointError(UserError):
  """A checkpoint that cannot be read as a supported model."""


class NonFiniteError(UserError):
  """Training met a non-finite loss or gradient: the run's settings or data (or the arithmetic)
  gave NaN/inf, and going on would train and evaluate a broken model. One line, like bad input."""
