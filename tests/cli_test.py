"""The `visage-jax` commands, as a user runs them: one in its own process, the rest in this one
(fixtures.cli; tests/errors_test.py runs the other exit statuses in processes)."""

import json
import os
import subprocess
import sys

import numpy as np
from absl.testing import absltest

import fixtures
from visage_jax import decode, prompts, result
from visage_jax.checkpoints import loader
from visage_jax.runs import landscape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, check=True, process=False):
  if process:
    proc = subprocess.run([sys.executable, "-m", "visage_jax.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
  else:
    proc = fixtures.cli(*args)
  if check and proc.returncode != 0:
    raise AssertionError(f"visage-jax {args} failed:\n{proc.stderr[-3000:]}")
  return proc


class GenerateTest(absltest.TestCase):

  def test_generate_prints_json_lines_equal_to_library_greedy(self):
    d = self.create_tempdir().full_path
    tok = fixtures.toy_tokenizer()
    fixtures.save_tiny_hf(d, "llama", tokenizer=tok)
    proc = run_cli("generate", f"--model={d}", "--prompt=Write a poem", "--prompt=Tell me a story now",
                   "--max_new_tokens=5", process=True)
    lines = [json.loads(l) for l in proc.stdout.strip().splitlines()]
    self.assertEqual([l["prompt"] for l in lines], ["Write a poem", "Tell me a story now"])
    cfg, params = loader.load_params(d)
    ids = prompts.tokenize_prompts([prompts.format_prompt(p, tok) for p in ("Write a poem", "Tell me a story now")],
                                   tok, "auto")
    outs = decode.generate(params, cfg, ids, max_new_tokens=5, eos_ids=loader.eos_ids(d, tok),
                           pad_id=decode.pad_id_of(tok))
    self.assertEqual([l["generation"] for l in lines], [tok.decode(o, skip_special_tokens=True) for o in outs])

  def test_convert_then_generate_raw(self):
    d = self.create_tempdir().full_path
    fixtures.save_tiny_hf(d, "mistral", tokenizer=fixtures.toy_tokenizer(), sliding_window=4)
    out = os.path.join(self.create_tempdir().full_path, "conv")
    run_cli("convert", f"--model={d}", f"--out={out}")
    a = run_cli("generate", f"--model={out}", "--prompt=Hello there", "--no_chat_template", "--max_new_tokens=4")
    b = run_cli("generate", f"--model={d}", "--prompt=Hello there", "--no_chat_template", "--max_new_tokens=4")
    self.assertEqual(a.stdout, b.stdout)

  def test_bad_model_path_is_a_clear_error(self):
    proc = run_cli("generate", "--model=/nonexistent/model", "--prompt=hi", check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("/nonexistent/model: no such file or directory", proc.stderr)


class LandscapeCommandTest(absltest.TestCase):

  def test_demo_config_end_to_end_on_smollm2_then_export(self):
    """The README's main job (configs/demo.py, small grid) on the embedded real model."""
    w = self.create_tempdir().full_path
    proc = run_cli("landscape", "--config=configs/demo.py:tiny", f"--workdir={w}", "--noprogress")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertTrue(summary["complete"])
    self.assertLen(summary["asr"], 1)
    self.assertLen(summary["asr"][0], 3)
    for name in ("landscape.json", "generations.jsonl", "landscape.png", "directions.safetensors",
                 "run_config.json"):
      self.assertTrue(os.path.exists(os.path.join(w, name)), name)
    with open(os.path.join(w, "landscape.json")) as f:
      result = json.load(f)
    self.assertEqual(result["judge_disagreements"], [])
    self.assertIn("SmolLM2", result["model"])
    self.assertEqual((result["overrefusal"]["n_prompts"], result["overrefusal"]["judge"]), (4, "prefix"))
    self.assertTrue(os.path.exists(os.path.join(w, "overrefusal.jsonl")))   # the demo measures over-refusal
    # Re-running the finished run is a no-op resume with the same result.
    again = json.loads(run_cli("landscape", "--config=configs/demo.py:tiny", f"--workdir={w}",
                               "--noprogress").stdout.strip().splitlines()[-1])
    self.assertEqual(again["asr"], summary["asr"])
    # A different config in the same workdir is refused.
    refused = run_cli("landscape", "--config=configs/demo.py:tiny", f"--workdir={w}", "--noprogress",
                      "--config.landscape.seed=1", check=False)
    self.assertNotEqual(refused.returncode, 0)
    self.assertIn("different config (landscape.seed: 0 -> 1)", refused.stderr)
    out = os.path.join(self.create_tempdir().full_path, "dirs.safetensors")
    run_cli("export-directions", f"--workdir={w}", f"--out={out}")
    from safetensors.numpy import load_file
    tensors = load_file(out)
    self.assertEqual(tensors["0/model.layers.0.self_attn.q_proj.weight"].shape, (576, 576))
    self.assertEqual(tensors["0/model.embed_tokens.weight"].dtype, np.float32)
    self.assertNotIn("0/lm_head.weight", tensors)  # tied: one entry moves both
    self.assertTrue(np.all(tensors["0/model.norm.weight"] == 0))


class LandscapeSummaryTest(absltest.TestCase):

  def test_visage_printed_with_its_interval(self):
    w = self.create_tempdir().full_path
    run = dict(vis_type="1D_random", coords_x=[-1.0, 0.0, 1.0], coords_y=None, complete=True,
               asr=[[100.0, 0.0, 50.0]], visage={"per_direction": [75.0], "mean": 75.0},
               ci95={"visage": {"per_direction": [[60.0, 87.5]], "mean": [60.0, 87.5]}})
    summary = lambda r: landscape.summary_text(result.Result.from_json(r), w) + "\n"   # as printed
    self.assertIn("VISAGE (higher = safer): 75.0, 95% interval [60.00, 87.50] (bootstrap over prompts)",
                  summary(run))
    self.assertIn("VISAGE (higher = safer): 75.0\n", summary(dict(run, ci95=None)))   # older runs


if __name__ == "__main__":
  absltest.main()
