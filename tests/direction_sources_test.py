"""Landscapes along the gradient and refusal directions, and a census in groups, end to end on a
tiny checkpoint: the run's directions are the ones the direction modules compute, bad input fails
before anything is written."""

import json
import os

import jax
import numpy as np
from absl.testing import absltest

import fixtures
from visage_jax import errors, result
from visage_jax.analysis import census
from visage_jax.directions import gradient, refusal, vectors
from visage_jax.runs import direction_sources, landscape, pipeline
from visage_jax.training import trainsets


def _config(model_dir, vis_type, **landscape_overrides):
  c = landscape.default_config()
  c.model.path = model_dir
  c.prompts.update(path=fixtures.advbench_path(), limit=3)
  c.landscape.update(vis_type=vis_type, steps=2, multiplier=2.0)
  c.landscape.update(landscape_overrides)
  c.decode.max_new_tokens = 6
  c.engine.max_batch = 4
  c.ci95.resamples = 50
  c.gradient.rows = "10:14"
  c.refusal.update(harmful_rows="10:16", validation_rows="20:24", harmless_limit=6)
  return c


class DirectionSourcesTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = os.path.join(absltest.get_default_test_tmpdir(), "tiny_sources")
    fixtures.save_tiny_hf(cls.model, "llama", tokenizer=fixtures.toy_tokenizer("bpe", refusals=True), seed=5,
                          boost_refusals=True)
    cls.m = pipeline.load_model(cls.model, "float32")

  def _directions(self, w):
    return vectors.load_safetensors(os.path.join(w, "directions.safetensors"), self.m.cfg)

  def test_gradient_run_uses_the_gradient_direction(self):
    w = self.create_tempdir().full_path
    c = _config(self.model, "1D_gradient")
    record = landscape.run(c, w, progress=False)
    self.assertTrue(record.complete)
    rows = trainsets.read_advbench("")[10:14]
    batch = gradient.encode(rows, self.m.tokenizer, template="auto", system_prompt="default")
    loss, want = gradient.gradient_direction(self.m.params, batch, self.m.cfg)
    [got] = self._directions(w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    source = record.direction_source
    self.assertEqual((source["kind"], source["n_examples"], source["rows"]), ("gradient", 4, "10:14"))
    self.assertAlmostEqual(source["loss"], loss, places=5)
    again = landscape.run(c, w, progress=False)   # resumed: the same record, source included
    self.assertEqual(again.direction_source, source)
    self.assertEqual(again.to_json()["asr"], record.to_json()["asr"])

  def test_gradient_rows_that_overlap_the_prompts_are_refused(self):
    w = self.create_tempdir().full_path
    c = _config(self.model, "1D_gradient")
    c.gradient.rows = "1:3"   # rows 1, 2 are evaluated prompts (limit 3)
    with self.assertRaisesRegex(errors.UserError, r"gradient.rows '1:3': 2 gradient goal\(s\) are also evaluated"):
      landscape.run(c, w, progress=False)
    self.assertEqual(os.listdir(w), [])
    c.gradient.allow_overlap = True
    self.assertTrue(landscape.run(c, w, progress=False).complete)

  def test_bad_rows_and_layers_are_one_line_errors(self):
    for field, value, pattern in (("gradient.rows", "400", "gradient.rows '400': expected 'start:end'"),
                                  ("gradient.rows", "0:999", "0 <= start < end <= 520"),
                                  ("refusal.harmful_rows", "5:5", "refusal.harmful_rows '5:5'"),
                                  ("refusal.layer", 99, "refusal.layer 99: expected -1")):
      vis = "1D_gradient" if field.startswith("gradient") else "1D_refusal"
      c = _config(self.model, vis)
      section, key = field.split(".")
      c[section][key] = value
      w = self.create_tempdir().full_path
      with self.assertRaisesRegex(errors.UserError, pattern):
        landscape.run(c, w, progress=False)
      self.assertEqual(os.listdir(w), [], field)
    c = _config(self.model, "1D_gradient")
    c.gradient.prompts_path = fixtures.write_text(self.create_tempdir().full_path, "g.csv", "goal\nx\n")
    with self.assertRaisesRegex(errors.UserError, "missing \\['target'\\]"):
      landscape.run(c, self.create_tempdir().full_path, progress=False)

  def test_refusal_run_at_a_given_layer(self):
    w = self.create_tempdir().full_path
    c = _config(self.model, "1D_refusal", multiplier=2.0)
    c.refusal.layer = 1
    record = landscape.run(c, w, progress=False)
    self.assertIn(1.0, record.coords_x.tolist())    # the ablation itself is a grid point
    adv = trainsets.read_advbench("")
    packed = lambda goals: direction_sources._packed(goals, self.m, c)
    from visage_jax import prompts, resources
    harmless = prompts.load_goals(resources.path(resources.BENIGN_INSTRUCTIONS), 6)
    r = refusal.refusal_directions(self.m.params, self.m.cfg, packed([e["goal"] for e in adv[10:16]]),
                                   packed(harmless))
    want = refusal.ablation_direction(self.m.params, r[1])
    [got] = self._directions(w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    source = record.direction_source
    self.assertEqual((source["kind"], source["layer"]), ("refusal", 1))
    self.assertAlmostEqual(source["norm_ratio"]["total"], refusal.norm_ratios(self.m.params, want)["total"], places=5)

  def test_refusal_layer_chosen(self):
    c = _config(self.model, "1D_refusal")
    w = self.create_tempdir().full_path
    try:
      record = landscape.run(c, w, progress=False)
    except errors.UserError as e:   # a random tiny model may refuse nothing, or move KL too far
      self.assertRegex(str(e), "refuses none of them|no candidate layer")
      return
    source = record.direction_source
    self.assertEqual([k["layer"] for k in source["candidates"]], refusal.candidate_layers(self.m.cfg.num_layers))
    allowed = [k for k in source["candidates"] if k["kl"] is not None and k["kl"] < refusal.KL_LIMIT]
    self.assertEqual(source["layer"], min(allowed, key=lambda k: k["refusal_score"])["layer"])

  def test_census_in_groups_equals_one_group(self):
    runs = {}
    for group in (2, 8):
      w = self.create_tempdir().full_path
      c = _config(self.model, "1D_random", num_directions=8, direction_group=group)
      runs[group] = (landscape.run(c, w, progress=False), w)
      self.assertFalse(os.path.exists(os.path.join(w, "directions.safetensors")))   # N > 4: from the seed
      with open(os.path.join(w, "run_config.json")) as f:
        self.assertFalse(json.load(f)["landscape"]["save_directions"])
    (a, wa), (b, wb) = runs[2], runs[8]
    self.assertEqual(a.to_json()["asr"], b.to_json()["asr"])
    for name in ("generations.jsonl",):
      with open(os.path.join(wa, name)) as f, open(os.path.join(wb, name)) as g:
        key = lambda l: (l["direction"], l["step"])
        self.assertEqual(sorted(map(json.loads, f), key=key), sorted(map(json.loads, g), key=key))
    got = a.census["asr"]
    want = census.census(np.asarray(a.to_json()["asr"], float), a.coords_x.tolist(), tolerance=10.0)
    self.assertEqual(got, json.loads(json.dumps(want)))
    self.assertEqual(result.load_run(wa).census, a.census)


if __name__ == "__main__":
  absltest.main()
