"""The experiments runner on a tiny model: every job runs, EXPERIMENTS.md is built from the run
files, a second run recomputes nothing, and the capability curve matches transformers."""

import importlib.util
import json
import os
import tempfile
from unittest import mock

import numpy as np
import torch
from absl.testing import absltest

import fixtures
from visage_jax import checkpoints, experiments, finetune, landscape, pipeline, prompts, tensors


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
    cls.results = experiments.run(tiny_config(cls.model_dir), cls.workdir, cls.out)

  def test_every_experiment_reports_numbers_read_from_its_jobs(self):
    self.assertEqual(set(self.results), set(experiments.NAMES))
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

  def test_jobs_are_shared_and_a_rerun_computes_nothing(self):
    # F3's default-prompt landscape is F4's strong variant: one job.
    self.assertIn("aligned_1d_default", self.results["f4_strength"]["jobs"])
    self.assertIn("aligned_1d_default", self.results["f3_system_prompts"]["jobs"])
    boom = mock.Mock(side_effect=AssertionError("recomputed"))
    with mock.patch.object(landscape, "run", boom), mock.patch.object(finetune, "run", boom), \
         mock.patch.object(experiments, "_capability_curve", boom):
      again = experiments.run(tiny_config(self.model_dir), self.workdir, self.out)
    self.assertEqual(again["f2_finetune"]["rows"], self.results["f2_finetune"]["rows"])

  def test_capability_perplexity_matches_transformers(self):
    import transformers

    curve = self.results["capability"]["curve"]
    cfg, params = checkpoints.load_params(self.model_dir)
    tok = checkpoints.load_tokenizer(self.model_dir)
    lc = experiments.landscape_config(tiny_config(self.model_dir), num_directions=1)
    d = tensors.to_hf_tensors(pipeline.build_directions(lc, params, cfg)[0][0], cfg)
    examples = curve["examples"]
    self.assertLen(examples, curve["n_answers"])
    net = transformers.AutoModelForCausalLM.from_pretrained(self.model_dir, torch_dtype=torch.float32)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    i = len(curve["alphas"]) - 1
    alpha = curve["alphas"][i]
    net.load_state_dict({k: v + alpha * torch.from_numpy(np.asarray(d[k], np.float32)) if k in d else v
                         for k, v in state.items()})
    total, count = 0.0, 0
    with torch.no_grad():
      for ex in examples:
        text = prompts.format_prompt(ex["prompt"], tok, "auto", "default")
        p_ids = prompts.tokenize_prompts([text], tok, "auto")[0]
        r_ids = tok(ex["response"], add_special_tokens=False)["input_ids"]
        r_ids += [tok.eos_token_id] if ex["eos"] else []
        ids = torch.tensor([p_ids + r_ids])
        logp = torch.log_softmax(net(ids).logits[0, :-1].double(), -1)
        tgt = ids[0, 1:]
        nll = -logp[torch.arange(len(tgt)), tgt][len(p_ids) - 1:]
        total, count = total + float(nll.sum()), count + len(nll)
    np.testing.assert_allclose(curve["perplexity"][i], np.exp(total / count), rtol=2e-3)

  def test_unknown_experiment_is_a_clear_error(self):
    c = experiment_config("all")
    c.experiment = "f9"
    with self.assertRaisesRegex(ValueError, "experiment 'f9' is not one of f1_basin"):
      experiments.validate(c)


if __name__ == "__main__":
  absltest.main()
