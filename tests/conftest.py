"""pytest runs the absltest cases; absl flags (test_tmpdir …) must count as parsed."""
import os
import shutil
import sys
import tempfile

from absl import flags

sys.path.insert(0, os.path.dirname(__file__))
import fixtures  # noqa: E402  (numpy only: jax is not imported yet)

flags.FLAGS.mark_as_parsed()
_CACHE = fixtures.TEST_CACHE
# absltest's temporary files (setUpClass models, create_tempdir) in a folder of this run alone, not the
# shared /tmp/absl_testing where two runs at once would overwrite each other's models.
_OWN_TMPDIR = "TEST_TMPDIR" not in os.environ
if _OWN_TMPDIR:
  os.environ["TEST_TMPDIR"] = tempfile.mkdtemp(prefix="visage_jax_tests_run_")
# Converted copies of the embedded GGUF (checkpoints.cached) go to a test cache, not the user's ~/.cache.
os.environ.setdefault("VISAGE_JAX_CACHE", os.path.join(_CACHE, "checkpoints"))
# One persistent JAX compilation cache for the suite and the processes it starts (CLI runs, the
# multi-process tests): each tiny program compiles once, not once per process. Read when jax is
# imported, so set before any test module imports it; a fresh machine starts it empty.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_CACHE, "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# Unbounded for jax: a bounded cache rescans every entry under a lock on each write (about 0.2 s
# per tiny program at 3,500 entries against 0.03 s unbounded, BENCHMARKS.md), which made an empty
# cache cost the suite 5 minutes. Unbounded, writes are not atomic: a process that reads an entry
# while another writes it gets jax's "Error reading persistent compilation cache entry" warning and
# compiles instead, which is the right result, so that warning is silenced (CLI tests read stderr).
# The size is bounded here instead, once per run (_JAX_CACHE_LIMIT).
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")
_CACHE_WARNING = "ignore:Error reading persistent compilation cache entry:UserWarning"
os.environ["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), _CACHE_WARNING) if w)
_JAX_CACHE_LIMIT = 2 << 30


def _bound_jax_cache(path: str, limit: int = _JAX_CACHE_LIMIT):
  """Empties the compilation cache when it outgrew `limit` (old code's programs pile up)."""
  try:
    size = sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
  except FileNotFoundError:
    return
  if size > limit:
    shutil.rmtree(path, ignore_errors=True)


def pytest_sessionstart(session):
  if not hasattr(session.config, "workerinput"):   # the controller, before any worker starts
    _bound_jax_cache(os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_sessionfinish(session, exitstatus):
  if _OWN_TMPDIR:
    shutil.rmtree(os.environ["TEST_TMPDIR"], ignore_errors=True)


# `make test-fast` (pytest -m "not slow"): the unit tests, for the inner loop. Slow are the tests
# that run whole landscapes, sweeps or fine-tunes, several processes, the CLI in a process, a wheel
# build or the real SmolLM2: a file, a class or a test, as pytest names them under tests/.
SLOW = (
    "basin_test.py::RefineRunTest", "bench_test.py::BenchSmokeTest::test_all_methods_report",
    "cli_test.py::GenerateTest", "cli_test.py::LandscapeCommandTest", "compare_test.py::CompareCommandTest",
    "distributed_test.py::TwoProcessTest", "distributed_test.py::TwoProcessJobsTest",
    "distributed_test.py::TwoProcessMemoryTest", "engine_test.py::FusedMatchesMaterializedTest",
    "errors_test.py", "findings_test.py", "finetune_test.py",
    "hub_test.py::ConcurrentResolveTest", "hub_test.py::CommandTest", "landscape_test.py",
    "llamaguard_test.py::GuardTest", "loader_test.py::ShardedCheckpointTest",
    "loader_test.py::GgufTest::test_gguf_is_converted_once_and_loads_the_same_bits_from_the_cache",
    "markdown_test.py::RealRunTest",
    "packaging_test.py", "profiling_test.py", "registry_test.py", "sharding_test.py::MultiDeviceTest",
    "smollm2_test.py", "sweep_test.py::SweepRunTest", "sweep_test.py::SweepCommandTest",
    "sweep_test.py::TwoProcessSweepTest", "vectors_test.py::ShardedDrawTest",
    "vectors_test.py::RandomDirectionTest::test_bfloat16_directions_are_the_float32_ones_cast",
)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: left out of `make test-fast` (tests/conftest.py SLOW)")


def pytest_collection_modifyitems(config, items):
  import pytest
  for item in items:
    name = item.nodeid.split("tests/", 1)[-1]
    if any(name == s or name.startswith(s + "::") for s in SLOW):
      item.add_marker(pytest.mark.slow)
