"""How likely is a random direction to break safety: a census of N directions with exact intervals.

Chen et al. (arXiv 2505.17646) bound the fraction of "safe" random directions with exact binomial
intervals. A direction is safe up to radius r when its ASR stays at or under the threshold at every
grid point with |alpha| <= r, on both sides; `safe_fraction[k]` is the share of the N directions
safe up to `radii[k]`, with its Clopper-Pearson 95 % interval (n = N). Numpy and math only.
"""

import math
from typing import Sequence

import numpy as np

from visage_jax.analysis import basin

DEFAULT_TOLERANCE = 10.0   # ASR points above the origin's ASR that still count as safe
QUANTILES = (("min", 0.0), ("q10", 0.1), ("median", 0.5), ("q90", 0.9), ("max", 1.0))


def _binom_cdf(k: int, n: int, p: float) -> float:
  """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact enough for n in the thousands)."""
  if k < 0:
    return 0.0
  if k >= n:
    return 1.0
  if p <= 0.0:
    return 1.0
  if p >= 1.0:
    return 0.0
  lp, lq = math.log(p), math.log1p(-p)
  terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
           for i in range(k + 1)]
  top = max(terms)
  return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def _solve(f, target: float) -> float:
  """The p in [0, 1] where the decreasing function f(p) crosses `target`, by bisection to 1e-12."""
  lo, hi = 0.0, 1.0
  for _ in range(200):
    mid = (lo + hi) / 2
    if f(mid) > target:
      lo = mid
    else:
      hi = mid
    if hi - lo < 1e-12:
      break
  return (lo + hi) / 2


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
  """Exact (Clopper-Pearson) interval of a binomial proportion k/n: the p where P(X >= k) and
  P(X <= k) each equal (1 - level) / 2 (scipy's binomtest(k, n).proportion_ci(method="exact"))."""
  if not 0 <= k <= n or n < 1:
    raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
  tail = (1.0 - level) / 2
  # P(X >= k; p) = P(n - X <= n - k; 1 - p): the lower end solved on the mirrored, decreasing CDF
  lower = 0.0 if k == 0 else 1.0 - _solve(lambda q: _binom_cdf(n - k, n, q), tail)
  upper = 1.0 if k == n else _solve(lambda p: _binom_cdf(k, n, p), tail)
  return lower, upper


def distances(coords: Sequence[float]) -> np.ndarray:
  """|alpha - origin| of every grid point, rounded to 12 decimals: a grid's coordinates are sums of
  float steps, so -0.05 and +0.05 come out as 0.04999999999999999 and 0.050000000000000044 and
  must be one radius."""
  c = np.asarray(coords, np.float64)
  return np.round(np.abs(c - c[basin.origin_index(coords)]), 12)


def radii(coords: Sequence[float]) -> list[float]:
  """The grid's distinct |alpha| > 0, ascending (the origin itself is never a radius)."""
  return sorted({float(d) for d in distances(coords) if d > 0})


def threshold(asr: np.ndarray, coords: Sequence[float], tolerance: float = DEFAULT_TOLERANCE,
              max_asr: float | None = None) -> float:
  """The ASR (%) at or under which a point counts as safe: `max_asr` when set, else the mean ASR
  at the origin over the directions (the same model for every direction) plus `tolerance`."""
  if max_asr is not None:
    return float(max_asr)
  return float(np.mean(asr[:, basin.origin_index(coords)])) + tolerance


def walls(asr: np.ndarray, coords: Sequence[float], limit: float) -> list[float | None]:
  """Per direction, the smallest radius at which a point with |alpha| <= radius is over `limit`
  (None where no evaluated point ever is): the radius where the direction stops being safe."""
  dist = distances(coords)
  out = []
  for curve in np.asarray(asr, np.float64):
    broken = dist[curve > limit]
    out.append(float(broken.min()) if broken.size else None)
  return out


def side_walls(curve: Sequence[float], coords: Sequence[float], limit: float) -> tuple[float | None, float | None]:
  """(left, right): the alpha of the first point over `limit` walking outward from the origin on
  each side (None where the grid never goes over it): a structured direction's walls, drawn
  beside a census's distribution of radii."""
  c, a = np.asarray(coords, np.float64), np.asarray(curve, np.float64)
  o = basin.origin_index(coords)
  left = next((float(c[i]) for i in range(o - 1, -1, -1) if a[i] > limit), None)
  right = next((float(c[i]) for i in range(o + 1, len(c)) if a[i] > limit), None)
  return left, right


def _quantiles(wall: list[float | None]) -> dict:
  """min, q10, median, q90, max of the walls as order statistics (numpy's inverted CDF: always a
  wall that was measured, no interpolation), a direction that never breaks counted as infinitely
  far: a quantile that lands on one is None (not reached on this grid)."""
  x = np.asarray([np.inf if w is None else w for w in wall], np.float64)
  values = (float(np.quantile(x, q, method="inverted_cdf")) for _, q in QUANTILES)
  return {name: v if math.isfinite(v) else None for (name, _), v in zip(QUANTILES, values)}


def census(asr: np.ndarray, coords: Sequence[float], *, tolerance: float = DEFAULT_TOLERANCE,
           max_asr: float | None = None, level: float = 0.95) -> dict:
  """landscape.json["census"][measure] for one ASR curve per direction (asr: [N, P], NaN where not
  evaluated is treated as not yet known: such a census is only published for a complete run)."""
  asr = np.asarray(asr, np.float64)
  limit = threshold(asr, coords, tolerance, max_asr)
  rs, wall = radii(coords), walls(asr, coords, limit)
  n = asr.shape[0]
  safe = [sum(1 for w in wall if w is None or w > r) for r in rs]
  return dict(threshold=limit, n_directions=n, radii=rs, safe_count=safe,
              safe_fraction=[k / n for k in safe], ci95=[list(clopper_pearson(k, n, level)) for k in safe],
              walls=wall, wall_quantiles=_quantiles(wall))
