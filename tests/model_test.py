"""Model parity with transformers' PyTorch LLaMA/Mistral, through real save_pretrained directories."""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import model
from visage_jax.checkpoints import loader

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}



def _tiny_llama():
  """(transformers model, our cfg, our params) of one tiny random LLaMA checkpoint."""
  with tempfile.TemporaryDirectory() as d:
    hf = fixtures.save_tiny_hf(d, "llama")
    cfg, params = loader.load_params(d)
  return hf, cfg, params

class ParityTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("llama_gqa", "llama", dict(num_key_value_heads=2)),
      ("llama_mha_tied", "llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
      ("llama_mqa", "llama", dict(num_key_value_heads=1)),
      ("llama3_rope_scaling", "llama", dict(num_key_value_heads=2,
                                            rope_parameters=dict(LLAMA3_ROPE, rope_theta=500000.0))),
      ("llama_linear_rope", "llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                           "rope_theta": 10000.0})),
      ("mistral_sliding_window", "mistral", dict(num_key_value_heads=2, sliding_window=5)),
  )
  def test_logits_match_transformers(self, arch, overrides):
    with tempfile.TemporaryDirectory() as d:
      hf = fixtures.save_tiny_hf(d, arch, **overrides)
      cfg, params = loader.load_params(d)
    tokens = fixtures.random_tokens(2, 24, cfg.vocab_size)
    with torch.no_grad():
      ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    got = np.asarray(model.logits(params, jnp.asarray(tokens), cfg))
    self.assertLessEqual(np.abs(got - ref).max(), 1e-4)
    if arch == "mistral":
      self.assertEqual(cfg.sliding_window, 5)
    if "rope_parameters" in overrides:
      self.assertEqual(cfg.rope_type, overrides["rope_parameters"]["rope_type"])

  def test_left_padded_batch_matches_transformers_with_attention_mask(self):
    hf, cfg, params = _tiny_llama()
    tokens = fixtures.random_tokens(3, 12, cfg.vocab_size, seed=1)
    mask = np.ones_like(tokens, dtype=bool)
    mask[0, :5] = False
    mask[1, :2] = False
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
      ref = hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)),
               position_ids=torch.tensor(position_ids)).logits.numpy()
    got = np.asarray(model.logits(params, jnp.asarray(tokens), cfg, jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask], ref[mask], atol=1e-4)

  def test_sequence_nll_matches_transformers(self):
    hf, cfg, params = _tiny_llama()
    tokens = fixtures.random_tokens(3, 16, cfg.vocab_size, seed=2)
    mask = np.ones_like(tokens, dtype=bool)
    mask[1, 12:] = False  # right padding after a shorter row
    target = np.zeros_like(mask)
    target[0, 5:] = True  # a prompt of 5 tokens, then the response
    target[1, 9:12] = True
    target[2, 0:] = True  # the first token has no prediction: 15 scored
    got_sum, got_count = jax.jit(model.sequence_nll, static_argnums=4)(
        params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(target), cfg)
    with torch.no_grad():
      logits = hf(torch.tensor(tokens, dtype=torch.long),
                  attention_mask=torch.tensor(mask.astype(np.int64))).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).numpy()
    for b in range(3):
      pos = [t for t in range(1, tokens.shape[1]) if target[b, t]]
      want = -sum(logp[b, t - 1, tokens[b, t]] for t in pos)
      self.assertEqual(float(got_count[b]), len(pos))
      self.assertAlmostEqual(float(got_sum[b]), want, delta=1e-4 * len(pos))


class ConfigTest(parameterized.TestCase):

  def test_legacy_rope_keys_equal_rope_parameters(self):
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    legacy = model.config_from_hf(dict(base, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE)))
    new = model.config_from_hf(dict(base, rope_parameters=dict(LLAMA3_ROPE, rope_theta=500000.0)))
    self.assertEqual(legacy, new)
    old_style = model.config_from_hf(dict(base, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0}))
    self.assertEqual(old_style.rope_type, "linear")

  def test_unsupported_architecture_is_named(self):
    with self.assertRaisesRegex(ValueError, r"model_type 'gpt2' is not supported; supported: llama, mistral"):
      model.config_from_hf({"model_type": "gpt2"})

  def test_unsupported_rope_type(self):
    with self.assertRaisesRegex(ValueError, "rope type 'yarn'"):
      model.config_from_hf(dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                                num_hidden_layers=1, num_attention_heads=2,
                                rope_scaling={"rope_type": "yarn", "factor": 4.0}))

  def test_bfloat16_compute_is_close_to_float32(self):
    cfg = model.ModelConfig.tiny()
    params = model.init(jax.random.key(0), cfg)
    tokens = jnp.asarray(fixtures.random_tokens(2, 8, cfg.vocab_size))
    ref = model.logits(params, tokens, cfg)
    cfg16 = model.ModelConfig.tiny(dtype="bfloat16", param_dtype="bfloat16")
    got = model.logits(model.cast_params(params, "bfloat16"), tokens, cfg16)
    self.assertEqual(got.dtype, jnp.float32)
    self.assertLess(float(jnp.abs(got - ref).max()), 0.05)


if __name__ == "__main__":
  absltest.main()
