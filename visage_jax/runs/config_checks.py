"""A landscape config, checked once, section by section, before anything is loaded or written.

`validate(c)` is the one entry: landscape.run calls it first, and so does every command that
runs landscape configs (bench, sweep and the experiments through landscape.run). Bad input is one
line naming the field and what was expected (errors.UserError, exit 2). The mesh is checked
where it is made (sharding.make_mesh): whether a shape fits depends on this machine's devices.
"""

import os

from visage_jax import distributed, errors, planner, prompts
from visage_jax.analysis import uncertainty
from visage_jax.checkpoints import loader
from visage_jax.directions import gradient, grid
from visage_jax.measures import capability, llamaguard, refusal_judge
from visage_jax.runs import judging
from visage_jax.training import trainsets


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
  if "gradient" in c.landscape.vis_type:
    gradient_section(c.gradient)
  if "refusal" in c.landscape.vis_type:
    refusal_section(c.refusal)
  census_section(c.get("census"))
  overrefusal_section(c.get("overrefusal"))


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
  if co.enabled and not 0 <= co.max_repetition <= 1:
    raise errors.UserError(f"coherence.max_repetition must be in [0, 1] (a fraction of repeated 4-grams), "
                           f"got {co.max_repetition}.")
  if co.enabled and co.model_path:
    loader.load_config(loader.resolve(co.model_path, weights=False))


def capability_section(cap) -> None:
  """Its text and multiple-choice files are read."""
  if cap.texts_path not in ("", capability.BENIGN):
    capability.read_texts(cap.texts_path)
  if cap.limit < 0:
    raise errors.UserError(f"capability.limit must be >= 0 (0 = every text), got {cap.limit}.")
  if cap.mc_shots < 0:
    raise errors.UserError(f"capability.mc_shots must be >= 0, got {cap.mc_shots}.")
  if cap.mc_path:
    capability.read_mc(cap.mc_path)
  if cap.mc_shots and not cap.mc_dev_path:
    raise errors.UserError(f"capability.mc_shots={cap.mc_shots} needs capability.mc_dev_path (the shots).")
  if cap.mc_dev_path and len(capability.read_mc(cap.mc_dev_path)) < cap.mc_shots:
    raise errors.UserError(f"{cap.mc_dev_path}: fewer rows than capability.mc_shots={cap.mc_shots}.")


def judges(j) -> None:
  """A model judge's name, format, budget and its checkpoint's config."""
  if j.model_path:
    if not judging.NAME_PATTERN.match(j.name or ""):
      raise errors.UserError(f"judges.name {j.name!r}: expected letters, digits, '_', '.' or '-'.")
    if j.format not in llamaguard.FORMATS:
      raise errors.UserError(f"judges.format {j.format!r}: expected one of {', '.join(llamaguard.FORMATS)}.")
    judging.check_new_tokens(j.max_new_tokens, j.format, "judges.max_new_tokens")
    loader.load_config(loader.resolve(j.model_path, weights=False))


def gradient_section(g) -> None:
  """The gradient direction's examples: rows of a goal,target CSV."""
  n = len(trainsets.read_advbench(g.prompts_path))
  gradient.row_range(g.rows, n, "gradient.rows")


def refusal_section(r) -> None:
  """The refusal direction's prompt rows, harmless prompts and layer."""
  n = len(trainsets.read_advbench(""))
  gradient.row_range(r.harmful_rows, n, "refusal.harmful_rows")
  gradient.row_range(r.validation_rows, n, "refusal.validation_rows")
  if r.harmless_path and not os.path.exists(r.harmless_path):
    raise errors.MissingFileError(f"refusal.harmless_path {r.harmless_path!r}: no such file (expected a JSONL "
                                  "with 'prompt' or a CSV with a 'prompt' or 'goal' column).")
  if isinstance(r.layer, bool) or not isinstance(r.layer, int) or r.layer < -1:
    raise errors.UserError(f"refusal.layer {r.layer!r}: expected -1 (chosen automatically) or a layer index >= 0.")
  if int(r.harmless_limit) < 0:
    raise errors.UserError(f"refusal.harmless_limit must be >= 0 (0 = all), got {r.harmless_limit}.")


def census_section(c) -> None:
  if c is not None and float(c.tolerance) < 0:
    raise errors.UserError(f"census.tolerance must be >= 0 (ASR points), got {c.tolerance}.")


def overrefusal_section(o) -> None:
  """Its prompts are read (a missing file or column fails here), its judge and numbers checked."""
  if o is None:
    return
  limit = o.limit
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
    raise errors.UserError(f"overrefusal.limit must be an integer >= 0 (0 = all prompts), got {limit!r}.")
  if o.judge not in refusal_judge.JUDGES:
    raise errors.UserError(f"overrefusal.judge {o.judge!r}: not a refusal judge; expected one of "
                           f"{', '.join(refusal_judge.JUDGES)}.")
  if float(o.tolerance) < 0:
    raise errors.UserError(f"overrefusal.tolerance must be >= 0 (percentage points), got {o.tolerance}.")
  if o.prompts_path:
    prompts.load_overrefusal(o.prompts_path, limit)
