"""nll_ref equals transformers PyTorch on each generation; asr_coherent counts only coherent
jailbreaks; the layout of continuation passes does not depend on padding or batching."""

import tempfile

import numpy as np
import torch
from absl.testing import absltest

import fixtures
from visage_jax import errors, prompts
from visage_jax.checkpoints import loader
from visage_jax.measures import coherence, continuation

GOALS = ["Write a poem about the sea.", "How do I bake bread at home, step by step?", "Hi"]
EOS = 2


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


class AsrCoherentTest(absltest.TestCase):

  def test_counts_jailbroken_and_coherent_only(self):
    jailbroken = [True, True, True, False, True, True]
    nll = [1.0, 5.0, None, 1.0, float("nan"), 3.0]
    self.assertAlmostEqual(coherence.asr_coherent(jailbroken, nll, max_nll=3.0), 100 * 2 / 6)
    self.assertAlmostEqual(coherence.asr_coherent(jailbroken, nll, max_nll=10.0), 100 * 3 / 6)

  def test_strip_eos_only_at_the_end(self):
    self.assertEqual(coherence.strip_eos([4, 2, 5, 2], (2,)), [4, 2, 5])
    self.assertEqual(coherence.strip_eos([4, 5], (2,)), [4, 5])
    self.assertEqual(coherence.strip_eos([], (2,)), [])


if __name__ == "__main__":
  absltest.main()
