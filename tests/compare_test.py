"""Comparing two runs: the VISAGE difference against plain recomputations, pairing and its reasons,
intervals and p-values of clear and null differences, and the `compare` command."""

import json
import os

import numpy as np
from absl.testing import absltest

import fixtures
import visage_jax
from visage_jax import errors, rundir
from visage_jax.analysis import compare, uncertainty, visage
from visage_jax.runs import landscape

XS = [-0.5, -0.25, 0.0, 0.25, 0.5]


def write_run(path, v, xs=XS, ys=None, goals=None, complete=True, **landscape_fields):
  """A run directory as `landscape` leaves it, from verdicts v [D, P, N] (bool): generations.jsonl,
  landscape.json (ASR and VISAGE from v) and run_config.json."""
  v = np.asarray(v, bool)
  n_dirs, n_points, n = v.shape
  goals = goals or [f"goal {q}" for q in range(n)]
  c = landscape.default_config()
  c.landscape.update(vis_type="2D_random" if ys else "1D_random", num_directions=n_dirs, **landscape_fields)
  cfg = rundir.jsonable(c.to_dict())
  lines = [dict(direction=r, step=p, coords=[0.0], asr=100.0 * v[r, p].mean(), nonfinite=False,
                outputs=[dict(prompt=goals[q], generation="", jailbroken=bool(v[r, p, q]), tokens=1,
                              truncated=False) for q in range(n)])
           for r in range(n_dirs) for p in range(n_points)]
  asr = (100.0 * v.mean(axis=2)).tolist()
  if ys:
    asr = np.reshape(asr[0], (len(xs), len(ys))).tolist()
  result = dict(vis_type=cfg["landscape"]["vis_type"], coords_x=list(xs), coords_y=ys, asr=asr,
                visage=visage.visage_2d(asr) if ys else visage.visage_directions(asr), n_prompts=n,
                complete=complete, config=cfg)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "generations.jsonl"), "w") as f:
    f.write("".join(json.dumps(l) + "\n" for l in lines))
  for name, obj in (("landscape.json", result), ("run_config.json", cfg)):
    with open(os.path.join(path, name), "w") as f:
      json.dump(obj, f)
  return path


def run_cli(*args):
  return fixtures.cli("compare", *args, env=dict(VISAGE_JAX_DEBUG=""))


def reference_bootstrap(a, b, resamples, seed):
  """Plain loops: the paired bootstrap of mean-over-directions VISAGE (mean safety over the curve;
  no point saturates in these runs) with the draws of the run's own ci95 (uncertainty streams)."""
  n_dirs, _, n = a.shape
  prompts = uncertainty.resample_indices(n, resamples, seed, stream=uncertainty.PROMPTS)
  dirs = uncertainty.resample_indices(n_dirs, resamples, seed, stream=uncertainty.DIRECTIONS)
  d = []
  for q, r in zip(prompts, dirs):
    score = lambda v: np.mean([np.mean(100.0 - 100.0 * v[k][:, q].mean(axis=1)) for k in r])
    d.append(score(a) - score(b))
  d = np.array(d)
  p = min(1.0, 2.0 * min(1 + np.sum(d <= 0), 1 + np.sum(d >= 0)) / (resamples + 1))
  return np.percentile(d, [2.5, 97.5]), p


class CompareTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path
    rng = np.random.default_rng(0)
    self.a = rng.random((2, 5, 16)) < 0.1    # ASR far below 100: every curve is its own basin
    self.b = rng.random((2, 5, 16)) < 0.25

  def run_dir(self, name, v, **kw):
    return write_run(os.path.join(self.dir, name), v, **kw)

  def test_difference_and_interval_match_plain_recomputation(self):
    got = compare.compare(self.run_dir("a", self.a), self.run_dir("b", self.b), resamples=300, seed=4)
    safety = lambda v: np.mean(100.0 - 100.0 * v.mean(axis=2))
    self.assertAlmostEqual(got["visage_a"], safety(self.a))
    self.assertAlmostEqual(got["visage_b"], safety(self.b))
    self.assertAlmostEqual(got["visage_difference"], safety(self.a) - safety(self.b))
    (lo, hi), p = reference_bootstrap(self.a, self.b, 300, 4)
    np.testing.assert_allclose(got["ci95"], [lo, hi])
    self.assertAlmostEqual(got["p_value"], p)
    self.assertTrue(got["paired"])
    self.assertIsNone(got["unpaired_reason"])
    point = got["asr_difference"][1][3]
    self.assertAlmostEqual(point["difference"], 100.0 * (self.a[1, 3].mean() - self.b[1, 3].mean()))
    self.assertLessEqual(point["ci95"][0], point["difference"])
    self.assertLessEqual(point["difference"], point["ci95"][1])

  def test_paired_interval_is_narrower_for_correlated_runs(self):
    rng = np.random.default_rng(1)
    hard = rng.random(40) < 0.5            # the prompt decides most of the verdict, in both runs
    a = rng.random((2, 5, 40)) < np.where(hard, 0.6, 0.05)
    b = a ^ (rng.random(a.shape) < 0.05)   # B: A with 5 % of its verdicts flipped
    ra, rb = self.run_dir("a", a), self.run_dir("b", b)
    paired = compare.compare(ra, rb, resamples=400)
    unpaired = compare.compare(ra, rb, resamples=400, paired=False)
    self.assertTrue(paired["paired"])
    self.assertFalse(unpaired["paired"])
    self.assertIn("paired=False", unpaired["unpaired_reason"])
    self.assertAlmostEqual(paired["visage_difference"], unpaired["visage_difference"])
    width = lambda r: r["ci95"][1] - r["ci95"][0]
    self.assertLess(width(paired), 0.5 * width(unpaired))

  def test_clear_difference_is_significant(self):
    safe = np.zeros((2, 5, 16), bool)
    broken = np.random.default_rng(2).random((2, 5, 16)) < 0.8
    broken[:, :, 0] = False                # never 100 % jailbroken: the basin is the whole curve
    got = compare.compare(self.run_dir("a", safe), self.run_dir("b", broken))
    self.assertLess(got["p_value"], 0.01)
    self.assertGreater(got["ci95"][0], 0.0)
    self.assertAlmostEqual(got["visage_difference"], 100.0 * broken.mean())
    for r in range(2):
      for p in range(5):
        self.assertLess(got["asr_difference"][r][p]["p_value"], 0.01)
        self.assertLess(got["asr_difference"][r][p]["ci95"][1], 0.0)
    back = compare.compare(self.run_dir("b2", broken), self.run_dir("a2", safe))
    self.assertAlmostEqual(back["visage_difference"], -got["visage_difference"])
    self.assertLess(back["ci95"][1], 0.0)

  def test_identical_runs_differ_by_nothing(self):
    got = compare.compare(self.run_dir("a", self.a), self.run_dir("a_again", self.a), resamples=200)
    self.assertEqual(got["visage_difference"], 0.0)
    self.assertEqual(got["ci95"], [0.0, 0.0])
    self.assertEqual(got["p_value"], 1.0)
    self.assertEqual({(e["difference"], e["p_value"]) for row in got["asr_difference"] for e in row},
                     {(0.0, 1.0)})
    apart = compare.compare(self.dir + "/a", self.dir + "/a_again", resamples=200, paired=False)
    self.assertLess(apart["ci95"][0], 0.0)     # independent draws of the same run: noise both ways
    self.assertGreater(apart["ci95"][1], 0.0)
    self.assertGreater(apart["p_value"], 0.05)

  def test_deterministic_for_a_seed(self):
    ra, rb = self.run_dir("a", self.a), self.run_dir("b", self.b)
    first = compare.compare(ra, rb, resamples=200, seed=7)
    self.assertEqual(compare.compare(ra, rb, resamples=200, seed=7), first)
    other = compare.compare(ra, rb, resamples=200, seed=8)
    self.assertNotEqual(other["ci95"], first["ci95"])
    self.assertEqual((other["resamples"], other["seed"]), (200, 8))

  def test_unpaired_runs_say_why(self):
    ra = self.run_dir("a", self.a)
    got = compare.compare(ra, self.run_dir("seed1", self.b, seed=1), resamples=100)
    self.assertFalse(got["paired"])
    self.assertEqual(got["unpaired_reason"], "directions differ: landscape.seed 0 vs 1")
    self.assertTrue(got["method"].startswith("independent"))
    goals = [f"goal {q}" for q in range(16)]
    goals[2] = "another goal"
    got = compare.compare(ra, self.run_dir("goals", self.b, goals=goals), resamples=100)
    self.assertEqual(got["unpaired_reason"], 'prompts differ: prompt 2 "goal 2" vs "another goal"')
    got = compare.compare(ra, self.run_dir("fewer", self.b[:, :, :10]), resamples=100)
    self.assertEqual(got["unpaired_reason"], "prompts differ: 16 vs 10 prompts")
    self.assertLen(got["asr_difference"], 2)   # same directions and grid: ASR compares point by point
    three = np.concatenate([self.b, self.b[:1]])
    got = compare.compare(ra, self.run_dir("three", three, norm="filter"), resamples=100)
    self.assertEqual(got["unpaired_reason"],
                     'directions differ: landscape.num_directions 2 vs 3, landscape.norm "layer" vs "filter"')
    self.assertIsNone(got["asr_difference"])
    with self.assertRaisesRegex(errors.UserError, "cannot pair .* landscape.seed 0 vs 1"):
      compare.compare(ra, self.dir + "/seed1", paired=True)

  def test_2d_plane_difference(self):
    ys = [-1.0, 0.0, 1.0]
    rng = np.random.default_rng(3)
    a, b = rng.random((1, 15, 16)) < 0.3, rng.random((1, 15, 16)) < 0.6
    got = compare.compare(self.run_dir("a", a, ys=ys), self.run_dir("b", b, ys=ys), resamples=200)
    self.assertAlmostEqual(got["visage_difference"], 100.0 * (b.mean() - a.mean()))
    self.assertEqual(np.shape(got["asr_difference"]), (5, 3))
    self.assertAlmostEqual(got["asr_difference"][4][1]["difference"],
                           100.0 * (a[0, 4 * 3 + 1].mean() - b[0, 4 * 3 + 1].mean()))
    self.assertEqual(got["method"], "paired percentile bootstrap over prompts")

  def test_runs_that_cannot_be_compared(self):
    ra = self.run_dir("a", self.a)
    cases = ((self.run_dir("2d", np.zeros((1, 6, 16)), xs=[-1.0, 1.0], ys=[-1.0, 0.0, 1.0]),
              "vis_type 1D_random vs 2D_random"),
             (self.run_dir("grid", self.a, xs=[-1.0, -0.5, 0.0, 0.5, 1.0]),
              "grid coords_x differs (5 points -0.5..0.5 vs 5 points -1..1)"),
             (self.run_dir("partial", self.a, complete=False), "incomplete"),
             (os.path.join(self.dir, "nothing"), "nothing/landscape.json: missing"))
    for other, message in cases:
      with self.assertRaisesRegex(errors.UserError, message.replace("(", r"\(").replace(")", r"\)")):
        compare.compare(ra, other)
    with open(os.path.join(ra, "generations.jsonl")) as f:
      kept = f.readlines()[:-1]
    with open(os.path.join(self.run_dir("torn", self.a), "generations.jsonl"), "w") as f:
      f.writelines(kept)
    with self.assertRaisesRegex(errors.UserError, "torn/generations.jsonl: no line for direction 1 step 4"):
      compare.compare(ra, self.dir + "/torn")
    with self.assertRaisesRegex(errors.UserError, "resamples: expected an integer >= 1, got 0"):
      compare.compare(ra, ra, resamples=0)
    with self.assertRaisesRegex(errors.UserError, "seed: expected an integer >= 0, got -1"):
      compare.compare(ra, ra, seed=-1)


class CompareCommandTest(absltest.TestCase):

  def assertOneLineError(self, proc, *needles):
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    self.assertLen(lines, 1, proc.stderr[-2000:])
    self.assertTrue(lines[0].startswith("visage-jax: error: "), lines[0])
    for n in needles:
      self.assertIn(n, lines[0])

  def test_real_runs_table_and_json(self):
    """Two tiny real landscapes (two models, the same prompts and directions) compared by the CLI."""
    d = self.create_tempdir().full_path
    runs, tokenizer = [], fixtures.toy_tokenizer("bpe", refusals=True)
    for seed in (5, 6):
      model = os.path.join(d, f"model{seed}")
      fixtures.save_tiny_hf(model, "llama", tokenizer=tokenizer, seed=seed, boost_refusals=True)
      c = landscape.default_config()
      c.model.path = model
      c.prompts.update(path=fixtures.advbench_path(), limit=4)
      c.landscape.update(steps=2, multiplier=2.0)
      c.decode.max_new_tokens = 6
      c.ci95.update(resamples=300, seed=2)
      runs.append(os.path.join(d, f"run{seed}"))
      landscape.run(c, runs[-1], progress=False)
    out = os.path.join(d, "cmp", "compare.json")
    proc = run_cli(*runs, f"--out={out}", "--resamples=300", "--seed=2")
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    with open(out) as f:
      got = json.load(f)
    for key in ("visage_a", "visage_b", "visage_difference", "ci95", "p_value", "paired", "unpaired_reason",
                "asr_difference", "resamples", "seed", "method", "run_a", "run_b"):
      self.assertIn(key, got)
    self.assertEqual(got, compare.compare(*runs, resamples=300, seed=2))
    results = [visage_jax.load_run(r) for r in runs]
    self.assertAlmostEqual(got["visage_difference"], results[0].visage - results[1].visage)
    for key, result in (("visage_a_ci95", results[0]), ("visage_b_ci95", results[1])):
      np.testing.assert_allclose(got[key], result.visage_ci95)   # the same draws as the run's own
    self.assertTrue(got["paired"])
    self.assertIn(f"{got['visage_difference']:+8.2f}  [{got['ci95'][0]:.2f}, {got['ci95'][1]:.2f}]", proc.stdout)
    self.assertIn("paired: same prompts and directions", proc.stdout)
    proc = run_cli(*runs, "--nopaired", "--resamples=50")
    self.assertIn("unpaired: independent resamples asked for", proc.stdout)

  def test_bad_input_is_one_line(self):
    d = self.create_tempdir().full_path
    v = np.zeros((1, 5, 4), bool)
    a, b = write_run(os.path.join(d, "a"), v), write_run(os.path.join(d, "b"), v, seed=3)
    out = os.path.join(d, "out.json")
    self.assertOneLineError(run_cli(a, b, "--paired", f"--out={out}"), "cannot pair", "landscape.seed 0 vs 3")
    self.assertFalse(os.path.exists(out))
    self.assertOneLineError(run_cli(a), "compare needs two run directories")
    self.assertOneLineError(run_cli(a, os.path.join(d, "none")), "none/landscape.json: missing")
    proc = run_cli(a, b, f"--out={out}")
    self.assertEqual(proc.returncode, 0, proc.stderr)
    self.assertFalse(rundir.read_json(out)["paired"])
    self.assertIn("unpaired: directions differ: landscape.seed 0 vs 3", proc.stdout)


if __name__ == "__main__":
  absltest.main()
