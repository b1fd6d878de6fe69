"""Scorers: the keyword judge's fields, and extra scorers that plug into a landscape run unchanged."""

import json
import os

import numpy as np
from absl.testing import absltest

import fixtures
from visage_jax.checkpoints import loader
from visage_jax.directions import vectors
from visage_jax.measures import keywords, scoring
from visage_jax.runs import landscape


def _row(q, text, refused=False, nonfinite=False):
  return scoring.Row(direction=0, point=1, prompt=q, goal=f"goal {q}", text=text, n_tokens=len(text),
                     refused=refused, truncated=refused, nonfinite=nonfinite, ids=tuple(map(ord, text)))


class Chars(scoring.Scorer):
  """Toy: each generation's length in characters, their mean per point, their maximum over the grid."""
  name, curves = "chars", ("mean_chars",)

  def score(self, rows):
    return [dict(chars=len(r.text)) for r in rows]

  def point(self, p):
    return dict(mean_chars=float(np.mean([rec["chars"] for rec in p.records])), longest=max(
        range(len(p.records)), key=lambda q: p.records[q]["chars"]))

  def summarize(self, curves, *, two_d, complete):
    return dict(max_mean_chars=max(v for row in curves["mean_chars"] for v in row if v is not None))


class EmbedNorm(scoring.Scorer):
  """Toy measure of the model itself: the norm of the perturbed embedding at each point."""
  name, needs, curves = "embed_norm", ("params",), ("embed_norm",)

  def point(self, p):
    return dict(embed_norm=float(np.linalg.norm(np.asarray(p.params()["embed_tokens"], np.float64))))


class KeywordScorerTest(absltest.TestCase):

  def test_record_and_line_layout(self):
    rows = [_row(0, "Sure, sure, sure, sure"), _row(1, "I cannot help with that", refused=True),
            _row(2, "As an AI I refuse", refused=False, nonfinite=True)]
    scorers = (scoring.KeywordScorer(),)
    recs = scoring.records(rows, scorers)
    self.assertEqual([list(r) for r in recs],
                     [["prompt", "generation", "jailbroken", "tokens", "truncated", "repetition"]] * 3)
    grams = [[r.ids[i:i + 4] for i in range(len(r.ids) - 3)] for r in rows]   # 4-grams seen before, recounted
    self.assertEqual([r["repetition"] for r in recs], [sum(g in gs[:i] for i, g in enumerate(gs)) / len(gs)
                                                       for gs in grams])
    self.assertGreater(recs[0]["repetition"], 0.5)
    self.assertEqual([r["jailbroken"] for r in recs], [keywords.is_jailbroken(r.text) for r in rows])
    line = scoring.point_line(scoring.Point(direction=0, step=1, coords=[0.5], rows=rows, records=recs), scorers)
    self.assertEqual(list(line), ["direction", "step", "coords", "asr", "nonfinite", "judge_disagreements",
                                  "outputs"])
    self.assertAlmostEqual(line["asr"], 100.0 / 3)
    self.assertTrue(line["nonfinite"])
    # Prompt 2 has a keyword the device did not see: the Python verdict is kept, the prompt listed.
    self.assertEqual(line["judge_disagreements"], [2])


class ExtraScorersTest(absltest.TestCase):

  def test_extra_scorers_reach_both_files_without_changing_the_keyword_results(self):
    root = self.create_tempdir().full_path
    model_dir = os.path.join(root, "model")
    fixtures.save_refusal_model(model_dir)
    c = landscape.default_config()
    c.model.path = model_dir
    c.prompts.update(path=fixtures.advbench_path(), limit=3)
    c.landscape.update(steps=2, multiplier=2.0, num_directions=2)
    c.decode.max_new_tokens = 6
    c.engine.max_batch = 4
    c.coherence.enabled = False   # the plain run: the keyword judge alone, as scoring.default()
    plain, extra = os.path.join(root, "plain"), os.path.join(root, "extra")
    base = landscape.run(c, plain, progress=False).to_json()
    result = landscape.run(c, extra, progress=False,
                           scorers=scoring.default() + (Chars(), EmbedNorm())).to_json()
    with open(os.path.join(extra, "generations.jsonl")) as f:
      lines = [json.loads(l) for l in f]
    with open(os.path.join(plain, "generations.jsonl")) as f:
      plain_lines = {(l["direction"], l["step"]): l for l in map(json.loads, f)}
    with open(os.path.join(extra, "landscape.json")) as f:
      self.assertEqual(json.load(f), result)

    cfg, theta = loader.load_params(model_dir)
    dirs = vectors.load_safetensors(os.path.join(extra, "directions.safetensors"), cfg)
    self.assertLen(lines, 2 * 3)
    for line in lines:
      r, p = line["direction"], line["step"]
      chars = [len(o["generation"]) for o in line["outputs"]]
      self.assertEqual([o["chars"] for o in line["outputs"]], chars)
      self.assertEqual(line["mean_chars"], float(np.mean(chars)))
      self.assertEqual(line["longest"], int(np.argmax(chars)))
      self.assertEqual(result["mean_chars"][r][p], line["mean_chars"])
      alpha = result["coords_x"][p]
      want = np.linalg.norm(np.asarray(theta["embed_tokens"], np.float64)
                            + alpha * np.asarray(dirs[r]["embed_tokens"], np.float64))
      self.assertAlmostEqual(result["embed_norm"][r][p], want, delta=1e-4 * want)
      # The keyword judge's fields are those of the default run.
      drop = lambda d, keys: {k: v for k, v in d.items() if k not in keys}
      self.assertEqual(drop(line, ("mean_chars", "longest", "embed_norm", "outputs")),
                       drop(plain_lines[(r, p)], ("outputs",)))
      self.assertEqual([drop(o, ("chars",)) for o in line["outputs"]], plain_lines[(r, p)]["outputs"])
    self.assertEqual(result["max_mean_chars"], max(l["mean_chars"] for l in lines))
    self.assertEqual((result["asr"], result["visage"]), (base["asr"], base["visage"]))
    self.assertNotEqual(result["embed_norm"][0][0], result["embed_norm"][0][1])


if __name__ == "__main__":
  absltest.main()
