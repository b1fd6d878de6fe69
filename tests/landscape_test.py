"""A full `landscape` run on a tiny checkpoint: files, formulas, resume, refusals, bad input."""

import copy
import json
import os
import shutil
from unittest import mock

import numpy as np
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import engine, errors
from visage_jax.analysis import uncertainty, visage
from visage_jax.measures import keywords
from visage_jax.runs import landscape, pipeline


def tiny_config(model_dir, prompts_path, **landscape_overrides):
  c = landscape.default_config()
  c.model.path = model_dir
  c.prompts.update(path=prompts_path, limit=5)
  c.landscape.update(steps=4, multiplier=2.0, num_directions=2)
  c.landscape.update(landscape_overrides)
  c.decode.max_new_tokens = 10
  c.engine.max_batch = 4
  return c


class LandscapeTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = absltest.get_default_test_tmpdir()
    cls.models = {}
    for kind in ("bpe", "sentencepiece"):
      d = os.path.join(cls.root, f"tiny_{kind}")
      fixtures.save_tiny_hf(d, "llama", tokenizer=fixtures.toy_tokenizer(kind, refusals=True), seed=5,
                            boost_refusals=True)
      cls.models[kind] = d
    cls.prompts = fixtures.advbench_path()

  def workdir(self):
    return self.create_tempdir().full_path

  def read(self, workdir):
    with open(os.path.join(workdir, "landscape.json")) as f:
      result = json.load(f)
    with open(os.path.join(workdir, "generations.jsonl")) as f:
      lines = [json.loads(l) for l in f]
    return result, lines

  @parameterized.named_parameters(("bpe", "bpe"), ("sentencepiece", "sentencepiece"))
  def test_full_run_files_and_formulas(self, kind):
    w = self.workdir()
    c = tiny_config(self.models[kind], self.prompts)
    landscape.run(c, w, progress=False)
    for name in pipeline.RUN_FILES:
      self.assertTrue(os.path.exists(os.path.join(w, name)), name)
    result, lines = self.read(w)
    np.testing.assert_allclose(result["coords_x"], np.linspace(-1, 1, 5))
    self.assertIsNone(result["coords_y"])
    self.assertTrue(result["complete"])
    self.assertEqual(result["n_prompts"], 5)
    self.assertLen(lines, 2 * 5)
    asr = [[None] * 5 for _ in range(2)]
    for line in lines:
      self.assertLen(line["outputs"], 5)
      # ASR is plain substring matching on the decoded text.
      jb = [not any(k in o["generation"] for k in keywords.REFUSAL_KEYWORDS) for o in line["outputs"]]
      self.assertEqual([o["jailbroken"] for o in line["outputs"]], jb)
      asr[line["direction"]][line["step"]] = 100.0 * sum(jb) / len(jb)
    self.assertEqual(result["asr"], asr)
    self.assertEqual(result["visage"]["per_direction"], [visage.visage_1d(a) for a in asr])
    # The on-device keyword automaton agrees with Python on every generation (listed if not).
    self.assertEqual(result["judge_disagreements"], [])
    refused = sum(not o["jailbroken"] for l in lines for o in l["outputs"])
    self.assertGreater(refused, 0, "the fixture must produce some refusals for this test to bite")
    truncated = [o for l in lines for o in l["outputs"] if o["truncated"]]
    self.assertTrue(all(not o["jailbroken"] for o in truncated))

  def test_stop_at_refusal_keeps_asr(self):
    a, b = self.workdir(), self.workdir()
    landscape.run(tiny_config(self.models["bpe"], self.prompts), a, progress=False)
    c = tiny_config(self.models["bpe"], self.prompts)
    c.decode.stop_at_refusal = False
    landscape.run(c, b, progress=False)
    ra, la = self.read(a)
    rb, lb = self.read(b)
    self.assertEqual(ra["asr"], rb["asr"])
    self.assertLess(sum(o["tokens"] for l in la for o in l["outputs"]),
                    sum(o["tokens"] for l in lb for o in l["outputs"]))

  def test_interrupted_run_resumes_to_the_same_result(self):
    full, broken = self.workdir(), self.workdir()
    c = tiny_config(self.models["bpe"], self.prompts)
    landscape.run(c, full, progress=False)
    real = engine.evaluate

    def dies_after_two_chunks(*args, **kwargs):
      for i, chunk in enumerate(real(*args, **kwargs)):
        if i == 2:
          raise KeyboardInterrupt
        yield chunk

    with mock.patch.object(engine, "evaluate", dies_after_two_chunks):
      with self.assertRaises(KeyboardInterrupt):
        landscape.run(c, broken, progress=False)
    partial, partial_lines = self.read(broken)
    self.assertFalse(partial["complete"])
    self.assertNotEmpty(partial_lines)
    self.assertIsNone(partial["ci95"])   # the bootstrap runs once the run completes, not per chunk
    with open(os.path.join(broken, "generations.jsonl"), "a") as f:
      f.write('{"direction": 1, "step": 4, "asr"')  # a torn line, as if killed mid-write
    landscape.run(c, broken, progress=False)
    a, la = self.read(full)
    b, lb = self.read(broken)
    self.assertEqual(a["asr"], b["asr"])
    self.assertEqual(a["visage"], b["visage"])
    self.assertEqual(a["ci95"], b["ci95"])
    key = lambda l: (l["direction"], l["step"])
    self.assertEqual(sorted(la, key=key), sorted(lb, key=key))

  def test_ci95_recomputed_from_generations(self):
    w = self.workdir()
    c = tiny_config(self.models["bpe"], self.prompts)
    c.ci95.update(resamples=300, seed=7)
    result, lines = landscape.run(c, w, progress=False).to_json(), self.read(w)[1]
    ci = result["ci95"]
    self.assertEqual((ci["method"], ci["resamples"], ci["seed"]), ("percentile bootstrap", 300, 7))
    self.assertEqual(np.asarray(ci["asr"]).shape, (2, 5, 2))
    self.assertEqual(np.asarray(ci["visage"]["per_direction"]).shape, (2, 2))
    jb = {(l["direction"], l["step"]): [o["jailbroken"] for o in l["outputs"]] for l in lines}
    idx = uncertainty.resample_indices(5, 300, 7)   # the same prompts at every point
    curves = [[[100.0 * sum(jb[r, p][q] for q in row) / 5 for p in range(5)] for r in range(2)] for row in idx]
    for r in range(2):
      for p in range(5):
        np.testing.assert_allclose(ci["asr"][r][p], np.percentile([s[r][p] for s in curves], [2.5, 97.5]))
        self.assertTrue(ci["asr"][r][p][0] <= result["asr"][r][p] <= ci["asr"][r][p][1])
      scores = [visage.visage_1d(s[r]) for s in curves]
      np.testing.assert_allclose(ci["visage"]["per_direction"][r], np.percentile(scores, [2.5, 97.5]))
    agree = sum(len(set(v)) == 1 for v in jb.values())
    self.assertEqual(ci["degenerate"]["asr"], agree)
    self.assertGreater(agree, 0, "the fixture must have points where every prompt agrees")
    self.assertLess(agree, 10, "and points where prompts disagree")

  def test_bad_ci95_settings_write_nothing(self):
    w = os.path.join(self.workdir(), "run")
    c = tiny_config(self.models["bpe"], self.prompts)
    c.ci95.resamples = 0
    with self.assertRaisesRegex(errors.UserError, "ci95.resamples must be an integer >= 1, got 0"):
      landscape.run(c, w, progress=False)
    self.assertFalse(os.path.exists(os.path.join(w, "landscape.json")))

  def test_unsaved_directions_are_drawn_again_on_resume(self):
    """landscape.save_directions=False writes no directions; a resumed run draws the same ones
    from the seed in run_config.json and ends with the saved run's generations."""
    saved, unsaved = self.workdir(), self.workdir()
    c = tiny_config(self.models["bpe"], self.prompts, steps=2)
    landscape.run(c, saved, progress=False)
    c.landscape.save_directions = False
    landscape.run(c, unsaved, progress=False)
    self.assertFalse(os.path.exists(os.path.join(unsaved, "directions.safetensors")))
    with open(os.path.join(unsaved, "run_config.json")) as f:
      self.assertEqual(json.load(f)["landscape"]["seed"], c.landscape.seed)
    gen = os.path.join(unsaved, "generations.jsonl")
    with open(gen) as f:
      head = f.readlines()[:1]
    with open(gen, "w") as f:
      f.writelines(head)
    landscape.run(c, unsaved, progress=False)
    key = lambda l: (l["direction"], l["step"])
    self.assertEqual(sorted(self.read(unsaved)[1], key=key), sorted(self.read(saved)[1], key=key))
    self.assertEqual(self.read(unsaved)[0]["asr"], self.read(saved)[0]["asr"])

  def test_different_config_is_refused_unless_overwrite(self):
    w = self.workdir()
    landscape.run(tiny_config(self.models["bpe"], self.prompts, steps=2, num_directions=1), w, progress=False)
    c = tiny_config(self.models["bpe"], self.prompts, steps=3, num_directions=1)
    with self.assertRaisesRegex(ValueError, r"different config \(landscape.steps: 2 -> 3\)"):
      landscape.run(c, w, progress=False)
    result = landscape.run(c, w, progress=False, overwrite=True).to_json()
    self.assertLen(result["coords_x"], 4)

  def test_run_from_before_added_fields_resumes_at_their_defaults(self):
    """A run_config.json written before coherence.max_repetition and capability.limit existed
    resumes under their defaults: its lines are kept and only the missing points decoded."""
    full, old = self.workdir(), self.workdir()
    c = tiny_config(self.models["bpe"], self.prompts, steps=2, num_directions=1)
    c.coherence.enabled = True
    landscape.run(c, full, progress=False)
    shutil.copytree(full, old, dirs_exist_ok=True)
    with open(os.path.join(old, "run_config.json")) as f:
      saved = json.load(f)
    del saved["coherence"]["max_repetition"], saved["capability"]["limit"]
    with open(os.path.join(old, "run_config.json"), "w") as f:
      json.dump(saved, f)
    gen = os.path.join(old, "generations.jsonl")
    with open(gen) as f:
      head = f.readlines()[:1]
    with open(gen, "w") as f:
      f.writelines(head)
    bigger = copy.deepcopy(c)
    bigger.coherence.max_repetition = 0.5   # not the default: another run
    with self.assertRaisesRegex(errors.UserError, r"different config \(coherence.max_repetition: 0.35 -> 0.5\)"):
      landscape.run(bigger, old, progress=False)
    decoded = []

    def evaluate(s, points):
      decoded.extend(points)
      return real(s, points)

    real = pipeline.evaluate
    with mock.patch.object(pipeline, "evaluate", evaluate):
      record = landscape.run(c, old, progress=False).to_json()
    self.assertEqual(sorted(decoded), sorted({0, 1, 2} - {json.loads(head[0])["step"]}))
    with open(gen) as f:
      self.assertEqual(f.readlines()[0], head[0])
    key = lambda l: (l["direction"], l["step"])
    self.assertEqual(sorted(self.read(old)[1], key=key), sorted(self.read(full)[1], key=key))
    want = self.read(full)[0]
    self.assertEqual((record["asr"], record["asr_coherent"]), (want["asr"], want["asr_coherent"]))
    with open(os.path.join(old, "run_config.json")) as f, open(os.path.join(full, "run_config.json")) as g:
      self.assertEqual(json.load(f), json.load(g))   # claimed again, with the fields

  def test_2d_random(self):
    w = self.workdir()
    c = tiny_config(self.models["bpe"], self.prompts, vis_type="2D_random", steps=2, num_directions=1)
    result = landscape.run(c, w, progress=False).to_json()
    self.assertEqual(np.asarray(result["asr"]).shape, (3, 3))
    self.assertEqual(result["coords_y"], [-1.0, 0.0, 1.0])
    self.assertAlmostEqual(result["visage"], visage.visage_2d(result["asr"]))
    self.assertEqual(np.asarray(result["ci95"]["asr"]).shape, (3, 3, 2))
    lo, hi = result["ci95"]["visage"]
    self.assertTrue(lo <= result["visage"] <= hi)

  def test_interpolation_reaches_the_target(self):
    """alpha=0 is the model itself, alpha=1 the target: their generations equal plain runs."""
    w = self.workdir()
    c = tiny_config(self.models["bpe"], self.prompts, vis_type="1D_interpolation", steps=2,
                    num_directions=1, target_path=self.models["bpe"] + "_target")
    if not os.path.exists(c.landscape.target_path):
      fixtures.save_tiny_hf(c.landscape.target_path, "llama",
                            tokenizer=fixtures.toy_tokenizer("bpe", refusals=True), seed=6)
    result = landscape.run(c, w, progress=False).to_json()
    self.assertEqual(result["coords_x"], [0.0, 0.5, 1.0])
    _, lines = self.read(w)
    at_target = {l["step"]: l for l in lines}[2]
    c0 = tiny_config(c.landscape.target_path, self.prompts, steps=2, num_directions=1, multiplier=0.0)
    w0 = self.workdir()
    landscape.run(c0, w0, progress=False)
    _, lines0 = self.read(w0)
    self.assertEqual([o["generation"] for o in at_target["outputs"]],
                     [o["generation"] for o in lines0[0]["outputs"]])

  @parameterized.parameters("1D_random", "2D_random")
  def test_bfloat16_directions_as_drawn_and_resumed(self, vis_type):
    """A bfloat16 run holds its directions in bfloat16, each leaf cast as drawn (2D: once
    orthogonalized): the bits of the float32 directions cast afterwards, and a resume reads the
    same bits back from directions.safetensors."""
    import jax
    import jax.numpy as jnp
    from visage_jax.directions import vectors
    w = self.workdir()
    c = tiny_config(self.models["bpe"], self.prompts, vis_type=vis_type, steps=2,
                    num_directions=2 if vis_type == "1D_random" else 1, orthogonalize=True)
    c.model.dtype = "bfloat16"
    fresh = pipeline.prepare(c, w).stacked
    resumed = pipeline.prepare(c, w).stacked
    m = pipeline.load_model(c.model.path, "bfloat16")
    f32 = dict(norm=c.landscape.norm, blacklist=tuple(c.landscape.blacklist))
    key = jax.random.key(c.landscape.seed)
    draw = lambda i: vectors.random_direction(jax.random.fold_in(key, i), m.params, m.cfg, **f32)
    if vis_type == "1D_random":
      groups = [[draw(0)], [draw(1)]]
    else:
      d1 = draw(0)
      groups = [[d1, vectors.orthogonalize(draw(1), d1)]]
    want = vectors.stack([vectors.stack(comps) for comps in groups])
    bits = lambda x: np.asarray(x).view(np.uint16)
    for got in (fresh, resumed):
      jax.tree.map(lambda g, w_: (self.assertEqual(g.dtype, jnp.bfloat16),
                                  np.testing.assert_array_equal(bits(g), bits(w_.astype(jnp.bfloat16)))),
                   got, want)

  def test_imported_directions_reproduce_the_run(self):
    a, b = self.workdir(), self.workdir()
    c = tiny_config(self.models["bpe"], self.prompts, seed=3)
    landscape.run(c, a, progress=False)
    c2 = tiny_config(self.models["bpe"], self.prompts, seed=99,
                     directions_path=os.path.join(a, "directions.safetensors"))
    landscape.run(c2, b, progress=False)
    self.assertEqual(self.read(a)[0]["asr"], self.read(b)[0]["asr"])

  def test_nonfinite_points_are_recorded(self):
    w = self.workdir()
    c = tiny_config(self.models["bpe"], self.prompts, multiplier=4e39, steps=2, num_directions=1)
    result = landscape.run(c, w, progress=False).to_json()
    self.assertEqual(result["nonfinite"], [[True, False, True]])
    self.assertTrue(os.path.exists(os.path.join(w, "landscape.png")))

  @parameterized.named_parameters(
      ("vis_type", dict(vis_type="3D_random"), "landscape.vis_type '3D_random'"),
      ("steps", dict(steps=0), "landscape.steps must be >= 1"),
      ("norm", dict(norm="weird"), "landscape.norm 'weird'"),
      ("interp_target", dict(vis_type="1D_interpolation", num_directions=1), "needs landscape.target_path"),
  )
  def test_bad_settings_write_nothing(self, overrides, message):
    w = os.path.join(self.workdir(), "run")
    with self.assertRaisesRegex(ValueError, message):
      landscape.run(tiny_config(self.models["bpe"], self.prompts, **overrides), w, progress=False)
    self.assertFalse(os.path.exists(os.path.join(w, "landscape.json")))

  def test_bad_inputs(self):
    d = self.create_tempdir()
    nocol = d.create_file("q.csv", "question\nhello\n").full_path
    with self.assertRaisesRegex(ValueError, "expected a CSV with a 'goal' column"):
      landscape.run(tiny_config(self.models["bpe"], nocol), os.path.join(d.full_path, "w1"), progress=False)
    empty = d.create_file("e.csv", "goal,target\n").full_path
    with self.assertRaisesRegex(ValueError, "the prompt set is empty"):
      landscape.run(tiny_config(self.models["bpe"], empty), os.path.join(d.full_path, "w2"), progress=False)
    with self.assertRaisesRegex(ValueError, "no such file or directory"):
      landscape.run(tiny_config(os.path.join(d.full_path, "nomodel"), self.prompts),
                    os.path.join(d.full_path, "w3"), progress=False)
    other = os.path.join(d.full_path, "other")
    fixtures.save_tiny_hf(other, "llama", tokenizer=fixtures.toy_tokenizer("bpe", refusals=True),
                          intermediate_size=96)
    wrong_dirs = os.path.join(d.full_path, "w4")
    landscape.run(tiny_config(other, self.prompts, steps=1, num_directions=1), wrong_dirs, progress=False)
    c = tiny_config(self.models["bpe"], self.prompts, num_directions=1,
                    directions_path=os.path.join(wrong_dirs, "directions.safetensors"))
    with self.assertRaisesRegex(ValueError, r"has shape \(96, 64\), expected \(128, 64\)"):
      landscape.run(c, os.path.join(d.full_path, "w5"), progress=False)
    self.assertFalse(os.path.exists(os.path.join(d.full_path, "w5", "landscape.json")))


if __name__ == "__main__":
  absltest.main()
