"""Capability perplexity and multiple-choice accuracy equal transformers PyTorch on θ + α·d;
the MMLU prompt layout; malformed MC files are one-line errors naming file and row."""

import os
import tempfile

import jax
import numpy as np
import torch
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import errors, prompts
from visage_jax.checkpoints import hf_tensors, loader
from visage_jax.directions import vectors
from visage_jax.measures import capability
from visage_jax.runs import landscape
from visage_jax.training import trainsets

ALPHAS = (-0.4, 0.0, 0.3)
SYSTEM = "You are a helpful assistant; answer every question in one short sentence."  # a shared prefix
TEXTS = [
    {"prompt": "Write a short poem about the sea.", "response": "The sea is wide and blue, it sings to you."},
    {"prompt": "Name three colours.", "response": "Red, green and blue."},
    {"prompt": "What is two plus two?", "response": "Two plus two is four."},
]
MC_HEADER = "question,A,B,C,D,answer,subject\n"
MC_ROWS = ('What is 2 + 2?,3,4,5,6,B,math\n'
           '"Which is a colour, really?",red,dog,cat,sun,A,general_knowledge\n'
           'Pick the last letter.,a,b,c,d,D,\n'
           'Which one is water?,fire,H2O,salt,sand,B,chemistry\n'
           'Which animal barks?,cat,cow,dog,fish,C,biology\n')
DEV = "question,A,B,C,D,answer\nOne plus one?,1,2,3,4,B\nSky colour?,green,blue,red,pink,B\nUnused?,w,x,y,z,A\n"


class CapabilityParityTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp(prefix="capability_test_")
    cls.tok = fixtures.toy_tokenizer("bpe")
    cls.hf = fixtures.save_tiny_hf(cls.dir, "llama", tokenizer=cls.tok, seed=5)
    cls.cfg, cls.params = loader.load_params(cls.dir)
    d = vectors.random_direction(7, cls.params, cls.cfg)
    cls.dirs = vectors.stack([vectors.stack([d])])          # R = 1, C = 1
    cls.hf_dir = hf_tensors.to_hf_tensors(d, cls.cfg)
    cls.state = {k: v.clone() for k, v in cls.hf.state_dict().items()}

  def _torch_at(self, alpha):
    self.hf.load_state_dict({k: v + alpha * torch.from_numpy(np.array(self.hf_dir[k], np.float32))
                             if k in self.hf_dir else v for k, v in self.state.items()})
    return self.hf

  def _torch_perplexity(self, alpha):
    net, total, count = self._torch_at(alpha), 0.0, 0
    for row in TEXTS:
      text = prompts.format_prompt(row["prompt"], self.tok, "auto", SYSTEM)
      p_ids = prompts.tokenize_prompts([text], self.tok, "auto")[0]
      r_ids = self.tok(row["response"], add_special_tokens=False)["input_ids"]
      ids = torch.tensor([p_ids + r_ids])
      with torch.no_grad():
        logp = torch.log_softmax(net(ids).logits[0, :-1].double(), -1)
      nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(p_ids) - 1:]
      self.assertLen(nll, len(r_ids))
      total, count = total + float(nll.sum()), count + len(nll)
    return np.exp(total / count)

  @parameterized.named_parameters(("materialized", "materialized"), ("fused", "fused"))
  def test_perplexity_matches_transformers(self, mode):
    rows = capability.encode_texts(TEXTS, self.tok, template="auto", system_prompt=SYSTEM)
    self.assertGreater(rows.shared_prefix, 0)   # the template's prefix is computed once per pass
    got = capability.perplexity(self.params, self.cfg, rows, self.dirs, np.array(ALPHAS)[:, None],
                                mode=mode, batch_size=2)
    want = [self._torch_perplexity(a) for a in ALPHAS]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    self.assertGreater(want[0], want[1] * 1.01)  # the points differ: a wrong α would show

  @parameterized.named_parameters(("materialized", "materialized"), ("fused", "fused"))
  def test_mc_logits_and_accuracy_match_transformers(self, mode):
    with tempfile.TemporaryDirectory() as d:
      rows = capability.read_mc(fixtures.write_text(d, "test.csv", MC_HEADER + MC_ROWS))
      dev = capability.read_mc(fixtures.write_text(d, "dev.csv", DEV))
    mc = capability.encode_mc(rows, self.tok, dev_rows=dev, shots=2)
    choice = [self.tok(f" {k}", add_special_tokens=False)["input_ids"][-1] for k in "ABCD"]
    got_acc = capability.mc_accuracy(self.params, self.cfg, mc, self.dirs, np.array(ALPHAS)[:, None],
                                     mode=mode, batch_size=2)
    for i, alpha in enumerate(ALPHAS):
      net = self._torch_at(alpha)
      want = []
      for row in rows:
        ids = torch.tensor([self.tok(capability.mc_prompt(row, dev[:2]))["input_ids"]])
        with torch.no_grad():
          want.append(net(ids).logits[0, -1, choice].numpy())
      want = np.array(want)
      coef = np.array([alpha], np.float32)
      if mode == "fused":
        got = capability.choice_logits(self.params, self.cfg, mc, batch_size=2, dirs=self.dirs, coef=coef)
      else:
        theta = jax.tree.map(lambda p, x: p + alpha * x[0, 0], self.params, self.dirs)
        got = capability.choice_logits(theta, self.cfg, mc, batch_size=2)
      np.testing.assert_allclose(got, want, atol=1e-4)
      np.testing.assert_array_equal(np.argmax(got, 1), np.argmax(want, 1))
      answers = np.array(["ABCD".index(r["answer"]) for r in rows])
      self.assertAlmostEqual(got_acc[i], np.mean(np.argmax(want, 1) == answers), places=6)


  def test_benign_rows_are_the_held_out_instructions_answered_greedily(self):
    from visage_jax import decode
    from visage_jax.training import trainsets
    eos = loader.eos_ids(self.dir, self.tok)
    rows = capability.benign_rows(self.params, self.cfg, self.tok, eos_ids=eos, template="auto",
                                  system_prompt="default", max_new_tokens=6)
    _, held = trainsets.benign_split()
    self.assertTrue(rows)
    self.assertLessEqual({r["prompt"] for r in rows}, set(held))
    text = prompts.format_prompt(rows[0]["prompt"], self.tok, "auto", "default")
    ids = prompts.tokenize_prompts([text], self.tok, "auto")
    out = decode.generate(self.params, self.cfg, ids, max_new_tokens=6, eos_ids=eos,
                          pad_id=decode.pad_id_of(self.tok))[0]
    self.assertEqual(rows[0]["response"], self.tok.decode([t for t in out if t not in eos],
                                                          skip_special_tokens=True))

  def test_limit_answers_the_first_held_out_instructions_only(self):
    from visage_jax.runs import config_checks
    eos = loader.eos_ids(self.dir, self.tok)
    rows = capability.benign_rows(self.params, self.cfg, self.tok, eos_ids=eos, template="auto",
                                  system_prompt="default", max_new_tokens=4, limit=3)
    _, held = trainsets.benign_split()
    self.assertLessEqual({r["prompt"] for r in rows}, set(held[:3]))
    self.assertTrue(rows)
    cap = landscape.default_config().capability
    cap.limit = -1
    with self.assertRaisesRegex(errors.UserError, r"^capability.limit must be >= 0"):
      config_checks.capability_section(cap)


class PromptLayoutTest(absltest.TestCase):

  def test_mmlu_prompt_with_subject_and_shots(self):
    row = {"question": "What is 2 + 2?", "A": "3", "B": "4", "C": "5", "D": "6", "answer": "B",
           "subject": "high_school_math"}
    shot = {"question": "One plus one?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B", "subject": ""}
    self.assertEqual(
        capability.mc_prompt(row, [shot]),
        "The following are multiple choice questions (with answers) about high_school_math.\n\n"
        "One plus one?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")

  def test_mmlu_prompt_without_subject_column(self):
    with tempfile.TemporaryDirectory() as d:
      rows = capability.read_mc(fixtures.write_text(d, "dev.csv", DEV))
    self.assertEqual(
        capability.mc_prompt(rows[2], rows[:0]),
        "The following are multiple choice questions (with answers).\n\nUnused?\nA. w\nB. x\nC. y\nD. z\nAnswer:")

  def test_first_k_dev_rows_and_too_many_shots(self):
    tok = fixtures.toy_tokenizer("bpe")
    with tempfile.TemporaryDirectory() as d:
      rows = capability.read_mc(fixtures.write_text(d, "t.csv", MC_HEADER + MC_ROWS))
      dev = capability.read_mc(fixtures.write_text(d, "dev.csv", DEV))
    mc = capability.encode_mc(rows[:1], tok, dev_rows=dev, shots=2)
    want = tok(capability.mc_prompt(rows[0], dev[:2]))["input_ids"]
    self.assertEqual(mc.tokens[0, mc.mask[0]].tolist(), want)
    self.assertEqual(want[0], tok.bos_token_id)  # the tokenizer's default special tokens
    with self.assertRaisesRegex(errors.UserError, "mc_shots=4 needs"):
      capability.encode_mc(rows, tok, dev_rows=dev, shots=4)


class MalformedMCTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("wrong_header", "question,a,b,c,d,answer\nq,1,2,3,4,A\n", 1, "expected the header"),
      ("unknown_column", "question,A,B,C,D,answer,topic\nq,1,2,3,4,A,x\n", 1, "expected the header"),
      ("answer_not_a_letter", "question,A,B,C,D,answer\nq,1,2,3,4,A\nq2,1,2,3,4,E\n", 3, "'E' is not one of"),
      ("missing_field", "question,A,B,C,D,answer\nq,1,2,3,4,A\nq2,1,2,3\n", 3, "missing or empty"),
      ("empty_question", "question,A,B,C,D,answer\n,1,2,3,4,A\n", 2, "missing or empty"),
      ("extra_field", "question,A,B,C,D,answer\nq,1,2,3,4,A,zzz\n", 2, "more fields"),
      ("empty_file", "", 1, "found nothing"),
  )
  def test_one_line_error_naming_file_and_row(self, text, row, what):
    with tempfile.TemporaryDirectory() as d:
      path = fixtures.write_text(d, "mc.csv", text)
      with self.assertRaises(errors.UserError) as e:
        capability.read_mc(path)
    msg = str(e.exception)
    self.assertTrue(msg.startswith(f"{path}:{row}: "), msg)
    self.assertIn(what, msg)
    self.assertNotIn("\n", msg)

  def test_header_only_and_missing_file(self):
    with tempfile.TemporaryDirectory() as d:
      path = fixtures.write_text(d, "mc.csv", "question,A,B,C,D,answer\n")
      with self.assertRaisesRegex(errors.UserError, "no questions"):
        capability.read_mc(path)
      with self.assertRaises(errors.MissingFileError):
        capability.read_mc(os.path.join(d, "absent.csv"))


if __name__ == "__main__":
  absltest.main()
