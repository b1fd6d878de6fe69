"""Many perturbed models at once: theta + sum_c coef_c * d_c for every decode row, chunked.

Three modes, same results up to float rounding:
  fused         one program decodes rows of many grid points over ONE copy of theta and the
                directions (each linear computes x.W + sum_c coef[b, c] x.D_c); several
                directions at once by `jax.vmap` over the stacked direction axis R.
  materialized  theta + alpha.d written into a donated buffer per (direction, point), then a
                plain decode: half the FLOPs, one extra weight copy; for when theta and D do
                not fit together or compute is the bottleneck.
  continuous    fused rows in a fixed number of slots; a slot whose row ends (EOS, budget,
                refusal) is refilled with the next (point, prompt) every `refill_every`
                steps, so short refusals do not leave slots idle until the longest row ends.
"""

import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import decode, errors, model, planner, sharding

DecodeSpec = decode.DecodeSpec


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def decode_fused(params, dirs, coef, tokens, mask, tables, *, cfg: model.ModelConfig,
                 spec: DecodeSpec) -> decode.Generation:
  """dirs leaves [R, C, ...], coef [B, C], tokens/mask [B, T] -> Generation with leaves [R, B, ...]."""
  one = lambda d: decode.greedy_impl(params, tokens, mask, tables, d, coef, cfg=cfg, spec=spec)
  return jax.vmap(one)(dirs)


@functools.partial(jax.jit, donate_argnums=0)
def materialize(buffer, params, dirs, r, coef):
  """theta + sum_c coef[c] * dirs[r, c] (float32 math) into `buffer`'s memory; dirs leaves [R, C, ...].

  Direction r is indexed inside the program, where the index fuses into the sum: slicing it out
  on the host side first would copy a whole params-sized tree per (point, direction).
  """
  del buffer
  return jax.tree.map(
      lambda p, d: (p.astype(jnp.float32) + jnp.tensordot(coef, d[r].astype(jnp.float32), 1)).astype(p.dtype),
      params, dirs)


@functools.partial(jax.jit, static_argnames=("cfg", "spec"), donate_argnums=0)
def refill(state: decode.DecodeState, slots, params, dirs, tokens, mask, coef, tables, *,
           cfg: model.ModelConfig, spec: DecodeSpec) -> decode.DecodeState:
  """Prefills k new rows and writes them into the given slots (slot index >= B: dropped)."""
  new = decode.prefill(params, tokens, mask, tables, dirs, coef, cfg=cfg, spec=spec)

  def put(old, fresh, axis):
    idx = (slice(None),) * axis + (slots,)
    return old.at[idx].set(fresh, mode="drop")

  cache = jax.tree.map(lambda o, f: put(o, f, 1 if o.ndim == 5 else 0), state.cache, new.cache)
  rest = jax.tree.map(lambda o, f: put(o, f, 0), state.replace(cache=None), new.replace(cache=None))
  return rest.replace(cache=cache)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "n_steps"), donate_argnums=0)
def advance(state: decode.DecodeState, params, dirs, tables, *, cfg: model.ModelConfig,
            spec: DecodeSpec, n_steps: int) -> decode.DecodeState:
  return decode.run_steps(params, state, tables, dirs, n_steps, cfg=cfg, spec=spec)


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
  """Rows per chunk from planner's memory model: slots per device on the free memory, times data.

  On CPU one host memory holds every device's rows, so the budget is global and rows unsplit.
  Memory is read on a local device: other processes' devices have no memory_stats.
  """
  device = device or jax.local_devices()[0]
  data, shards = mesh.shape["data"], mesh.shape["model"]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    per_slot = planner.slot_bytes(cfg, prompt_len, spec.max_new_tokens, n_directions=n_directions,
                                  mode=mode, model_shards=shards)
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    cap = min(planner.MAX_SLOTS, int(planner.HEADROOM * free) // per_slot) * data
  else:
    per_slot = planner.slot_bytes(cfg, prompt_len, spec.max_new_tokens, n_directions=n_directions,
                                  mode=mode)
    cap = min(64, planner.CPU_BUDGET // per_slot)
  rows = int(max(1, min(cap, n_rows)))
  return max(data, rows // data * data)


def _f32(coefs: np.ndarray) -> np.ndarray:
  """Coefficients as float32 on the host; beyond float32 they become inf like jnp's cast (such
  points are flagged nonfinite, not fatal)."""
  with np.errstate(over="ignore"):
    return np.asarray(coefs, np.float32)


def _pad_rows(idx: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([idx, np.full(size - len(idx), idx[-1])]) if len(idx) < size else idx


def evaluate(params: dict, cfg: model.ModelConfig, dirs: dict, coefs: np.ndarray,
             tokens: np.ndarray, mask: np.ndarray, tables: decode.KeywordTables | None,
             spec: DecodeSpec, *, points: list[int], mode: str = "fused", max_batch: int = 0,
             mesh=None, refill_every: int = 8) -> Iterator[Chunk]:
  """Decodes every prompt at the given grid points for all R directions, one chunk at a time.

  dirs: leaves [R, C, ...]; coefs: [n_points, C] grid coefficients; tokens/mask: [n_prompts, T].
  Rows are ordered point-major, so whole points complete early (the landscape writes them).
  """
  if mode not in planner.MODES:
    raise errors.UserError(f"engine.mode {mode!r} is not one of {', '.join(planner.MODES)}.")
  mesh = mesh or sharding.make_mesh((1, 1))
  n_prompts, T = tokens.shape
  R = jax.tree.leaves(dirs)[0].shape[0]
  rows_point = np.repeat(np.asarray(points, np.int64), n_prompts)
  rows_prompt = np.tile(np.arange(n_prompts), len(points))
  batch = max_batch or choose_batch(cfg, len(rows_point), T, spec, n_directions=R, mode=mode, mesh=mesh)
  data = mesh.shape["data"]
  batch = -(-batch // data) * data
  bsh = lambda nd, axis=0: sharding.batch_sharding(mesh, nd, axis)
  tokens_all, mask_all = np.asarray(tokens, np.int32), np.asarray(mask, bool)
  rep = sharding.replicated(mesh)
  tables = sharding.put(tables, rep)  # host values -> global arrays, also across processes

  def fetch(gen, directions, sel_point, sel_prompt, n):
    gen = sharding.to_host(gen)
    return Chunk(directions=directions, points=sel_point[:n], prompts=sel_prompt[:n],
                 tokens=np.asarray(gen.tokens)[:, :n], length=np.asarray(gen.length)[:, :n],
                 refused=np.asarray(gen.refused)[:, :n], nonfinite=np.asarray(gen.nonfinite)[:, :n])

  if mode == "continuous":
    for r in range(R):
      d = jax.tree.map(lambda x: x[r], dirs)
      yield from _continuous(params, cfg, d, r, coefs, tokens_all, mask_all, tables, spec, rows_point,
                             rows_prompt, batch, refill_every, bsh, mesh)
    return

  if mode == "fused":
    for start in range(0, len(rows_point), batch):
      sel_point = _pad_rows(rows_point[start:start + batch], batch)
      sel_prompt = _pad_rows(rows_prompt[start:start + batch], batch)
      n = min(batch, len(rows_point) - start)
      tok = sharding.put(tokens_all[sel_prompt], bsh(2))
      msk = sharding.put(mask_all[sel_prompt], bsh(2))
      coef = sharding.put(_f32(coefs[sel_point]), bsh(2))
      gen = decode_fused(params, dirs, coef, tok, msk, tables, cfg=cfg, spec=spec)
      yield fetch(gen, list(range(R)), sel_point, sel_prompt, n)
    return

  # One point's prompts per batch: more rows would only be padding (wasted compute).
  batch = min(batch, -(-n_prompts // data) * data)
  buffer = jax.tree.map(jnp.copy, params)
  for p in points:
    for r in range(R):
      buffer = materialize(buffer, params, dirs, sharding.put(np.int32(r), rep),
                           sharding.put(_f32(coefs[p]), rep))
      for start in range(0, n_prompts, batch):
        sel_prompt = _pad_rows(np.arange(start, min(start + batch, n_prompts)), batch)
        n = min(batch, n_prompts - start)
        tok = sharding.put(tokens_all[sel_prompt], bsh(2))
        msk = sharding.put(mask_all[sel_prompt], bsh(2))
        gen = decode.greedy(buffer, tok, msk, tables, None, None, cfg=cfg, spec=spec)
        gen = jax.tree.map(lambda x: x[None], gen)
        yield fetch(gen, [r], np.full(batch, p), sel_prompt, n)


def _slot_shardings(state, mesh):
  """Slots over "data" (KV heads over "model"), as refill and advance keep them: each data shard
  decodes only its own slots, and each program compiles once."""
  def one(x):
    axes = [None] * x.ndim
    if x.ndim == 5:  # KV cache k [L, B, K, S, H], v [L, B, K, H, S]
      axes[1], axes[2] = "data", "model"
    elif x.ndim:
      axes[0] = "data"
    return sharding.fit(mesh, x.shape, *axes)
  return jax.tree.map(one, state)


def _continuous(params, cfg, dirs_r, r, coefs, tokens_all, mask_all, tables, spec, rows_point,
                rows_prompt, slots, refill_every, bsh, mesh) -> Iterator[Chunk]:
  """Slots decode rows of any grid point (per-row coefficients); ended rows are refilled.

  The `done` flags come back whole to every process, so all processes refill alike.
  """
  data, rep = mesh.shape["data"], sharding.replicated(mesh)
  width = max(data, slots // 4 // data * data)  # rows prefilled per refill call: one compiled shape
  n_rows = len(rows_point)
  rows_like = lambda a: jax.ShapeDtypeStruct((slots,) + a.shape[1:], a.dtype)
  shapes = jax.eval_shape(
      functools.partial(decode.prefill, cfg=cfg, spec=spec), params, rows_like(tokens_all),
      rows_like(mask_all), tables, dirs_r, jax.ShapeDtypeStruct((slots, coefs.shape[1]), jnp.float32))
  empty = lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes).replace(
      done=jnp.ones((slots,), bool))
  state = jax.jit(empty, out_shardings=_slot_shardings(shapes, mesh))()
  owner = np.full(slots, -1)     # row index held by each slot, -1 = free
  queue = 0
  while queue < n_rows or (owner >= 0).any():
    free = np.flatnonzero(owner < 0)
    while queue < n_rows and len(free):
      take = free[:width]
      rows = np.arange(queue, min(queue + len(take), n_rows))
      take = take[:len(rows)]
      slot_ids = np.full(width, slots, np.int64)            # out of range: dropped
      slot_ids[:len(take)] = take
      sel = _pad_rows(rows, width)
      state = refill(state, sharding.put(slot_ids, rep), params, dirs_r,
                     sharding.put(tokens_all[rows_prompt[sel]], bsh(2)),
                     sharding.put(mask_all[rows_prompt[sel]], bsh(2)),
                     sharding.put(_f32(coefs[rows_point[sel]]), bsh(2)),
                     tables, cfg=cfg, spec=spec)
      owner[take] = rows
      queue += len(rows)
      free = np.flatnonzero(owner < 0)
    state = advance(state, params, dirs_r, tables, cfg=cfg, spec=spec, n_steps=refill_every)
    done = np.asarray(sharding.to_host(state.done))
    finished = np.flatnonzero(done & (owner >= 0))
    if not len(finished):
      continue
    gen = sharding.to_host(decode.as_generation(state))
    rows = owner[finished]
    yield Chunk(directions=[r], points=rows_point[rows], prompts=rows_prompt[rows],
                tokens=np.asarray(gen.tokens)[None, finished], length=np.asarray(gen.length)[None, finished],
                refused=np.asarray(gen.refused)[None, finished],
                nonfinite=np.asarray(gen.nonfinite)[None, finished])
    owner[finished] = -1
