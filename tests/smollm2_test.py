"""The embedded real model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' own GGUF loading."""

import jax.numpy as jnp
import numpy as np
import torch
from absl.testing import absltest

import fixtures
from visage_jax import decode, model, prompts
from visage_jax.checkpoints import loader


class SmolLM2Test(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    path = loader.default_model_path()
    local = loader.resolve(path, "float32")   # the converted copy, made once
    cls.cfg, cls.params = loader.load_params(local)
    cls.tok = loader.load_tokenizer(local)
    cls.eos = loader.eos_ids(local, cls.tok)
    cls.hf = fixtures.hf_gguf_reference(path)   # transformers' own GGUF loading, kept between runs
    goals = prompts.load_goals(fixtures.advbench_path(), 8)
    cls.texts = [prompts.format_prompt(g, cls.tok) for g in goals]

  def test_config_from_gguf_metadata(self):
    self.assertEqual((self.cfg.num_layers, self.cfg.hidden_size, self.cfg.num_heads, self.cfg.num_kv_heads),
                     (30, 576, 9, 3))
    self.assertTrue(self.cfg.tie_word_embeddings)

  def test_logits_match_transformers_gguf(self):
    ids = prompts.tokenize_prompts(self.texts[:2], self.tok, "auto")
    for row in ids:
      with torch.no_grad():
        ref = self.hf(torch.tensor([row])).logits.numpy()
      got = np.asarray(model.logits(self.params, jnp.asarray([row]), self.cfg))
      self.assertLessEqual(np.abs(got - ref).max(), 1e-3)

  def test_batched_greedy_tokens_match_transformers_generate(self):
    ids = prompts.tokenize_prompts(self.texts, self.tok, "auto")
    self.assertGreater(len({len(i) for i in ids}), 1, "prompts must need left padding")
    got = decode.generate(self.params, self.cfg, ids, max_new_tokens=32,
                          eos_ids=self.eos, pad_id=decode.pad_id_of(self.tok))
    self.tok.padding_side = "left"
    enc = self.tok(self.texts, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.no_grad():
      ref = self.hf.generate(**enc, max_new_tokens=32, do_sample=False)
    ref = ref[:, enc["input_ids"].shape[1]:].tolist()
    for i, (g, r) in enumerate(zip(got, ref)):
      self.assertEqual(g, r[:len(g)], f"prompt {i}")
      self.assertTrue(len(g) == 32 or g[-1] in self.eos)


if __name__ == "__main__":
  absltest.main()
