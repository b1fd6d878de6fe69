"""Benchmark smoke test: every method runs on a tiny model and the report has its fields (no timings asserted)."""

import contextlib
import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from jax._src import compilation_cache

import fixtures
from visage_jax.runs import bench


@contextlib.contextmanager
def _compiling():
  """Without the suite's persistent compilation cache (tests/conftest.py): a program found there
  is loaded, not compiled, and reports no compile time."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()   # jax decides once per process whether to use it
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


class BenchSmokeTest(absltest.TestCase):

  def test_all_methods_report(self):
    d = self.create_tempdir().full_path
    model_dir = os.path.join(d, "model")
    fixtures.save_tiny_hf(model_dir, "llama", tokenizer=fixtures.toy_tokenizer("bpe", refusals=True),
                          boost_refusals=True, seed=5)
    c = bench.default_config()
    c.model.path = model_dir
    c.prompts.update(path=fixtures.advbench_path(), limit=3)
    c.landscape.update(steps=4, multiplier=1.0)
    c.decode.max_new_tokens = 5
    c.bench.reference_points = 2
    out = os.path.join(d, "bench.json")
    report = bench.run(c, out, log=lambda m: None)
    with open(out) as f:
      self.assertEqual(json.load(f), report)
    self.assertEqual(set(report["methods"]), set(bench.METHODS))
    self.assertEqual(report["work_generated_tokens"], 5 * 3 * 5)
    pub = report["methods"]["reference_published"]
    self.assertTrue(pub["extrapolated"])
    self.assertEqual(pub["measured_points"], [0, 4])
    for name in ("fused", "materialized", "continuous"):
      e = report["methods"][name]
      self.assertFalse(e["extrapolated"])
      for key in ("wall_seconds", "compile_seconds", "generated_tokens_per_second",
                  "speedup_vs_reference_published", "speedup_vs_reference_batched"):
        self.assertIn(key, e)
      # Same greedy tokens as transformers at the measured points (float32 on both sides).
      self.assertGreaterEqual(e["token_agreement_vs_reference_batched"], 0.99, name)
      self.assertIsInstance(e["rows_that_differ_vs_reference_batched"], list)
    self.assertFalse(report["methods"]["default_real"]["equal_work"])
    self.assertIn("| reference_published |", bench.table(report))

  def test_differences_name_point_prompt_and_position(self):
    ref = np.zeros((2, 3, 5), np.int32)
    toks = ref.copy()
    toks[1, 2, 3:] = 7
    got = bench._differences(toks, ref, [0, 4], np.linspace(-1, 1, 5))
    self.assertEqual(got, [dict(point=4, alpha=1.0, prompt=2, first_differing_token=3)])

  def test_compile_clock_counts_and_leaves_no_listener(self):
    mon = jax.monitoring
    with _compiling(), \
         mock.patch.object(mon, "register_event_duration_secs_listener",
                           wraps=mon.register_event_duration_secs_listener) as reg, \
         mock.patch.object(mon, "unregister_event_duration_listener",
                           wraps=mon.unregister_event_duration_listener) as unreg:
      for i in range(3):
        with bench._CompileClock() as clock:
          jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) * i)(jnp.ones(i + 1)))
        self.assertGreater(clock.seconds, 0)
    self.assertEqual(reg.call_count, 3)
    self.assertEqual(unreg.call_count, 3)  # every listener registered was removed again

  def test_random_model_cannot_score_text(self):
    c = bench.default_config()
    c.model.path = "random:tiny"
    with self.assertRaisesRegex(ValueError, "bench.methods: default_real scores text"):
      bench.run(c, "/tmp/never.json")

  def test_unknown_method(self):
    c = bench.default_config()
    c.bench.methods = ("fastest",)
    with self.assertRaisesRegex(ValueError, "bench.methods: 'fastest'"):
      bench.run(c, "/tmp/never.json")


if __name__ == "__main__":
  absltest.main()
