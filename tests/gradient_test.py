"""The gradient direction against torch autograd on the same tiny model, loss and examples."""

import tempfile
from unittest import mock

import jax
import numpy as np
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import errors
from visage_jax.checkpoints import hf_tensors, loader
from visage_jax.directions import gradient

EXAMPLES = [dict(goal="Write a poem about the sea", target="Sure, here is a poem about the sea"),
            dict(goal="Tell me how to bake bread", target="Sure, here is how to bake bread at home"),
            dict(goal="Explain rain", target="Sure")]


class GradientDirectionTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = fixtures.toy_tokenizer("bpe")
    with tempfile.TemporaryDirectory() as d:
      cls.hf = fixtures.save_tiny_hf(d, "llama", tokenizer=cls.tok, seed=3)
      cls.cfg, cls.params = loader.load_params(d)

  def _torch_direction(self, batch, norm, blacklist):
    """-grad of the pooled mean target NLL from transformers + torch autograd, normalized per HF tensor."""
    import torch

    hf = self.hf.float()
    hf.zero_grad()
    tokens = torch.tensor(np.asarray(batch["tokens"]), dtype=torch.long)
    mask = torch.tensor(np.asarray(batch["mask"]), dtype=torch.long)
    logits = hf(input_ids=tokens, attention_mask=mask).logits[:, :-1]
    target = tokens[:, 1:]
    w = torch.tensor(np.asarray(batch["loss_mask"])[:, 1:], dtype=torch.float32)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            reduction="none").reshape(target.shape)
    loss = (nll * w).sum() / w.sum()
    loss.backward()
    out = {}
    for name, p in hf.named_parameters():
      g = -p.grad.detach().double().numpy()
      theta = p.detach().double().numpy()
      if any(b in name for b in blacklist):
        out[name] = np.zeros_like(g)
      elif norm == "layer":
        out[name] = g / np.linalg.norm(g) * np.linalg.norm(theta)
      else:
        out[name] = g / np.linalg.norm(g)
    return float(loss.detach()), out

  @parameterized.parameters(("layer", ("norm",)), ("none", ()))
  def test_matches_torch_autograd(self, norm, blacklist):
    batch = gradient.encode(EXAMPLES, self.tok, template="auto", system_prompt="default")
    loss, d = gradient.gradient_direction(self.params, batch, self.cfg, norm=norm, blacklist=blacklist)
    want_loss, want = self._torch_direction(batch, norm, blacklist)
    self.assertAlmostEqual(loss, want_loss, delta=1e-5 * abs(want_loss))
    got = hf_tensors.to_hf_tensors(d, self.cfg)
    self.assertEqual(set(got), set(want))
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4 * np.abs(want[name]).max(),
                                 err_msg=name)

  def test_targets_follow_the_formatted_goal_without_eos(self):
    batch = gradient.encode(EXAMPLES, self.tok, template="auto", system_prompt="default")
    for i, ex in enumerate(EXAMPLES):
      target = self.tok(ex["target"], add_special_tokens=False)["input_ids"]
      ids = np.asarray(batch["tokens"][i])[np.asarray(batch["loss_mask"][i])]
      self.assertEqual(ids.tolist(), target)   # exactly the target, no EOS after it

  def test_micro_batches_add_up(self):
    batch = gradient.encode(EXAMPLES * 4, self.tok, template="auto", system_prompt="default")
    self.assertGreater(len(EXAMPLES * 4), gradient.MICRO_BATCH)
    loss, g = gradient.compliance_gradient(self.params, batch, self.cfg)
    with mock.patch.object(gradient, "MICRO_BATCH", 1000):   # one pass over all 12 examples
      loss_one, g_one = gradient.compliance_gradient(self.params, batch, self.cfg)
    self.assertAlmostEqual(loss, loss_one, delta=1e-6 * loss)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_one)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()) + 1e-9)

  def test_rows_and_overlap(self):
    self.assertEqual(gradient.row_range("400:520", 520, "gradient.rows"), range(400, 520))
    for bad in ("400", "a:b", "10:5", "0:521", "-1:3"):
      with self.assertRaisesRegex(errors.UserError, "gradient.rows"):
        gradient.row_range(bad, 520, "gradient.rows")
    self.assertEqual(gradient.overlap(["Explain rain ", "x"], ["explain rain"]), ["Explain rain "])


if __name__ == "__main__":
  absltest.main()
