"""llama.cpp GGUF files -> params: metadata -> ModelConfig, tensors dequantized one at a time by
the `gguf` package, and llama.cpp's q/k row permutation undone (its interleaved RoPE layout).

Onto a mesh, each process dequantizes only the rows and quant blocks of its own shards, `_CHUNK`
bytes at a time: ggml stores a tensor row by row, each row a run of independent quant blocks,
so a block decodes to the same bits as the whole tensor.
"""

import contextlib
import os

import numpy as np

from visage_jax import model
from visage_jax.checkpoints import hf_tensors
from visage_jax.errors import CheckpointError

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
_CHUNK = 16 << 20  # bytes of float32 dequantized at a time for a block


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved RoPE -> HF rotate-half)."""
  dim = w.shape[0] // n_head // 2
  return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader, path: str, dtype: str) -> model.ModelConfig:
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


def _dequantize(t, data: np.ndarray, path: str) -> np.ndarray:
  """`data` (rows of tensor t as stored) -> float32."""
  import gguf

  try:
    return np.asarray(gguf.quants.dequantize(data, t.tensor_type), np.float32)
  except Exception as e:
    raise CheckpointError(f"{path}: cannot dequantize tensor {t.name!r} ({t.tensor_type.name}): {e}") from None


def read_rows(t, rows: np.ndarray, cols: range, path: str) -> np.ndarray:
  """Columns `cols` of the stored rows `rows` of a GGUF tensor (one row when 1D), dequantizing
  only the quant blocks holding those columns, `_CHUNK` bytes of output at a time."""
  import gguf

  data = t.data.reshape(-1, t.data.shape[-1])
  block, size = gguf.GGML_QUANT_SIZES[t.tensor_type] if data.dtype == np.uint8 else (1, 1)
  first, last = cols.start // block, -(-cols.stop // block)
  skip = cols.start - first * block
  out = np.empty((len(rows), len(cols)), np.float32)
  step = max(1, _CHUNK // (4 * block * max(1, last - first)))
  for a in range(0, len(rows), step):
    part = _dequantize(t, data[rows[a:a + step], first * size:last * size], path)
    out[a:a + step] = part.reshape(len(part), -1)[:, skip:skip + len(cols)]
  return out


@contextlib.contextmanager
def gguf_leaves(path: str, dtype: str):
  """(cfg, leaves) of a llama.cpp GGUF file, dequantizing one tensor at a time, or, onto a mesh,
  the blocks of rows and columns a process's devices hold (`read_rows`)."""
  import gguf

  if not os.path.exists(path):
    raise CheckpointError(f"{path}: file not found.")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the reader raises bare ValueError/struct errors on damaged files
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}).") from None
  cfg = gguf_config(reader, path, dtype)
  by_name = {t.name: t for t in reader.tensors}
  gguf_to_hf = {}
  for key, pattern in _GGUF_NAMES.items():
    hf_pattern = hf_tensors.HF_NAMES[key][0]
    for i in range(cfg.num_layers if key[0] == "layers" else 1):
      gguf_to_hf[hf_pattern.format(i=i)] = pattern.format(i=i)

  def heads(name):
    return {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(name.split(".")[-2])

  def get(name):
    t = by_name[gguf_to_hf[name]]
    w = _dequantize(t, t.data, path).reshape([int(s) for s in reversed(t.shape)])
    return w if heads(name) is None else unpermute_rows(w, heads(name))

  def get_block(name, index):
    t = by_name[gguf_to_hf[name]]
    shape = tuple(int(s) for s in reversed(t.shape))
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    rows = np.arange(shape[0])
    rows = rows if heads(name) is None else unpermute_rows(rows, heads(name))  # HF row -> stored row
    rows = rows[index[0]] if len(shape) == 2 else np.zeros(1, int)
    return read_rows(t, rows, range(shape[-1])[index[-1]], path).reshape(
        tuple(len(range(n)[s]) for n, s in zip(shape, index)))

  names = {hf: tuple(int(s) for s in reversed(by_name[g].shape)) for hf, g in gguf_to_hf.items()
           if g in by_name}
  yield cfg, hf_tensors.leaf_readers(get, names, cfg, source=path, get_block=get_block)


def load_gguf(path: str, dtype: str = "float32", shardings=None) -> tuple[model.ModelConfig, dict]:
  """Dequantizes a llama.cpp GGUF file (any type the gguf package knows) into params."""
  with gguf_leaves(path, dtype) as (cfg, leaves):
    return cfg, hf_tensors.assemble(leaves, hf_tensors.resolve_shardings(shardings, cfg))
