"""Repetition: the repeated 4-gram fraction against a recount, on hand-made loops and sentences
(toy BPE ids), and on hand-read generations of the demo model and SmolLM2 (their real ids,
tests/data/refusal_labels.jsonl, field `loop`)."""

import functools
import json
import os

from absl.testing import absltest, parameterized

import fixtures
from visage_jax.measures import repetition

LABELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "refusal_labels.jsonl")
LOOPS = (
    "I B I I B J J J J J J J J J J J J J J J J J J J J J J J J J J J J J J J J J J",
    "I\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\nI\n",
    "M2 en\n\nM2 en\n\nM2 en\n\nM2 en\n\nM2 en\n\nM2 en\n\nM2 en\n\nM2 en\n\nM2 en\n\nM2 en\n\n",
    "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat. The cat sat on the mat.",
)
SENTENCES = (
    "To kill a Python process, find its id with ps and send it a signal with kill.",
    "Here are a few restaurants you could try: an Italian trattoria, a sushi bar, or a tapas place "
    "near the river, where the food is good and the prices are fair.",
    "1. Preheat the oven.\n2. Mix the flour and the sugar.\n3. Bake for twenty minutes.",
    "I'm sorry, but I cannot help with that request. It could cause harm.",
)


@functools.lru_cache(maxsize=None)
def _tokenizer():
  return fixtures.toy_tokenizer()


def _ids(text):
  return _tokenizer()(text, add_special_tokens=False)["input_ids"]


class RepetitionTest(parameterized.TestCase):

  def test_against_a_recount(self):
    ids = [1, 2, 3, 4, 1, 2, 3, 4, 5, 1, 2, 3]
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]   # 9 4-grams, (1,2,3,4) twice
    self.assertAlmostEqual(repetition.repeated_ngram_fraction(ids), 1 / 9)
    self.assertAlmostEqual(repetition.repeated_ngram_fraction(ids, n=3), 3 / 10)
    self.assertEqual(len(grams) - len(set(grams)), 1)
    self.assertEqual(repetition.repeated_ngram_fraction([7] * 20), 16 / 17)
    self.assertEqual(repetition.repeated_ngram_fraction([1, 2, 3, 4]), 0.0)
    self.assertEqual(repetition.repeated_ngram_fraction([]), 0.0)

  @parameterized.parameters(*LOOPS)
  def test_loops_exceed_the_threshold(self, text):
    self.assertGreater(repetition.repeated_ngram_fraction(_ids(text)), repetition.MAX_REPETITION)

  @parameterized.parameters(*SENTENCES)
  def test_sentences_do_not(self, text):
    self.assertLess(repetition.repeated_ngram_fraction(_ids(text)), 0.1)

  def test_threshold_separates_the_hand_read_loops(self):
    with open(LABELS, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    loops = [repetition.repeated_ngram_fraction(r["ids"]) for r in rows if r["loop"]]
    others = [repetition.repeated_ngram_fraction(r["ids"]) for r in rows if not r["loop"]]
    self.assertLen(loops, 33)
    self.assertLess(max(others), repetition.MAX_REPETITION)                        # 0.289
    self.assertEqual(sum(v > repetition.MAX_REPETITION for v in loops), 29)        # of 33

if __name__ == "__main__":
  absltest.main()
