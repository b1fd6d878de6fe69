"""Blocks of safetensors tensors read with pread: numpy's slices of the whole tensor, bit for bit;
leaves built from blocks equal the whole read's slices; damaged files named. Streamed files are
what safetensors reads, each tensor produced after the one before it was written."""

import json
import os
import struct
from unittest import mock

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import fixtures
from visage_jax.checkpoints import hf_tensors, loader, safetensors_file
from visage_jax.errors import CheckpointError


def _save(path, arrays: dict) -> None:
  """safetensors.torch writes every dtype we read, bfloat16 included."""
  import torch
  from safetensors.torch import save_file
  save_file({k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) if v.dtype == jnp.bfloat16
             else torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, path)


class ReadBlockTest(parameterized.TestCase):

  @parameterized.named_parameters(("f32", np.float32), ("f16", np.float16), ("bf16", jnp.bfloat16))
  def test_blocks_are_numpy_slices(self, dtype):
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((37, 12)).astype(dtype), "n": rng.standard_normal(7).astype(dtype)}
    path = os.path.join(self.create_tempdir().full_path, "t.safetensors")
    _save(path, arrays)
    header = safetensors_file.read_header(path)
    self.assertEqual(header["w"][:2], (np.dtype(dtype), (37, 12)))
    fd = os.open(path, os.O_RDONLY)
    self.addCleanup(os.close, fd)
    cases = [("w", (slice(5, 19), slice(None))), ("w", (slice(None), slice(3, 9))),
             ("w", (slice(30, 37), slice(0, 6))), ("w", ()), ("n", (slice(2, 6),)), ("n", (slice(None),))]
    for chunk in (safetensors_file._CHUNK, 5 * 12 * np.dtype(dtype).itemsize):  # one read; 5 rows a read
      with mock.patch.object(safetensors_file, "_CHUNK", chunk):
        for name, index in cases:
          got = safetensors_file.read_block(fd, header[name], index, name)
          self.assertEqual(got.dtype, np.dtype(dtype))
          np.testing.assert_array_equal(got.view(np.uint8), arrays[name][index].view(np.uint8),
                                        err_msg=f"{name}{index} chunk {chunk}")

  def test_damaged_files_are_named(self):
    root = self.create_tempdir().full_path
    good = os.path.join(root, "good.safetensors")
    _save(good, {"w": np.ones((64, 64), np.float32)})
    with open(good, "rb") as f:
      blob = f.read()
    cut = os.path.join(root, "cut.safetensors")
    with open(cut, "wb") as f:
      f.write(blob[:-100])
    with self.assertRaisesRegex(CheckpointError, r"cut.safetensors: tensor 'w' \(F32 \[64, 64\]\) does not fit"):
      safetensors_file.read_header(cut)
    odd = os.path.join(root, "odd.safetensors")
    header = json.dumps({"z": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    with open(odd, "wb") as f:
      f.write(struct.pack("<Q", len(header)) + header + bytes(16))
    entry = safetensors_file.read_header(odd)["z"]  # listed; an error only when read
    with self.assertRaisesRegex(CheckpointError, "odd.safetensors: tensor 'z' has dtype C64"):
      safetensors_file.read_block(0, entry, (), f"{odd}: tensor 'z'")
    junk = os.path.join(root, "junk.safetensors")
    with open(junk, "wb") as f:
      f.write(struct.pack("<Q", 10) + b"not json!!")
    with self.assertRaisesRegex(CheckpointError, "junk.safetensors: not a readable safetensors file"):
      safetensors_file.read_header(junk)


class LeafBlockTest(parameterized.TestCase):

  @parameterized.named_parameters(("float32", "float32"), ("bfloat16", "bfloat16"))
  def test_leaf_blocks_are_slices_of_the_whole_leaf(self, dtype):
    """Every leaf (stacked, transposed, 1-D) read by blocks over layers, rows and columns equals
    the whole read's slice, also cast from a float16 file."""
    root = self.create_tempdir().full_path
    fixtures.save_tiny_hf(root, "llama", num_hidden_layers=3)
    path = os.path.join(root, "model.safetensors")
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      names = [k for k in json.loads(f.read(n)) if k != "__metadata__"]
    from safetensors.numpy import load_file
    _save(path, {k: v.astype(np.float16) for k, v in load_file(path).items()})
    cfg = loader.load_config(root, dtype)
    header = safetensors_file.read_header(path)
    self.assertEqual(sorted(header), sorted(names))
    fd = os.open(path, os.O_RDONLY)
    self.addCleanup(os.close, fd)
    from safetensors import safe_open
    whole = safe_open(path, framework="numpy")
    readers = hf_tensors.leaf_readers(whole.get_tensor, {k: v[1] for k, v in header.items()}, cfg, root,
                                   get_block=lambda k, i: safetensors_file.read_block(fd, header[k], i, k))
    checked = 0
    for leaf_path, read in readers:
      leaf = read()
      half, quarter = leaf.shape[-1] // 2, leaf.shape[-1] // 4
      for index in ((slice(1, 3),), (slice(None),) * (leaf.ndim - 1) + (slice(0, half),),
                    (slice(0, 1), slice(None), slice(quarter, half))[:leaf.ndim]):
        got = read.block(index)
        self.assertEqual(got.dtype, leaf.dtype)
        np.testing.assert_array_equal(got, leaf[index], err_msg=f"{leaf_path} {index}")
        checked += 1
    self.assertEqual(checked, 3 * len(readers))


class WriteStreamedTest(absltest.TestCase):

  def test_streamed_file_is_read_by_safetensors_one_tensor_at_a_time(self):
    """safetensors (torch, every dtype) reads back each tensor and the metadata; when a tensor is
    produced, the writer holds none before it (every process produces, only writers write)."""
    import weakref
    from safetensors import safe_open
    rng = np.random.default_rng(0)
    arrays = {"b.w": rng.standard_normal((5, 3)).astype(jnp.bfloat16), "a.n": np.arange(7, dtype=np.float32),
              "c.h": rng.standard_normal((2, 3, 4)).astype(np.float16), "d.i": np.arange(6, dtype=np.int32)}
    root = self.create_tempdir().full_path
    path, produced, held = os.path.join(root, "s.safetensors"), [], []

    def produce(key):
      held.append([k for k, alive in produced if alive() is not None])
      t = np.array(arrays[key], order="F")   # a fresh array, any layout: the writer makes it contiguous
      produced.append((key, weakref.ref(t)))
      return t
    keys = ["b.w", "a.n", "c.h", "d.i"]
    entries = [(k, arrays[k].dtype, arrays[k].shape, lambda k=k: produce(k)) for k in keys]
    for write in (False, True):
      produced.clear(), held.clear()
      safetensors_file.write_streamed(path, entries, metadata={"format": "pt"}, write=write)
      self.assertEqual([k for k, _ in produced], keys)
      self.assertEqual(held, [[]] * len(keys), "a tensor held while the next was produced")
      self.assertEqual(os.listdir(root), ["s.safetensors"] if write else [])
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
    self.assertEqual(n % 8, 0)
    with safe_open(path, framework="pt") as f:
      self.assertEqual(f.metadata(), {"format": "pt"})
      self.assertEqual(sorted(f.keys()), sorted(keys))
      for k in keys:
        got, want = f.get_tensor(k), arrays[k]
        self.assertEqual(str(got.dtype), f"torch.{want.dtype}")
        np.testing.assert_array_equal(got.float().numpy(), want.astype(np.float32), err_msg=k)


if __name__ == "__main__":
  absltest.main()
