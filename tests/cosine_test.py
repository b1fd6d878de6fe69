"""Cosines of saved directions against numpy on the flattened HF tensors."""

import contextlib
import io
import json
import os

import jax
import numpy as np
from absl.testing import absltest

import fixtures

from visage_jax import cli, errors, model
from visage_jax.checkpoints import hf_tensors
from visage_jax.directions import cosine, vectors


class CosineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cfg = model.ModelConfig.tiny(num_layers=2)
    cls.params = model.init(jax.random.key(0), cls.cfg)
    d = [vectors.random_direction(i, cls.params, cls.cfg) for i in range(3)]
    mixed = jax.tree.map(lambda a, b: 0.6 * a + 0.8 * b, d[0], d[1])   # correlated with both
    cls.dirs = [d[0], d[1], d[2], mixed]
    root = absltest.get_default_test_tmpdir()
    cls.run_dir = os.path.join(root, "cosine_run")
    os.makedirs(cls.run_dir, exist_ok=True)
    vectors.save_safetensors(os.path.join(cls.run_dir, cosine.FILE), cls.dirs[:2], cls.cfg)
    cls.file = os.path.join(root, "other.safetensors")
    vectors.save_safetensors(cls.file, cls.dirs[2:], cls.cfg)

  def _flat(self, d):
    return np.concatenate([t.astype(np.float64).ravel() for _, t in sorted(hf_tensors.to_hf_tensors(d, self.cfg).items())])

  def test_matrix_is_numpys(self):
    labels, cos = cosine.cosine_matrix([self.run_dir, self.file])
    self.assertEqual(labels, [f"{self.run_dir}#0", f"{self.run_dir}#1", f"{self.file}#0", f"{self.file}#1"])
    x = np.stack([self._flat(d) for d in self.dirs])
    want = (x @ x.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
    np.testing.assert_allclose(cos, want, rtol=1e-6, atol=1e-7)
    self.assertGreater(cos[0, 3], 0.3)       # the mixed direction leans on both of its parts
    self.assertLess(abs(cos[0, 2]), 0.1)     # independent draws are nearly orthogonal

  def test_command_prints_the_table_and_writes_json(self):
    out = os.path.join(self.create_tempdir().full_path, "cos.json")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), fixtures.cli_flag("out", out):
      cli.cmd_cosine([self.run_dir, self.file])
    self.assertIn(f"3: {self.file}#1", buf.getvalue())
    self.assertIn("+1.0000", buf.getvalue())
    with open(out) as f:
      saved = json.load(f)
    self.assertLen(saved["cosine"], 4)

  def test_bad_sources(self):
    with self.assertRaisesRegex(errors.UserError, "no-such: no such file"):
      cosine.cosine_matrix(["no-such"])
    empty = self.create_tempdir().full_path
    with self.assertRaisesRegex(errors.UserError, "without directions.safetensors"):
      cosine.cosine_matrix([empty])
    small = model.ModelConfig.tiny(num_layers=1)
    other = os.path.join(self.create_tempdir().full_path, "small.safetensors")
    vectors.save_safetensors(other, [vectors.random_direction(0, model.init(jax.random.key(1), small), small)], small)
    with self.assertRaisesRegex(errors.UserError, "different models"):
      cosine.cosine_matrix([self.run_dir, other])


if __name__ == "__main__":
  absltest.main()
