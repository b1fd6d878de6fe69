"""Conversion: HF dirs (single and sharded), GGUF, orbax round trip, HF-name map, bad inputs."""

import json
import os
import shutil
import tempfile

import jax
import numpy as np
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import checkpoints, model


class HfDirTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path
    self.hf = fixtures.save_tiny_hf(self.dir, "llama", tokenizer=fixtures.toy_tokenizer())

  def test_hf_to_tree_to_orbax_to_tree_is_bit_identical(self):
    cfg, params = checkpoints.load_params(self.dir)
    out = os.path.join(self.create_tempdir().full_path, "converted")
    checkpoints.save_converted(out, cfg, params, checkpoints.load_tokenizer(self.dir), source=self.dir)
    cfg2, params2 = checkpoints.load_params(out)
    self.assertEqual(cfg, cfg2)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    hf_state = {k: v.numpy() for k, v in self.hf.state_dict().items()}
    exported = checkpoints.to_hf_tensors(params2, cfg2)
    self.assertEqual(set(exported), set(hf_state))
    for name, t in exported.items():
      np.testing.assert_array_equal(t, hf_state[name], err_msg=name)
    self.assertEqual(len(checkpoints.load_tokenizer(out)), len(checkpoints.load_tokenizer(self.dir)))

  def test_sharded_checkpoint_loads_like_single_file(self):
    sharded = self.create_tempdir().full_path
    single = self.create_tempdir().full_path
    fixtures.save_tiny_hf(sharded, "llama", max_shard_size="60KB")
    fixtures.save_tiny_hf(single, "llama")
    self.assertTrue(os.path.exists(os.path.join(sharded, "model.safetensors.index.json")))
    _, a = checkpoints.load_params(single)
    _, b = checkpoints.load_params(sharded)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)

  def test_hf_name_map_addresses_single_layers(self):
    cfg, params = checkpoints.load_params(self.dir)
    path, layer, transposed = checkpoints.leaf_for_hf_name("model.layers.1.mlp.down_proj.weight", cfg)
    self.assertEqual((path, layer, transposed), (("layers", "down_proj"), 1, True))
    leaf = np.asarray(checkpoints.get_leaf(params, path))[layer]
    np.testing.assert_array_equal(leaf.T, self.hf.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy())
    with self.assertRaisesRegex(KeyError, "model.layers.9"):
      checkpoints.leaf_for_hf_name("model.layers.9.mlp.down_proj.weight", cfg)

  def test_missing_shard_is_named(self):
    sharded = self.create_tempdir().full_path
    fixtures.save_tiny_hf(sharded, "llama", max_shard_size="60KB")
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
      shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(sharded, shard))
    with self.assertRaisesRegex(checkpoints.CheckpointError, f"{shard}: shard listed in the index is missing"):
      checkpoints.load_params(sharded)

  def test_wrong_shape_names_tensor_and_both_shapes(self):
    with open(os.path.join(self.dir, "config.json")) as f:
      cfg = json.load(f)
    cfg["intermediate_size"] = 96
    with open(os.path.join(self.dir, "config.json"), "w") as f:
      json.dump(cfg, f)
    with self.assertRaisesRegex(checkpoints.CheckpointError,
                                r"'model.layers.0.mlp.gate_proj.weight' has shape \(128, 64\), expected \(96, 64\)"):
      checkpoints.load_params(self.dir)

  def test_missing_tensor_is_named(self):
    from safetensors.numpy import load_file, save_file
    f = os.path.join(self.dir, "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with self.assertRaisesRegex(checkpoints.CheckpointError, "missing tensor 'model.layers.1.self_attn.v_proj.weight'"):
      checkpoints.load_params(self.dir)

  def test_unsupported_model_type(self):
    with open(os.path.join(self.dir, "config.json")) as f:
      cfg = json.load(f)
    cfg["model_type"] = "qwen2"
    with open(os.path.join(self.dir, "config.json"), "w") as f:
      json.dump(cfg, f)
    with self.assertRaisesRegex(ValueError, "model_type 'qwen2' is not supported"):
      checkpoints.load_params(self.dir)

  def test_unreadable_paths(self):
    with self.assertRaisesRegex(checkpoints.CheckpointError, "no such file"):
      checkpoints.load_params(os.path.join(self.dir, "nope"))
    empty = self.create_tempdir().full_path
    with self.assertRaisesRegex(checkpoints.CheckpointError, "neither config.json"):
      checkpoints.load_params(empty)

  def test_failed_conversion_leaves_nothing_behind(self):
    cfg, params = checkpoints.load_params(self.dir)
    parent = self.create_tempdir().full_path
    with self.assertRaises(AttributeError):  # the tokenizer fails after the params were written
      checkpoints.save_converted(os.path.join(parent, "out"), cfg, params, tokenizer=object())
    self.assertEqual(os.listdir(parent), [])


class GgufTest(absltest.TestCase):

  def test_corrupt_gguf(self):
    d = self.create_tempdir().full_path
    bad = os.path.join(d, "bad.gguf")
    with open(bad, "wb") as f:
      f.write(b"GGUF" + os.urandom(64))
    with self.assertRaisesRegex(checkpoints.CheckpointError, "bad.gguf: not a readable GGUF file"):
      checkpoints.load_params(bad)

  def test_truncated_gguf(self):
    src = checkpoints.default_model_path()
    d = self.create_tempdir().full_path
    bad = os.path.join(d, "truncated.gguf")
    with open(src, "rb") as f, open(bad, "wb") as g:
      g.write(f.read(3_000_000))
    with self.assertRaisesRegex(checkpoints.CheckpointError, "truncated.gguf"):
      checkpoints.load_params(bad)

  def test_unpermute_inverts_llama_cpp_permute(self):
    """llama.cpp convert_hf_to_gguf.py permutes q/k rows; we must undo exactly that."""
    def permute(w, n_head):
      return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for heads in (1, 3, 6):
      np.testing.assert_array_equal(checkpoints._unpermute_rows(permute(w, heads), heads), w)


if __name__ == "__main__":
  absltest.main()
