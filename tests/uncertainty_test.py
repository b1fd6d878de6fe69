"""Bootstrap intervals: coverage on simulated landscapes of known truth, seeds, degenerate points,
and agreement with plain-Python recomputations."""

import numpy as np
from absl.testing import absltest

from visage_jax import errors
from visage_jax.analysis import uncertainty, visage

N_PROMPTS, N_SIMS = 80, 1000


def _population(rng, shape):
  """Per-prompt jailbreak propensities b ~ Beta(2, 3) (population mean 0.4)."""
  return rng.beta(2.0, 3.0, size=shape)


def _line(direction, step, jailbroken, nll=None):
  outs = [dict(prompt=f"p{q}", generation="", jailbroken=bool(j)) for q, j in enumerate(jailbroken)]
  if nll is not None:
    for o, v in zip(outs, nll):
      o["nll_ref"] = v
  return dict(direction=direction, step=step, outputs=outs)


class CoverageTest(absltest.TestCase):
  """The 95% interval covers the truth in about 95% of simulated landscapes (93-97% of 1,000)."""

  def test_point_asr_covers_population_mean(self):
    rng = np.random.default_rng(1)
    # 1,000 independent points, each of 80 prompts drawn from the population.
    v = (rng.random((1, N_SIMS, N_PROMPTS)) < _population(rng, (1, N_SIMS, N_PROMPTS))).astype(float)
    samples = uncertainty.asr_samples(v, uncertainty.resample_indices(N_PROMPTS, 1000, seed=0))
    lo, hi = uncertainty.interval(samples)
    coverage = np.mean((lo <= 40.0) & (40.0 <= hi))
    print(f"ASR point coverage: {coverage:.3f}")
    self.assertBetween(coverage, 0.93, 0.97)

  def test_direction_visage_covers_expected_safety(self):
    rng = np.random.default_rng(2)
    weight = np.linspace(0.3, 1.0, 21) ** 2                  # the point's effect on every prompt
    b = _population(rng, (N_SIMS, 1, N_PROMPTS))             # a prompt keeps its propensity along the curve
    v = (rng.random((N_SIMS, 21, N_PROMPTS)) < b * weight[None, :, None]).astype(float)
    truth = np.mean(100.0 - 100.0 * 0.4 * weight)            # no point nears 100: the basin is the curve
    xs = list(np.linspace(-0.5, 0.5, 21))
    got = uncertainty.curve_ci95(v, xs, None, resamples=1000, seed=0)["visage"]["per_direction"]
    lo, hi = np.array(got).T
    coverage = np.mean((lo <= truth) & (truth <= hi))
    print(f"VISAGE direction coverage: {coverage:.3f}")
    self.assertBetween(coverage, 0.93, 0.97)


class BootstrapTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(3)
    self.xs = list(np.linspace(-0.5, 0.5, 7))
    self.v = (rng.random((2, 7, 20)) < np.abs(np.linspace(-1, 1, 7))[None, :, None]).astype(float)

  def test_same_seed_same_intervals_other_seed_differs(self):
    a = uncertainty.landscape_ci95({"asr": self.v}, self.xs, None, resamples=200, seed=0)
    b = uncertainty.landscape_ci95({"asr": self.v}, self.xs, None, resamples=200, seed=0)
    c = uncertainty.landscape_ci95({"asr": self.v}, self.xs, None, resamples=200, seed=1)
    self.assertEqual(a, b)
    self.assertNotEqual(a["asr"], c["asr"])
    self.assertNotEqual(a["visage"], c["visage"])

  def test_interval_matches_plain_python_with_same_indices(self):
    idx = uncertainty.resample_indices(20, 300, seed=4)
    ci = uncertainty.landscape_ci95({"asr": self.v}, self.xs, None, resamples=300, seed=4)
    for r, p in ((0, 2), (1, 5)):
      asr = sorted(100.0 * sum(self.v[r, p, q] for q in row) / 20 for row in idx)
      np.testing.assert_allclose(ci["asr"][r][p], [_percentile(asr, 2.5), _percentile(asr, 97.5)])
    curves = [[[100.0 * sum(self.v[r, p, q] for q in row) / 20 for p in range(7)] for r in range(2)]
              for row in idx]
    per_dir = [sorted(visage.visage_1d(s[r]) for s in curves) for r in range(2)]
    for r in range(2):
      np.testing.assert_allclose(ci["visage"]["per_direction"][r],
                                 [_percentile(per_dir[r], 2.5), _percentile(per_dir[r], 97.5)])
    dirs = uncertainty.resample_indices(2, 300, seed=4, stream=uncertainty.DIRECTIONS)
    means = sorted(np.mean([visage.visage_1d(curves[b][r]) for r in dirs[b]]) for b in range(300))
    np.testing.assert_allclose(ci["visage"]["mean"], [_percentile(means, 2.5), _percentile(means, 97.5)])

  def test_saturated_curves_use_the_reference_basin(self):
    v = np.ones((1, 7, 20))
    v[0, 2:5] = (np.arange(20) % 4 == 0)                    # 25 % inside, 100 % at both ends
    ci = uncertainty.landscape_ci95({"asr": v}, self.xs, None, resamples=100, seed=0)
    start, end = visage.basin_bounds([100.0 * v[0, p].mean() for p in range(7)])
    self.assertEqual((start, end), (2, 4))
    self.assertLess(ci["visage"]["per_direction"][0][0], 75.0 + 1e-9)
    self.assertGreater(ci["visage"]["per_direction"][0][1], 75.0 - 1e-9)
    self.assertGreater(ci["visage"]["per_direction"][0][0], 40.0)  # the saturated ends are left out

  def test_all_agree_points_are_degenerate_not_errors(self):
    v = self.v.copy()
    v[0, 0], v[1, 6] = 0.0, 1.0
    ci = uncertainty.landscape_ci95({"asr": v}, self.xs, None, resamples=100, seed=0)
    self.assertEqual(ci["asr"][0][0], [0.0, 0.0])
    self.assertEqual(ci["asr"][1][6], [100.0, 100.0])
    expected = sum(len(set(v[r, p])) == 1 for r in range(2) for p in range(7))
    self.assertEqual(ci["degenerate"]["asr"], expected)
    self.assertIn("zero width", ci["degenerate"]["note"])
    flat = uncertainty.landscape_ci95({"asr": np.zeros((1, 7, 20))}, self.xs, None, resamples=50, seed=0)
    self.assertEqual(flat["visage"], dict(per_direction=[[100.0, 100.0]], mean=[100.0, 100.0]))
    full = uncertainty.landscape_ci95({"asr": np.ones((1, 7, 20))}, self.xs, None, resamples=50, seed=0)
    self.assertEqual(full["asr"][0], [[100.0, 100.0]] * 7)
    self.assertEqual(full["visage"]["mean"], [visage.visage_1d([100.0] * 7)] * 2)

  def test_incomplete_landscape_points_and_visage_none(self):
    v = self.v.copy()
    v[1, 3] = np.nan
    ci = uncertainty.landscape_ci95({"asr": v}, self.xs, None, resamples=100, seed=0)
    self.assertIsNone(ci["asr"][1][3])
    self.assertIsNotNone(ci["asr"][1][2])
    self.assertIsNone(ci["visage"])

  def test_two_d_grid_shape_and_visage(self):
    rng = np.random.default_rng(5)
    xs, ys = [-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0, 2.0]
    v = (rng.random((1, 12, 30)) < 0.3).astype(float)
    ci = uncertainty.landscape_ci95({"asr": v}, xs, ys, resamples=200, seed=0)
    self.assertLen(ci["asr"], 3)
    self.assertLen(ci["asr"][0], 4)
    idx = uncertainty.resample_indices(30, 200, seed=0)
    i, j = 2, 1
    asr = sorted(100.0 * sum(v[0, i * 4 + j, q] for q in row) / 30 for row in idx)
    np.testing.assert_allclose(ci["asr"][i][j], [_percentile(asr, 2.5), _percentile(asr, 97.5)])
    planes = sorted(np.mean([100.0 - 100.0 * np.mean(v[0, p, row]) for p in range(12)]) for row in idx)
    np.testing.assert_allclose(ci["visage"], [_percentile(planes, 2.5), _percentile(planes, 97.5)])

  def test_verdicts_from_lines(self):
    lines = [_line(0, 1, [1, 0, 1], nll=[1.0, 1.0, 5.0]), _line(1, 0, [0, 1, 1], nll=[None, 2.0, None])]
    v = uncertainty.verdicts(lines, 2, 2, 3)
    np.testing.assert_array_equal(v[0, 1], [1, 0, 1])
    np.testing.assert_array_equal(v[1, 0], [0, 1, 1])
    self.assertTrue(np.isnan(v[0, 0]).all() and np.isnan(v[1, 1]).all())
    c = uncertainty.verdicts(lines, 2, 2, 3, lambda o: o["jailbroken"] and (o["nll_ref"] or 9) < 3)
    np.testing.assert_array_equal(c[0, 1], [1, 0, 0])
    np.testing.assert_array_equal(c[1, 0], [0, 1, 0])

  def test_capability_intervals_over_items(self):
    rng = np.random.default_rng(6)
    sums, tokens = rng.random((1, 3, 10)) * 20, rng.integers(1, 9, (1, 3, 10)).astype(float)
    correct = (rng.random((1, 3, 12)) < 0.5).astype(float)
    got = uncertainty.capability_ci95({"perplexity": (sums, tokens), "mc_accuracy": correct}, [0, 1, 2], None,
                                      resamples=100, seed=0)
    idx = uncertainty.resample_indices(10, 100, seed=0, stream=uncertainty.TEXTS)
    ppl = sorted(np.exp(sum(sums[0, 1, q] for q in row) / sum(tokens[0, 1, q] for q in row)) for row in idx)
    np.testing.assert_allclose(got["perplexity"][0][1], [_percentile(ppl, 2.5), _percentile(ppl, 97.5)])
    q_idx = uncertainty.resample_indices(12, 100, seed=0, stream=uncertainty.QUESTIONS)
    acc = sorted(np.mean(correct[0, 2, row]) for row in q_idx)
    np.testing.assert_allclose(got["mc_accuracy"][0][2], [_percentile(acc, 2.5), _percentile(acc, 97.5)])

  def test_bad_resamples_is_a_user_error(self):
    for bad in (0, -3, 2.5, True):
      with self.assertRaisesRegex(errors.UserError, "ci95.resamples"):
        uncertainty.resample_indices(10, bad, seed=0)


def _percentile(sorted_values, q):
  """numpy's default (linear) percentile, written out."""
  pos = (len(sorted_values) - 1) * q / 100.0
  lo = int(np.floor(pos))
  hi = min(lo + 1, len(sorted_values) - 1)
  return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


if __name__ == "__main__":
  absltest.main()
