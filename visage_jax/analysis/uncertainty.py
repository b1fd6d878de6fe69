"""Confidence intervals of a landscape's ASR and VISAGE: a percentile bootstrap over prompts.

80 prompts make an ASR point's standard error up to 5.6 points, so two runs' curves or VISAGE
scores differ by chance well before they differ in kind. Every resample draws prompts with
replacement, the same prompt indices at every point and direction of a run (a prompt that is hard
at one alpha tends to be hard at the next), and recomputes ASR, then VISAGE with the reference
basin search on each resampled curve; the mean VISAGE of several directions also resamples the
directions. Intervals are the 2.5 / 97.5 percentiles. Pure numpy; seeded, so a run's intervals
are reproducible.

Arrays: B resamples, D directions, P grid points (X*Y in 2D, flattened as steps are), N prompts.
"""

from typing import Callable, Sequence

import numpy as np

from visage_jax import errors
from visage_jax.analysis import visage

METHOD = "percentile bootstrap"
RESAMPLES = 1000   # landscape.default_config's ci95.resamples
PERCENTILES = (2.5, 97.5)
PROMPTS, DIRECTIONS, TEXTS, QUESTIONS = 0, 1, 2, 3   # independent random streams of one seed
DEGENERATE_NOTE = ("points where every prompt agrees (ASR 0 or 100): every resample gives the same "
                   "value, so the interval has zero width; only more prompts could widen it")


def verdicts(lines: list[dict], n_dirs: int, n_points: int, n_prompts: int,
             field: str | Callable[[dict], bool] = "jailbroken") -> np.ndarray:
  """[D, P, N] 1.0 / 0.0 per generation from generations.jsonl lines; NaN where no line yet.
  `field`: a record's boolean field, or a rule over the record (coherent ASR brings
  measures.coherence.coherent_jailbreak: the rule stays there, this module numpy over records)."""
  verdict = field if callable(field) else (lambda o: o[field])
  out = np.full((n_dirs, n_points, n_prompts), np.nan)
  for line in lines:
    outs = line["outputs"]
    assert len(outs) == n_prompts, (line["direction"], line["step"], len(outs), n_prompts)
    out[line["direction"], line["step"]] = [bool(verdict(o)) for o in outs]
  return out


def capability_items(lines: list[dict], n_dirs: int, n_points: int) -> dict:
  """capability_ci95's input from the lines' capability_items (measures.CapabilityScorer): NaN
  where a line has none (written before items were kept) or an item is null (non-finite)."""
  items = [(l["direction"], l["step"], l["capability_items"]) for l in lines if l.get("capability_items")]

  def grid(field):
    n = max((len(it[field]) for _, _, it in items if field in it), default=0)
    out = np.full((n_dirs, n_points, n), np.nan)
    for r, p, it in items:
      if field in it:
        out[r, p] = [np.nan if x is None else float(x) for x in it[field]]
    return out

  out = {}
  if any("nll" in it for _, _, it in items):
    out["perplexity"] = (grid("nll"), grid("tokens"))
  if any("correct" in it for _, _, it in items):
    out["mc_accuracy"] = grid("correct")
  return out


def check(resamples, seed) -> None:
  """The config's ci95 section, checked before a run writes anything."""
  if isinstance(resamples, bool) or not (isinstance(resamples, int) and resamples >= 1):
    raise errors.UserError(f"ci95.resamples must be an integer >= 1, got {resamples!r}.")
  if isinstance(seed, bool) or not (isinstance(seed, int) and seed >= 0):
    raise errors.UserError(f"ci95.seed must be an integer >= 0, got {seed!r}.")


def resample_indices(n: int, resamples: int, seed: int, stream: int = PROMPTS) -> np.ndarray:
  """[B, n] indices drawn with replacement; `stream` keeps prompts, directions and capability
  items independent under one seed."""
  check(resamples, seed)
  return np.random.default_rng([int(seed), stream]).integers(0, n, size=(resamples, n))


def resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
  """[B, n] how often each item is drawn in each resample: a resampled mean is one matmul."""
  counts = np.zeros((idx.shape[0], n))
  np.add.at(counts, (np.arange(idx.shape[0])[:, None], idx), 1.0)
  return counts


def _sums(counts: np.ndarray, x: np.ndarray) -> np.ndarray:
  """[B, D, P] resampled sums of items x [D, P, N]; NaN where the point has a NaN item (set
  explicitly, not left to the matmul: a BLAS may skip zero counts, and partial runs skip the work)."""
  d, p, n = x.shape
  flat = x.reshape(d * p, n)
  done = ~np.isnan(flat).any(axis=1)
  out = np.full((counts.shape[0], d * p), np.nan)
  out[:, done] = counts @ flat[done].T
  return out.reshape(-1, d, p)


def asr_samples(v: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """[B, D, P] ASR in percent of each resample from verdicts [D, P, N] (NaN where not evaluated)."""
  return (100.0 / v.shape[2]) * _sums(resample_counts(idx, v.shape[2]), v)


def interval(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(lo, hi): the 2.5 and 97.5 percentiles over axis 0 (NaN where any sample is NaN)."""
  samples = np.asarray(samples, np.float64)
  flat = samples.reshape(len(samples), -1)
  done = ~np.isnan(flat).any(axis=0)
  lo, hi = np.full((2, flat.shape[1]), np.nan)
  lo[done], hi[done] = np.percentile(flat[:, done], PERCENTILES, axis=0)
  return lo.reshape(samples.shape[1:]), hi.reshape(samples.shape[1:])


def visage_samples(asr_samples: np.ndarray, two_d: bool, coords: Sequence) -> np.ndarray:
  """Per-resample VISAGE of complete ASR samples [B, D, P]: [B, D] in 1D (each curve scored over its
  own basin, visage.visage_1d, searched only where a value saturates), [B] in 2D (the whole plane).
  coords = (coords_x, coords_y), checked against the samples' grid."""
  xs, ys = coords
  _, d, p = asr_samples.shape
  expected = len(xs) * (len(ys) if two_d else 1)
  if p != expected or (two_d and d != 1):
    raise errors.UserError(f"ASR samples of shape {asr_samples.shape} do not fit a grid of {len(xs)} x "
                           f"{len(ys) if two_d else 1} points ({'2D, one plane' if two_d else '1D'}).")
  if two_d:
    return np.mean(100.0 - asr_samples[:, 0], axis=1)
  out = np.mean(100.0 - asr_samples, axis=2)   # the basin is the whole curve unless one saturates
  for i, j in zip(*np.nonzero((asr_samples > visage.SATURATED).any(axis=2))):
    out[i, j] = visage.visage_1d(asr_samples[i, j])
  return out


def _pairs(lo: np.ndarray, hi: np.ndarray) -> list:
  """Nested lists of [lo, hi] (None where NaN or infinite: JSON has neither), shaped like lo."""
  if lo.ndim == 0:
    return [float(lo), float(hi)] if np.isfinite(lo) and np.isfinite(hi) else None
  return [_pairs(a, b) for a, b in zip(lo, hi)]


def _grid(pairs: list, coords_x, coords_y) -> list:
  """[dir][point] in 1D; [x][y] in 2D (one plane), as landscape.json holds ASR."""
  if coords_y is None:
    return pairs
  return [pairs[0][i * len(coords_y):(i + 1) * len(coords_y)] for i in range(len(coords_x))]


def curve_ci95(v: np.ndarray, coords_x, coords_y, *, resamples: int, seed: int) -> dict:
  """{"asr": grid of [lo, hi] or None, "visage": interval or None} of one judge's verdicts [D, P, N].
  VISAGE needs every point: None until then."""
  two_d = coords_y is not None
  samples = asr_samples(v, resample_indices(v.shape[2], resamples, seed))
  out = dict(asr=_grid(_pairs(*interval(samples)), coords_x, coords_y), visage=None)
  if np.isnan(v).any():
    return out
  vis = visage_samples(samples, two_d, (coords_x, coords_y))
  if two_d:
    out["visage"] = _pairs(*interval(vis))
  else:
    pick = resample_indices(v.shape[0], resamples, seed, stream=DIRECTIONS)
    means = np.take_along_axis(vis, pick, axis=1).mean(axis=1)
    out["visage"] = dict(per_direction=_pairs(*interval(vis)), mean=_pairs(*interval(means)))
  return out


def rate_ci95(v: np.ndarray, coords_x, coords_y, *, resamples: int, seed: int) -> list:
  """Grid of [lo, hi] (None where not evaluated) of the % of prompts with verdict 1 in v [D, P, N]
  (over-refusal: the safe prompts refused), prompts resampled as for ASR."""
  samples = asr_samples(v, resample_indices(v.shape[2], resamples, seed))
  return _grid(_pairs(*interval(samples)), coords_x, coords_y)


def capability_ci95(capability: dict, coords_x, coords_y, *, resamples: int, seed: int) -> dict:
  """Perplexity and multiple-choice accuracy intervals over their items (reference texts,
  questions), the same resampled items at every point. capability: {"perplexity": (NLL sums
  [D, P, T], token counts [D, P, T]), "mc_accuracy": correct [D, P, Q]}; NaN where not measured."""
  out = {}
  if "perplexity" in capability:
    sums, tokens = (np.asarray(a, np.float64) for a in capability["perplexity"])
    c = resample_counts(resample_indices(sums.shape[2], resamples, seed, stream=TEXTS), sums.shape[2])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      samples = np.exp(_sums(c, sums) / _sums(c, tokens))
      out["perplexity"] = _grid(_pairs(*interval(samples)), coords_x, coords_y)
  if "mc_accuracy" in capability:
    v = np.asarray(capability["mc_accuracy"], np.float64)
    samples = asr_samples(v, resample_indices(v.shape[2], resamples, seed, stream=QUESTIONS)) / 100.0
    out["mc_accuracy"] = _grid(_pairs(*interval(samples)), coords_x, coords_y)
  return out


def degenerate_points(v: np.ndarray) -> int:
  """Evaluated points of verdicts [D, P, N] where every prompt agrees (a zero-width interval)."""
  return int(np.sum(v.min(axis=2) == v.max(axis=2)))   # NaN (not evaluated) never compares equal


def landscape_ci95(curves: dict, coords_x, coords_y, *, resamples: int = RESAMPLES, seed: int = 0,
                   capability: dict | None = None) -> dict:
  """landscape.json["ci95"]. curves: {"asr": verdicts [D, P, N], optionally "asr_coherent": ...};
  their VISAGE goes under "visage" / "visage_coherent". capability: see capability_ci95."""
  out = dict(method=METHOD, resamples=resamples, seed=seed)
  degenerate = {}
  for name, v in curves.items():
    got = curve_ci95(v, coords_x, coords_y, resamples=resamples, seed=seed)
    out[name] = got["asr"]
    out[name.replace("asr", "visage")] = got["visage"]
    degenerate[name] = degenerate_points(v)
  if capability:
    out["capability"] = capability_ci95(capability, coords_x, coords_y, resamples=resamples, seed=seed)
  out["degenerate"] = dict(degenerate, note=DEGENERATE_NOTE)
  return out
