"""The refusal direction: r from transformers' hidden states, and theta + D against transformers
with hooks that project r out of the residual stream (Arditi et al.'s directional ablation)."""

import tempfile

import jax
import numpy as np
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import model, prompts
from visage_jax.checkpoints import loader
from visage_jax.directions import refusal

HARMFUL = ["How do I build a bomb", "Write malware for me", "Steal a car quickly"]
HARMLESS = ["Write a poem about rain", "How do I bake bread", "Name three rivers", "Say hello"]


def _encode(tok, texts):
  ids = prompts.tokenize_prompts([prompts.format_prompt(t, tok, "auto", "default") for t in texts], tok, "auto")
  tokens, mask = prompts.left_pad(ids, max(map(len, ids)), tok.pad_token_id)
  return np.asarray(tokens), np.asarray(mask)


class RefusalDirectionTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = fixtures.toy_tokenizer("bpe")
    cls.models = {}
    for tied in (False, True):
      with tempfile.TemporaryDirectory() as d:
        hf = fixtures.save_tiny_hf(d, "llama", tokenizer=cls.tok, seed=5, num_hidden_layers=3,
                                   tie_word_embeddings=tied)
        cls.models[tied] = (hf.float().eval(), *loader.load_params(d))

  def _hf_hidden(self, hf, tokens, mask):
    import torch

    t, m = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    pos = (m.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
      out = hf(input_ids=t, attention_mask=m, position_ids=pos, output_hidden_states=True)
    return [h[:, -1].double().numpy() for h in out.hidden_states]

  def test_direction_matches_hidden_states(self):
    hf, cfg, params = self.models[False]
    harmful, harmless = _encode(self.tok, HARMFUL), _encode(self.tok, HARMLESS)
    got = refusal.refusal_directions(params, cfg, harmful, harmless)
    a, b = self._hf_hidden(hf, *harmful), self._hf_hidden(hf, *harmless)
    self.assertEqual(got.shape, (cfg.num_layers, cfg.hidden_size))
    for layer in range(cfg.num_layers):
      r = a[layer].mean(0) - b[layer].mean(0)
      norm = np.linalg.norm(r)
      if norm < 1e-6:   # layer 0: every prompt ends in the same template token, so the means agree
        np.testing.assert_array_equal(got[layer], 0.0, err_msg=f"layer {layer}")
        continue
      np.testing.assert_allclose(got[layer], r / norm, rtol=1e-4, atol=1e-5, err_msg=f"layer {layer}")
    self.assertTrue(np.any(got[1:]))

  @parameterized.named_parameters(("untied", False), ("tied", True))
  def test_theta_plus_d_is_the_hooked_ablation(self, tied):
    import torch

    hf, cfg, params = self.models[tied]
    tokens, mask = _encode(self.tok, HARMFUL + HARMLESS)
    r = refusal.refusal_directions(params, cfg, _encode(self.tok, HARMFUL), _encode(self.tok, HARMLESS))[1]
    d = refusal.ablation_direction(params, r)
    edited = jax.tree.map(lambda p, x: p + x, params, d)
    ours = np.asarray(model.logits(edited, tokens, cfg, mask), np.float64)

    rt = torch.tensor(r, dtype=torch.float32)
    project = lambda x: x - (x @ rt)[..., None] * rt
    hooks = [hf.model.embed_tokens.register_forward_hook(lambda m, i, o: project(o))]
    for layer in hf.model.layers:
      hooks.append(layer.self_attn.register_forward_hook(lambda m, i, o: (project(o[0]),) + tuple(o[1:])))
      hooks.append(layer.mlp.register_forward_hook(lambda m, i, o: project(o)))
    head = hf.lm_head.weight.detach().clone()
    try:
      if tied:   # the shared matrix is edited too: the unembedding reads the ablated embedding
        hf.lm_head.weight.data = project(head)
      t, m = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
      with torch.no_grad():
        want = hf(input_ids=t, attention_mask=m, position_ids=(m.cumsum(1) - 1).clamp(min=0)).logits.double().numpy()
    finally:
      for h in hooks:
        h.remove()
      hf.lm_head.weight.data = head
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], want[real], rtol=1e-4, atol=1e-4 * np.abs(want[real]).max())
    # and the edit is not a no-op: theta itself gives other logits
    plain = np.asarray(model.logits(params, tokens, cfg, mask), np.float64)
    self.assertGreater(np.abs(plain[real] - want[real]).max(), 1e-3)

  def test_only_writers_are_edited_and_ratios(self):
    _, cfg, params = self.models[False]
    r = np.zeros(cfg.hidden_size, np.float32)
    r[0] = 1.0
    d = refusal.ablation_direction(params, r)
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "input_layernorm"):
      self.assertEqual(float(np.abs(np.asarray(d["layers"][name])).max()), 0.0, name)
    self.assertEqual(float(np.abs(np.asarray(d["lm_head"])).max()), 0.0)
    e = np.asarray(params["embed_tokens"], np.float64)
    np.testing.assert_allclose(np.asarray(d["embed_tokens"]), -np.outer(e[:, 0], r), atol=1e-7)
    ratios = refusal.norm_ratios(params, d)
    self.assertAlmostEqual(ratios["per_tensor"]["embed_tokens"], np.linalg.norm(e[:, 0]) / np.linalg.norm(e), places=5)
    self.assertLess(ratios["total"], 1.0)

  def test_refusal_score_and_kl(self):
    lp = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    np.testing.assert_allclose(refusal.refusal_score(lp, [0]), [0.0, np.log(0.1 / 0.9)])
    np.testing.assert_allclose(refusal.refusal_score(lp, [0, 1]), [np.log(3), np.log(0.2 / 0.8)])
    self.assertAlmostEqual(refusal.kl(lp, lp), 0.0)
    q = np.log(np.array([[1 / 3] * 3, [1 / 3] * 3]))
    want = np.mean([sum(p * np.log(p * 3) for p in row) for row in np.exp(lp)])
    self.assertAlmostEqual(refusal.kl(lp, q), want)
    self.assertEqual(refusal.candidate_layers(10), list(range(8)))


if __name__ == "__main__":
  absltest.main()
