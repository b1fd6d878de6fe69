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

  @property
  def rows(self) -> int:
    return self.prompt.shape[0]


def layout(prompt_ids: list[list[int]], continuations: list[list[int]], pad_id: int, *,
           prompt_width: int = 0, cont_width: int = 0) -> Layout:
  """Bucketed arrays (prompts.bucket_length on both parts) for every row at once; at least
  `prompt_width` / `cont_width` columns, so calls on different rows can share one compiled shape."""
  if len(prompt_ids) != len(continuations):
    raise ValueError(f"{len(prompt_ids)} prompts but {len(continuations)} continuations.")
  if not prompt_ids:
    raise errors.UserError("continuation.layout: no rows to score.")
  for i, ids in enumerate(prompt_ids):
    if not ids:
      raise errors.UserError(f"row {i}: empty prompt; the first continuation token needs a prompt "
                             "token to be predicted from.")
  prompt, prompt_mask = prompts.left_pad(
      prompt_ids, max(prompt_width, prompts.bucket_length(max(map(len, prompt_ids)))), pad_id)
  width = max(cont_width, prompts.bucket_length(max(map(len, continuations)), minimum=MIN_CONTINUATION))
  cont = np.full((len(continuations), width), pad_id, np.int32)
  cont_mask = np.zeros((len(continuations), width), bool)
  for i, ids in enumerate(continuations):
    cont[i, :len(ids)] = ids
    cont_mask[i, :len(ids)] = True
  return Layout(prompt, prompt_mask, cont, cont_mask)


@functools.partial(jax.jit, static_argnames=("cfg",))
def nll_sums(params: dict, prompt: jax.Array, prompt_mask: jax.Array,   # [B, T]
             cont: jax.Array, cont_mask: jax.Array,                     # [B, G]
             dirs: dict | None = None, r: jax.Array | None = None,
             coef: jax.Array | None = None, *, cfg: model.ModelConfig) -> tuple[jax.Array, jax.Array]:
  """(summed NLL [B], scored tokens [B]) of each row's continuation under params (+ coef.dirs[r]).

  dirs leaves [R, C, ...] as the engine stacks them, indexed inside the program (no host copy);
  coef [C], the same for every row (fused evaluation of one grid point).
  """
  B, T = prompt.shape
  d, c = None, None
  if dirs is not None:
    d = jax.tree.map(lambda x: x[r], dirs)
    c = jnp.broadcast_to(coef.astype(jnp.float32), (B, coef.shape[-1]))
  cache = model.init_cache(cfg, B, T + cont.shape[1])
  first, cache = model.forward(params, prompt, prompt_mask, cache, cfg, d, c, last_only=True, attend=0)
  rest, _ = model.forward(params, cont, cont_mask, cache, cfg, d, c, attend=T)
  logits = jnp.concatenate([first, rest[:, :-1]], axis=1)                    # [B, G, V]: g predicts cont[g]
  picked = jnp.take_along_axis(logits, cont[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - picked
  w = cont_mask.astype(jnp.float32)
  return jnp.sum(jnp.where(cont_mask, nll, 0.0), axis=1), jnp.sum(w, axis=1)


def even_batch(n_rows: int, batch_size: int) -> int:
  """Rows per batch: as few batches of at most batch_size as before, split evenly, so 20 rows
  run as 2 x 10 and not 16 + 16 with 12 padding rows (a prefill pass is compute-bound)."""
  n_batches = -(-n_rows // max(1, batch_size))
  return -(-n_rows // n_batches)


def score(params: dict, cfg: model.ModelConfig, rows: Layout, *, batch_size: int = 16,
          dirs: dict | None = None, r: int = 0, coef: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
  """(summed NLL [N] float64, counts [N]) of every row, in batches of one size (`even_batch`; the
  last one padded by repeating a row), so a whole sweep compiles once."""
  batch_size = even_batch(rows.rows, batch_size)
  sums, counts = np.zeros(rows.rows), np.zeros(rows.rows)
  extra = () if dirs is None else (dirs, np.int32(r), np.asarray(coef, np.float32))
  for start in range(0, rows.rows, batch_size):
    n = min(batch_size, rows.rows - start)
    sel = np.arange(start, start + batch_size).clip(max=rows.rows - 1)
    s, k = nll_sums(params, rows.prompt[sel], rows.prompt_mask[sel], rows.cont[sel],
                    rows.cont_mask[sel], *extra, cfg=cfg)
    s, k = jax.device_get((s, k))
    sums[start:start + n], counts[start:start + n] = s[:n], k[:n]
  return sums, counts
