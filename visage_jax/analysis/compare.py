"""Two landscape runs compared: A's VISAGE minus B's, with a bootstrap interval and a p-value.

Two runs differ by chance as well as by what changed between them (a fine-tune, a system
prompt): their prompts and random directions are samples. The difference is bootstrapped over
prompts and directions (uncertainty.py's percentile bootstrap). Paired when both runs answered
the same prompts along the same directions: every resample draws the same prompt and direction
indices for both runs, so what the runs share cancels and the interval narrows. Otherwise each
run is resampled independently, and the result says why (`unpaired_reason`).

Random directions with the same settings are the same draw (normalized against each model's
own weights), so runs of two models along "the same" directions pair; interpolation directions
run from the model to its target, so they pair only when both ends are the same.

p_value, two-sided, of "no difference", from the B resampled differences d*:
  p = min(1, 2 * min(1 + #{d* <= 0}, 1 + #{d* >= 0}) / (B + 1))
The +1s keep p above 0 (its least value is 2 / (B + 1)); identical runs give p = 1.
"""

import json
import os

import numpy as np

from visage_jax import errors, result, rundir
from visage_jax.analysis import uncertainty

# landscape settings that fix the directions (the grid itself is compared through its coords)
DIRECTION_FIELDS = ("vis_type", "num_directions", "seed", "norm", "blacklist", "orthogonalize",
                    "directions_path", "target_path", "target2_path")
_B_STREAM = 100   # run B's own random streams when unpaired (uncertainty streams + this)


def load_run(path: str) -> dict:
  """A complete run's record, config, goals (in prompt order) and verdicts [D, P, N]."""
  record = result.load_run(path)
  if not record.complete:
    raise errors.UserError(f"{os.path.join(path, result.FILE)}: the run is incomplete "
                           "(complete: false); resume it with `visage-jax landscape` first.")
  config = rundir.read_json(os.path.join(path, "run_config.json")) or record.config
  if not isinstance(config, dict) or "landscape" not in config:
    raise errors.UserError(f"{os.path.join(path, 'run_config.json')}: missing or without a landscape "
                           "section; expected the run's resolved config.")
  n_dirs, n_points = record.n_dirs, record.n_points
  lines = rundir.read_jsonl(os.path.join(path, "generations.jsonl"), repair=False)
  if record.n_prompts is None:
    raise errors.UserError(f"{os.path.join(path, result.FILE)}: missing field 'n_prompts'.")
  n_prompts = record.n_prompts
  for line in lines:
    if len(line.get("outputs", ())) != n_prompts:
      raise errors.UserError(f"{os.path.join(path, 'generations.jsonl')}: direction {line.get('direction')} "
                             f"step {line.get('step')} has {len(line.get('outputs', ()))} outputs, "
                             f"expected n_prompts = {n_prompts}.")
  v = uncertainty.verdicts(lines, n_dirs, n_points, n_prompts)
  if np.isnan(v).any():
    r, p, _ = np.argwhere(np.isnan(v))[0]
    raise errors.UserError(f"{os.path.join(path, 'generations.jsonl')}: no line for direction {r} step {p}; "
                           "expected every grid point of a complete run.")
  goals = [o["prompt"] for o in next(l for l in lines if l["direction"] == 0 and l["step"] == 0)["outputs"]]
  return dict(path=path, result=record, config=config, goals=goals, verdicts=v, two_d=record.two_d)


def check_comparable(a: dict, b: dict) -> None:
  """Runs on different kinds of landscape or grids have no common VISAGE scale: refused."""
  ra, rb = a["result"], b["result"]
  what = f"cannot compare {a['path']} with {b['path']}"
  if ra.vis_type != rb.vis_type:
    raise errors.UserError(f"{what}: vis_type {ra.vis_type} vs {rb.vis_type}.")
  for key in ("coords_x", "coords_y"):
    xa, xb = getattr(ra, key), getattr(rb, key)
    if (xa is None) != (xb is None) or (xa is not None and (
        len(xa) != len(xb) or not np.allclose(xa, xb, rtol=0, atol=1e-9))):
      raise errors.UserError(f"{what}: grid {key} differs ({_grid_text(xa)} vs {_grid_text(xb)}).")


def _grid_text(xs) -> str:
  return "none" if xs is None else f"{len(xs)} points {xs[0]:g}..{xs[-1]:g}"


def differences(a: dict, b: dict) -> str | None:
  """Why the runs cannot be paired ("prompts differ: ...; directions differ: ..."), or None."""
  why = []
  ga, gb = a["goals"], b["goals"]
  if len(ga) != len(gb):
    why.append(f"prompts differ: {len(ga)} vs {len(gb)} prompts")
  elif ga != gb:
    i = next(i for i, (x, y) in enumerate(zip(ga, gb)) if x != y)
    why.append(f"prompts differ: prompt {i} {_short(ga[i])} vs {_short(gb[i])}")
  fields = [("landscape", f) for f in DIRECTION_FIELDS]
  if "interpolation" in a["config"]["landscape"].get("vis_type", ""):
    fields += [("model", "path"), ("model", "lora_path")]
  diffs = [f"{s}.{f} {_short(a['config'][s].get(f))} vs {_short(b['config'][s].get(f))}"
           for s, f in fields if a["config"].get(s, {}).get(f) != b["config"].get(s, {}).get(f)]
  if diffs:
    why.append("directions differ: " + ", ".join(diffs))
  return "; ".join(why) or None


def _short(value, limit: int = 40) -> str:
  text = json.dumps(rundir.jsonable(value))
  return text if len(text) <= limit else text[:limit - 1] + "…"


def p_value(d: np.ndarray) -> np.ndarray:
  """Two-sided bootstrap p-value of no difference over axis 0 of resampled differences d* (module
  docstring)."""
  below, above = 1 + np.sum(d <= 0, axis=0), 1 + np.sum(d >= 0, axis=0)
  return np.minimum(1.0, 2.0 * np.minimum(below, above) / (d.shape[0] + 1))


def _draws(run: dict, resamples: int, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
  """(prompt indices [B, N], direction indices [B, D]) of one run's resamples."""
  n_dirs, _, n = run["verdicts"].shape
  return (uncertainty.resample_indices(n, resamples, seed, stream=stream + uncertainty.PROMPTS),
          uncertainty.resample_indices(n_dirs, resamples, seed, stream=stream + uncertainty.DIRECTIONS))


def _samples(run: dict, draws) -> tuple[np.ndarray, np.ndarray]:
  """ASR [B, D, P] and the run's one VISAGE [B] (mean over the drawn directions in 1D) per draw."""
  prompts, dirs = draws
  asr = uncertainty.asr_samples(run["verdicts"], prompts)
  r = run["result"]
  vis = uncertainty.visage_samples(asr, run["two_d"], (r.coords_x, r.coords_y))
  if not run["two_d"]:
    vis = np.take_along_axis(vis, dirs, axis=1).mean(axis=1)
  return asr, vis


def _observed(run: dict) -> tuple[np.ndarray, float]:
  """ASR [D, P] and VISAGE of the run itself: the draw of every prompt and direction once."""
  n_dirs, _, n = run["verdicts"].shape
  asr, vis = _samples(run, (np.arange(n)[None], np.arange(n_dirs)[None]))
  return asr[0], float(vis[0])


def _pair(lo, hi) -> list[float]:
  return [float(lo), float(hi)]


def _asr_difference(a: dict, b: dict, samples_a: np.ndarray, samples_b: np.ndarray) -> list | None:
  """Per point {difference, ci95, p_value}, shaped like landscape.json's asr ([dir][point] in 1D,
  [x][y] in 2D); None when the runs have different numbers of directions."""
  if samples_a.shape != samples_b.shape:
    return None
  point = _observed(a)[0] - _observed(b)[0]
  d = samples_a - samples_b
  lo, hi = uncertainty.interval(d)
  p = p_value(d)
  grid = np.empty(point.shape, object)
  for r, i in np.ndindex(point.shape):
    grid[r, i] = dict(difference=float(point[r, i]), ci95=_pair(lo[r, i], hi[r, i]), p_value=float(p[r, i]))
  return a["result"].to_grid(grid).tolist()


def compare(run_a: str, run_b: str, resamples: int = 1000, seed: int = 0, paired: bool | None = None) -> dict:
  """VISAGE of run A minus run B with its 95% interval and p-value, and the same per grid point for
  ASR. paired: None = when the runs allow it, True = demanded (refused if they differ), False =
  independent resamples."""
  for name, value, least in (("resamples", resamples, 1), ("seed", seed, 0)):
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      raise errors.UserError(f"{name}: expected an integer >= {least}, got {value!r}.")
  a, b = load_run(run_a), load_run(run_b)
  check_comparable(a, b)
  reason = differences(a, b)
  if paired and reason:
    raise errors.UserError(f"cannot pair {run_a} with {run_b}: {reason}.")
  is_paired = reason is None if paired is None else bool(paired)
  if not is_paired and reason is None:
    reason = "independent resamples asked for (paired=False)"
  draws_a = _draws(a, resamples, seed, 0)
  asr_a, vis_a = _samples(a, draws_a)
  asr_b, vis_b = _samples(b, draws_a if is_paired else _draws(b, resamples, seed, _B_STREAM))
  over = "prompts" if a["two_d"] else "prompts and directions"
  out = dict(run_a=run_a, run_b=run_b, vis_type=a["result"].vis_type, paired=is_paired,
             unpaired_reason=None if is_paired else reason,
             method=f"{'paired' if is_paired else 'independent'} {uncertainty.METHOD} over {over}",
             resamples=resamples, seed=seed,
             visage_a=_observed(a)[1], visage_a_ci95=_pair(*uncertainty.interval(vis_a)),
             visage_b=_observed(b)[1], visage_b_ci95=_pair(*uncertainty.interval(vis_b)))
  out.update(visage_difference=out["visage_a"] - out["visage_b"],
             ci95=_pair(*uncertainty.interval(vis_a - vis_b)), p_value=float(p_value(vis_a - vis_b)),
             coords_x=a["result"].coords_x.tolist(),
             coords_y=None if a["result"].coords_y is None else a["result"].coords_y.tolist(),
             asr_difference=_asr_difference(a, b, asr_a, asr_b))
  return out


def table(report: dict) -> str:
  """A few lines for a person: both VISAGE scores, the difference, its interval and p."""
  ci = lambda pair: f"[{pair[0]:.2f}, {pair[1]:.2f}]"
  how = ("paired: same prompts and directions" if report["paired"]
         else f"unpaired: {report['unpaired_reason']}")
  return "\n".join([
      f"A  {report['run_a']}", f"B  {report['run_b']}",
      f"  {'VISAGE A':<10} {report['visage_a']:8.2f}  {ci(report['visage_a_ci95'])}",
      f"  {'VISAGE B':<10} {report['visage_b']:8.2f}  {ci(report['visage_b_ci95'])}",
      f"  {'A - B':<10} {report['visage_difference']:+8.2f}  {ci(report['ci95'])}  p = {report['p_value']:.3g}",
      f"  {how}", f"  {report['method']}, {report['resamples']} resamples, seed {report['seed']}"]) + "\n"
