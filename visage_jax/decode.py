"""Greedy decoding: prefill + KV cache + one jitted while_loop, no host round-trip per token."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import judges, model, prompts


@flax.struct.dataclass
class DecodeState:
  step: jax.Array       # [] tokens written so far
  last: jax.Array       # [B] token fed next
  out: jax.Array        # [B, max_new_tokens]
  done: jax.Array       # [B]
  length: jax.Array     # [B] tokens generated, EOS included
  judge: jax.Array      # [B] keyword-automaton state
  refused: jax.Array    # [B] a refusal keyword has appeared
  nonfinite: jax.Array  # [B] some step produced inf/NaN logits
  cache: model.KVCache


@flax.struct.dataclass
class Generation:
  tokens: jax.Array     # [B, max_new_tokens], pad_id after the end
  length: jax.Array     # [B] tokens generated, EOS included
  refused: jax.Array    # [B] on-device keyword verdict (False when no tables were given)
  nonfinite: jax.Array  # [B]


@flax.struct.dataclass
class KeywordTables:
  """On-device copy of judges.KeywordTables."""
  next_state: jax.Array  # [states, V] int32
  matched: jax.Array     # [states, V] bool


def _is_eos(tokens, eos_ids):
  return functools.reduce(jnp.logical_or, [tokens == e for e in eos_ids])


def greedy_impl(params: dict, tokens: jax.Array, mask: jax.Array, tables: KeywordTables | None,
                dirs: dict | None, coef: jax.Array | None, *, cfg: model.ModelConfig,
                max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int,
                fixed_length: bool = False, stop_at_refusal: bool = False) -> Generation:
  """Greedy continuation of left-padded prompts [B, T] (unjitted; the engine vmaps it).

  A row ends at its first EOS, or at a refusal keyword when `stop_at_refusal` (its verdict
  cannot change after that); the loop ends when every row has. `fixed_length` disables both
  (benchmarks: every row does max_new_tokens steps).
  """
  B, T = tokens.shape
  stop_refusal = stop_at_refusal and tables is not None and not fixed_length

  def judge(state, refused, tok, live):
    if tables is None:
      return state, refused
    nxt_state, hit = judges.advance(tables.next_state, tables.matched, state, tok)
    return jnp.where(live, nxt_state, state), refused | (hit & live)

  def finished(tok, refused):
    if fixed_length:
      return jnp.zeros_like(refused)
    return _is_eos(tok, eos_ids) | (refused & stop_refusal)

  def bad(logits):
    return ~jnp.all(jnp.isfinite(logits[:, -1]), axis=-1)

  cache = model.init_cache(cfg, B, T + max_new_tokens)
  logits, cache = model.forward(params, tokens, mask, cache, cfg, dirs, coef, last_only=True)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  live = jnp.ones((B,), bool)
  jstate, refused = judge(jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool), first, live)
  state = DecodeState(
      step=jnp.ones((), jnp.int32), last=first,
      out=jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first),
      done=finished(first, refused), length=jnp.ones((B,), jnp.int32), judge=jstate,
      refused=refused, nonfinite=bad(logits), cache=cache)

  def running(s):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def step(s):
    logits, cache = model.forward(params, s.last[:, None], jnp.ones((B, 1), bool), s.cache, cfg,
                                  dirs, coef)
    live = ~s.done
    nxt = jnp.where(live, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), pad_id)
    jstate, refused = judge(s.judge, s.refused, nxt, live)
    return s.replace(step=s.step + 1, last=nxt, cache=cache,
                     out=jax.lax.dynamic_update_slice_in_dim(s.out, nxt[:, None], s.step, axis=1),
                     done=s.done | finished(nxt, refused), length=s.length + live.astype(jnp.int32),
                     judge=jstate, refused=refused, nonfinite=s.nonfinite | (bad(logits) & live))

  s = jax.lax.while_loop(running, step, state)
  return Generation(tokens=s.out, length=s.length, refused=s.refused, nonfinite=s.nonfinite)


_STATIC = ("cfg", "max_new_tokens", "eos_ids", "pad_id", "fixed_length", "stop_at_refusal")
greedy = jax.jit(greedy_impl, static_argnames=_STATIC)


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
  gen = greedy(params, jnp.asarray(tokens), jnp.asarray(mask), None, None, None, cfg=cfg,
               max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids), pad_id=pad_id,
               fixed_length=fixed_length)
  out, lengths = np.asarray(gen.tokens), np.asarray(gen.length)
  return [out[i, :lengths[i]].tolist() for i in range(len(token_lists))]
