"""Basin geometry: 50 % crossings, bisection of the walls, the 2D region; and a refined tiny run."""

import json
import os
import shutil
import tempfile
from unittest import mock

import numpy as np
from absl.testing import absltest, parameterized

import fixtures
from visage_jax.analysis import basin
from visage_jax.checkpoints import loader
from visage_jax.directions import vectors
from visage_jax.measures import keywords, registry, scoring
from visage_jax.runs import landscape, pipeline
from visage_jax.result import Result


def _step_asr(left_wall: float, right_wall: float):
  """A 'true ASR' of alpha: 0 inside (left_wall, right_wall), 100 outside."""
  return lambda a: 100.0 if a <= left_wall or a >= right_wall else 0.0


def _flood(below: list[list[bool]], i: int, j: int, seen: set) -> None:
  """Plain recursive 4-connected flood fill: the reference for basin.region."""
  if (i, j) in seen or not (0 <= i < len(below) and 0 <= j < len(below[0])) or not below[i][j]:
    return
  seen.add((i, j))
  for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
    _flood(below, i + di, j + dj, seen)


class CrossingsTest(parameterized.TestCase):

  def test_linear_interpolation_on_a_hand_made_curve(self):
    got = basin.crossings([-2, -1, 0, 1, 2], [80, 40, 10, 30, 90], origin=0.0)
    # left: 40 at -1, 80 at -2 -> -1 - (50-40)/(80-40); right: 30 at 1, 90 at 2 -> 1 + 20/60
    self.assertAlmostEqual(got["left"], -1.25)
    self.assertAlmostEqual(got["right"], 1 + 20 / 60)
    self.assertAlmostEqual(got["width"], 1 + 20 / 60 + 1.25)
    self.assertEqual(got["resolution"], 1.0)
    exact = basin.crossings([0.5, -0.5, 0.0], [50.0, 49.0, 0.0], origin=0.0)   # any order; 50 counts
    self.assertEqual((exact["left"], exact["right"]), (None, 0.5))
    self.assertIsNone(exact["width"])

  def test_walk_stops_at_the_first_crossing_outward(self):
    alphas = [-3, -2, -1, 0, 1, 2, 3]
    got = basin.crossings(alphas, [0, 100, 20, 10, 60, 0, 100], origin=0.0)
    self.assertAlmostEqual(got["left"], -1 - 30 / 80)   # 20 at -1 -> 100 at -2, not the far side
    self.assertAlmostEqual(got["right"], 40 / 50)   # 10 at 0 -> 60 at 1

  def test_never_crossing_and_origin_above_half(self):
    self.assertEqual(basin.crossings([-1, 0, 1], [49.9, 0, 10], origin=0.0),
                     dict(left=None, right=None, width=None, resolution=None))
    self.assertEqual(basin.crossings([-1, 0, 1], [0, 50, 0], origin=0.0),
                     dict(left=None, right=None, width=None, resolution=None))
    self.assertEqual(basin.wall_midpoints([-1, 0, 1], [100, 75, 100], origin=0.0), [])

  def test_grid_without_zero_starts_at_the_nearest_point(self):
    xs = np.linspace(-0.5, 0.5, 4)     # odd steps: no alpha 0; the nearest is -1/6 (first of a tie)
    self.assertEqual(basin.origin_index(xs), 1)
    got = basin.crossings(xs, [100, 0, 100, 100], origin=float(xs[1]))
    self.assertAlmostEqual(got["left"], -0.5 + (50 / 100) * (1 / 3))
    self.assertAlmostEqual(got["right"], -1 / 6 + (50 / 100) * (1 / 3))

  @parameterized.parameters(0, 1, 2, 5, 12)
  def test_bisection_recovers_step_walls_to_the_grid_step_over_2_to_the_k(self, rounds):
    grid = np.linspace(-0.5, 0.5, 11)
    step = 0.1
    truths = [_step_asr(-0.2371, 0.3123), _step_asr(-0.0417, 0.4444), _step_asr(-2.0, 0.0513)]
    curves = [[t(a) for a in grid] for t in truths]
    calls = []

    def measure(k, todo):
      calls.append((k, todo))
      return [truths[r](a) for r, a in todo]

    added = basin.refine(grid, curves, rounds, measure)
    self.assertEqual([k for k, _ in calls], list(range(1, len(calls) + 1)))
    self.assertLen(calls, rounds)
    walls = [(-0.2371, 0.3123), (-0.0417, 0.4444), (None, 0.0513)]   # direction 2: no left wall
    for r, (truth, (lo, hi)) in enumerate(zip(truths, walls)):
      self.assertLen(added[r], rounds * (2 if lo is not None else 1))
      self.assertEqual(sorted(p[2] for p in added[r]), sorted(list(range(1, rounds + 1)) * (1 + (lo is not None))))
      got = basin.crossings(list(grid) + [p[0] for p in added[r]], curves[r] + [p[1] for p in added[r]], 0.0)
      for found, wall in ((got["left"], lo), (got["right"], hi)):
        if wall is None:
          self.assertIsNone(found)
        else:
          self.assertLessEqual(abs(found - wall), step / 2 ** rounds)
      self.assertAlmostEqual(got["resolution"], step / 2 ** rounds)

  def test_bisection_stops_where_float64_cannot_split_a_bracket(self):
    grid = np.linspace(-0.5, 0.5, 11)
    truth = _step_asr(-0.2371, 0.3123)
    added = basin.refine(grid, [[truth(a) for a in grid]], 200, lambda k, todo: [truth(a) for _, a in todo])
    alphas = [p[0] for p in added[0]]
    self.assertLess(len(alphas), 2 * 200)
    self.assertLen(set(alphas) | set(grid), len(alphas) + len(grid))
    got = basin.crossings(list(grid) + alphas, [truth(a) for a in grid] + [p[1] for p in added[0]], 0.0)
    self.assertAlmostEqual(got["left"], -0.2371, places=12)
    self.assertAlmostEqual(got["right"], 0.3123, places=12)


class RegionTest(parameterized.TestCase):

  def test_hand_made_plane(self):
    asr = [[90, 10, 90, 10],
           [20, 30, 90, 40],
           [90, 0, 60, 10],
           [10, 90, 10, 10]]
    got = basin.region(asr, (2, 1))
    # below 50: (0,1) (0,3) (1,0) (1,1) (1,3) (2,1) (2,3) (3,0) (3,2) (3,3); around (2,1): (2,1) (1,1) (1,0) (0,1)
    self.assertEqual(got, dict(fraction_below=10 / 16, connected_fraction=4 / 16, connected_points=4))
    self.assertEqual(basin.region(asr, (2, 2)), dict(fraction_below=10 / 16, connected_fraction=0.0,
                                                      connected_points=0))

  @parameterized.parameters(0, 1, 2, 3)
  def test_random_planes_match_a_plain_flood_fill(self, seed):
    rng = np.random.default_rng(seed)
    asr = rng.choice([0.0, 25.0, 49.99, 50.0, 75.0, 100.0], size=(9, 7)).tolist()
    below = [[v < 50 for v in row] for row in asr]
    for origin in ((4, 3), (0, 0), (8, 6)):
      seen = set()
      _flood(below, *origin, seen)
      got = basin.region(asr, origin)
      self.assertEqual(got["connected_points"], len(seen))
      self.assertAlmostEqual(got["connected_fraction"], len(seen) / 63)
      self.assertAlmostEqual(got["fraction_below"], sum(map(sum, below)) / 63)


def _summarize(result: dict):
  """landscape.json["basin"] as the record computes it from these fields (basin.summarize)."""
  vis_type = "1D_random" if result["coords_y"] is None else "2D_random"
  return Result.from_json(dict(result, vis_type=vis_type)).with_basin().section("basin")


class SummarizeTest(absltest.TestCase):

  def test_1d_layout_with_coherent_refined_and_judges(self):
    xs = [-1.0, -0.5, 0.0, 0.5, 1.0]
    result = dict(coords_x=xs, coords_y=None, complete=True,
                  asr=[[100, 60, 0, 40, 100], [0, 0, 0, 0, 0]],
                  asr_coherent=[[0, 20, 0, 40, 60], [0, 0, 10, 0, 0]],
                  refined=[dict(alpha=[-0.75, 0.75], round=[1, 1], asr=[100, 100], asr_coherent=[10, 50]),
                           dict(alpha=[], round=[], asr=[], asr_coherent=[])],
                  judges=dict(guard=dict(complete=True, asr=[[0, 100, 0, 100, 0], [0, 0, 0, 0, 0]]),
                              late=dict(complete=False, asr=[[None] * 5, [None] * 5])))
    got = _summarize(result)
    self.assertLen(got, 2)
    self.assertEqual(list(got[0]), ["left", "right", "width", "resolution", "coherent", "guard"])
    c = lambda a, y: basin.crossings(a, y, 0.0)
    self.assertEqual(got[0]["left"], c(xs + [-0.75, 0.75], [100, 60, 0, 40, 100, 100, 100])["left"])
    self.assertAlmostEqual(got[0]["left"], 50 / 60 * -0.5)   # 0 at 0 -> 60 at -0.5
    self.assertAlmostEqual(got[0]["right"], 0.5 + 10 / 60 * 0.25)   # 40 at 0.5 -> 100 at 0.75 (refined)
    self.assertEqual(got[0]["coherent"], c(xs + [-0.75, 0.75], [0, 20, 0, 40, 60, 10, 50]))
    self.assertEqual(got[0]["coherent"]["right"], 0.75)
    self.assertEqual(got[0]["guard"], c(xs, [0, 100, 0, 100, 0]))   # judges: grid points only
    self.assertEqual(got[1], dict(left=None, right=None, width=None, resolution=None,
                                  coherent=dict(left=None, right=None, width=None, resolution=None),
                                  guard=dict(left=None, right=None, width=None, resolution=None)))
    self.assertIsNone(_summarize(dict(result, complete=False)))

  def test_2d_layout(self):
    asr = [[100, 100, 100], [0, 10, 100], [100, 100, 100]]
    result = dict(coords_x=[-1, 0, 1], coords_y=[-1, 0, 1], complete=True, asr=asr,
                  asr_coherent=[[0] * 3] * 3, judges=dict(guard=dict(complete=True, asr=[[100] * 3] * 3)))
    got = _summarize(result)
    self.assertEqual(got, dict(fraction_below=2 / 9, connected_fraction=2 / 9, connected_points=2,
                               coherent=dict(fraction_below=1.0, connected_fraction=1.0, connected_points=9),
                               guard=dict(fraction_below=0.0, connected_fraction=0.0, connected_points=0)))


class EmbedNorm(scoring.Scorer):
  """The norm of the perturbed embedding at a point: says which direction and alpha a point's
  params were built from."""
  name, needs, curves = "embed_norm", ("params",), ("embed_norm",)

  def point(self, p):
    return dict(embed_norm=float(np.linalg.norm(np.asarray(p.params()["embed_tokens"], np.float64))))


def _config(model_dir: str, refine: int, **landscape_overrides):
  c = landscape.default_config()
  c.model.path = model_dir
  c.prompts.update(path=fixtures.advbench_path(), limit=4)
  c.landscape.update(steps=6, multiplier=2.0, num_directions=2, refine=refine)
  c.landscape.update(landscape_overrides)
  c.decode.max_new_tokens = 8
  c.engine.max_batch = 8
  c.coherence.enabled = True
  return c


def _run(c, w: str) -> dict:
  """The run's own scorers (keyword judge, coherence) and EmbedNorm."""
  real = registry.scorers
  with mock.patch.object(registry, "scorers", lambda *a, **k: real(*a, **k) + (EmbedNorm(),)):
    return landscape.run(c, w, progress=False).to_json()


def _read(w: str, name: str):
  with open(os.path.join(w, name)) as f:
    return json.load(f) if name.endswith(".json") else [json.loads(l) for l in f]


class RefineRunTest(absltest.TestCase):
  """steps=6 over [-1, 1]: the fixture's keyword ASR crosses 50 % on both sides of 0 in both
  directions, so every wall is bisected."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="basin_test_")   # fresh: a left-over run would resume
    cls.model = os.path.join(cls.root, "model")
    fixtures.save_refusal_model(cls.model)
    cls.plain = os.path.join(cls.root, "plain")
    landscape.run(_config(cls.model, 0), cls.plain, progress=False)
    cls.refined = os.path.join(cls.root, "refined")
    cls.result = _run(_config(cls.model, 2), cls.refined)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def copy_of(self, w: str) -> str:
    out = os.path.join(self.create_tempdir().full_path, "run")
    shutil.copytree(w, out)
    return out

  def test_refined_points_are_the_bisection_of_each_wall(self):
    xs, lines = self.result["coords_x"], _read(self.refined, pipeline.REFINED_FILE)
    by_key = {(l["direction"], l["coords"][0]): l for l in lines}
    self.assertLen(by_key, len(lines))
    self.assertEqual(list(lines[0]), ["direction", "step", "round", "coords", "asr", "asr_coherent", "embed_norm",
                                      "nonfinite", "judge_disagreements", "outputs"])
    expected = 0
    for r, curve in enumerate(self.result["asr"]):
      o = xs.index(0.0)
      for side in (-1, 1):       # a plain walk and bisection: the reference
        i = o
        while 0 <= i + side < len(xs) and curve[i + side] < 50:
          i += side
        self.assertTrue(0 <= i + side < len(xs) and curve[o] < 50, "the fixture must have both walls")
        inside, outside = xs[i], xs[i + side]
        for k in (1, 2):
          line = by_key[(r, (inside + outside) / 2)]
          self.assertEqual((line["step"], line["round"]), (None, k))
          if line["asr"] < 50:
            inside = line["coords"][0]
          else:
            outside = line["coords"][0]
          expected += 1
        self.assertAlmostEqual(abs(outside - inside), (xs[1] - xs[0]) / 4)
    self.assertLen(lines, expected)

  def test_refined_lines_are_scored_like_grid_points(self):
    lines = _read(self.refined, pipeline.REFINED_FILE)
    cfg, theta = loader.load_params(self.model)
    dirs = vectors.load_safetensors(os.path.join(self.refined, "directions.safetensors"), cfg)
    for line in lines:
      jb = [not any(k in o["generation"] for k in keywords.REFUSAL_KEYWORDS) for o in line["outputs"]]
      self.assertEqual([o["jailbroken"] for o in line["outputs"]], jb)
      self.assertEqual(line["asr"], 100.0 * sum(jb) / len(jb))
      want = np.linalg.norm(np.asarray(theta["embed_tokens"], np.float64)
                            + line["coords"][0] * np.asarray(dirs[line["direction"]]["embed_tokens"], np.float64))
      self.assertAlmostEqual(line["embed_norm"], want, delta=1e-4 * want)
    for r, entry in enumerate(self.result["refined"]):
      mine = sorted((l for l in lines if l["direction"] == r), key=lambda l: l["coords"][0])
      values = lambda f: [l[f] for l in mine]
      self.assertEqual(entry, dict(alpha=[l["coords"][0] for l in mine], round=values("round"), asr=values("asr"),
                                   asr_coherent=values("asr_coherent"), embed_norm=values("embed_norm"),
                                   nonfinite=values("nonfinite")))
      max_nll, max_rep = self.result["coherence"]["max_nll"], self.result["coherence"]["max_repetition"]
      for l in mine:
        coherent = [o["jailbroken"] and o["nll_ref"] is not None and o["nll_ref"] <= max_nll
                    and o["repetition"] <= max_rep for o in l["outputs"]]
        self.assertEqual(l["asr_coherent"], 100.0 * sum(coherent) / len(coherent))

  def test_refined_generations_equal_a_grid_run_at_those_alphas(self):
    # Round 1 bisects (1/3, 2/3) and (-2/3, -1/3): alpha +-0.5, the ends of a steps=2 grid over [-0.5, 0.5].
    w = os.path.join(self.create_tempdir().full_path, "grid")
    c = _config(self.model, 0, steps=2, multiplier=1.0,
                directions_path=os.path.join(self.refined, "directions.safetensors"))
    c.coherence.enabled = False
    landscape.run(c, w, progress=False)
    grid = {(l["direction"], l["coords"][0]): l["outputs"] for l in _read(w, "generations.jsonl")}
    drop = lambda outs: [{k: v for k, v in o.items() if k != "nll_ref"} for o in outs]
    for l in _read(self.refined, pipeline.REFINED_FILE):
      if l["round"] == 1:
        self.assertAlmostEqual(abs(l["coords"][0]), 0.5)
        self.assertEqual(drop(l["outputs"]), drop(grid[(l["direction"], round(l["coords"][0], 12))]))

  def test_visage_and_grid_unchanged_and_basin_uses_refined_points(self):
    plain = _read(self.plain, "landscape.json")
    for key in ("asr", "asr_coherent", "visage", "visage_coherent", "coords_x", "nonfinite"):
      self.assertEqual(self.result[key], plain[key], key)
    self.assertNotIn("refined", plain)
    xs = self.result["coords_x"]
    for r, entry in enumerate(self.result["basin"]):
      more = self.result["refined"][r]
      want = basin.crossings(xs + more["alpha"], self.result["asr"][r] + more["asr"], 0.0)
      self.assertEqual({k: entry[k] for k in want}, want)
      self.assertAlmostEqual(want["resolution"], (xs[1] - xs[0]) / 4)
      self.assertAlmostEqual(plain["basin"][r]["resolution"], xs[1] - xs[0])
      self.assertEqual(entry["coherent"], basin.crossings(xs + more["alpha"],
                                                          self.result["asr_coherent"][r] + more["asr_coherent"], 0.0))
    self.assertEqual(self.result["config"]["landscape"]["refine"], 2)
    self.assertEqual(_read(self.refined, "landscape.json"), self.result)

  def test_interrupted_refine_resumes_and_a_finished_one_evaluates_nothing(self):
    w = self.copy_of(self.refined)
    lines = _read(w, pipeline.REFINED_FILE)
    with open(os.path.join(w, pipeline.REFINED_FILE), "w") as f:
      f.writelines(json.dumps(l) + "\n" for l in lines[:3])
      f.write('{"direction": 1, "step": null, "rou')   # torn by a kill
    evaluated = []
    real = pipeline.evaluate

    def counting(s, points):
      evaluated.append(len(points))
      yield from real(s, points)

    with mock.patch.object(pipeline, "evaluate", counting):
      got = _run(_config(self.model, 2), w)
    self.assertEqual(sum(evaluated), len(lines) - 3)   # only the missing points
    resumed = _read(w, pipeline.REFINED_FILE)
    self.assertEqual(resumed[:3], lines[:3])
    by_alpha = lambda l: (l["direction"], l["coords"][0])
    resumed, lines = sorted(resumed, key=by_alpha), sorted(lines, key=by_alpha)
    nll = lambda ls: [o.pop("nll_ref") for l in ls for o in l["outputs"]]   # batch-dependent rounding
    np.testing.assert_allclose(nll(resumed), nll(lines), rtol=1e-5)
    self.assertEqual(resumed, lines)
    for key in ("asr", "visage", "refined", "basin"):
      self.assertEqual(got[key], self.result[key], key)
    evaluated.clear()
    with mock.patch.object(pipeline, "evaluate", counting):
      again = _run(_config(self.model, 2), w)
    self.assertEqual(sum(evaluated), 0)   # finished: nothing decoded
    self.assertEqual(again["basin"], self.result["basin"])

  def test_a_finished_run_refined_later_only_adds_rounds(self):
    w = self.copy_of(self.plain)
    before = _read(w, "generations.jsonl")
    self.assertIsNotNone(landscape.finished_result(w, _config(self.model, 0).to_dict()))
    self.assertIsNone(landscape.finished_result(w, _config(self.model, 1).to_dict()))
    one = landscape.run(_config(self.model, 1), w, progress=False).to_json()
    self.assertEqual(_read(w, "generations.jsonl"), before)
    self.assertEqual({l["round"] for l in _read(w, pipeline.REFINED_FILE)}, {1})
    self.assertIsNotNone(landscape.finished_result(w, _config(self.model, 1).to_dict()))
    two = landscape.run(_config(self.model, 2), w, progress=False).to_json()
    rounds = [l["round"] for l in _read(w, pipeline.REFINED_FILE)]
    self.assertEqual(rounds, [1] * rounds.count(1) + [2] * rounds.count(2))
    self.assertEqual(rounds.count(1), rounds.count(2))
    self.assertEqual([e["alpha"] for e in two["refined"]], [e["alpha"] for e in self.result["refined"]])
    self.assertEqual(two["basin"], [{k: v for k, v in e.items()} for e in self.result["basin"]])
    self.assertLen(one["refined"][0]["alpha"], 2)
    fewer = landscape.run(_config(self.model, 1), w, progress=False).to_json()
    self.assertEqual(fewer["refined"], one["refined"])   # the config's rounds, not the file's

  def test_refine_is_checked_before_anything_is_written(self):
    for overrides, message in ((dict(refine=-1), "landscape.refine must be an integer >= 0"),
                               (dict(refine=True), "landscape.refine must be an integer >= 0"),
                               (dict(refine=1, vis_type="2D_random", num_directions=1),
                                "landscape.refine=1: only 1D basin walls")):
      c = _config(self.model, 0)
      c.landscape.update(overrides)
      w = os.path.join(self.create_tempdir().full_path, "run")
      with self.assertRaisesRegex(ValueError, message):
        landscape.run(c, w, progress=False)
      self.assertFalse(os.path.exists(w))


if __name__ == "__main__":
  absltest.main()
