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
`evaluate` takes the rows as one `Workload` and hands them to the mode's generator; which mode
and how many rows fit are the planner's predictions (planner.choose_mode; choose_batch and
choose_mode here read the live device's free memory).
"""

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import decode, errors, model, planner, sharding


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def decode_fused(params, dirs, coef, tokens, mask, tables, *, cfg: model.ModelConfig,
                 spec: decode.DecodeSpec) -> decode.Generation:
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
           cfg: model.ModelConfig, spec: decode.DecodeSpec) -> decode.DecodeState:
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
            spec: decode.DecodeSpec, n_steps: int) -> decode.DecodeState:
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


def _device_slots(cfg: model.ModelConfig, prompt_len: int, spec: decode.DecodeSpec, *, n_directions: int,
                  mode: str, shards: int, device) -> int | None:
  """Slots per device in `device`'s free memory (materialized: beside its theta + alpha*d buffer,
  one params-sized tree); None where the device reports no memory (CPU)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not (stats and "bytes_limit" in stats):
    return None
  per_slot = planner.slot_bytes(cfg, prompt_len, spec.max_new_tokens, n_directions=n_directions,
                                mode=mode, model_shards=shards)
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  if mode == "materialized":
    free -= planner.params_per_device(cfg, shards) * jnp.dtype(cfg.param_dtype).itemsize
  return max(0, min(planner.MAX_SLOTS, int(planner.HEADROOM * free) // per_slot))


def choose_batch(cfg: model.ModelConfig, n_rows: int, prompt_len: int, spec: decode.DecodeSpec, *,
                 n_directions: int, mode: str, mesh, device=None) -> int:
  """Rows per chunk from planner's memory model: slots per device on the free memory, times data.

  On CPU one host memory holds every device's rows, so the budget is global and rows unsplit.
  Memory is read on a local device: other processes' devices have no memory_stats.
  """
  device = device or jax.local_devices()[0]
  data, shards = mesh.shape["data"], mesh.shape["model"]
  slots = _device_slots(cfg, prompt_len, spec, n_directions=n_directions, mode=mode, shards=shards,
                        device=device)
  if slots is not None:
    cap = slots * data
  else:
    per_slot = planner.slot_bytes(cfg, prompt_len, spec.max_new_tokens, n_directions=n_directions,
                                  mode=mode)
    cap = min(64, planner.CPU_BUDGET // per_slot)
  rows = int(max(1, min(cap, n_rows)))
  return max(data, rows // data * data)


def choose_mode(cfg: model.ModelConfig, *, n_prompts: int, n_directions: int, batch: int, prompt_len: int,
                spec: decode.DecodeSpec, mesh, device=None) -> tuple[str, str, int]:
  """engine.mode=auto on the live device -> (mode, reason, batch): planner.choose_mode's pick on the
  fused `batch`, continuous when materialized's theta + alpha*d buffer leaves no slot in the
  device's free memory, and a materialized batch no larger than fits beside that buffer (as the
  pod plans of pods.plan_on_mesh decide)."""
  device = device or jax.local_devices()[0]
  slots = _device_slots(cfg, prompt_len, spec, n_directions=n_directions, mode="materialized",
                        shards=mesh.shape["model"], device=device)
  mode, why = planner.choose_mode(cfg, n_prompts=n_prompts, n_directions=n_directions, batch=batch,
                                  device=device, materialized_fits=slots is None or slots > 0)
  if mode == "materialized":
    batch = choose_batch(cfg, batch, prompt_len, spec, n_directions=n_directions, mode=mode, mesh=mesh,
                         device=device)
  return mode, why, batch


def _f32(coefs: np.ndarray) -> np.ndarray:
  """Coefficients as float32 on the host; beyond float32 they become inf like jnp's cast (such
  points are flagged nonfinite, not fatal)."""
  with np.errstate(over="ignore"):
    return np.asarray(coefs, np.float32)


def _pad_rows(idx: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([idx, np.full(size - len(idx), idx[-1])]) if len(idx) < size else idx


@dataclasses.dataclass(frozen=True)
class Workload:
  """The rows to decode: every prompt at each of `points`, for each of the R directions.

  Host-side, never traced: cfg and spec are the static arguments of every program; params and
  dirs are used as the caller placed them (on `mesh`); the rest are host values, placed per chunk.
  """
  params: dict
  cfg: model.ModelConfig
  dirs: dict                    # leaves [R, C, ...]
  coefs: np.ndarray             # [n_points, C] grid coefficients
  tokens: np.ndarray            # [n_prompts, T]
  mask: np.ndarray              # [n_prompts, T]
  tables: decode.KeywordTables | None
  spec: decode.DecodeSpec
  points: Sequence[int]         # grid points to decode, in this order
  mesh: jax.sharding.Mesh | None = None   # None: one device

  @property
  def n_directions(self) -> int:
    return jax.tree.leaves(self.dirs)[0].shape[0]

  def rows(self) -> tuple[np.ndarray, np.ndarray]:
    """(point, prompt) of every row, point-major, so whole points complete early."""
    n_prompts = self.tokens.shape[0]
    return (np.repeat(np.asarray(self.points, np.int64), n_prompts),
            np.tile(np.arange(n_prompts), len(self.points)))

  def put_rows(self, prompts: np.ndarray, points: np.ndarray | None = None) -> tuple:
    """Tokens and mask of the given rows (and their coefficients, given points), over "data"."""
    rows = sharding.batch_sharding(self.mesh, 2)
    placed = (sharding.put(self.tokens[prompts], rows), sharding.put(self.mask[prompts], rows))
    return placed if points is None else placed + (sharding.put(_f32(self.coefs[points]), rows),)


def evaluate(work: Workload, *, mode: str = "fused", max_batch: int = 0,
             refill_every: int = 8) -> Iterator[Chunk]:
  """Decodes every row of `work` for all R directions, one chunk at a time, in one of planner.MODES.

  max_batch: rows per chunk (0: choose_batch's); continuous refills ended slots every
  `refill_every` steps.
  """
  if mode not in planner.MODES:
    raise errors.UserError(f"engine.mode {mode!r} is not one of {', '.join(planner.MODES)}.")
  mesh = work.mesh or sharding.make_mesh((1, 1))
  n_rows, prompt_len = len(work.points) * work.tokens.shape[0], work.tokens.shape[1]
  batch = max_batch or choose_batch(work.cfg, n_rows, prompt_len, work.spec,
                                    n_directions=work.n_directions, mode=mode, mesh=mesh)
  data = mesh.shape["data"]
  batch = -(-batch // data) * data
  work = dataclasses.replace(   # tables: host values -> global arrays, also across processes
      work, mesh=mesh, tokens=np.asarray(work.tokens, np.int32), mask=np.asarray(work.mask, bool),
      tables=sharding.put(work.tables, sharding.replicated(mesh)))
  if mode == "continuous":
    yield from _continuous(work, batch, refill_every)
  elif mode == "fused":
    yield from _fused(work, batch)
  else:
    yield from _materialized(work, batch)


def _chunk(gen: decode.Generation, directions: list[int], points: np.ndarray, prompts: np.ndarray,
           index) -> Chunk:
  """Fetches `gen` and keeps `index` of each field: the chunk's [len(directions), B] rows."""
  gen = sharding.to_host(gen)
  pick = lambda x: np.asarray(x)[index]
  return Chunk(directions=directions, points=points, prompts=prompts, tokens=pick(gen.tokens),
               length=pick(gen.length), refused=pick(gen.refused), nonfinite=pick(gen.nonfinite))


def _fused(w: Workload, batch: int) -> Iterator[Chunk]:
  """`batch` rows of any grid points per program, all R directions vmapped over one theta."""
  point, prompt = w.rows()
  for start in range(0, len(point), batch):
    sel_point = _pad_rows(point[start:start + batch], batch)
    sel_prompt = _pad_rows(prompt[start:start + batch], batch)
    n = min(batch, len(point) - start)
    tok, msk, coef = w.put_rows(sel_prompt, sel_point)
    gen = decode_fused(w.params, w.dirs, coef, tok, msk, w.tables, cfg=w.cfg, spec=w.spec)
    yield _chunk(gen, list(range(w.n_directions)), sel_point[:n], sel_prompt[:n], np.s_[:, :n])


def _materialized(w: Workload, batch: int) -> Iterator[Chunk]:
  """theta + coef.d per (point, direction) in one donated buffer, then plain decodes of its prompts.

  One point's prompts per batch: more rows would only be padding (wasted compute).
  """
  n_prompts, data = w.tokens.shape[0], w.mesh.shape["data"]
  batch = min(batch, -(-n_prompts // data) * data)
  rep = sharding.replicated(w.mesh)
  buffer = jax.tree.map(jnp.copy, w.params)
  for p in w.points:
    for r in range(w.n_directions):
      buffer = materialize(buffer, w.params, w.dirs, sharding.put(np.int32(r), rep),
                           sharding.put(_f32(w.coefs[p]), rep))
      for start in range(0, n_prompts, batch):
        sel_prompt = _pad_rows(np.arange(start, min(start + batch, n_prompts)), batch)
        n = min(batch, n_prompts - start)
        tok, msk = w.put_rows(sel_prompt)
        gen = decode.greedy(buffer, tok, msk, w.tables, None, None, cfg=w.cfg, spec=w.spec)
        yield _chunk(gen, [r], np.full(n, p), sel_prompt[:n], np.s_[None, :n])


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


def _empty_slots(w: Workload, dirs_r: dict, slots: int) -> decode.DecodeState:
  """A state of `slots` ended rows, created where refill and advance keep it."""
  rows_like = lambda a: jax.ShapeDtypeStruct((slots,) + a.shape[1:], a.dtype)
  shapes = jax.eval_shape(
      functools.partial(decode.prefill, cfg=w.cfg, spec=w.spec), w.params, rows_like(w.tokens),
      rows_like(w.mask), w.tables, dirs_r, jax.ShapeDtypeStruct((slots, w.coefs.shape[1]), jnp.float32))
  empty = lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes).replace(
      done=jnp.ones((slots,), bool))
  return jax.jit(empty, out_shardings=_slot_shardings(shapes, w.mesh))()


def _continuous(w: Workload, slots: int, refill_every: int) -> Iterator[Chunk]:
  """Per direction, slots decode rows of any grid point (per-row coefficients); ended rows are
  refilled. The `done` flags come back whole to every process, so all processes refill alike."""
  rows = w.rows()
  for r in range(w.n_directions):
    dirs_r = jax.tree.map(lambda x: x[r], w.dirs)
    state = _empty_slots(w, dirs_r, slots)
    owner = np.full(slots, -1)     # row index held by each slot, -1 = free
    queue = 0
    while queue < len(rows[0]) or (owner >= 0).any():
      state, queue = _refill_free(w, state, dirs_r, owner, queue, rows)
      state = advance(state, w.params, dirs_r, w.tables, cfg=w.cfg, spec=w.spec, n_steps=refill_every)
      finished = np.flatnonzero(np.asarray(sharding.to_host(state.done)) & (owner >= 0))
      if len(finished):
        held = owner[finished]
        yield _chunk(decode.as_generation(state), [r], rows[0][held], rows[1][held],
                     np.s_[None, finished])
        owner[finished] = -1


def _refill_free(w: Workload, state: decode.DecodeState, dirs_r: dict, owner: np.ndarray, queue: int,
                 rows: tuple[np.ndarray, np.ndarray]) -> tuple[decode.DecodeState, int]:
  """Prefills the next queued rows into free slots (`owner` < 0, updated in place); returns the
  state and the new queue position. Each refill call prefills `width` rows: one compiled shape."""
  (point, prompt), slots, data = rows, len(owner), w.mesh.shape["data"]
  width = max(data, slots // 4 // data * data)
  rep = sharding.replicated(w.mesh)
  free = np.flatnonzero(owner < 0)
  while queue < len(point) and len(free):
    take = free[:width]
    new = np.arange(queue, min(queue + len(take), len(point)))
    take = take[:len(new)]
    slot_ids = np.full(width, slots, np.int64)            # out of range: dropped
    slot_ids[:len(take)] = take
    sel = _pad_rows(new, width)
    slot_ids = sharding.put(slot_ids, rep)
    state = refill(state, slot_ids, w.params, dirs_r, *w.put_rows(prompt[sel], point[sel]), w.tables,
                   cfg=w.cfg, spec=w.spec)
    owner[take] = new
    queue += len(new)
    free = np.flatnonzero(owner < 0)
  return state, queue
