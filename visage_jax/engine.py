"""Many perturbed models at once: theta + sum_c coef_c * d_c for every decode row, chunked.

Two modes, same results up to float rounding:
  fused         one program decodes rows of many grid points over ONE copy of theta and the
                directions (each linear computes x.W + sum_c coef[b, c] x.D_c); several
                directions at once by `jax.vmap` over the stacked direction axis R.
  materialized  theta + alpha.d written into a donated buffer per (direction, point), then a
                plain decode: half the FLOPs, one extra weight copy; for when theta and D do
                not fit together or compute is the bottleneck.
"""

import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import decode, model, sharding

MODES = ("fused", "materialized")


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Static decoding settings (hashable: part of the compiled program's identity)."""
  max_new_tokens: int
  eos_ids: tuple[int, ...]
  pad_id: int
  stop_at_refusal: bool = True
  fixed_length: bool = False


def _greedy(params, tokens, mask, tables, dirs, coef, cfg, spec):
  return decode.greedy_impl(params, tokens, mask, tables, dirs, coef, cfg=cfg,
                            max_new_tokens=spec.max_new_tokens, eos_ids=spec.eos_ids,
                            pad_id=spec.pad_id, fixed_length=spec.fixed_length,
                            stop_at_refusal=spec.stop_at_refusal)


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def decode_fused(params, dirs, coef, tokens, mask, tables, *, cfg: model.ModelConfig,
                 spec: DecodeSpec) -> decode.Generation:
  """dirs leaves [R, C, ...], coef [B, C], tokens/mask [B, T] -> Generation with leaves [R, B, ...]."""
  one = lambda d: _greedy(params, tokens, mask, tables, d, coef, cfg, spec)
  return jax.vmap(one)(dirs)


@functools.partial(jax.jit, donate_argnums=0)
def materialize(buffer, params, dirs, coef):
  """theta + sum_c coef[c] * dirs[c] (float32 math) into `buffer`'s memory; dirs leaves [C, ...]."""
  del buffer
  return jax.tree.map(
      lambda p, d: (p.astype(jnp.float32) + jnp.tensordot(coef, d.astype(jnp.float32), 1)).astype(p.dtype),
      params, dirs)


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def decode_plain(params, tokens, mask, tables, *, cfg: model.ModelConfig, spec: DecodeSpec):
  return _greedy(params, tokens, mask, tables, None, None, cfg, spec)


@dataclasses.dataclass
class Chunk:
  """Results for rows (direction r, point, prompt): arrays are [len(directions), B]."""
  directions: list[int]
  points: np.ndarray    # [B] grid point index of each row
  prompts: np.ndarray   # [B] prompt index of each row
  tokens: np.ndarray    # [R, B, max_new_tokens]
  length: np.ndarray    # [R, B]
  refused: np.ndarray   # [R, B]
  nonfinite: np.ndarray  # [R, B]


def choose_batch(cfg: model.ModelConfig, n_rows: int, prompt_len: int, spec: DecodeSpec, *,
                 n_directions: int, mode: str, mesh, device=None) -> int:
  """Rows per chunk from a memory model: KV cache + activations per row against free memory."""
  device = device or jax.devices()[0]
  itemsize = jnp.dtype(cfg.dtype).itemsize
  seq = prompt_len + spec.max_new_tokens
  kv = 2 * cfg.num_layers * seq * cfg.num_kv_heads * cfg.head_dim * itemsize
  act = prompt_len * (4 * cfg.hidden_size + 2 * cfg.intermediate_size) * 4 + cfg.vocab_size * 8
  act += cfg.num_heads * prompt_len * seq * 4
  per_row = (kv + act) * (n_directions if mode == "fused" else 1)
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    budget, cap = 0.7 * free, 1024
  else:
    budget, cap = 2 << 30, 64  # CPU: compute-bound, bigger batches stop paying off
  rows = int(max(1, min(cap, budget // max(per_row, 1), n_rows)))
  data = mesh.shape["data"]
  return max(data, rows // data * data)


def _pad_rows(idx: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([idx, np.full(size - len(idx), idx[-1])]) if len(idx) < size else idx


def evaluate(params: dict, cfg: model.ModelConfig, dirs: dict, coefs: np.ndarray,
             tokens: np.ndarray, mask: np.ndarray, tables: decode.KeywordTables | None,
             spec: DecodeSpec, *, points: list[int], mode: str = "fused", max_batch: int = 0,
             mesh=None) -> Iterator[Chunk]:
  """Decodes every prompt at the given grid points for all R directions, one chunk at a time.

  dirs: leaves [R, C, ...]; coefs: [n_points, C] grid coefficients; tokens/mask: [n_prompts, T].
  Rows are ordered point-major, so whole points complete early (the landscape writes them).
  """
  if mode not in MODES:
    raise ValueError(f"engine.mode {mode!r} is not one of {', '.join(MODES)}.")
  mesh = mesh or sharding.make_mesh((1, 1))
  n_prompts, T = tokens.shape
  R = jax.tree.leaves(dirs)[0].shape[0]
  rows_point = np.repeat(np.asarray(points, np.int64), n_prompts)
  rows_prompt = np.tile(np.arange(n_prompts), len(points))
  batch = max_batch or choose_batch(cfg, len(rows_point), T, spec, n_directions=R, mode=mode, mesh=mesh)
  data = mesh.shape["data"]
  batch = -(-batch // data) * data
  bsh = lambda nd, axis=0: sharding.batch_sharding(mesh, nd, axis)
  tokens_all, mask_all = jnp.asarray(tokens), jnp.asarray(mask)

  def fetch(gen, directions, sel_point, sel_prompt, n):
    gen = jax.device_get(gen)
    return Chunk(directions=directions, points=sel_point[:n], prompts=sel_prompt[:n],
                 tokens=np.asarray(gen.tokens)[:, :n], length=np.asarray(gen.length)[:, :n],
                 refused=np.asarray(gen.refused)[:, :n], nonfinite=np.asarray(gen.nonfinite)[:, :n])

  if mode == "fused":
    for start in range(0, len(rows_point), batch):
      sel_point = _pad_rows(rows_point[start:start + batch], batch)
      sel_prompt = _pad_rows(rows_prompt[start:start + batch], batch)
      n = min(batch, len(rows_point) - start)
      tok = jax.device_put(tokens_all[sel_prompt], bsh(2))
      msk = jax.device_put(mask_all[sel_prompt], bsh(2))
      coef = jax.device_put(jnp.asarray(coefs[sel_point], jnp.float32), bsh(2))
      gen = decode_fused(params, dirs, coef, tok, msk, tables, cfg=cfg, spec=spec)
      yield fetch(gen, list(range(R)), sel_point, sel_prompt, n)
    return

  buffer = jax.tree.map(jnp.copy, params)
  for p in points:
    for r in range(R):
      d = jax.tree.map(lambda x: x[r], dirs)
      buffer = materialize(buffer, params, d, jnp.asarray(coefs[p], jnp.float32))
      for start in range(0, n_prompts, batch):
        sel_prompt = _pad_rows(np.arange(start, min(start + batch, n_prompts)), batch)
        n = min(batch, n_prompts - start)
        tok = jax.device_put(tokens_all[sel_prompt], bsh(2))
        msk = jax.device_put(mask_all[sel_prompt], bsh(2))
        gen = decode_plain(buffer, tok, msk, tables, cfg=cfg, spec=spec)
        gen = jax.tree.map(lambda x: x[None], gen)
        yield fetch(gen, [r], np.full(batch, p), sel_prompt, n)
