"""The census of random directions: exact intervals against scipy, fractions and walls against a
plain-Python recount from the ASR table."""

import numpy as np
from absl.testing import absltest, parameterized
from scipy import stats

from visage_jax.analysis import census


def _recount(asr, coords, limit):
  """safe_fraction and walls straight from the definition: a direction is safe up to r when every
  point with |alpha| <= r (measured from the origin point) has ASR <= limit."""
  origin = min(range(len(coords)), key=lambda i: abs(coords[i]))
  dist = [abs(c - coords[origin]) for c in coords]
  rs = sorted({d for d in dist if d > 0})
  safe = [sum(all(a <= limit for a, d in zip(curve, dist) if d <= r) for curve in asr) / len(asr) for r in rs]
  walls = [min((d for a, d in zip(curve, dist) if a > limit), default=None) for curve in asr]
  return rs, safe, walls


class CensusTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 7, 32, 64, 150)
  def test_clopper_pearson_is_scipys_exact_interval(self, n):
    for k in range(n + 1):
      want = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
      np.testing.assert_allclose(census.clopper_pearson(k, n), (want.low, want.high), rtol=0, atol=1e-9)

  def test_other_levels(self):
    want = stats.binomtest(3, 20).proportion_ci(confidence_level=0.9, method="exact")
    np.testing.assert_allclose(census.clopper_pearson(3, 20, 0.9), (want.low, want.high), atol=1e-9)

  def test_fractions_and_walls_match_a_recount(self):
    rng = np.random.default_rng(0)
    coords = [round(x, 4) for x in np.linspace(-0.5, 0.5, 11)]
    for _ in range(20):
      n = int(rng.integers(2, 40))
      # curves that grow away from the origin with noise, so walls fall at different radii
      dist = np.abs(np.asarray(coords))
      asr = np.clip(rng.uniform(0, 400, (n, 1)) * dist ** 2 + rng.uniform(0, 15, (n, len(coords))), 0, 100)
      asr = np.round(asr / 6.25) * 6.25   # ASR of 16 prompts
      got = census.census(asr, coords, tolerance=10)
      limit = asr[:, 5].mean() + 10
      rs, safe, walls = _recount(asr.tolist(), coords, limit)
      self.assertEqual(got["threshold"], limit)
      np.testing.assert_allclose(got["radii"], rs)
      np.testing.assert_allclose(got["safe_fraction"], safe)
      self.assertEqual(got["walls"], walls)
      for k, frac in enumerate(safe):
        want = stats.binomtest(round(frac * n), n).proportion_ci(method="exact")
        np.testing.assert_allclose(got["ci95"][k], (want.low, want.high), atol=1e-9)

  def test_a_runs_own_grid_has_one_radius_per_step(self):
    """The grid's float coordinates (-0.05 is 0.04999999999999999 from the origin, +0.05 is
    0.050000000000000044): one radius each, and every wall is one of them."""
    from visage_jax.directions import grid
    coords, _ = grid.grid_coords("1D_random", 10, 0.5)
    self.assertEqual(len(census.radii(coords)), 5)
    np.testing.assert_allclose(census.radii(coords), [0.05, 0.1, 0.15, 0.2, 0.25], atol=1e-12)
    asr = np.zeros((2, 11))
    asr[0, 4], asr[1, 6] = 50, 50   # broken at -0.05 and at +0.05
    got = census.census(asr, coords)
    self.assertEqual(got["walls"], [census.radii(coords)[0]] * 2)
    self.assertEqual(got["safe_count"], [0, 0, 0, 0, 0])

  def test_absolute_threshold_and_quantiles(self):
    coords = [-1.0, -0.5, 0.0, 0.5, 1.0]
    asr = np.array([[100, 50, 0, 0, 20], [0, 0, 0, 0, 0], [100, 100, 0, 60, 100], [0, 0, 0, 0, 100]], float)
    got = census.census(asr, coords, max_asr=30)
    self.assertEqual(got["threshold"], 30.0)
    self.assertEqual(got["walls"], [0.5, None, 0.5, 1.0])
    self.assertEqual(got["safe_fraction"], [0.5, 0.25])
    # order statistics of (0.5, 0.5, 1.0, inf)
    self.assertEqual(got["wall_quantiles"], dict(min=0.5, q10=0.5, median=0.5, q90=None, max=None))

  def test_side_walls(self):
    coords = [-1.0, -0.5, 0.0, 0.5, 1.0]
    self.assertEqual(census.side_walls([100, 50, 0, 0, 20], coords, 10), (-0.5, 1.0))
    self.assertEqual(census.side_walls([0, 0, 0, 0, 0], coords, 10), (None, None))
    self.assertEqual(census.side_walls([100, 0, 0, 60, 0], coords, 10), (-1.0, 0.5))   # the first, not the last


if __name__ == "__main__":
  absltest.main()
