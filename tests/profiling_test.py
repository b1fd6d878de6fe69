"""The profiling helpers BENCHMARKS.md uses: variants agree, per-op times come back."""

import os
import subprocess
import sys

import jax
import numpy as np
from absl.testing import absltest

import fixtures
from visage_jax import decode, model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import profiling  # noqa: E402  (tools/ is a folder of developer scripts, not a package)


def _python(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.join(ROOT, "tools")), timeout=120)


class ProfilingTest(absltest.TestCase):

  def test_variants_agree_and_ops_are_timed(self):
    cfg = model.ModelConfig.tiny()
    params = model.init(jax.random.key(0), cfg)
    tokens = fixtures.random_tokens(4, 8, cfg.vocab_size)
    mask = np.ones_like(tokens, bool)
    spec = decode.DecodeSpec(max_new_tokens=9, eos_ids=(-1,), pad_id=0, fixed_length=True)
    got = profiling.time_variants(params, cfg, tokens, mask, spec, [1, 4], rounds=1)
    self.assertEqual(sorted(got), [1, 4])
    for best, median, out in got.values():
      self.assertGreater(best, 0)
      self.assertGreaterEqual(best, median)
      self.assertEqual(out.shape, (4, 9))
    np.testing.assert_array_equal(got[1][2], got[4][2])
    fn = jax.jit(lambda p, t, m: decode.greedy_impl(p, t, m, None, None, None, cfg=cfg, spec=spec))
    rows = profiling.op_table(fn, (params, tokens, mask), steps=8)
    self.assertTrue(rows)
    self.assertTrue(all(ms >= 0 and per > 0 for ms, per, _ in rows))
    self.assertTrue(any("f32[4," in name for _, _, name in rows))  # shapes joined from the HLO

  def test_imports_next_to_cli_in_either_order(self):
    """Both define --model etc.; only cli.py may define them at import time."""
    for order in ("visage_jax.cli, profiling", "profiling, visage_jax.cli"):
      proc = _python("-c", f"import {order}")
      self.assertEqual(proc.returncode, 0, f"import {order}:\n{proc.stderr[-2000:]}")

  def test_script_help(self):
    proc = _python(os.path.join("tools", "profiling.py"), "--help")
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    for flag in ("--model", "--prompt_len", "--max_new_tokens", "--segments", "--rounds", "--trace"):
      self.assertIn(flag, proc.stdout)


if __name__ == "__main__":
  absltest.main()
