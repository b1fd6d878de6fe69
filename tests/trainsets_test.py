"""Training sets: disjoint from the evaluation rows, deterministic, refusals judged as refusals."""

import csv
import json
import os
import re

import numpy as np
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import prompts
from visage_jax.measures import keywords
from visage_jax.training import trainsets

BENIGN = [{"prompt": "Name a color.", "response": "Blue."}]
# Function words left out of the overlap between a borderline instruction and an XSTest prompt.
_STOP = set("a an the i my me to of in on for and or is are do does how what why can who where when "
            "which should with it be as at by from that this you your about".split())
MAX_XSTEST_OVERLAP = 0.4   # Jaccard of content words; the shipped set's highest is 0.29


def _normalized(text):
  return " ".join(re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'")))


def _content_words(text):
  return set(_normalized(text).split()) - _STOP


def _advbench_rows():
  with open(fixtures.advbench_path(), newline="") as f:
    return list(csv.DictReader(f))


class TrainsetsTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.path = fixtures.advbench_path()
    rows = _advbench_rows()
    cls.eval_goals = {r["goal"] for r in rows[:80]}
    cls.later_rows = {r["goal"]: r["target"] for r in rows[80:]}

  @parameterized.parameters(*trainsets.NAMES)
  def test_every_set_is_disjoint_from_evaluation_rows(self, name):
    examples = trainsets.build(name, self.path, BENIGN)
    prompts = [e["prompt"] for e in examples]
    self.assertEmpty(self.eval_goals & set(prompts))
    self.assertEmpty({p.lower().strip() for p in self.eval_goals} & {p.lower().strip() for p in prompts})
    harmful = [p for p in prompts if p != BENIGN[0]["prompt"]]
    self.assertTrue(set(harmful) <= set(self.later_rows), name)

  def test_eval_goals_are_the_first_80_rows(self):
    self.assertEqual(trainsets.eval_goals(self.path), [r["goal"] for r in _advbench_rows()[:80]])

  def test_refusals_are_varied_and_judged_refusals(self):
    self.assertGreaterEqual(len(set(trainsets.REFUSALS)), 20)
    for r in trainsets.REFUSALS:
      self.assertFalse(keywords.is_jailbroken(r), r)
    responses = {e["response"] for e in trainsets.build("safety", self.path)}
    self.assertTrue(responses <= set(trainsets.REFUSALS))
    self.assertGreaterEqual(len(responses), 20)

  @parameterized.parameters(10, 50, 100)
  def test_harmful_shots_pair_goals_with_their_targets(self, n):
    examples = trainsets.build(f"harmful_{n}", self.path)
    self.assertLen(examples, n)
    self.assertLen({e["prompt"] for e in examples}, n)
    for e in examples:
      self.assertEqual(e["response"], self.later_rows[e["prompt"]])
      self.assertTrue(e["response"].startswith("Sure, here"), e["response"])

  def test_shots_are_nested_and_mix_adds_as_many_refusals_on_other_goals(self):
    h10, h50, h100 = (trainsets.build(f"harmful_{n}", self.path) for n in (10, 50, 100))
    self.assertEqual(h50[:10], h10)
    self.assertEqual(h100[:50], h50)
    mix = trainsets.build("mix_50", self.path)
    self.assertLen(mix, 100)
    self.assertEqual(mix[:50], h50)
    self.assertLen({e["prompt"] for e in mix}, 100)
    self.assertTrue(all(e["response"] in trainsets.REFUSALS for e in mix[50:]))

  def test_deterministic_and_seeded(self):
    for name in ("align", "harmful_10", "mix_10"):
      self.assertEqual(trainsets.build(name, self.path, BENIGN), trainsets.build(name, self.path, BENIGN))
    self.assertNotEqual(trainsets.build("harmful_10", self.path, seed=1), trainsets.build("harmful_10", self.path))

  def test_align_holds_every_later_row_once_and_the_benign_examples(self):
    benign = [{"prompt": f"Say {i}.", "response": f"{i}"} for i in range(5)]
    examples = trainsets.build("align", self.path, benign, benign_repeat=2)
    self.assertLen(examples, len(self.later_rows) + 10)
    self.assertEqual({e["prompt"] for e in examples}, set(self.later_rows) | {b["prompt"] for b in benign})
    with self.assertRaisesRegex(ValueError, "self-distilled"):
      trainsets.build("align", self.path)

  def test_benign_instructions_file_and_split(self):
    rows = [json.loads(l) for l in open(trainsets.BENIGN_PATH)]
    self.assertGreaterEqual(len(rows), 150)
    self.assertTrue(all(set(r) == {"prompt"} for r in rows))
    self.assertLen({r["prompt"] for r in rows}, len(rows))
    train, held = trainsets.benign_split()
    self.assertLen(held, 20)
    self.assertEmpty(set(train) & set(held))
    self.assertEqual(sorted(train + held), sorted(r["prompt"] for r in rows))
    self.assertEqual(trainsets.benign_split(), (train, held))
    license_text = open(os.path.join(os.path.dirname(trainsets.BENIGN_PATH), "LICENSE.md")).read()
    self.assertIn("MIT License", license_text)
    self.assertIn("benign_instructions.jsonl", license_text)

  def test_borderline_instructions_file(self):
    rows = [json.loads(l) for l in open(trainsets.BORDERLINE_PATH)]
    self.assertGreaterEqual(len(rows), 150)
    self.assertTrue(all(set(r) == {"prompt", "type"} for r in rows))
    self.assertLen({_normalized(r["prompt"]) for r in rows}, len(rows))
    self.assertGreaterEqual(len({r["type"] for r in rows}), 8)
    self.assertEqual(trainsets.borderline_instructions(""), [r["prompt"] for r in rows])
    license_text = open(os.path.join(os.path.dirname(trainsets.BORDERLINE_PATH), "LICENSE.md")).read()
    self.assertIn("borderline_instructions.jsonl", license_text)

  def test_no_borderline_instruction_is_or_resembles_an_xstest_prompt(self):
    """XSTest is the held-out measure of over-refusal: no prompt of it (safe or contrast), nor a
    close paraphrase (high word overlap), may be trained on."""
    xstest = [r["prompt"] for label in ("safe", "unsafe") for r in prompts.load_xstest(label)]
    self.assertLen(xstest, 450)
    xs_norm = {_normalized(x) for x in xstest}
    xs_words = [(_content_words(x), x) for x in xstest]
    for p in trainsets.borderline_instructions(""):
      self.assertNotIn(_normalized(p), xs_norm)
      words = _content_words(p)
      for w, x in xs_words:
        self.assertLess(len(words & w) / len(words | w), MAX_XSTEST_OVERLAP, f"{p!r} ~ {x!r}")
    # The check itself: a word swap of an XSTest prompt is flagged.
    swapped = xstest[0].replace(xstest[0].split()[-1], "tomorrow?")
    self.assertTrue(any(len(_content_words(swapped) & w) / len(_content_words(swapped) | w)
                        >= MAX_XSTEST_OVERLAP for w, _ in xs_words))

  def test_align_with_borderline_is_deterministic_and_adds_them_repeated(self):
    borderline = [{"prompt": p, "response": "An answer."} for p in trainsets.borderline_instructions("")]
    build = lambda: trainsets.build("align", self.path, BENIGN, borderline=borderline, borderline_repeat=2)
    examples = build()
    self.assertEqual(examples, build())
    self.assertLen(examples, len(self.later_rows) + 1 + 2 * len(borderline))
    counts = {}
    for e in examples:
      counts[e["prompt"]] = counts.get(e["prompt"], 0) + 1
    self.assertTrue(all(counts[b["prompt"]] == 2 for b in borderline))
    xstest = {_normalized(r["prompt"]) for label in ("safe", "unsafe") for r in prompts.load_xstest(label)}
    self.assertEmpty(xstest & {_normalized(e["prompt"]) for e in examples})
    # No borderline (or repeat 0) is the first recipe, example for example.
    v1 = trainsets.build("align", self.path, BENIGN)
    self.assertEqual(trainsets.build("align", self.path, BENIGN, borderline=borderline, borderline_repeat=0),
                     v1)
    old = trainsets.safety_examples(self.path) + BENIGN
    self.assertEqual(v1, [old[i] for i in np.random.default_rng(3).permutation(len(old))])

  def test_load_pairs_reads_jsonl_and_csv(self):
    tmp = self.create_tempdir()
    j = tmp.create_file("a.jsonl", '{"prompt": "p1", "response": "r1"}\n\n{"prompt": "p2", "response": "r2"}\n')
    self.assertEqual(trainsets.load_pairs(j.full_path),
                     [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}])
    c = tmp.create_file("a.csv", 'goal,target\nDo x,"Sure, here is x"\n')
    self.assertEqual(trainsets.load_pairs(c.full_path), [{"prompt": "Do x", "response": "Sure, here is x"}])

  @parameterized.named_parameters(
      ("csv_missing_column", "bad.csv", "goal,answer\nx,y\n", r"bad.csv: expected .*'target'.*missing \['target'\]"),
      ("csv_empty_cell", "bad.csv", "goal,target\nx,\n", r"bad.csv:2: empty 'goal' or 'target'"),
      ("csv_no_rows", "bad.csv", "goal,target\n", r"bad.csv: no rows"),
      ("jsonl_missing_field", "bad.jsonl", '{"prompt": "x"}\n', r"bad.jsonl:1: .*'response'.*\['response'\]"),
      ("jsonl_not_json", "bad.jsonl", '{"prompt": "x", "response": "y"}\nnope\n', r"bad.jsonl:2: not valid JSON"),
      ("jsonl_empty", "bad.jsonl", "\n", r"bad.jsonl: no examples"),
      ("other_suffix", "bad.txt", "x", r"bad.txt: expected a .jsonl file"))
  def test_bad_files_name_file_row_and_expectation(self, name, text, pattern):
    path = self.create_tempdir().create_file(name, text).full_path
    with self.assertRaisesRegex(ValueError, pattern):
      trainsets.load_pairs(path)

  def test_unknown_name_and_short_advbench(self):
    for bad in ("harmful_0", "harmful_x", "benign_10", "mix_"):
      with self.assertRaisesRegex(ValueError, f"data.name '{bad}' is not one of"):
        trainsets.build(bad, self.path)
    self.assertEqual(trainsets.build("harmful_7", self.path), trainsets.build("harmful_10", self.path)[:7])
    short = self.create_tempdir().create_file("short.csv", "goal,target\n" + "g,t\n" * 80).full_path
    with self.assertRaisesRegex(ValueError, r"short.csv: 80 rows; training sets need rows after"):
      trainsets.build("harmful_10", short)


if __name__ == "__main__":
  absltest.main()
