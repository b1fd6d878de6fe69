"""`random:<preset>` models: shapes from the planner, created on the mesh, fixed seed; full-budget
rows; refused where text is read (landscape), taken by `plan`."""

import os
import subprocess
import sys

import jax
import numpy as np
from absl.testing import absltest

from visage_jax import engine, model, planner, sharding
from visage_jax.checkpoints import loader, random_weights
from visage_jax.errors import CheckpointError
from visage_jax.runs import bench, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "visage_jax.cli", *args], capture_output=True, text=True,
                        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)


class RandomWeightsTest(absltest.TestCase):

  def test_tiny_is_model_init_of_the_seed_on_the_mesh_in_dtype(self):
    mesh = sharding.make_mesh((1, 1))
    cfg, params = loader.load_params("random:tiny", "bfloat16", shardings=mesh)
    self.assertEqual(cfg, model.ModelConfig.tiny(dtype="bfloat16", param_dtype="bfloat16"))
    eager = model.init(jax.random.key(random_weights.SEED), cfg)  # jit rounds the bfloat16 cast alike, fused
    _, unplaced = loader.load_params("random:tiny", "bfloat16")   # the default device: the same bits
    want_shardings = sharding.param_shardings(params, mesh)
    for got, want, same, where in zip(jax.tree.leaves(params), jax.tree.leaves(eager), jax.tree.leaves(unplaced),
                                      jax.tree.leaves(want_shardings)):
      self.assertEqual(got.dtype, jax.numpy.bfloat16)
      self.assertEqual(got.sharding, where)
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-4)
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(same, np.float32))

  def test_presets_are_the_planners_models(self):
    for name in planner.MODELS:
      self.assertEqual(loader.load_config(f"random:{name}", "bfloat16"), planner.known_model(name, "bfloat16"))
    with self.assertRaisesRegex(CheckpointError, "no random preset 'llama9'; presets: tiny, llama2_7b"):
      loader.load_config("random:llama9")

  def test_every_row_decodes_its_whole_budget(self):
    """No EOS id and no refusal keyword: the landscape's own spec (EOS + stop_at_refusal) runs
    every row to max_new_tokens."""
    c = bench.default_config()
    c.model.path = "random:tiny"
    c.prompts.update(limit=3, template="llama2")
    c.landscape.update(steps=2, save_directions=False)
    c.decode.max_new_tokens = 7
    s = bench.load_setup(c, self.create_tempdir().full_path)
    self.assertIsNone(s.model.tokenizer)
    self.assertEqual(s.spec.eos_ids, ())
    self.assertTrue(s.spec.stop_at_refusal)
    self.assertFalse(s.spec.fixed_length)
    self.assertFalse(np.asarray(s.tables.matched).any())
    work = engine.Workload(s.model.params, s.model.cfg, s.stacked, s.coefs, s.prompts.tokens, s.prompts.mask,
                           s.tables, s.spec, points=[0, 1, 2], mesh=s.mesh)
    for mode in ("materialized", "continuous"):
      rows = 0
      for ch in engine.evaluate(work, mode=mode, max_batch=4):
        np.testing.assert_array_equal(ch.length, 7)
        self.assertFalse(ch.refused.any())
        rows += ch.length.size
      self.assertEqual(rows, 9, mode)

  def test_text_reading_refuses_it(self):
    with self.assertRaisesRegex(CheckpointError, "random weights have no tokenizer"):
      pipeline.load_model("random:tiny", "float32")
    with self.assertRaisesRegex(CheckpointError, "random weights have no tokenizer"):
      loader.load_tokenizer("random:llama2_7b")

  def test_landscape_command_refuses_it_in_one_line_and_writes_nothing(self):
    w = self.create_tempdir().full_path
    proc = run_cli("landscape", "--config=configs/demo.py:tiny", f"--workdir={w}", "--noprogress",
                   "--config.model.path=random:llama2_7b")
    self.assertEqual(proc.returncode, 2, proc.stderr)
    self.assertEqual(proc.stderr.strip().splitlines(),
                     ["visage-jax: error: model 'random:llama2_7b': random weights have no tokenizer and "
                      "their generations mean nothing; only `visage-jax bench` and `plan` take a random: model."])
    self.assertEqual(os.listdir(w), [])

  def test_plan_takes_it(self):
    proc = run_cli("plan", "--model=random:llama2_7b", "--accelerator=h100", "--mesh=1,1")
    self.assertEqual(proc.returncode, 0, proc.stderr)
    row = next(l for l in proc.stdout.splitlines() if l.startswith("| random:llama2_7b"))
    expected = planner.plan(planner.known_model("llama2_7b"), planner.ACCELERATORS["h100"].memory_bytes,
                            (1, 1), prompt_len=256, max_new_tokens=512)
    self.assertIn(f"| {expected['global_batch']} ", row)


if __name__ == "__main__":
  absltest.main()
