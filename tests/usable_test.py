"""The usable basin against its definition recomputed in plain Python (1D walls, 2D regions)."""

import numpy as np
from absl.testing import absltest, parameterized

from visage_jax.analysis import usable

X = [-0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4]


def _plain_walls(asr, rate, xs, asr_limit, rate_limit):
  """First alpha walking out from the origin where a point is not usable (None: never)."""
  o = xs.index(0.0)
  bad = [a > asr_limit or r > rate_limit for a, r in zip(asr, rate)]
  left = next((xs[i] for i in range(o - 1, -1, -1) if bad[i]), None)
  right = next((xs[i] for i in range(o + 1, len(xs)) if bad[i]), None)
  return left, right


class UsableTest(parameterized.TestCase):

  @parameterized.named_parameters(("tolerance", None), ("max_asr", 30.0))
  def test_1d_walls_are_a_recount(self, max_asr):
    rng = np.random.default_rng(0)
    asr = np.clip(np.abs(np.asarray(X))[None] * rng.uniform(100, 400, (3, 1)), 0, 100).round(1)
    rate = np.clip(20 + np.asarray(X)[None] * rng.uniform(-300, 300, (3, 1)), 0, 100).round(1)
    asr[:, 4], rate[:, 4] = 5.0, 20.0
    got = usable.usable_basin(asr, rate, X, None, asr_tolerance=10.0, max_asr=max_asr, rate_tolerance=10.0)
    asr_limit = max_asr if max_asr is not None else 5.0 + 10.0
    self.assertEqual(got["asr_threshold"], asr_limit)
    self.assertEqual(got["rate_threshold"], 30.0)
    self.assertLen(got["directions"], 3)
    narrower = 0
    for a, r, d in zip(asr.tolist(), rate.tolist(), got["directions"]):
      left, right = _plain_walls(a, r, X, asr_limit, 30.0)
      self.assertEqual((d["left"], d["right"]), (left, right))
      self.assertEqual(d["width"], None if None in (left, right) else right - left)
      safe = _plain_walls(a, [0.0] * len(X), X, asr_limit, 30.0)
      self.assertEqual((d["safety"]["left"], d["safety"]["right"]), safe)
      narrower += (left, right) != safe
    self.assertGreater(narrower, 0, "over-refusal must narrow some basin for this test to bite")

  def test_2d_region_is_a_recount(self):
    xs = ys = [-1.0, 0.0, 1.0]
    asr = np.array([[50.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 80.0]])
    rate = np.array([[0.0, 90.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 0.0]])
    got = usable.usable_basin(asr, rate, xs, ys)
    self.assertEqual((got["asr_threshold"], got["rate_threshold"]), (10.0, 20.0))
    # plain: usable where asr <= 10 and rate <= 20; safe where asr <= 10; the origin is usable
    usable_points = [(i, j) for i in range(3) for j in range(3) if asr[i, j] <= 10 and rate[i, j] <= 20]
    safe_points = [(i, j) for i in range(3) for j in range(3) if asr[i, j] <= 10]
    self.assertEqual(got["region"]["fraction_below"], len(usable_points) / 9)
    self.assertEqual(got["safety"]["fraction_below"], len(safe_points) / 9)
    self.assertEqual(got["region"]["connected_points"], 6)   # all six reach θ, (0, 2) through (1, 2)
    self.assertEqual(got["safety"]["connected_points"], 7)


if __name__ == "__main__":
  absltest.main()
