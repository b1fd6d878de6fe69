"""Greedy decoding: prefill + KV cache + one jitted while_loop, no host round-trip per token."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import model, prompts


@flax.struct.dataclass
class DecodeState:
  step: jax.Array   # [] tokens written so far
  last: jax.Array   # [B] token fed next
  out: jax.Array    # [B, max_new_tokens]
  done: jax.Array   # [B]
  length: jax.Array  # [B] tokens generated, EOS included
  cache: model.KVCache


def _is_eos(tokens, eos_ids):
  return functools.reduce(jnp.logical_or, [tokens == e for e in eos_ids])


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_ids", "pad_id",
                                             "fixed_length"))
def greedy(params: dict, tokens: jax.Array, mask: jax.Array, *, cfg: model.ModelConfig,
           max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int, fixed_length: bool = False,
           dirs: dict | None = None, coef: jax.Array | None = None):
  """Greedy continuation of left-padded prompts [B, T].

  Stops each row at its first EOS (later slots hold pad_id) and the loop when all rows
  are done, unless `fixed_length` (benchmarks: every row does max_new_tokens steps).
  Returns (out [B, max_new_tokens] int32, length [B] int32, EOS counted).
  """
  B, T = tokens.shape
  cache = model.init_cache(cfg, B, T + max_new_tokens)
  logits, cache = model.forward(params, tokens, mask, cache, cfg, dirs, coef)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  done = _is_eos(first, eos_ids) & (not fixed_length)
  state = DecodeState(
      step=jnp.ones((), jnp.int32), last=first,
      out=jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first),
      done=done, length=jnp.ones((B,), jnp.int32), cache=cache)

  def running(s):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def step(s):
    logits, cache = model.forward(params, s.last[:, None], jnp.ones((B, 1), bool), s.cache, cfg,
                                  dirs, coef)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    nxt = jnp.where(s.done, pad_id, nxt)
    done = s.done | (_is_eos(nxt, eos_ids) & (not fixed_length))
    return s.replace(step=s.step + 1, last=nxt, cache=cache,
                     out=jax.lax.dynamic_update_slice_in_dim(s.out, nxt[:, None], s.step, axis=1),
                     done=done, length=s.length + (~s.done).astype(jnp.int32))

  state = jax.lax.while_loop(running, step, state)
  return state.out, state.length


def eos_ids_of(tokenizer, extra: tuple[int, ...] = ()) -> tuple[int, ...]:
  """EOS ids from the tokenizer plus chat end-of-turn tokens it defines (LLaMA-3 <|eot_id|>)."""
  ids = set(extra)
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  vocab = tokenizer.get_vocab()
  for special in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>"):
    if special in vocab and special in (tokenizer.all_special_tokens or []):
      ids.add(int(vocab[special]))
  return tuple(sorted(ids))


def pad_id_of(tokenizer) -> int:
  if tokenizer.pad_token_id is not None:
    return int(tokenizer.pad_token_id)
  return int(tokenizer.eos_token_id or 0)


def generate(params: dict, cfg: model.ModelConfig, token_lists: list[list[int]], *,
             max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int,
             fixed_length: bool = False, batch_bucket: bool = True) -> list[list[int]]:
  """Host-side wrapper: buckets prompt length (and batch), runs `greedy`, trims each row."""
  if not token_lists:
    return []
  length = prompts.bucket_length(max(len(t) for t in token_lists))
  rows = list(token_lists)
  if batch_bucket:
    rows += [rows[-1]] * (prompts.bucket_length(len(rows), minimum=1) - len(rows))
  tokens, mask = prompts.left_pad(rows, length, pad_id)
  out, lengths = greedy(params, jnp.asarray(tokens), jnp.asarray(mask), cfg=cfg,
                        max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids), pad_id=pad_id,
                        fixed_length=fixed_length)
  out, lengths = np.asarray(out), np.asarray(lengths)
  return [out[i, :lengths[i]].tolist() for i in range(len(token_lists))]
