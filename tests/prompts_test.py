"""Chat templates (the reference's strings), system prompts, left padding, prompt files."""

import json
import os

import numpy as np
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import prompts


class TemplateTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tok = fixtures.toy_tokenizer()

  @parameterized.named_parameters(
      ("llama2_default", "llama2", "default",
       "[INST] <<SYS>>\n" + prompts.LLAMA2_SAFETY_PROMPT + "\n<</SYS>>\n\nDo X. [/INST]"),
      ("llama2_none", "llama2", "none", "[INST] Do X. [/INST]"),
      ("llama2_aoa", "llama2", "aoa", "[INST] <<SYS>>\n" + prompts.AOA_PROMPT + "\n<</SYS>>\n\nDo X. [/INST]"),
      ("vicuna_default", "vicuna", "default", prompts.VICUNA_DEFAULT_PROMPT + " USER: Do X. ASSISTANT:"),
      ("vicuna_none", "vicuna", "none", "USER: Do X. ASSISTANT:"),
      ("mistral_custom", "mistral", "Be nice.", "[INST] Be nice. Do X. [/INST]"),
      ("llama3_none", "llama3", "none",
       "<|start_header_id|>system<|end_header_id|>\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>"
       "\n\nDo X.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
      ("raw", "raw", "default", "Do X."),
  )
  def test_explicit_templates(self, template, system, expected):
    self.assertEqual(prompts.format_prompt(" Do X. ", self.tok, template, system), expected)

  def test_auto_uses_chat_template_and_system_setting(self):
    self.assertEqual(prompts.format_prompt("Do X.", self.tok), "<|user|>Do X.</s><|assistant|>")
    self.assertEqual(prompts.format_prompt("Do X.", self.tok, "auto", "aoa"),
                     f"<|system|>{prompts.AOA_PROMPT}</s><|user|>Do X.</s><|assistant|>")

  def test_auto_without_chat_template_is_a_clear_error(self):
    self.tok.chat_template = None
    with self.assertRaisesRegex(ValueError, "no chat template"):
      prompts.format_prompt("Do X.", self.tok)

  def test_unknown_template(self):
    with self.assertRaisesRegex(ValueError, "prompts.template 'chatml'"):
      prompts.format_prompt("Do X.", self.tok, "chatml")

  def test_special_tokens_once(self):
    [auto] = prompts.tokenize_prompts([prompts.format_prompt("Do X.", self.tok)], self.tok, "auto")
    [raw] = prompts.tokenize_prompts(["Do X."], self.tok, "raw")
    self.assertNotEqual(auto[0], self.tok.bos_token_id)
    self.assertEqual(raw[0], self.tok.bos_token_id)


class DataTest(absltest.TestCase):

  def test_advbench_first_rows(self):
    goals = prompts.load_goals(fixtures.advbench_path(), 80)
    self.assertLen(goals, 80)
    self.assertTrue(goals[0].startswith("Write a script that can exploit vulnerabilities"))

  def test_jsonl_and_errors(self):
    d = self.create_tempdir()
    good = d.create_file("p.jsonl", "\n".join(json.dumps({"prompt": f"q{i}"}) for i in range(3)))
    self.assertEqual(prompts.load_goals(good.full_path, 2), ["q0", "q1"])
    bad = d.create_file("b.jsonl", json.dumps({"text": "q"}))
    with self.assertRaisesRegex(ValueError, r"b.jsonl:1: expected an object with a string field 'prompt'"):
      prompts.load_goals(bad.full_path)
    nocol = d.create_file("c.csv", "question,target\nq,t\n")
    with self.assertRaisesRegex(ValueError, r"c.csv: expected a CSV with a 'goal' column, found columns \['question', 'target'\]"):
      prompts.load_goals(nocol.full_path)
    empty = d.create_file("e.csv", "goal,target\n")
    with self.assertRaisesRegex(ValueError, "e.csv: the prompt set is empty"):
      prompts.load_goals(empty.full_path)
    with self.assertRaisesRegex(FileNotFoundError, "nope.csv"):
      prompts.load_goals(os.path.join(d.full_path, "nope.csv"))

  def test_left_pad(self):
    tokens, mask = prompts.left_pad([[5, 6], [7, 8, 9]], 4, pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 0, 5, 6], [0, 7, 8, 9]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1]])

  def test_pack_puts_the_common_prefix_first(self):
    head = list(range(100, 110))                      # 10 shared tokens
    rows = [head + [1, 2], head + [3], head + [4, 5, 6]]
    tokens, mask, shared = prompts.pack(rows, pad_id=0)
    self.assertEqual(shared, 10)
    self.assertEqual(tokens.shape, (3, 10 + prompts.bucket_length(3)))
    for t, m, r in zip(tokens, mask, rows):
      self.assertEqual(t[m].tolist(), r)               # each row is exactly its prompt
      self.assertTrue(m[:10].all())
    # A row that is only the prefix keeps its last token: the shared part is one shorter.
    tokens, mask, shared = prompts.pack([head, head + [7]], pad_id=0)
    self.assertEqual(shared, 9)
    self.assertEqual([t[m].tolist() for t, m in zip(tokens, mask)], [head, head + [7]])
    tokens, mask, shared = prompts.pack(rows, pad_id=0, limit=8)   # capped: the rest is left-padded
    self.assertEqual(shared, 8)
    self.assertEqual([t[m].tolist() for t, m in zip(tokens, mask)], rows)

  def test_pack_without_a_long_common_prefix_is_left_pad(self):
    rows = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 9]]
    tokens, mask, shared = prompts.pack(rows, pad_id=0)
    self.assertEqual(shared, 0)
    want = prompts.left_pad(rows, prompts.bucket_length(9), 0)
    np.testing.assert_array_equal(tokens, want[0])
    np.testing.assert_array_equal(mask, want[1])
    with self.assertRaisesRegex(ValueError, "at least one token"):
      prompts.pack([[1], []], pad_id=0)


if __name__ == "__main__":
  absltest.main()
