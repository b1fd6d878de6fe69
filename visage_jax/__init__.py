"""VISAGE safety landscapes (Peng et al., NeurIPS 2024) in JAX.

The Python API for notebooks: `load_run(path)` reads a run's record (result.Result: curves,
VISAGE, intervals, generations), `run_landscape(config, workdir)` runs or resumes a landscape from
a ConfigDict (runs.landscape.default_config() or a configs/ file) and returns that record.
"""

from visage_jax.result import Result, load_run

__all__ = ["Result", "load_run", "run_landscape"]


def __getattr__(name: str):
  """run_landscape imports JAX and the models only when used: `import visage_jax` stays cheap."""
  if name == "run_landscape":
    from visage_jax.runs.landscape import run
    return run
  raise AttributeError(f"module 'visage_jax' has no attribute {name!r}")
