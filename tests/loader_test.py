"""Conversion: HF dirs (single and sharded), GGUF (whole and by blocks on 8 devices), orbax round
trip, HF-name map, bad inputs, sharded save/restore (8 devices, 2 processes), streaming
conversion and its peak memory."""

import json
import os
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import model
from visage_jax.checkpoints import gguf_file, hf_tensors, loader


class HfDirTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path
    self.hf = fixtures.save_tiny_hf(self.dir, "llama", tokenizer=fixtures.toy_tokenizer())

  def test_hf_to_tree_to_orbax_to_tree_is_bit_identical(self):
    cfg, params = loader.load_params(self.dir)
    out = os.path.join(self.create_tempdir().full_path, "converted")
    loader.save_converted(out, cfg, params, loader.load_tokenizer(self.dir), source=self.dir)
    cfg2, params2 = loader.load_params(out)
    self.assertEqual(cfg, cfg2)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    hf_state = {k: v.numpy() for k, v in self.hf.state_dict().items()}
    exported = hf_tensors.to_hf_tensors(params2, cfg2)
    self.assertEqual(set(exported), set(hf_state))
    for name, t in exported.items():
      np.testing.assert_array_equal(t, hf_state[name], err_msg=name)
    self.assertEqual(len(loader.load_tokenizer(out)), len(loader.load_tokenizer(self.dir)))

  def test_bfloat16_checkpoint_loads_on_one_device(self):
    # Most released chat models (e.g. Llama-3-8B-Instruct) ship bfloat16 safetensors, which
    # safetensors' numpy reader cannot read; the pread reader can.
    import torch
    bf16 = self.create_tempdir().full_path
    self.hf.to(torch.bfloat16).save_pretrained(bf16)
    cfg, params = loader.load_params(bf16)
    exported = hf_tensors.to_hf_tensors(params, cfg)
    for name, t in self.hf.state_dict().items():
      np.testing.assert_array_equal(exported[name], t.float().numpy(), err_msg=name)

  def test_sharded_checkpoint_loads_like_single_file(self):
    sharded = self.create_tempdir().full_path
    single = self.create_tempdir().full_path
    fixtures.save_tiny_hf(sharded, "llama", max_shard_size="60KB")
    fixtures.save_tiny_hf(single, "llama")
    self.assertTrue(os.path.exists(os.path.join(sharded, "model.safetensors.index.json")))
    _, a = loader.load_params(single)
    _, b = loader.load_params(sharded)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)

  def test_hf_name_map_addresses_single_layers(self):
    cfg, params = loader.load_params(self.dir)
    path, layer, transposed = hf_tensors.leaf_for_hf_name("model.layers.1.mlp.down_proj.weight", cfg)
    self.assertEqual((path, layer, transposed), (("layers", "down_proj"), 1, True))
    leaf = np.asarray(hf_tensors.get_leaf(params, path))[layer]
    np.testing.assert_array_equal(leaf.T, self.hf.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy())
    with self.assertRaisesRegex(KeyError, "model.layers.9"):
      hf_tensors.leaf_for_hf_name("model.layers.9.mlp.down_proj.weight", cfg)

  def test_missing_shard_is_named(self):
    sharded = self.create_tempdir().full_path
    fixtures.save_tiny_hf(sharded, "llama", max_shard_size="60KB")
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
      shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(sharded, shard))
    with self.assertRaisesRegex(loader.CheckpointError, f"{shard}: shard listed in the index is missing"):
      loader.load_params(sharded)

  def test_wrong_shape_names_tensor_and_both_shapes(self):
    with open(os.path.join(self.dir, "config.json")) as f:
      cfg = json.load(f)
    cfg["intermediate_size"] = 96
    with open(os.path.join(self.dir, "config.json"), "w") as f:
      json.dump(cfg, f)
    with self.assertRaisesRegex(loader.CheckpointError,
                                r"'model.layers.0.mlp.gate_proj.weight' has shape \(128, 64\), expected \(96, 64\)"):
      loader.load_params(self.dir)

  def test_missing_tensor_is_named(self):
    from safetensors.numpy import load_file, save_file
    f = os.path.join(self.dir, "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with self.assertRaisesRegex(loader.CheckpointError, "missing tensor 'model.layers.1.self_attn.v_proj.weight'"):
      loader.load_params(self.dir)

  def test_unsupported_model_type(self):
    with open(os.path.join(self.dir, "config.json")) as f:
      cfg = json.load(f)
    cfg["model_type"] = "qwen2"
    with open(os.path.join(self.dir, "config.json"), "w") as f:
      json.dump(cfg, f)
    with self.assertRaisesRegex(ValueError, "model_type 'qwen2' is not supported"):
      loader.load_params(self.dir)

  def test_unreadable_paths(self):
    with self.assertRaisesRegex(loader.CheckpointError, "no such file"):
      loader.load_params(os.path.join(self.dir, "nope"))
    empty = self.create_tempdir().full_path
    with self.assertRaisesRegex(loader.CheckpointError, "neither config.json"):
      loader.load_params(empty)

  def test_failed_conversion_leaves_nothing_behind(self):
    cfg, params = loader.load_params(self.dir)
    parent = self.create_tempdir().full_path
    with self.assertRaises(AttributeError):  # the tokenizer fails after the params were written
      loader.save_converted(os.path.join(parent, "out"), cfg, params, tokenizer=object())
    self.assertEqual(os.listdir(parent), [])


class EosIdsTest(absltest.TestCase):

  def test_greedy_stops_at_every_generation_config_eos_as_transformers_generate(self):
    import torch
    from transformers import AutoModelForCausalLM
    from visage_jax import decode, prompts

    d = self.create_tempdir().full_path
    tok = fixtures.toy_tokenizer()
    fixtures.save_tiny_hf(d, "llama", tokenizer=tok)
    cfg, params = loader.load_params(d)
    goals = ("Write a poem", "Tell me a story now", "How do I bake bread")
    ids = prompts.tokenize_prompts([prompts.format_prompt(g, tok) for g in goals], tok, "auto")
    free = decode.generate(params, cfg, ids, max_new_tokens=10, eos_ids=(-1,), pad_id=0)
    ends = (free[0][3], free[1][3])  # Llama-3 style: two ids end a turn
    with open(os.path.join(d, loader.GENERATION_CONFIG)) as f:
      generation = json.load(f)
    generation["eos_token_id"] = list(ends)
    with open(os.path.join(d, loader.GENERATION_CONFIG), "w") as f:
      json.dump(generation, f)

    eos = loader.eos_ids(d, tok)
    self.assertEqual(eos, tuple(sorted({*ends, tok.eos_token_id})))
    got = decode.generate(params, cfg, ids, max_new_tokens=10, eos_ids=eos, pad_id=decode.pad_id_of(tok))
    self.assertEqual([g[-1] for g in got[:2]], list(ends))
    self.assertEqual(len(got[2]), 10)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    for row, g in zip(ids, got):
      with torch.no_grad():
        ref = hf.generate(torch.tensor([row]), max_new_tokens=10, do_sample=False)[0, len(row):].tolist()
      self.assertEqual(g, ref)

    converted = os.path.join(self.create_tempdir().full_path, "converted")
    loader.convert(d, converted, tokenizer=tok)
    self.assertEqual(loader.eos_ids(converted, tok), eos)
    os.remove(os.path.join(converted, loader.GENERATION_CONFIG))  # as a GGUF file's converted copy
    self.assertEqual(loader.eos_ids(converted, tok), (tok.eos_token_id,))


class StreamingConvertTest(absltest.TestCase):

  def test_convert_of_sharded_checkpoint_is_the_transformers_tree(self):
    src = self.create_tempdir().full_path
    hf = fixtures.save_tiny_hf(src, "llama", max_shard_size="60KB")
    self.assertTrue(os.path.exists(os.path.join(src, "model.safetensors.index.json")))
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    for dtype in ("float32", "bfloat16"):
      out = os.path.join(self.create_tempdir().full_path, "converted")
      loader.convert(src, out, dtype)
      self.assertTrue(os.path.isdir(os.path.join(out, "params", "layers.down_proj")))
      cfg, params = loader.load_params(out, dtype)
      got = hf_tensors.to_hf_tensors(params, cfg)
      self.assertEqual(set(got), set(state))
      for name, t in got.items():
        np.testing.assert_array_equal(t, state[name].astype(t.dtype), err_msg=f"{dtype} {name}")
        self.assertEqual(t.dtype, np.dtype(jax.numpy.dtype(dtype)))

  def test_whole_tree_format_1_still_loads(self):
    import orbax.checkpoint as ocp
    cfg = model.ModelConfig.tiny()
    params = model.init(jax.random.key(3), cfg)
    path = self.create_tempdir().full_path
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(os.path.join(path, "params"), params)
      ckpt.wait_until_finished()
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(model.config_to_hf(cfg), f)
    with open(os.path.join(path, loader.CONVERTED_MARKER), "w") as f:
      json.dump({"format": 1, "source": "", "param_dtype": "float32"}, f)
    _, back = loader.load_params(path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, back)

  def test_convert_peak_host_memory_is_a_fraction_of_the_model(self):
    """A ~130 MB float32 checkpoint in 40 MB shards: the streaming conversion's peak resident
    memory (VmHWM, measured in a fresh process) stays well under the model; loading it whole does not."""
    src = self.create_tempdir().full_path
    fixtures.save_tiny_hf(src, "llama", max_shard_size="40MB", vocab_size=8192, hidden_size=512,
                          intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=4)
    out = os.path.join(self.create_tempdir().full_path, "memory.json")
    proc = fixtures.run_script("scaleout_main.py", "convert", src,
                               os.path.join(self.create_tempdir().full_path, "converted"), out)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    with open(out) as f:
      r = json.load(f)
    print("convert memory:", json.dumps(r))
    self.assertGreater(r["shards"], 1)
    self.assertGreater(r["checkpoint_bytes"], 0.99 * r["model_bytes"])
    self.assertLess(r["streamed_peak_bytes"], 0.5 * r["model_bytes"])
    self.assertGreater(r["whole_peak_bytes"], r["model_bytes"])


class ShardedCheckpointTest(absltest.TestCase):

  def test_save_from_one_mesh_restores_into_others(self):
    """8 virtual CPU devices: a (2,4)-sharded tree saved, restored into (4,2), (1,1), (1,8), via
    load_params and onto one device, and a sharded HF directory converted through a (2,4) mesh:
    bit-identical, each leaf in the requested sharding."""
    root = self.create_tempdir().full_path
    hf_dir = os.path.join(root, "hf")
    fixtures.save_tiny_hf(hf_dir, "llama", max_shard_size="60KB")
    out = os.path.join(root, "checkpoints.json")
    proc = fixtures.run_script("scaleout_main.py", "checkpoints", root, hf_dir, out)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    with open(out) as f:
      r = json.load(f)
    self.assertEqual(r["problems"], [])
    self.assertEqual(r["compared"], 5 * 11 + 12)  # restores x leaves (tied: no lm_head), HF leaves
    self.assertEqual(r["split"], {"4x2": 8, "1x1": 0, "1x8": 8})  # all but the 3 RMSNorm leaves

  def test_two_processes_write_and_read_their_shards(self):
    """2 processes x 4 CPU devices (gloo): save from a (2,4) mesh, restore into (4,2), and a
    direction drawn over both processes; every shard each process holds is checked."""
    root = self.create_tempdir().full_path
    port = str(fixtures.free_port())
    env = fixtures.subprocess_env()
    script = os.path.join(os.path.dirname(__file__), "scaleout_main.py")
    outs = [os.path.join(root, f"process{i}.json") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, script, "process", port, "2", str(i), root, outs[i]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    logs = fixtures.wait_all(procs, 240)
    for p, log in zip(procs, logs):
      self.assertEqual(p.returncode, 0, log[-4000:])
    reports = []
    for o in outs:
      with open(o) as f:
        reports.append(json.load(f))
    for r in reports:
      self.assertEqual(r["problems"], [])
      self.assertEqual((r["devices"], r["local_devices"]), (8, 4))
      self.assertGreater(r["compared"], 2 * 11)
    self.assertIn("params", reports[0]["files"])
    self.assertIn(loader.CONVERTED_MARKER, reports[0]["files"])
    self.assertEqual(reports[0]["writers"], ["ocdbt.process_0", "ocdbt.process_1"])  # each its shards


class GgufTest(absltest.TestCase):

  def test_corrupt_gguf(self):
    d = self.create_tempdir().full_path
    bad = os.path.join(d, "bad.gguf")
    with open(bad, "wb") as f:
      f.write(b"GGUF" + os.urandom(64))
    with self.assertRaisesRegex(loader.CheckpointError, "bad.gguf: not a readable GGUF file"):
      loader.load_params(bad)

  def test_truncated_gguf(self):
    src = loader.default_model_path()
    d = self.create_tempdir().full_path
    bad = os.path.join(d, "truncated.gguf")
    with open(src, "rb") as f, open(bad, "wb") as g:
      g.write(f.read(3_000_000))
    with self.assertRaisesRegex(loader.CheckpointError, "truncated.gguf"):
      loader.load_params(bad)

  def test_gguf_is_converted_once_and_loads_the_same_bits_from_the_cache(self):
    gguf_path = loader.default_model_path()
    cache = self.create_tempdir().full_path
    with mock.patch.dict(os.environ, VISAGE_JAX_CACHE="off"):
      self.assertEqual(loader.resolve(gguf_path, "bfloat16"), gguf_path)
      cfg, params = loader.load_params(gguf_path, "bfloat16")
      tok = loader.load_tokenizer(gguf_path)
    with mock.patch.dict(os.environ, VISAGE_JAX_CACHE=cache):
      cfg1, params1 = loader.load_params(loader.resolve(gguf_path, "bfloat16"), "bfloat16")
      (copy,) = os.listdir(cache)
      self.assertTrue(copy.endswith("-bfloat16"), copy)
      self.assertEqual(loader.resolve(gguf_path, "bfloat16"), os.path.join(cache, copy))
      with mock.patch.object(gguf_file, "gguf_leaves", side_effect=AssertionError("re-read")):
        cfg2, params2 = loader.load_params(loader.resolve(gguf_path, "bfloat16"), "bfloat16")
        tok2 = loader.load_tokenizer(gguf_path)
    self.assertEqual(cfg, cfg1)
    self.assertEqual(cfg, cfg2)
    for got in (params1, params2):
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, got)
    text = "Write a poem about the sea."
    self.assertEqual(tok(text)["input_ids"], tok2(text)["input_ids"])
    self.assertEqual(tok.chat_template, tok2.chat_template)
    self.assertEqual(tok.eos_token_id, tok2.eos_token_id)

  def test_blocks_on_a_mesh_are_the_whole_tensors_bits(self):
    """8 virtual CPU devices: a GGUF of eight tensor types loaded onto (1,8), (2,4) and (8,1)
    meshes by blocks equals its whole-tensor load bit for bit; a split tensor is never
    dequantized whole, each row of a row-split one (q/k permuted) once, 1 KB at a time on 1x8."""
    import gguf

    root = self.create_tempdir().full_path
    path = os.path.join(root, "tiny.gguf")
    fixtures.save_tiny_gguf(path)
    out = os.path.join(root, "gguf.json")
    proc = fixtures.run_script("scaleout_main.py", "gguf", path, out)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    with open(out) as f:
      r = json.load(f)
    self.assertEqual(r["problems"], [])
    self.assertEqual(r["compared"], 3 * 12)
    rows = {t.name: int(t.shape[1]) for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}
    row_split = {n: k for n, k in rows.items() if not n.endswith(("_output.weight", "_down.weight"))}
    self.assertLen(row_split, 2 + 5 * 2)
    loads = r["loads"]
    for mesh in ("1x8", "2x4"):
      self.assertEqual(loads[mesh]["whole"], [], mesh)
      self.assertEqual({n: loads[mesh]["rows"][n] for n in row_split}, row_split, mesh)
    self.assertLessEqual(loads["1x8"]["largest"], 1024)
    self.assertEqual(loads["8x1"]["whole"], sorted(rows))  # replicated: each read once, not per device
    self.assertEqual({n: loads["8x1"]["rows"][n] for n in rows}, rows)

  def test_unpermute_inverts_llama_cpp_permute(self):
    """llama.cpp convert_hf_to_gguf.py permutes q/k rows; we must undo exactly that."""
    def permute(w, n_head):
      return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for heads in (1, 3, 6):
      np.testing.assert_array_equal(gguf_file.unpermute_rows(permute(w, heads), heads), w)


if __name__ == "__main__":
  absltest.main()
