"""The experiments runner on a tiny model: every job runs, EXPERIMENTS.md is built from the run
files, a second run recomputes nothing, the capability curve is F1's measured one, and F4 attacks
every shot count under every seed."""

import importlib.util
import json
import os
import tempfile
from unittest import mock

from absl.testing import absltest

import fixtures
from visage_jax.experiments import findings, report
from visage_jax.runs import finetune, landscape


def experiment_config(name, arg=None):
  """configs/experiments/<name>.py, the record of that experiment."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def tiny_config(model_dir, name="all"):
  c = experiment_config(name, "tiny")
  c.model.update(path=model_dir, aligned_lora="")
  c.data.advbench_path = fixtures.advbench_path()
  c.progress = False
  return c


class ExperimentsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    root = tempfile.mkdtemp(prefix="experiments_test_")  # fresh: cached jobs would hide a broken run
    cls.model_dir = os.path.join(root, "tiny_exp")
    fixtures.save_tiny_hf(cls.model_dir, "llama", tokenizer=fixtures.toy_tokenizer("bpe", refusals=True),
                          seed=3, boost_refusals=True)
    cls.workdir = os.path.join(root, "exp")
    cls.out = os.path.join(root, "report", "EXPERIMENTS.md")
    cls.results = findings.run(tiny_config(cls.model_dir), cls.workdir, cls.out)

  def test_every_experiment_reports_numbers_read_from_its_jobs(self):
    self.assertEqual(set(self.results), set(findings.NAMES))
    text = open(self.out).read()
    for title in ("## F1", "## Capability", "## F2", "## F3", "## F4", "## Job wall times"):
      self.assertIn(title, text)
    f1 = self.results["f1_basin"]
    aligned = json.load(open(os.path.join(self.workdir, "jobs", "f1_aligned_1d", "landscape.json")))
    self.assertEqual(f1["rows"][0]["visage"], aligned["visage"]["per_direction"])
    self.assertEqual(f1["rows"][0]["asr_center"], [row[1] for row in aligned["asr"]])  # 3 points: centre 1
    self.assertIn(f"| aligned | 2 | {', '.join(f'{v:.1f}' for v in f1['rows'][0]['asr_center'])} |", text)
    f2 = self.results["f2_finetune"]
    ev = json.load(open(os.path.join(self.workdir, "jobs", "f2_harmful_2", "eval.json")))
    self.assertEqual(f2["rows"][1]["asr"], ev["asr"])
    self.assertEqual([r["model"] for r in f2["rows"]], ["aligned (no attack)", "harmful_2", "mix_2"])
    f3 = self.results["f3_system_prompts"]
    self.assertEqual([r["system_prompt"] for r in f3["rows"]], ["default", "none"])
    for name, r in self.results.items():
      for fig in r["figures"].values():
        self.assertTrue(os.path.exists(os.path.join(os.path.dirname(self.out), "docs", "experiments",
                                                    os.path.basename(fig))), fig)
      self.assertTrue(r["checks"], name)
      self.assertTrue(all(isinstance(ok, bool) for _, ok in r["checks"]))

  def test_regenerating_keeps_the_sections_measured_by_hand(self):
    out = os.path.join(tempfile.mkdtemp(prefix="experiments_kept_"), "EXPERIMENTS.md")
    block = f"{report.HAND_BEGIN}\n## F9 — measured by hand\n\n| a | b |\n{report.HAND_END}"
    with open(out, "w") as f:
      f.write(f"# an old report\n\nstale numbers\n\n{block}\n\n## Compute\n\nstale\n")
    for _ in range(2):   # regenerated twice: the block stays, once, before the job times
      report.write_report(tiny_config(self.model_dir), self.workdir, out)
      text = open(out).read()
      self.assertEqual(text.count(block), 1)
      self.assertNotIn("stale", text)
      self.assertLess(text.index("## F4"), text.index(block))
      self.assertLess(text.index(block), text.index("## Compute"))

  def test_jobs_are_shared_and_a_rerun_computes_nothing(self):
    # F1's aligned landscape is the capability curve, F3's default-prompt one F4's strong variant.
    for name in ("f1_basin", "capability"):
      self.assertIn("f1_aligned_1d", self.results[name]["jobs"])
    for name in ("f3_system_prompts", "f4_strength"):
      self.assertIn("aligned_1d_default", self.results[name]["jobs"])
    boom = mock.Mock(side_effect=AssertionError("recomputed"))
    with mock.patch.object(landscape, "run", boom), mock.patch.object(finetune, "run", boom):
      again = findings.run(tiny_config(self.model_dir), self.workdir, self.out)
    self.assertEqual(again["f2_finetune"]["rows"], self.results["f2_finetune"]["rows"])

  def test_capability_curve_is_f1s_measured_perplexity(self):
    # The perplexity itself is checked against transformers in measures_test; here: the experiment
    # reads F1's aligned landscape (coherence and capability on) and nothing else.
    curve = self.results["capability"]["curve"]
    job = os.path.join(self.workdir, "jobs", "f1_aligned_1d")
    aligned = json.load(open(os.path.join(job, "landscape.json")))
    self.assertEqual(curve["perplexity"], aligned["capability"]["perplexity"][0])
    self.assertEqual(curve["alphas"], aligned["coords_x"])
    self.assertIsNotNone(aligned["visage_coherent"])
    with open(os.path.join(job, "capability_texts.jsonl")) as f:
      self.assertEqual(curve["n_answers"], sum(1 for line in f if line.strip()))

  def test_f4_attacks_every_shot_count_and_seed(self):
    f4 = self.results["f4_strength"]
    c = tiny_config(self.model_dir)
    for row in f4["rows"]:
      self.assertEqual(sorted(row["attacked"]), sorted(c.f4_strength.shots))
      for n, by_seed in row["attacked"].items():
        self.assertEqual(sorted(by_seed), sorted(c.f4_strength.seeds))
        ev = json.load(open(os.path.join(self.workdir, "jobs", f"f4_{row['key']}_harmful_{n}_s0", "eval.json")))
        self.assertLen(by_seed[0], c.f4_strength.eval_prompts)
        self.assertEqual(ev["n_eval"], c.f4_strength.eval_prompts)
        self.assertEqual(ev["n_benign"], 0)
    self.assertFalse(os.path.exists(os.path.join(self.workdir, "jobs", "f4_strong_harmful_1_s0", "model")))
