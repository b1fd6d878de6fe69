"""A landscape config, checked once, section by section, before anything is loaded or written.

`validate(c)` is the one entry: landscape.run calls it first, and so does every command that
runs landscape configs (bench, sweep and the experiments through landscape.run). Bad input is one
line naming the field and what was expected (errors.UserError, exit 2). The mesh is checked
where it is made (sharding.make_mesh): whether a shape fits depends on this machine's devices.
"""

from visage_jax import distributed, errors, planner
from visage_jax.analysis import uncertainty
from visage_jax.checkpoints import loader
from visage_jax.directions import grid
from visage_jax.measures import capability
from visage_jax.runs import judging


def validate(c) -> None:
  """Every section of landscape config `c`; the first bad field fails."""
  landscape(c.landscape)
  decode(c.decode)
  engine(c.engine)
  distributed.check(c.distributed)
  uncertainty.check(c.ci95.resamples, c.ci95.seed)
  coherence(c.coherence)
  capability_section(c.capability)
  judges(c.judges)


def landscape(ls) -> None:
  """The grid and its directions."""
  grid.grid_coords(ls.vis_type, ls.steps, ls.multiplier, ls.get("extra_steps", 0))
  if ls.num_directions < 1:
    raise errors.UserError(f"landscape.num_directions must be >= 1, got {ls.num_directions}.")
  if ls.vis_type != "1D_random" and ls.num_directions != 1:
    raise errors.UserError(f"landscape.num_directions={ls.num_directions}: only 1D_random draws several "
                           f"directions; {ls.vis_type} uses exactly one (a line or a plane).")
  if "interpolation" in ls.vis_type and not ls.target_path:
    raise errors.UserError(f"{ls.vis_type} needs landscape.target_path (the checkpoint at alpha = 1).")
  if ls.vis_type == "2D_interpolation" and not ls.target2_path:
    raise errors.UserError("2D_interpolation needs landscape.target2_path (the third checkpoint).")
  refine = ls.get("refine", 0)
  if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
    raise errors.UserError(f"landscape.refine must be an integer >= 0 (bisection rounds per basin wall), "
                           f"got {refine!r}.")
  if refine and not ls.vis_type.startswith("1D"):
    raise errors.UserError(f"landscape.refine={refine}: only 1D basin walls are bisected; {ls.vis_type} "
                           "needs landscape.refine=0.")


def decode(d) -> None:
  if d.max_new_tokens < 1:
    raise errors.UserError(f"decode.max_new_tokens must be >= 1, got {d.max_new_tokens}.")


def engine(e) -> None:
  if e.mode not in ("auto",) + planner.MODES:
    raise errors.UserError(f"engine.mode {e.mode!r} is not one of auto, {', '.join(planner.MODES)}.")


def coherence(co) -> None:
  """Its reference model's config is read (not its weights)."""
  if co.enabled and not co.max_nll > 0:
    raise errors.UserError(f"coherence.max_nll must be > 0 (nats per token), got {co.max_nll}.")
  if co.enabled and co.model_path:
    loader.load_config(loader.resolve(co.model_path, weights=False))


def capability_section(cap) -> None:
  """Its text and multiple-choice files are read."""
  if cap.texts_path not in ("", capability.BENIGN):
    capability.read_texts(cap.texts_path)
  if cap.mc_shots < 0:
    raise errors.UserError(f"capability.mc_shots must be >= 0, got {cap.mc_shots}.")
  if cap.mc_path:
    capability.read_mc(cap.mc_path)
  if cap.mc_shots and not cap.mc_dev_path:
    raise errors.UserError(f"capability.mc_shots={cap.mc_shots} needs capability.mc_dev_path (the shots).")
  if cap.mc_dev_path and len(capability.read_mc(cap.mc_dev_path)) < cap.mc_shots:
    raise errors.UserError(f"{cap.mc_dev_path}: fewer rows than capability.mc_shots={cap.mc_shots}.")


def judges(j) -> None:
  """A model judge's name and its checkpoint's config."""
  if j.model_path:
    if not judging.NAME_PATTERN.match(j.name or ""):
      raise errors.UserError(f"judges.name {j.name!r}: expected letters, digits, '_', '.' or '-'.")
    if int(j.max_new_tokens) < 1:
      raise errors.UserError(f"judges.max_new_tokens must be >= 1, got {j.max_new_tokens}.")
    loader.load_config(loader.resolve(j.model_path, weights=False))
