"""Repetition of a generation's token ids: loops such as "I B I I B J J J J ..." that a perturbed
model falls into are fluent to the reference model (low nll_ref) yet say nothing, so coherence
needs a second test besides perplexity (issue #23).
"""

from typing import Sequence

NGRAM = 4
# Measured on 288 hand-read 48-token generations of the demo model and SmolLM2 as shipped
# (tests/data/refusal_labels.jsonl, field `loop`; tools/refusal_generations.py): the 255 that are
# not loops reach at most 0.289 (a thank-you note that says "I hope this message finds you well"
# twice), 29 of the 33 loops exceed 0.35 ("I B I I B J J J J" 0.667, "I\n\nI B\n\nYour\nYour\n\nM2M"
# 0.422, SmolLM2's own "The Witcher 3: The Witcher 3: ..." 0.844); the 4 below (0.24-0.33) loop
# over only the second half of their tokens. Between 0.289 and 0.35 nothing was seen; the margin
# is for longer generations than these 48 tokens, whose plain lists repeat more 4-grams.
MAX_REPETITION = 0.35


def repeated_ngram_fraction(ids: Sequence[int], n: int = NGRAM) -> float:
  """The fraction of the generation's n-grams that already occurred earlier in it, in [0, 1].

  n = 4 tokens: shorter n-grams recur in plain prose (", and the", "\\n\\n1."), longer ones miss
  loops whose period is short but irregular ("I B I I B J J J J"). Fewer than n + 1 tokens
  cannot repeat an n-gram: 0.
  """
  total = len(ids) - n + 1
  if total <= 1:
    return 0.0
  seen = set()
  repeats = 0
  for i in range(total):
    gram = tuple(ids[i:i + n])
    repeats += gram in seen
    seen.add(gram)
  return repeats / total
