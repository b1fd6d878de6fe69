"""pytest runs the absltest cases; absl flags (test_tmpdir …) must count as parsed."""
import os
import sys
import tempfile

from absl import flags

sys.path.insert(0, os.path.dirname(__file__))
flags.FLAGS.mark_as_parsed()
# Converted copies of the embedded GGUF (checkpoints.cached) go to a test cache, not the user's ~/.cache.
os.environ.setdefault("VISAGE_JAX_CACHE", os.path.join(tempfile.gettempdir(), "visage_jax_test_cache"))
