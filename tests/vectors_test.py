"""Directions: per-HF-tensor normalization, blacklist, determinism, tied embeddings, safetensors I/O,
sharded draws bit-identical to one device."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import model
from visage_jax.checkpoints import hf_tensors
from visage_jax.directions import vectors


def _hf(tree, cfg):
  return hf_tensors.to_hf_tensors(tree, cfg)


class RandomDirectionTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.cfg = model.ModelConfig.tiny(num_layers=3)
    self.params = model.init(jax.random.key(0), self.cfg)

  def test_layer_norm_per_hf_tensor_and_blacklist(self):
    d = _hf(vectors.random_direction(7, self.params, self.cfg), self.cfg)
    theta = _hf(self.params, self.cfg)
    self.assertLen(d, 3 * 9 + 3)
    for name, t in d.items():
      if "norm" in name:
        np.testing.assert_array_equal(t, 0, err_msg=name)
      else:
        np.testing.assert_allclose(np.linalg.norm(t), np.linalg.norm(theta[name]), rtol=1e-5, err_msg=name)

  def test_filter_norm_per_output_row(self):
    d = _hf(vectors.random_direction(1, self.params, self.cfg, norm="filter"), self.cfg)
    theta = _hf(self.params, self.cfg)
    for name in ("model.layers.2.self_attn.q_proj.weight", "lm_head.weight", "model.embed_tokens.weight"):
      np.testing.assert_allclose(np.linalg.norm(d[name], axis=1), np.linalg.norm(theta[name], axis=1),
                                 rtol=1e-5, err_msg=name)

  def test_none_is_unit_per_tensor_and_custom_blacklist(self):
    d = _hf(vectors.random_direction(1, self.params, self.cfg, norm="none", blacklist=("mlp", "embed")),
            self.cfg)
    for name, t in d.items():
      if "mlp" in name or "embed" in name:
        np.testing.assert_array_equal(t, 0, err_msg=name)
      else:
        np.testing.assert_allclose(np.linalg.norm(t), 1.0, rtol=1e-5, err_msg=name)

  def test_each_tensor_drawn_from_its_own_name_key(self):
    """A tensor's draw is N(0, I) from fold_in(key, crc32(HF name)), in HF shape: independent of the
    stacking, of the other tensors and of the device layout."""
    import zlib
    key = jax.random.key(3)
    d = _hf(vectors.random_direction(key, self.params, self.cfg, norm="none", blacklist=()), self.cfg)
    name = "model.layers.1.mlp.down_proj.weight"
    z = np.asarray(jax.random.normal(jax.random.fold_in(key, zlib.crc32(name.encode())), d[name].shape))
    np.testing.assert_allclose(d[name], z / np.linalg.norm(z), rtol=1e-5, atol=1e-7)
    other = _hf(vectors.random_direction(jax.random.key(4), self.params, self.cfg), self.cfg)
    self.assertFalse(np.allclose(other[name], d[name]))

  def test_tied_embeddings_are_one_entry(self):
    cfg = model.ModelConfig.tiny(tie_word_embeddings=True)
    params = model.init(jax.random.key(0), cfg)
    d = _hf(vectors.random_direction(0, params, cfg), cfg)
    self.assertIn("model.embed_tokens.weight", d)
    self.assertNotIn("lm_head.weight", d)

  def test_orthogonalize(self):
    d1 = vectors.random_direction(0, self.params, self.cfg)
    d2 = vectors.orthogonalize(vectors.random_direction(1, self.params, self.cfg), d1)
    a, b = _hf(d1, self.cfg), _hf(d2, self.cfg)
    for name in a:
      if "norm" not in name:
        self.assertLess(abs(float(np.sum(a[name] * b[name]))), 1e-4 * np.linalg.norm(a[name]) ** 2)
        np.testing.assert_allclose(np.linalg.norm(b[name]), np.linalg.norm(a[name]), rtol=1e-4)

  def test_interpolation_lands_on_target(self):
    other = model.init(jax.random.key(9), self.cfg)
    d = vectors.interpolation_direction(self.params, other)
    jax.tree.map(lambda a, dd, b: np.testing.assert_allclose(a + dd, b, atol=1e-6), self.params, d, other)

  def test_bfloat16_directions_are_the_float32_ones_cast(self):
    """dtype= casts each leaf as it is made: the bits of the float32 direction cast afterwards,
    also when read back from a file, and stacked into [R, C, ...] on the mesh."""
    from visage_jax import sharding
    bf16 = lambda tree: jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16)), tree)
    same = lambda a, b: jax.tree.map(lambda x, y: np.testing.assert_array_equal(
        np.asarray(x).view(np.uint16), np.asarray(y).view(np.uint16)), a, b)
    ds = [vectors.random_direction(i, self.params, self.cfg, dtype="bfloat16") for i in range(2)]
    self.assertEqual({x.dtype for x in jax.tree.leaves(ds)}, {jnp.dtype(jnp.bfloat16)})
    same(ds[0], bf16(vectors.random_direction(0, self.params, self.cfg)))
    other = model.init(jax.random.key(9), self.cfg)
    same(vectors.interpolation_direction(self.params, other, "bfloat16"),
         bf16(vectors.interpolation_direction(self.params, other)))
    path = os.path.join(self.create_tempdir().full_path, "dirs.safetensors")
    vectors.save_safetensors(path, ds, self.cfg)
    same(vectors.load_safetensors(path, self.cfg, dtype="bfloat16"), ds)
    want = vectors.stack([vectors.stack([ds[0]]), vectors.stack([ds[1]])])
    stacked = vectors.stack_grouped([[ds[0]], [ds[1]]], sharding.make_mesh((1, 1)))
    same(stacked, want)
    self.assertEqual(stacked["layers"]["q_proj"].shape, (2, 1) + self.params["layers"]["q_proj"].shape)
    self.assertEqual(jax.tree.leaves(ds), [], "stacking frees the directions' leaves")

  def test_safetensors_round_trip_and_torch_interop(self):
    from safetensors.torch import load_file
    ds = [vectors.random_direction(i, self.params, self.cfg) for i in range(2)]
    path = os.path.join(self.create_tempdir().full_path, "dirs.safetensors")
    vectors.save_safetensors(path, ds, self.cfg)
    as_torch = load_file(path)
    self.assertEqual(tuple(as_torch["1/model.layers.0.self_attn.k_proj.weight"].shape), (32, 64))
    back = vectors.load_safetensors(path, self.cfg)
    for a, b in zip(ds, back):
      jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    with self.assertRaisesRegex(ValueError, "holds 2 direction"):
      vectors.load_safetensors(path, self.cfg, count=3)

  def test_sliced_read_places_each_leaf_with_the_whole_read_bits(self):
    """load_safetensors(shardings=...) reads slices per shard into the target sharding; on one
    device the shard is the leaf, and the bits equal the whole read (2 processes: distributed_test)."""
    from jax.sharding import NamedSharding, PartitionSpec
    from visage_jax import sharding
    ds = [vectors.random_direction(i, self.params, self.cfg) for i in range(2)]
    path = os.path.join(self.create_tempdir().full_path, "dirs.safetensors")
    vectors.save_safetensors(path, ds, self.cfg)
    mesh = sharding.make_mesh((1, 1))
    targets = sharding.param_shardings(self.params, mesh)
    got = vectors.load_safetensors(path, self.cfg, count=1, shardings=targets)
    self.assertLen(got, 1)
    for x, t, want in zip(jax.tree.leaves(got[0]), jax.tree.leaves(targets), jax.tree.leaves(ds[0])):
      self.assertIsInstance(x.sharding, NamedSharding)
      self.assertTrue(x.sharding.is_equivalent_to(t, x.ndim))
      np.testing.assert_array_equal(np.asarray(x), np.asarray(want))
    bad = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), self.params)
    other_cfg = model.ModelConfig.tiny(num_layers=3, intermediate_size=96)
    with self.assertRaisesRegex(ValueError, r"direction 0\): tensor 'model.layers.0.mlp.gate_proj.weight' "
                                            r"has shape \(128, 64\), expected \(96, 64\)"):
      vectors.load_safetensors(path, other_cfg, shardings=bad)

  def test_mismatched_direction_file_is_named(self):
    other_cfg = model.ModelConfig.tiny(num_layers=3, intermediate_size=96)
    path = os.path.join(self.create_tempdir().full_path, "dirs.safetensors")
    vectors.save_safetensors(path, [vectors.random_direction(0, model.init(jax.random.key(0), other_cfg),
                                                                   other_cfg)], other_cfg)
    with self.assertRaisesRegex(ValueError, r"gate_proj.weight' has shape \(96, 64\), expected \(128, 64\)"):
      vectors.load_safetensors(path, self.cfg)
    with self.assertRaisesRegex(ValueError, r"direction 0: layers/down_proj has shape \(3, 96, 64\), the model's "
                                            r"is \(3, 128, 64\)"):
      vectors.check_matches(vectors.random_direction(0, model.init(jax.random.key(0), other_cfg), other_cfg),
                               self.params, "direction 0")


class OrderedSumTest(parameterized.TestCase):

  @parameterized.parameters(1, 5, 64, 96, 320, 1000)
  def test_ordered_sum_is_the_sum(self, n):
    x = np.random.default_rng(n).standard_normal((3, n, 2)).astype(np.float32)
    got = vectors._ordered_sum(jax.numpy.asarray(x), 1, None)
    self.assertEqual(got.shape, (3, 1, 2))
    np.testing.assert_allclose(got, x.astype(np.float64).sum(1, keepdims=True), rtol=1e-5, atol=1e-5)


class ShardedDrawTest(absltest.TestCase):

  def test_sharded_draws_are_one_device_bits_and_stay_sharded(self):
    """8 virtual CPU devices, meshes (1,1) (8,1) (1,8) (2,4) (4,2), norms layer/filter/none, the
    `shardings=` argument and orthogonalize: bit-identical to the one-device result, every leaf in
    its param sharding with each device holding its shard only; drawing communicates nothing and
    normalizing only partial sums."""
    out = os.path.join(self.create_tempdir().full_path, "directions.json")
    proc = fixtures.run_script("scaleout_main.py", "directions", out)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    with open(out) as f:
      r = json.load(f)
    self.assertEqual(r["problems"], [])
    self.assertEqual(r["compared"], (5 * (3 + 1) + 1) * 11)  # (5 meshes x 4 draws + orthogonalize) x leaves
    for mesh, split in r["split"].items():  # all but the 3 RMSNorm leaves split over "model"
      self.assertEqual(split, 8 if mesh.endswith(("x8", "x4", "x2")) else 0, mesh)
    stages = {name for name, _, _ in r["collectives"]}
    self.assertEqual(stages, {"_draw", "_squares", "_normalize", "_zeros"})
    for name, biggest, size in r["collectives"]:
      if name != "_normalize":
        self.assertEqual(biggest, 0, f"{name} communicates")  # each device draws its own shard
      self.assertLess(biggest, size, f"{name}: a collective moves a whole leaf")


if __name__ == "__main__":
  absltest.main()
