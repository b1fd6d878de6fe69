"""nll_ref equals transformers PyTorch on each generation; asr_coherent counts only coherent
jailbreaks; the layout of continuation passes does not depend on padding or batching; a run's
Reference scores each distinct generation once, on prompts prefilled once, to the same values."""

import tempfile
from unittest import mock

import numpy as np
import torch
from absl.testing import absltest

import fixtures
from visage_jax import errors, prompts
from visage_jax.checkpoints import loader
from visage_jax.measures import coherence, continuation

GOALS = ["Write a poem about the sea.", "How do I bake bread at home, step by step?", "Hi"]
EOS = 2
# float32 rounding of one NLL: its logits come out of sums of at most 384 terms (the vocabulary's
# logsumexp; width 64, MLP 128, at most 64 positions), each rounding by at most n * 2^-24
# relative: 384 * 6e-8 = 2.3e-5 of a value near ln(384) = 6 nats, about 1e-4 nats absolute.
# The prefilled and the plain pass run the same operations (values equal bit for bit on CPU);
# transformers sums in another order.
TOL = 1e-4


class NllRefTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = fixtures.toy_tokenizer("bpe")
    with tempfile.TemporaryDirectory() as d:
      cls.hf = fixtures.save_tiny_hf(d, "llama", tokenizer=cls.tok, seed=1)
      cls.cfg, cls.params = loader.load_params(d)
    texts = [prompts.format_prompt(g, cls.tok, "auto", "default") for g in GOALS]
    cls.prompt_ids = prompts.tokenize_prompts(texts, cls.tok, "auto")
    rng = np.random.default_rng(0)
    cls.generated = [rng.integers(7, cls.cfg.vocab_size, 11).tolist() + [cls.tok.eos_token_id],  # ended by EOS
                     rng.integers(7, cls.cfg.vocab_size, 5).tolist(),                            # cut by the budget
                     [cls.tok.eos_token_id],                                                     # EOS only: no tokens
                     rng.integers(7, cls.cfg.vocab_size, 30).tolist()]
    cls.prompt_ids.append(cls.prompt_ids[0])

  def _torch(self, p_ids, g_ids):
    ids = torch.tensor([p_ids + g_ids])
    with torch.no_grad():
      logp = torch.log_softmax(self.hf(ids).logits[0, :-1].double(), -1)
    return float(-logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(p_ids) - 1:].mean())

  def test_matches_transformers_without_the_final_eos(self):
    self.assertEqual(self.tok.eos_token_id, EOS)
    got = coherence.nll_ref(self.params, self.cfg, self.prompt_ids, self.generated, eos_ids=(EOS,),
                            pad_id=self.tok.pad_token_id, batch_size=2)
    self.assertIsNone(got[2])
    for i in (0, 1, 3):
      gen = self.generated[i][:-1] if i == 0 else self.generated[i]
      self.assertAlmostEqual(got[i], self._torch(self.prompt_ids[i], gen), delta=1e-4)
    with_eos = self._torch(self.prompt_ids[0], self.generated[0])
    self.assertGreater(abs(got[0] - with_eos), 1e-3)  # the EOS really is left out

  def test_batching_and_padding_do_not_change_values(self):
    kw = dict(eos_ids=(EOS,), pad_id=self.tok.pad_token_id)
    all_rows = coherence.nll_ref(self.params, self.cfg, self.prompt_ids, self.generated, batch_size=16, **kw)
    alone = coherence.nll_ref(self.params, self.cfg, self.prompt_ids[1:2], self.generated[1:2], **kw)
    self.assertAlmostEqual(all_rows[1], alone[0], delta=1e-5)

  def test_foreign_token_ids_are_an_error(self):
    with self.assertRaisesRegex(errors.UserError, "outside the reference model's vocabulary"):
      coherence.nll_ref(self.params, self.cfg, self.prompt_ids[:1], [[self.cfg.vocab_size + 3]],
                        eos_ids=(EOS,), pad_id=0)

  def test_layout_puts_prompts_right_and_continuations_left(self):
    rows = continuation.layout([[5, 6, 7], [8]], [[9], []], pad_id=0)
    self.assertEqual(rows.prompt.shape[1] % 8, 0)
    self.assertEqual(rows.prompt[0, -3:].tolist(), [5, 6, 7])
    self.assertEqual(rows.cont[0, :1].tolist(), [9])
    self.assertEqual(rows.cont_mask.sum(1).tolist(), [1, 0])

  def test_even_batches(self):
    self.assertEqual([continuation.even_batch(n, 16) for n in (1, 16, 17, 20, 33)], [1, 16, 9, 10, 11])


class ReferenceTest(absltest.TestCase):
  """Reference.nll against continuation.nll_sums on [prompt | generation] rows (the plain pass, no
  memo, no prompt cache) and against transformers."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = fixtures.toy_tokenizer("bpe")
    with tempfile.TemporaryDirectory() as d:
      cls.hf = fixtures.save_tiny_hf(d, "llama", tokenizer=cls.tok, seed=2)
      cls.cfg, cls.params = loader.load_params(d)
    texts = [prompts.format_prompt(g, cls.tok, "auto", "default") for g in GOALS]
    cls.prompt_ids = prompts.tokenize_prompts(texts, cls.tok, "auto")
    rng = np.random.default_rng(1)
    refusal = rng.integers(7, cls.cfg.vocab_size, 4).tolist()
    # (prompt, generation) rows of three chunks: the same refusal at several points, with and
    # without its EOS, and rows that differ only in their prompt.
    cls.chunks = [[(0, refusal + [EOS]), (1, refusal), (2, rng.integers(7, cls.cfg.vocab_size, 9).tolist())],
                  [(0, refusal), (1, refusal + [EOS]), (2, [EOS])],
                  [(2, rng.integers(7, cls.cfg.vocab_size, 12).tolist()), (0, refusal), (1, refusal)]]

  def _plain(self, rows):
    gens = [coherence.strip_eos(g, (EOS,)) for _, g in rows]
    layout = continuation.layout([self.prompt_ids[q] for q, _ in rows], gens, self.tok.pad_token_id,
                                 cont_width=16)
    sums, counts = continuation.score(self.params, self.cfg, layout)
    return [s / k if k else None for s, k in zip(sums, counts)]

  def _torch(self, q, g_ids):
    ids = torch.tensor([self.prompt_ids[q] + g_ids])
    with torch.no_grad():
      logp = torch.log_softmax(self.hf(ids).logits[0, :-1].double(), -1)
    return float(-logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(self.prompt_ids[q]) - 1:].mean())

  def _check(self, got, rows):
    for v, want, (q, g) in zip(got, self._plain(rows), rows):
      if want is None:
        self.assertIsNone(v)
        continue
      self.assertAlmostEqual(v, want, delta=TOL)
      self.assertAlmostEqual(v, self._torch(q, coherence.strip_eos(g, (EOS,))), delta=TOL)

  def test_chunks_match_the_plain_pass_and_transformers(self):
    for reuse in (True, False):
      ref = coherence.Reference(self.params, self.cfg, self.prompt_ids, eos_ids=(EOS,),
                                pad_id=self.tok.pad_token_id, max_new_tokens=16, batch_size=2,
                                reuse_prompts=reuse)
      for rows in self.chunks:
        self._check(ref.nll([q for q, _ in rows], [g for _, g in rows]), rows)
      self.assertEqual(bool(ref.prefilled), reuse)

  def test_each_distinct_generation_is_scored_once(self):
    ref = coherence.Reference(self.params, self.cfg, self.prompt_ids, eos_ids=(EOS,),
                              pad_id=self.tok.pad_token_id, max_new_tokens=16)
    with mock.patch.object(continuation, "in_batches", wraps=continuation.in_batches) as passes:
      got = [ref.nll([q for q, _ in rows], [g for _, g in rows]) for rows in self.chunks]
    self.assertEqual([c.args[0] for c in passes.call_args_list], [3, 1, 1])  # new rows per chunk
    self.assertEqual(got[1][:2], got[0][:2])
    self.assertEqual(got[2][1:], got[0][:2])
    self.assertNotEqual(got[0][0], got[0][1])   # the same refusal after another prompt
    self.assertEqual(ref.nll([], []), [])        # a chunk of over-refusal rows only

  def test_bit_equal_to_the_full_pass_of_each_chunk(self):
    """A row's bits depend on the shapes of its pass (XLA CPU's matmul picks its kernel by size:
    a 2-row pass sums differently from a 12-row one), so Reference runs each chunk's new rows in
    the batch the full pass used for that chunk: values equal the full pass bit for bit."""
    rng = np.random.default_rng(3)
    gen = lambda n: rng.integers(7, self.cfg.vocab_size, n).tolist()
    first = [(i % 3, gen(3 + i)) for i in range(12)]
    chunks = [first,
              first[:10] + [(0, gen(5)), (1, gen(7) + [EOS])],   # two new rows beside ten seen ones
              first[2:7],                                         # a last, smaller chunk
              first[:4] + [(2, [EOS])] + [(1, gen(9)) for _ in range(15)]]
    pad = self.tok.pad_token_id
    widths = (prompts.bucket_length(max(map(len, self.prompt_ids))), prompts.bucket_length(16, minimum=8))
    for reuse in (True, False):
      ref = coherence.Reference(self.params, self.cfg, self.prompt_ids, eos_ids=(EOS,), pad_id=pad,
                                max_new_tokens=16, reuse_prompts=reuse)
      for rows in chunks:
        layout = continuation.layout([self.prompt_ids[q] for q, _ in rows],
                                     [coherence.strip_eos(g, (EOS,)) for _, g in rows], pad,
                                     prompt_width=widths[0], cont_width=widths[1])
        sums, counts = continuation.score(self.params, self.cfg, layout)   # f0a303a's nll_ref
        want = [float(s / k) if k else None for s, k in zip(sums, counts)]
        self.assertEqual(ref.nll([q for q, _ in rows], [g for _, g in rows]), want, f"reuse={reuse}")
      self.assertEqual(sorted(ref.prefilled), [5, 10, 12] if reuse else [])   # one prompt cache a batch

  def test_prompt_cache_kept_only_where_it_fits(self):
    n_tokens = 3 * 64
    need = 2 * self.cfg.num_layers * n_tokens * self.cfg.num_kv_heads * self.cfg.head_dim * 4
    fits = lambda free: coherence.prompt_cache_fits(self.cfg, n_tokens, dict(bytes_limit=free, bytes_in_use=0))
    self.assertTrue(fits(need / 0.15 * 1.01))
    self.assertFalse(fits(need / 0.15 * 0.99))
    self.assertTrue(coherence.prompt_cache_fits(self.cfg, n_tokens, {}))   # CPU: no limit reported


class AsrCoherentTest(absltest.TestCase):

  def test_counts_jailbroken_and_coherent_only(self):
    jailbroken = [True, True, True, False, True, True, True, True]
    nll = [1.0, 5.0, None, 1.0, float("nan"), 3.0, 1.0, 1.0]
    rep = [0.0, 0.0, 0.0, 0.0, 0.0, 0.35, 0.6, None]   # the last: a record from before repetition
    records = [dict(jailbroken=j, nll_ref=v, repetition=r) for j, v, r in zip(jailbroken, nll, rep)]
    records[-1].pop("repetition")
    self.assertAlmostEqual(coherence.asr_coherent(records, max_nll=3.0, max_repetition=0.35), 100 * 3 / 8)
    self.assertAlmostEqual(coherence.asr_coherent(records, max_nll=10.0, max_repetition=0.35), 100 * 4 / 8)
    self.assertAlmostEqual(coherence.asr_coherent(records, max_nll=3.0, max_repetition=1.0), 100 * 4 / 8)
    self.assertAlmostEqual(coherence.asr_coherent(records, max_nll=3.0, max_repetition=0.3), 100 * 2 / 8)

  def test_strip_eos_only_at_the_end(self):
    self.assertEqual(coherence.strip_eos([4, 2, 5, 2], (2,)), [4, 2, 5])
    self.assertEqual(coherence.strip_eos([4, 5], (2,)), [4, 5])
    self.assertEqual(coherence.strip_eos([], (2,)), [])


if __name__ == "__main__":
  absltest.main()
