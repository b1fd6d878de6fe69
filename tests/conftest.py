"""pytest runs the absltest cases; absl flags (test_tmpdir …) must count as parsed."""
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(__file__))
flags.FLAGS.mark_as_parsed()
