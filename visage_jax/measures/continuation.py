"""Negative log-likelihood of continuations given prompts, prefill only: the one pass behind
coherence (nll_ref of each generation) and capability (perplexity of reference answers).

Rows are laid out [left-padded prompt | continuation, right-padded]. The prompt columns are
prefilled with logits for their last position only, then the continuation columns run on top
of that cache: logits exist only where a continuation token is predicted, so a 49k vocabulary
costs [B, G, V] floats, not [B, T + G, V]. Positions come from the masks, so padding never
changes a row's numbers.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import errors, model, prompts

MIN_CONTINUATION = 8   # bucket floor for the continuation columns


@dataclasses.dataclass(frozen=True)
class Layout:
  """Host arrays of N rows; built once, scored at any number of weights (one compiled shape)."""
  prompt: np.ndarray        # [N, T] int32, left-padded
  prompt_mask: np.ndarray   # [N, T] bool
  cont: np.ndarray          # [N, G] int32, right-padded
  cont_mask: np.ndarray     # [N, G] bool, the scored tokens
  shared_prefix: int = 0    # the first columns of every row hold the same tokens (prompts.pack)

  @property
  def rows(self) -> int:
    return self.prompt.shape[0]


def layout(prompt_ids: list[list[int]], continuations: list[list[int]], pad_id: int, *,
           prompt_width: int = 0, cont_width: int = 0) -> Layout:
  """Bucketed arrays (prompts.bucket_length on both parts) for every row at once; at least
  `prompt_width` / `cont_width` columns, so calls on different rows can share one compiled shape."""
  if len(prompt_ids) != len(continuations):
    raise ValueError(f"{len(prompt_ids)} prompts but {len(continuations)} continuations.")
  return Layout(*pad_prompts(prompt_ids, pad_id, prompt_width), *pad_continuations(continuations, pad_id, cont_width))


def pad_prompts(prompt_ids: list[list[int]], pad_id: int, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """[N, T] left-padded prompts and their mask, T the bucketed longest (at least `width`)."""
  if not prompt_ids:
    raise errors.UserError("continuation.layout: no rows to score.")
  for i, ids in enumerate(prompt_ids):
    if not ids:
      raise errors.UserError(f"row {i}: empty prompt; the first continuation token needs a prompt "
                             "token to be predicted from.")
  return prompts.left_pad(prompt_ids, max(width, prompts.bucket_length(max(map(len, prompt_ids)))), pad_id)


def pad_continuations(continuations: list[list[int]], pad_id: int, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """[N, G] right-padded continuations and their mask (the scored tokens), G bucketed."""
  width = max(width, prompts.bucket_length(max(map(len, continuations)), minimum=MIN_CONTINUATION))
  cont = np.full((len(continuations), width), pad_id, np.int32)
  cont_mask = np.zeros((len(continuations), width), bool)
  for i, ids in enumerate(continuations):
    cont[i, :len(ids)] = ids
    cont_mask[i, :len(ids)] = True
  return cont, cont_mask


def _prefill(params, prompt, prompt_mask, length, d, c, cfg, shared_prefix=0):
  """(logits at each prompt's last position [B, 1, V], the prompts' cache of `length` slots).

  The first `shared_prefix` columns, the same tokens in every row under the same weights (one grid
  point), are computed for one row and their keys/values repeated, as decode.prefill does.
  """
  B = prompt.shape[0]
  if shared_prefix:
    one = model.init_cache(cfg, 1, length)
    _, one = model.forward(params, prompt[:1, :shared_prefix], prompt_mask[:1, :shared_prefix], one, cfg, d,
                           None if c is None else c[:1], last_only=True, attend=0)
    cache = jax.tree.map(lambda x: jnp.repeat(x, B, axis=1 if x.ndim == 5 else 0), one)
    prompt, prompt_mask = prompt[:, shared_prefix:], prompt_mask[:, shared_prefix:]
  else:
    cache = model.init_cache(cfg, B, length)
  return model.forward(params, prompt, prompt_mask, cache, cfg, d, c, last_only=True, attend=shared_prefix)


def _continue(params, first, cache, cont, cont_mask, d, c, cfg):
  """(summed NLL [B], scored tokens [B]) of cont [B, G] run on top of the prompts' cache, whose
  first empty slot is the prompt width; `first` [B, 1, V] predicts cont[:, 0]."""
  rest, _ = model.forward(params, cont, cont_mask, cache, cfg, d, c, attend=cache.mask.shape[1] - cont.shape[1])
  logits = jnp.concatenate([first, rest[:, :-1]], axis=1)                    # [B, G, V]: g predicts cont[g]
  picked = jnp.take_along_axis(logits, cont[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - picked
  w = cont_mask.astype(jnp.float32)
  return jnp.sum(jnp.where(cont_mask, nll, 0.0), axis=1), jnp.sum(w, axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "shared_prefix"))
def nll_sums(params: dict, prompt: jax.Array, prompt_mask: jax.Array,   # [B, T]
             cont: jax.Array, cont_mask: jax.Array,                     # [B, G]
             dirs: dict | None = None, r: jax.Array | None = None,
             coef: jax.Array | None = None, *, cfg: model.ModelConfig,
             shared_prefix: int = 0) -> tuple[jax.Array, jax.Array]:
  """(summed NLL [B], scored tokens [B]) of each row's continuation under params (+ coef.dirs[r]).

  dirs leaves [R, C, ...] as the engine stacks them, indexed inside the program (no host copy);
  coef [C], the same for every row (fused evaluation of one grid point). shared_prefix: Layout.shared_prefix.
  """
  B, T = prompt.shape
  d, c = None, None
  if dirs is not None:
    d = jax.tree.map(lambda x: x[r], dirs)
    c = jnp.broadcast_to(coef.astype(jnp.float32), (B, coef.shape[-1]))
  first, cache = _prefill(params, prompt, prompt_mask, T + cont.shape[1], d, c, cfg, shared_prefix)
  return _continue(params, first, cache, cont, cont_mask, d, c, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def prefill(params: dict, prompt: jax.Array, prompt_mask: jax.Array,  # [N, T]
            *, cfg: model.ModelConfig) -> tuple[jax.Array, model.KVCache]:
  """nll_sums' prompt pass alone, for prompts scored under the same weights again and again:
  (logits [N, 1, V] at each prompt's last position, the prompts' cache of T slots)."""
  return _prefill(params, prompt, prompt_mask, prompt.shape[1], None, None, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def nll_sums_prefilled(params: dict, first: jax.Array, cache: model.KVCache,  # prefill's, [N, ...]
                       rows: jax.Array,                                        # [B] prompt of each row
                       cont: jax.Array, cont_mask: jax.Array,                  # [B, G]
                       *, cfg: model.ModelConfig) -> tuple[jax.Array, jax.Array]:
  """nll_sums of continuations on prompts prefilled once: the rows' cache gathered and given G
  empty slots, then the same continuation pass as nll_sums (the same arithmetic, row by row)."""
  G = cont.shape[1]
  grow = lambda x, axis: jnp.pad(x, [(0, G if a == axis else 0) for a in range(x.ndim)])
  cache = model.KVCache(k=grow(cache.k[:, rows], 3), v=grow(cache.v[:, rows], 4),
                        mask=grow(cache.mask[rows], 1), pos=cache.pos[rows], index=cache.index[rows])
  return _continue(params, first[rows], cache, cont, cont_mask, None, None, cfg)


def even_batch(n_rows: int, batch_size: int) -> int:
  """Rows per batch: as few batches of at most batch_size as before, split evenly, so 20 rows
  run as 2 x 10 and not 16 + 16 with 12 padding rows (a prefill pass is compute-bound)."""
  n_batches = -(-n_rows // max(1, batch_size))
  return -(-n_rows // n_batches)


def score(params: dict, cfg: model.ModelConfig, rows: Layout, *, batch_size: int = 16,
          dirs: dict | None = None, r: int = 0, coef: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
  """(summed NLL [N] float64, counts [N]) of every row, in batches of one size (`even_batch`), so a
  whole sweep compiles once."""
  extra = () if dirs is None else (dirs, np.int32(r), np.asarray(coef, np.float32))
  return in_batches(rows.rows, even_batch(rows.rows, batch_size), lambda sel: nll_sums(
      params, rows.prompt[sel], rows.prompt_mask[sel], rows.cont[sel], rows.cont_mask[sel], *extra, cfg=cfg,
      shared_prefix=rows.shared_prefix))


def in_batches(n_rows: int, batch_size: int, run) -> tuple[np.ndarray, np.ndarray]:
  """(sums [N], counts [N]) of run(sel) over batches of `batch_size` row indices, the last one
  padded by repeating a row (one compiled shape)."""
  sums, counts = np.zeros(n_rows), np.zeros(n_rows)
  for start in range(0, n_rows, batch_size):
    n = min(batch_size, n_rows - start)
    sel = np.arange(start, start + batch_size).clip(max=n_rows - 1)
    s, k = jax.device_get(run(sel))
    sums[start:start + n], counts[start:start + n] = s[:n], k[:n]
  return sums, counts
