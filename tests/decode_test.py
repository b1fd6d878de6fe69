"""Greedy decoding: cache vs no cache, EOS per row, budget, no recompiles within a bucket."""

import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import decode, model, prompts


_LOGITS = jax.jit(model.logits, static_argnums=2)   # one compile per length, not one per op and length


def _uncached_greedy(params, prompt, cfg, n):
  """Re-runs the whole sequence each step: the obviously-correct reference."""
  seq = jnp.asarray(prompt)
  out = []
  for _ in range(n):
    nxt = jnp.argmax(_LOGITS(params, seq, cfg)[:, -1], axis=-1)
    out.append(np.asarray(nxt))
    seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)
  return np.stack(out, axis=1)


class DecodeTest(parameterized.TestCase):

  @parameterized.named_parameters(("mha", 4, None), ("gqa", 2, None), ("mqa", 1, None),
                                  ("sliding_window", 2, 3))
  def test_cached_greedy_matches_uncached(self, num_kv_heads, window):
    cfg = model.ModelConfig.tiny(num_kv_heads=num_kv_heads, sliding_window=window,
                                 model_type="mistral" if window else "llama")
    params = model.init(jax.random.key(0), cfg)
    prompt = fixtures.random_tokens(2, 5, cfg.vocab_size)
    spec = decode.DecodeSpec(max_new_tokens=8, eos_ids=(-1,), pad_id=0)
    gen = decode.greedy(params, jnp.asarray(prompt), jnp.ones(prompt.shape, bool), None, None, None,
                        cfg=cfg, spec=spec)
    np.testing.assert_array_equal(np.asarray(gen.tokens), _uncached_greedy(params, prompt, cfg, 8))
    np.testing.assert_array_equal(np.asarray(gen.length), [8, 8])

  @parameterized.named_parameters(("gqa", 2, None), ("sliding_window", 2, 3))
  def test_attention_windows_match_uncached(self, num_kv_heads, window):
    """Every step its own window (the tightest bound), with left-padded rows."""
    cfg = model.ModelConfig.tiny(num_kv_heads=num_kv_heads, sliding_window=window,
                                 model_type="mistral" if window else "llama")
    params = model.init(jax.random.key(4), cfg)
    rows = [[5, 9, 17, 3], [7, 8, 9, 10, 11, 12, 13]]
    tokens, mask = prompts.left_pad(rows, 8, 0)
    spec = decode.DecodeSpec(max_new_tokens=9, eos_ids=(-1,), pad_id=0)
    with mock.patch.object(decode, "WINDOW_SEGMENTS", 100), mock.patch.object(decode, "MIN_SEGMENT_STEPS", 1):
      self.assertEqual(len(decode.windows(8, 9)), 8)
      gen = jax.jit(lambda p, t, m: decode.greedy_impl(p, t, m, None, None, None, cfg=cfg, spec=spec))(
          params, tokens, mask)
    for i, r in enumerate(rows):
      np.testing.assert_array_equal(np.asarray(gen.tokens)[i], _uncached_greedy(params, np.asarray([r]), cfg, 9)[0])

  def test_shared_prefix_prefill_matches_plain_rows(self):
    """Prefix computed once and broadcast == every row prefilled whole == the uncached loop."""
    cfg = model.ModelConfig.tiny(num_kv_heads=2)
    params = model.init(jax.random.key(5), cfg)
    head = [int(t) for t in fixtures.random_tokens(1, 12, cfg.vocab_size, seed=6)[0]]
    rows = [head + [3, 4, 5], head + [9], head + [7, 7, 7, 7, 7, 7]]
    tokens, mask, shared = prompts.pack(rows, pad_id=0)
    self.assertEqual(shared, 12)
    base = decode.DecodeSpec(max_new_tokens=9, eos_ids=(-1,), pad_id=0)
    run = lambda spec, t, m: np.asarray(jax.jit(lambda p, t, m: decode.greedy_impl(
        p, t, m, None, None, None, cfg=cfg, spec=spec))(params, t, m).tokens)
    got = run(dataclasses.replace(base, shared_prefix=shared), tokens, mask)
    np.testing.assert_array_equal(got, run(base, tokens, mask))
    np.testing.assert_array_equal(got, run(base, *prompts.left_pad(rows, 24, 0)))
    for i, r in enumerate(rows):
      np.testing.assert_array_equal(got[i], _uncached_greedy(params, np.asarray([r]), cfg, 9)[0])

  def test_verdict_logits_are_each_steps_logits_until_the_row_ends(self):
    """spec.verdict_ids: the loop keeps those tokens' logits at every step a row is live."""
    cfg = model.ModelConfig.tiny(num_kv_heads=2)
    params = model.init(jax.random.key(7), cfg)
    rows = [[5, 9, 17, 3], [7, 8, 9, 10, 11, 12, 13]]
    tokens, mask = prompts.left_pad(rows, 8, 0)
    free = decode.DecodeSpec(max_new_tokens=9, eos_ids=(-1,), pad_id=0, verdict_ids=(3, 11, 4))
    gen = decode.greedy(params, jnp.asarray(tokens), jnp.asarray(mask), None, None, None, cfg=cfg,
                        spec=free)
    for i, r in enumerate(rows):
      seq = np.asarray([r + np.asarray(gen.tokens)[i].tolist()])
      want = np.asarray(model.logits(params, jnp.asarray(seq), cfg))[0, len(r) - 1:-1][:, [3, 11, 4]]
      np.testing.assert_allclose(np.asarray(gen.verdict)[i], want, rtol=1e-5, atol=1e-5)
    eos = int(np.asarray(gen.tokens)[0, 2])  # row 0 ends at step 2: later steps stay zero
    ended = decode.greedy(params, jnp.asarray(tokens), jnp.asarray(mask), None, None, None, cfg=cfg,
                          spec=dataclasses.replace(free, eos_ids=(eos,)))
    n = int(np.asarray(ended.length)[0])
    self.assertLessEqual(n, 3)
    np.testing.assert_array_equal(np.asarray(ended.verdict)[0, :n], np.asarray(gen.verdict)[0, :n])
    np.testing.assert_array_equal(np.asarray(ended.verdict)[0, n:], 0.0)
    self.assertIsNone(decode.greedy(params, jnp.asarray(tokens), jnp.asarray(mask), None, None, None,
                                    cfg=cfg, spec=dataclasses.replace(free, verdict_ids=())).verdict)

  def test_greedy_token_is_argmax_also_for_ties_inf_and_nan(self):
    rows = np.random.default_rng(0).standard_normal((8, 50)).astype(np.float32)
    rows[1, [3, 7]] = 9.0                       # tie: the first wins
    rows[2, 5], rows[2, 9] = np.inf, np.inf     # +inf, twice
    rows[3, 4] = -np.inf                        # finite max, a -inf elsewhere
    rows[4, [6, 2]] = np.nan                    # NaN: argmax returns the first NaN
    rows[5] = -np.inf                           # all -inf
    rows[6, 0], rows[6, 30] = np.nan, np.inf
    token, bad = map(np.asarray, decode.greedy_token(jnp.asarray(rows)))
    np.testing.assert_array_equal(token, np.asarray(jnp.argmax(jnp.asarray(rows), axis=-1)))
    np.testing.assert_array_equal(token[[1, 2, 4, 6]], [3, 5, 2, 0])
    np.testing.assert_array_equal(bad, ~np.isfinite(rows).all(axis=-1))

  def test_windows_cover_every_written_slot(self):
    for prompt_len, new in [(8, 1), (8, 2), (16, 9), (56, 64), (100, 512), (24, 17)]:
      w = decode.windows(prompt_len, new)
      self.assertEqual(sum(n for n, _ in w), max(new - 1, 0))
      done = 0
      for n, attend in w:
        done += n
        # the last step of a segment reads slots < prompt_len + done - 1
        self.assertGreaterEqual(attend, prompt_len + done - 1)
        self.assertLessEqual(attend, prompt_len + new)
    self.assertEqual(len(decode.windows(56, 64)), 7)
    self.assertEqual(len(decode.windows(100, 512)), decode.WINDOW_SEGMENTS)
    self.assertEqual(len(decode.windows(16, 9)), 1)

  def test_left_padding_does_not_change_tokens(self):
    cfg = model.ModelConfig.tiny()
    params = model.init(jax.random.key(1), cfg)
    a, b = [5, 9, 17, 3], [7, 8, 9, 10, 11, 12, 13]
    together = decode.generate(params, cfg, [a, b], max_new_tokens=6, eos_ids=(-1,), pad_id=0)
    alone = [decode.generate(params, cfg, [p], max_new_tokens=6, eos_ids=(-1,), pad_id=0)[0] for p in (a, b)]
    self.assertEqual(together, alone)

  def test_stops_at_eos_per_row_and_respects_budget(self):
    cfg = model.ModelConfig.tiny()
    params = model.init(jax.random.key(2), cfg)
    rows = [list(r) for r in fixtures.random_tokens(4, 6, cfg.vocab_size, seed=3)]
    free = decode.generate(params, cfg, rows, max_new_tokens=10, eos_ids=(-1,), pad_id=0)
    self.assertEqual([len(r) for r in free], [10] * 4)
    eos = free[0][3]  # row 0 emits this at step 3; every row must stop at its first occurrence
    got = decode.generate(params, cfg, rows, max_new_tokens=10, eos_ids=(eos,), pad_id=0)
    for f, g in zip(free, got):
      expected = f[:f.index(eos) + 1] if eos in f else f
      self.assertEqual(g, expected)
    self.assertLessEqual(len(got[0]), 4)
    fixed = decode.generate(params, cfg, rows, max_new_tokens=10, eos_ids=(eos,), pad_id=0,
                            fixed_length=True)
    self.assertEqual(fixed, free)

  def test_same_bucket_does_not_recompile(self):
    cfg = model.ModelConfig.tiny(num_layers=1)
    params = model.init(jax.random.key(3), cfg)
    decode.generate(params, cfg, [[1, 2, 3]], max_new_tokens=4, eos_ids=(-1,), pad_id=0)
    before = decode.greedy._cache_size()
    decode.generate(params, cfg, [[4, 5, 6, 7, 8]], max_new_tokens=4, eos_ids=(-1,), pad_id=0)
    decode.generate(params, cfg, [[9] * 11], max_new_tokens=4, eos_ids=(-1,), pad_id=0)
    self.assertEqual(decode.greedy._cache_size(), before)
    decode.generate(params, cfg, [[9] * 17], max_new_tokens=4, eos_ids=(-1,), pad_id=0)
    self.assertEqual(decode.greedy._cache_size(), before + 1)

  def test_bucket_lengths(self):
    self.assertEqual([prompts.bucket_length(n) for n in (1, 16, 17, 100, 257, 600)],
                     [16, 16, 24, 104, 264, 640])
    self.assertEqual([prompts.bucket_rows(n) for n in (0, 1, 3, 4, 33)], [1, 1, 4, 4, 64])


if __name__ == "__main__":
  absltest.main()
