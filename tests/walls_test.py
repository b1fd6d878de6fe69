"""`visage-jax walls`: walls.md's numbers against a plain-Python recount from the ASR tables, the
figure rendered, and bad runs refused in one line before anything is written."""

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
from absl.testing import absltest

import fixtures
from matplotlib import image as mpl_image
from scipy import stats

from visage_jax import cli, errors, result
from visage_jax.analysis import census

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = [round(v, 4) for v in np.linspace(-0.5, 0.5, 11)]
X_INTERP = [round(v, 4) for v in np.linspace(-0.5, 1.5, 9)]


def _write(root: str, name: str, d: dict) -> str:
  path = os.path.join(root, name)
  os.makedirs(path, exist_ok=True)
  result.Result.from_json(d).write(path)
  return path


def _census_asr(seed: int, n: int) -> np.ndarray:
  """ASR of 16 prompts growing away from the origin at different rates, so walls differ."""
  rng = np.random.default_rng(seed)
  dist = np.abs(np.asarray(X))
  asr = np.clip(rng.uniform(50, 900, (n, 1)) * dist ** 2 + rng.uniform(0, 12, (n, len(X))), 0, 100)
  asr[rng.integers(n)] = 5.0        # one direction never breaks on this grid
  asr[:, X.index(0.0)] = 5.0        # every direction starts from the same model
  return np.round(asr / 6.25) * 6.25


def _recount(curves, coords, tolerance=10.0, max_asr=None):
  """The census from its definition, in plain Python."""
  origin = min(range(len(coords)), key=lambda i: abs(coords[i]))
  limit = max_asr if max_asr is not None else sum(c[origin] for c in curves) / len(curves) + tolerance
  dist = [abs(c - coords[origin]) for c in coords]
  rs = sorted({d for d in dist if d > 0})
  n = len(curves)
  safe = [sum(all(a <= limit for a, d in zip(c, dist) if d <= r) for c in curves) for r in rs]
  walls = [min((d for a, d in zip(c, dist) if a > limit), default=math.inf) for c in curves]
  ordered = sorted(walls)
  quantiles = [ordered[max(math.ceil(q * n), 1) - 1] for q in (0.0, 0.1, 0.5, 0.9, 1.0)]  # inverted CDF
  return limit, rs, safe, quantiles


def _sides(curve, coords, limit):
  """(left, right): the first alpha over `limit` walking out from the origin, in plain Python."""
  o = min(range(len(coords)), key=lambda i: abs(coords[i]))
  left = next((coords[i] for i in reversed(range(o)) if curve[i] > limit), None)
  right = next((coords[i] for i in range(o + 1, len(coords)) if curve[i] > limit), None)
  return left, right


def _section(md: str, name: str) -> str:
  return md.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]


def _rows(text: str) -> list[list[str]]:
  """The cells of every table row under a header, separator lines left out."""
  return [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines()
          if line.startswith("| ") and not line.startswith("|---")]


def _value(cell: str) -> float:
  return math.inf if cell == "none on grid" else float(cell)


class WallsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = os.path.join(absltest.get_default_test_tmpdir(), "walls_runs")
    cls.asr = _census_asr(0, 24)
    cls.coherent = np.clip(cls.asr - 20, 0, 100)
    cls.judge = _census_asr(1, 24)
    cls.census_run = _write(cls.root, "census24", dict(
        vis_type="1D_random", coords_x=X, coords_y=None, asr=cls.asr.tolist(), asr_coherent=cls.coherent.tolist(),
        judges={"guard": dict(model="g", asr=cls.judge.tolist(), complete=True)}, complete=True,
        config={"census": {"tolerance": 5.0}}))
    x = np.asarray(X_INTERP)
    cls.interp = [np.clip(300 * np.abs(x) ** 2 - 10, 0, 100).round(2).tolist()]
    cls.interp_run = _write(cls.root, "alignment", dict(
        vis_type="1D_interpolation", coords_x=X_INTERP, coords_y=None, asr=cls.interp, complete=True))
    one_sided = [0.0 if v <= 0 else min(100.0, 1000 * v * v) for v in X]
    cls.single = [one_sided]
    cls.single_run = _write(cls.root, "gradient", dict(
        vis_type="1D_random", coords_x=X, coords_y=None, asr=cls.single, asr_coherent=[[0.0] * len(X)],
        complete=True, config={"census": {"max_asr": 30.0}}))
    cls.out = os.path.join(cls.root, "out")
    cls.printed = cls.walls([cls.census_run, cls.interp_run, cls.single_run], cls.out)
    with open(os.path.join(cls.out, "walls.md")) as f:
      cls.md = f.read()

  @staticmethod
  def walls(runs, out):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), fixtures.cli_flag("out", out):
      cli.cmd_walls(runs)
    return buf.getvalue()

  def test_census_table_is_a_recount(self):
    text = _section(self.md, "census24")
    self.assertIn("census of 24 random directions", text)
    for name, curves in (("asr", self.asr), ("asr_coherent", self.coherent), ("judge:guard", self.judge)):
      limit, rs, safe, quantiles = _recount(curves.tolist(), X, tolerance=5.0)   # the run's census.tolerance
      block = text.split(f"(`{name}`): threshold ", 1)[1].split("\n### ", 1)[0]
      self.assertAlmostEqual(float(block.split(" ", 1)[0]), limit, places=2)
      table, quantile_table = block.split("Walls (radius", 1)
      rows = _rows(table)[1:]
      self.assertEqual([float(r[0]) for r in rows], rs)
      self.assertEqual([r[1] for r in rows], [f"{k} / 24" for k in safe])
      for r, k in zip(rows, safe):
        self.assertAlmostEqual(float(r[2]), k / 24, places=4)
        ci = stats.binomtest(k, 24).proportion_ci(method="exact")
        lo, hi = map(float, r[3].strip("[]").split(", "))
        self.assertAlmostEqual(lo, ci.low, places=4)
        self.assertAlmostEqual(hi, ci.high, places=4)
      header, values = _rows(quantile_table)
      self.assertEqual(header, ["min", "q10", "median", "q90", "max"])
      self.assertEqual([_value(v) for v in values], quantiles)
    self.assertIn("none on grid", text)   # the direction that never breaks: max beyond the grid

  def test_structured_walls_are_the_first_point_over_the_threshold(self):
    for name, curve, coords, limit in (
        ("alignment", self.interp[0], X_INTERP, self.interp[0][X_INTERP.index(0.0)] + 10),   # default tolerance
        ("gradient", self.single[0], X, 30.0)):                                            # census.max_asr
      rows = _rows(_section(self.md, name))[1:]
      asr_row = next(r for r in rows if "(`asr`)" in r[0])
      self.assertAlmostEqual(float(asr_row[1]), limit, places=2)
      left, right = _sides(curve, coords, limit)
      self.assertEqual([None if c == "none on grid" else float(c) for c in asr_row[3:]], [left, right])
    self.assertEqual(_sides(self.single[0], X, 30.0)[0], None)   # the fixture has a side without a wall
    gradient = _rows(_section(self.md, "gradient"))[1:]
    self.assertEqual([r[0] for r in gradient], ["keyword ASR (`asr`)", "coherent ASR (`asr_coherent`)"])
    self.assertEqual(gradient[1][3:], ["none on grid", "none on grid"])

  def test_the_usable_basin_is_marked_where_over_refusal_was_measured(self):
    """A refusal run whose over-refusal rises on the left: the usable basin's walls are the first
    point, walking out from the origin, over either threshold; a census gets its safe fraction."""
    x = np.asarray(X)
    asr = [np.clip(400 * np.abs(x) ** 2, 0, 100).round(2).tolist()]
    rate = [np.clip(20 - 200 * x, 0, 100).round(2).tolist()]
    run = _write(self.root, "refusal_or", dict(
        vis_type="1D_random", coords_x=X, coords_y=None, asr=asr, complete=True,
        overrefusal=dict(rate=rate, ci95=None, judge="prefix", n_prompts=16, prompts_path="xstest"),
        config={"overrefusal": {"tolerance": 5.0}}))
    rates = np.clip(20 + np.random.default_rng(3).uniform(-60, 60, (24, 1)) * x, 0, 100)
    census_run = _write(self.root, "census_or", dict(
        vis_type="1D_random", coords_x=X, coords_y=None, asr=self.asr.tolist(), complete=True,
        overrefusal=dict(rate=rates.tolist(), ci95=None, judge="prefix", n_prompts=16, prompts_path="xstest")))
    out = os.path.join(self.root, "out_or")
    self.walls([run, census_run], out)
    with open(os.path.join(out, "walls.md")) as f:
      md = f.read()
    origin = X.index(0.0)
    asr_limit, rate_limit = asr[0][origin] + 10.0, rate[0][origin] + 5.0
    bad = [float(a > asr_limit or r > rate_limit) for a, r in zip(asr[0], rate[0])]
    rows = _rows(_section(md, "refusal_or"))[1:]
    usable_row = next(r for r in rows if "(`usable`)" in r[0])
    self.assertAlmostEqual(float(usable_row[1]), asr_limit, places=2)
    want = _sides(bad, X, 0.5)
    self.assertEqual([None if c == "none on grid" else float(c) for c in usable_row[3:]], list(want))
    self.assertNotEqual(want, _sides(asr[0], X, asr_limit))   # over-refusal narrows it here
    self.assertIn(f"over-refusal is at most {rate_limit:.2f} %", _section(md, "refusal_or"))
    text = _section(md, "census_or")
    rate_limit = float(np.mean(rates[:, origin])) + 10.0
    usable = np.where(rates > rate_limit, 1000.0, self.asr).tolist()
    limit, rs, safe, _ = _recount(usable, X, max_asr=float(np.mean(self.asr[:, origin])) + 10.0)
    block = text.split("(`usable`): threshold ", 1)[1].split("\n### ", 1)[0]
    self.assertEqual([r[1] for r in _rows(block.split("Walls (radius", 1)[0])[1:]], [f"{k} / 24" for k in safe])
    self.assertNotEqual(safe, _recount(self.asr.tolist(), X)[2])   # over-refusal breaks some directions sooner

  def test_a_saved_census_section_is_used_as_it_is(self):
    d = result.load_run(self.census_run).to_json()
    saved = census.census(self.asr, X, max_asr=50.0)
    d["census"] = {"asr": saved}
    run = _write(self.create_tempdir().full_path, "saved", d)
    out = self.create_tempdir().full_path
    self.walls([run], out)
    with open(os.path.join(out, "walls.md")) as f:
      text = _section(f.read(), "saved")
    self.assertIn("(`asr`): threshold 50.00 %", text)        # the section's, not origin + tolerance
    self.assertIn("(`asr_coherent`): threshold ", text)       # measures it lacks are computed
    rows = _rows(text.split("(`asr`)", 1)[1].split("Walls (radius", 1)[0])[1:]
    self.assertEqual([int(r[1].split(" / ")[0]) for r in rows], saved["safe_count"])

  def test_a_measure_not_judged_everywhere_is_left_out(self):
    judge = [list(self.single[0][:-1]) + [None]]
    run = _write(self.create_tempdir().full_path, "judging", dict(
        vis_type="1D_random", coords_x=X, coords_y=None, asr=self.single, complete=True,
        judges={"guard": dict(model="g", asr=judge, complete=False)}))
    out = self.create_tempdir().full_path
    self.walls([run], out)
    with open(os.path.join(out, "walls.md")) as f:
      text = _section(f.read(), "judging")
    self.assertIn("Left out (not every point evaluated yet): judge:guard.", text)
    self.assertEqual([r[0] for r in _rows(text)[1:]], ["keyword ASR (`asr`)"])

  def test_figure_is_written_and_not_blank(self):
    self.assertEqual(json.loads(self.printed)["written"],
                     [os.path.join(self.out, "walls.png"), os.path.join(self.out, "walls.md")])
    self.assertEqual(sorted(os.listdir(self.out)), ["walls.md", "walls.png"])   # no temp files left
    img = mpl_image.imread(os.path.join(self.out, "walls.png"))
    self.assertGreater(img.shape[1], 1500)      # three measures side by side
    self.assertGreater(img.std(), 0.05)
    for runs in ([self.census_run], [self.interp_run, self.single_run]):   # census only, structured only
      out = self.create_tempdir().full_path
      self.walls(runs, out)
      self.assertGreater(mpl_image.imread(os.path.join(out, "walls.png")).std(), 0.05)

  def test_bad_runs_are_one_line_errors_and_write_nothing(self):
    root = self.create_tempdir().full_path
    plane = _write(root, "plane", dict(vis_type="2D_random", coords_x=[-0.5, 0.0, 0.5], coords_y=[-0.5, 0.0, 0.5],
                                       asr=[[100.0, 90.0, 80.0], [70.0, 25.0, 60.0], [50.0, 40.0, 30.0]]))
    partial = _write(root, "partial", dict(vis_type="1D_random", coords_x=X, coords_y=None,
                                           asr=[[0.0] * 10 + [None]]))
    bad_section = result.load_run(self.census_run).to_json()
    bad_section["census"] = {"asr": {"threshold": 10.0}}
    bad_section = _write(root, "bad_section", bad_section)
    bad_config = _write(root, "bad_config", dict(vis_type="1D_random", coords_x=X, coords_y=None, asr=self.single,
                                                 config={"census": {"tolerance": "ten"}}))
    empty = os.path.join(root, "empty")
    os.makedirs(empty)
    out = os.path.join(root, "out")
    for runs, error, message in (
        ([self.census_run, plane], errors.UserError, f"{plane}: a 2D run (2D_random); walls reads 1D runs"),
        ([os.path.join(root, "none")], errors.MissingFileError, f"{root}/none: no such run directory"),
        ([empty], errors.MissingFileError, f"{empty}/landscape.json: missing"),
        ([partial], errors.UserError, f"{partial}: ASR not evaluated at 1 of 11 points yet"),
        ([bad_section], errors.UserError,
         f"{bad_section}/landscape.json: field 'census.asr' lacks n_directions, radii"),
        ([bad_config], errors.UserError,
         f"{bad_config}/landscape.json: config field 'census.tolerance' must be a number, got 'ten'"),
        ([], errors.UserError, "walls needs at least one run directory and --out=DIR")):
      with self.subTest(message), self.assertRaisesRegex(error, "^" + re.escape(message)) as e:
        self.walls(runs, out)
      self.assertNotIn("\n", str(e.exception))
      self.assertFalse(os.path.exists(out))
    with self.assertRaisesRegex(errors.UserError, "--out=DIR"):
      self.walls([self.census_run], "")

  def test_command_line_exits_2_with_one_line(self):
    out = self.create_tempdir().full_path
    plane = _write(out, "plane", dict(vis_type="2D_random", coords_x=[0.0, 0.5], coords_y=[0.0, 0.5],
                                      asr=[[0.0, 10.0], [20.0, 30.0]]))
    env = {k: v for k, v in os.environ.items() if k != "VISAGE_JAX_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "visage_jax.cli", "walls", self.interp_run, plane,
                           f"--out={out}/walls"], capture_output=True, text=True, cwd=ROOT,
                          env=dict(env, JAX_PLATFORMS="cpu"), timeout=300)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertEqual(proc.stderr.strip().splitlines(), [f"visage-jax: error: {plane}: a 2D run (2D_random); walls "
                                                        "reads 1D runs (a census of 1D_random directions, or one "
                                                        "direction: interpolation, gradient, refusal)."])
    self.assertFalse(os.path.exists(f"{out}/walls"))


if __name__ == "__main__":
  absltest.main()
