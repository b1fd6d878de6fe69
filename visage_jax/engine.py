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
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import decode, errors, model, planner, sharding

MODES = ("fused", "materialized", "continuous")

# Nominal peak FLOP/s and memory bandwidth (bytes/s) by device kind, for the mode cost model.
# Unknown accelerators fall back to the H100 figures (memory-bound decode, like every GPU/TPU).
DEVICE_PEAKS = {
    "cpu": (1.0e11, 2.0e10),
    "H100": (9.89e14, 3.35e12),
    "H200": (9.89e14, 4.8e12),
    "A100": (3.12e14, 2.0e12),
    "TPU v4": (2.75e14, 1.2e12),
    "TPU v5 lite": (1.97e14, 8.2e11),
    "TPU v5p": (4.59e14, 2.76e12),
}


def device_peaks(device=None) -> tuple[float, float]:
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return DEVICE_PEAKS["cpu"]
  kind = str(getattr(device, "device_kind", ""))
  for name, peaks in DEVICE_PEAKS.items():
    if name.lower() in kind.lower():
      return peaks
  return DEVICE_PEAKS["H100"]


def choose_mode(cfg: model.ModelConfig, *, n_prompts: int, n_directions: int, batch: int,
                device=None) -> tuple[str, str]:
  """Roofline cost model of one decode step: materialized points vs rows fused across points.

  Per generated token a row costs 2*N FLOPs (4*N fused: x.W and x.D); a step reads the
  weights once (fused: weights + R directions). Materialized batches one point's prompts;
  fused batches `batch` rows of any points. The cheaper per-token time wins; fused runs
  as continuous batching (refilled slots), which only ever removes idle work.
  """
  flops, bandwidth = device_peaks(device)
  n = sum(math.prod(s) for s in jax.tree.leaves(model.param_shapes(cfg),
                                                 is_leaf=lambda x: isinstance(x, tuple)))
  wbytes = n * jnp.dtype(cfg.param_dtype).itemsize
  b_mat = max(1, min(n_prompts, batch))
  t_mat = max(wbytes / bandwidth, 2 * n * b_mat / flops) / b_mat
  b_fus = max(1, batch)
  t_fus = max(wbytes * (1 + n_directions) / bandwidth, 4 * n * b_fus * n_directions / flops) / (b_fus * n_directions)
  if t_mat <= t_fus:
    return "materialized", (f"compute-bound: {t_mat * 1e3:.3f} ms/token materialized (batch {b_mat}) "
                            f"<= {t_fus * 1e3:.3f} ms/token fused (batch {b_fus})")
  return "continuous", (f"memory-bound: {t_fus * 1e3:.3f} ms/token fused (batch {b_fus}) < "
                        f"{t_mat * 1e3:.3f} ms/token materialized (batch {b_mat})")


def step_roofline(cfg: model.ModelConfig, *, mode: str, batch: int, cache_len: int,
                  n_directions: int = 1, device=None) -> dict:
  """The floor of one decode step: bytes it must move and FLOPs it must do, over the device peaks.

  Weights are read once per step (fused/continuous also read the R directions); every row reads
  its KV cache (`cache_len` positions) and does 2*N FLOPs per linear pass (fused: x.W and x.D,
  4*N) plus attention. Prefill is not counted, so a run's achieved fraction is a lower bound.
  """
  flops_peak, bandwidth = device_peaks(device)
  n = sum(math.prod(s) for s in jax.tree.leaves(model.param_shapes(cfg),
                                                 is_leaf=lambda x: isinstance(x, tuple)))
  item = jnp.dtype(cfg.param_dtype).itemsize
  fused = mode != "materialized"
  rows = batch * (n_directions if fused else 1)
  weight_bytes = n * item * (1 + (n_directions if fused else 0))
  kv_bytes = rows * 2 * cfg.num_layers * cache_len * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  flops = rows * ((4 if fused else 2) * n + 4 * cfg.num_layers * cache_len * cfg.num_heads * cfg.head_dim)
  t_mem, t_flop = (weight_bytes + kv_bytes) / bandwidth, flops / flops_peak
  return dict(bytes_per_step=int(weight_bytes + kv_bytes), weight_bytes=int(weight_bytes),
              kv_cache_bytes=int(kv_bytes), flops_per_step=int(flops), peak_flops=flops_peak,
              peak_bandwidth=bandwidth, floor_seconds_per_step=max(t_mem, t_flop),
              bound="memory" if t_mem >= t_flop else "compute")


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
  if mode not in MODES:
    raise errors.UserError(f"engine.mode {mode!r} is not one of {', '.join(MODES)}.")
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
