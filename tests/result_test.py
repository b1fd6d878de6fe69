"""The record of a run (result.py): old files round-trip byte for byte plus `schema`, malformed fields
fail in one line naming the file and the field, and the notebook API (README's example included)
reads what the files hold."""

import contextlib
import copy
import io
import json
import os
import re
import shutil
import tempfile

import numpy as np
from absl.testing import absltest, parameterized

import fixtures
import visage_jax
from visage_jax import errors, result
from visage_jax.analysis import visage
from visage_jax.runs import landscape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(model_dir: str, vis_type: str):
  """Seconds: 4 prompts, 3 points per axis, 8 tokens; 1D with two directions and coherence."""
  c = landscape.default_config()
  c.model.path = model_dir
  c.prompts.update(path=fixtures.advbench_path(), limit=4)
  c.landscape.update(vis_type=vis_type, steps=2, multiplier=2.0, num_directions=1 if vis_type[0] == "2" else 2)
  c.decode.max_new_tokens = 8
  c.engine.max_batch = 4
  c.coherence.enabled = vis_type[0] == "1"
  return c


def _read(path: str):
  with open(path) as f:
    return f.read()


def _old_format(run_dir: str, to: str) -> dict:
  """A copy of the run as written before `schema` existed: landscape.json without it."""
  shutil.copytree(run_dir, to)
  d = json.loads(_read(os.path.join(run_dir, "landscape.json")))
  assert list(d)[0] == "schema", list(d)
  del d["schema"]
  with open(os.path.join(to, "landscape.json"), "w") as f:
    f.write(json.dumps(d, indent=1))
  return d


def readme_example() -> str:
  """The Python block of README.md that follows the marker comment."""
  text = _read(os.path.join(ROOT, "README.md"))
  return re.search(r"<!-- tested by tests/result_test.py -->\s*```python\n(.*?)```", text, re.S).group(1)


class ResultTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="result_test_")   # fresh: a left-over run would resume
    model = os.path.join(cls.root, "model")
    fixtures.save_refusal_model(model)
    cls.runs = {}
    for vis_type in ("1D_random", "2D_random"):
      cls.runs[vis_type] = os.path.join(cls.root, vis_type)
      cls.returned = visage_jax.run_landscape(_config(model, vis_type), cls.runs[vis_type], progress=False)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def copy(self, vis_type: str = "1D_random") -> str:
    return shutil.copytree(self.runs[vis_type], os.path.join(self.create_tempdir().full_path, "run"))

  @parameterized.parameters("1D_random", "2D_random")
  def test_a_run_written_before_schema_rewrites_to_the_same_file_plus_schema(self, vis_type):
    old_dir = os.path.join(self.create_tempdir().full_path, "old")
    old = _old_format(self.runs[vis_type], old_dir)
    record = visage_jax.load_run(old_dir)
    out = self.create_tempdir().full_path
    record.write(out)
    again = json.loads(_read(os.path.join(out, "landscape.json")))
    self.assertEqual(list(again), ["schema"] + list(old))   # key order, top level
    self.assertEqual(_read(os.path.join(out, "landscape.json")),
                     json.dumps({"schema": result.SCHEMA, **old}, indent=1))   # and every level below
    self.assertEqual(again.pop("schema"), 1)
    self.assertEqual(again, old)
    # what the run wrote is what its record says, and recomputing its basin changes nothing
    self.assertEqual(_read(os.path.join(self.runs[vis_type], "landscape.json")),
                     json.dumps(record.with_basin().to_json(), indent=1))

  def test_unknown_sections_survive(self):
    d = json.loads(_read(os.path.join(self.runs["1D_random"], "landscape.json")))
    d["census"] = {"anything": [1, {"nested": None}]}
    d["judges"] = {"guard": {"asr": [[0.0, 50.0, None]] * 2, "visage": None, "future": "kept"}}
    got = result.Result.from_json(copy.deepcopy(d)).to_json()
    self.assertEqual(got, d)
    self.assertEqual(list(got), list(d))

  def test_api_reads_what_the_files_hold(self):
    run = visage_jax.load_run(self.runs["1D_random"])
    d = json.loads(_read(os.path.join(self.runs["1D_random"], "landscape.json")))
    self.assertIsInstance(self.returned, result.Result)   # run_landscape returns the record
    self.assertEqual(run.vis_type, "1D_random")
    np.testing.assert_array_equal(run.coords_x, [-1.0, 0.0, 1.0])
    self.assertIsNone(run.coords_y)
    self.assertEqual((run.n_dirs, run.n_points), (2, 3))
    np.testing.assert_array_equal(run.asr, d["asr"])
    self.assertEqual(run.asr.shape, (2, 3))
    self.assertEqual(run.visage, d["visage"]["mean"])
    np.testing.assert_array_equal(run.visage_per_direction, d["visage"]["per_direction"])
    self.assertEqual(run.visage_ci95, tuple(d["ci95"]["visage"]["mean"]))
    np.testing.assert_array_equal(run.ci95["asr"], d["ci95"]["asr"])
    self.assertEqual(run.ci95["asr"].shape, (2, 3, 2))
    self.assertEqual(list(run.curves), ["asr", "asr_coherent"])
    np.testing.assert_array_equal(run.curves["asr_coherent"], d["asr_coherent"])
    self.assertEqual(run.visages["asr_coherent"].mean, d["visage_coherent"]["mean"])
    self.assertEqual(run.asr_at_zero, d["asr"][0][1])
    self.assertEqual(run.max_nll, 3.0)
    self.assertEqual(run.setting("decode.max_new_tokens"), 8)
    self.assertIsNone(run.setting("decode.nothing"))
    self.assertEqual(run.basin["asr"], [{k: e[k] for k in result.CROSSING} for e in d["basin"]])
    with open(os.path.join(self.runs["1D_random"], "generations.jsonl")) as f:
      lines = [json.loads(l) for l in f]
    want = [dict(direction=l["direction"], step=l["step"], coords=l["coords"], prompt_index=q, **o)
            for l in lines for q, o in enumerate(l["outputs"])]
    self.assertEqual(list(run.generations()), want)
    self.assertLen(want, 2 * 3 * 4)

  def test_2d_shapes(self):
    run = visage_jax.load_run(self.runs["2D_random"])
    d = json.loads(_read(os.path.join(self.runs["2D_random"], "landscape.json")))
    self.assertEqual((run.n_dirs, run.n_points), (1, 9))
    self.assertEqual(run.asr.shape, (3, 3))
    np.testing.assert_array_equal(run.asr, d["asr"])
    self.assertIsNone(run.visage_per_direction)
    self.assertEqual(run.visage, d["visage"])
    self.assertEqual(run.asr_at_zero, d["asr"][1][1])
    self.assertEqual(run.ci95["asr"].shape, (3, 3, 2))
    self.assertEqual(run.basin, {"asr": d["basin"]})
    np.testing.assert_array_equal(run.to_grid(np.arange(9)[None]), np.arange(9).reshape(3, 3))

  def test_every_measure_is_a_curve_nan_where_not_evaluated(self):
    d = json.loads(_read(os.path.join(self.runs["1D_random"], "landscape.json")))
    d["asr"][1][2] = None
    d["capability"] = dict(perplexity=[[2.0, 1.5, None], [3.0, 1.5, 4.0]])
    d["embed_norm"] = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]     # a custom scorer's top-level curve
    run = result.Result.from_json(d)
    self.assertTrue(np.isnan(run.asr[1, 2]))
    self.assertEqual(list(run.curves), ["asr", "asr_coherent", "perplexity", "embed_norm"])
    self.assertTrue(np.isnan(run.curves["perplexity"][0, 2]))
    run = visage_jax.load_run(self.runs["1D_random"])
    judged = run.with_judge("guard", dict(model="g", asr=[[0.0, 50.0, 100.0]] * 2, visage=None, complete=True),
                            dict(asr=None, visage=None), dict(method="m", resamples=9, seed=1))
    np.testing.assert_array_equal(judged.curves["judge:guard"], [[0.0, 50.0, 100.0]] * 2)
    self.assertEqual(judged.judges["guard"].model, "g")
    self.assertIs(judged.with_judge("guard", *judged.judge_section("guard"), {}), judged)   # unchanged: itself
    self.assertIn("judge:guard", judged.basin)

  def test_asr_at_zero_and_visage_of_small_records(self):
    one_d = dict(vis_type="1D_random", coords_x=np.linspace(-0.5, 0.5, 5).tolist(), coords_y=None,
                 asr=[[100.0, 40.0, 12.5, 50.0, 100.0], [90.0, 30.0, 12.5, 60.0, 100.0]])
    self.assertEqual(result.Result.from_json(one_d).asr_at_zero, 12.5)
    odd = dict(one_d, coords_x=np.linspace(-0.5, 0.5, 4).tolist(), asr=[[10.0, 0.0, 0.0, 20.0]])
    self.assertIsNone(result.Result.from_json(odd).asr_at_zero)
    plane = dict(vis_type="2D_random", coords_x=[-0.5, 0.0, 0.5], coords_y=[-0.5, 0.0, 0.5],
                 asr=[[100.0, 90.0, 80.0], [70.0, 25.0, 60.0], [50.0, 40.0, 30.0]], visage=62.5)
    self.assertEqual(result.Result.from_json(plane).asr_at_zero, 25.0)
    self.assertIsNone(result.Result.from_json(dict(plane, coords_y=[-0.5, -0.1, 0.3])).asr_at_zero)
    self.assertEqual(result.Result.from_json(plane).visage, 62.5)
    self.assertIsNone(result.Result.from_json(dict(plane, visage=None)).visage)
    curves = [[100.0, 20.0, 0.0, 30.0, 100.0], [100.0, 50.0, 10.0, 50.0, 100.0]]
    # Both basins are [1, 3]: safety (80 + 100 + 70) / 3 and (50 + 90 + 50) / 3.
    mean = result.Result.from_json(dict(one_d, asr=curves, visage=visage.visage_directions(curves))).visage
    self.assertAlmostEqual(mean, ((80 + 100 + 70) / 3 + (50 + 90 + 50) / 3) / 2)

  @parameterized.named_parameters(
      ("asr_shape", lambda d: d["asr"][1].pop(), r"field 'asr' must hold numbers or None in shape \(2, 3\)"),
      ("asr_directions", lambda d: d["asr"].pop(), r"field 'ci95.asr' has shape \(2, 3, 2\), "
       r"expected \(1, 3, 2\) from asr's directions and coords_x"),
      ("asr_text", lambda d: d["asr"][0].__setitem__(0, "high"), r"field 'asr' must hold numbers"),
      ("ci95_shape", lambda d: d["ci95"]["asr"][0].pop(), r"field 'ci95.asr' must hold numbers"),
      ("coherent", lambda d: d.update(asr_coherent=[[1.0]]), r"field 'asr_coherent' has shape"),
      ("judge", lambda d: d.update(judges={"g": {"asr": [[1.0]]}}), r"field 'judges.g.asr' has shape"),
      ("visage", lambda d: d["visage"].update(mean="high"), r"field 'visage' must be a number"),
      ("vis_type", lambda d: d.update(vis_type="3D_random"), r"field 'vis_type' is '3D_random'"),
      ("coords", lambda d: d.update(coords_x=[]), r"field 'coords_x' must be a non-empty list"),
      ("missing", lambda d: d.pop("asr"), r"missing field 'asr'"),
      ("schema", lambda d: d.update(schema=2), r"field 'schema' is 2; this version reads schema 1 to 1"),
      ("basin", lambda d: d.update(basin={"left": 0.0}), r"field 'basin' must be a list"),
      ("refined", lambda d: d.update(refined=[dict(alpha=[0.5], asr=[1.0, 2.0])]), r"field 'refined\[0\].asr'"),
  )
  def test_a_malformed_field_is_named_in_one_line(self, corrupt, message):
    w = self.copy()
    path = os.path.join(w, "landscape.json")
    d = json.loads(_read(path))
    corrupt(d)
    with open(path, "w") as f:
      json.dump(d, f)
    with self.assertRaisesRegex(errors.UserError, "^" + re.escape(path) + ": " + message) as e:
      visage_jax.load_run(w)
    self.assertNotIn("\n", str(e.exception))

  def test_missing_or_broken_file(self):
    w = self.create_tempdir().full_path
    with self.assertRaisesRegex(errors.MissingFileError, re.escape(os.path.join(w, "landscape.json")) + ": missing"):
      visage_jax.load_run(w)
    with open(os.path.join(w, "landscape.json"), "w") as f:
      f.write('{"vis_type": ')
    with self.assertRaisesRegex(errors.UserError, "landscape.json: not valid JSON"):
      visage_jax.load_run(w)

  def test_readme_example_runs(self):
    code = readme_example().replace("runs/demo", self.runs["1D_random"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(code, "README.md", "exec"), {})
    run = visage_jax.load_run(self.runs["1D_random"])
    self.assertIn(f"1D_random (2, 3) VISAGE {run.visage:.2f}", out.getvalue())
    self.assertIn("asr_coherent", out.getvalue())


if __name__ == "__main__":
  absltest.main()
