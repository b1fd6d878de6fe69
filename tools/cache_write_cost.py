"""What one tiny program costs to compile and store in a JAX persistent compilation cache that
already holds many entries: bounded (jax then rescans every entry under a lock on each write)
against unbounded, and a warm hit. Each iteration compiles two programs (a new shape's `ones` and
an add). The suite's choice in tests/conftest.py rests on this (BENCHMARKS.md).

  python tools/cache_write_cost.py CACHE_DIR_WITH_ENTRIES     # copies it; the original is untouched
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

_CHILD = """
import sys, time
import jax.numpy as jnp
n, offset = 60, int(sys.argv[1])
t = time.perf_counter()
for i in range(n):
  (jnp.ones((3, 1000 + offset + i)) + 1.0).block_until_ready()
print(f"{(time.perf_counter() - t) / n * 1000:.1f}")
"""


def _per_iteration_ms(cache: str | None, max_size: int, offset: int) -> str:
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", JAX_COMPILATION_CACHE_MAX_SIZE=str(max_size))
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
  else:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return subprocess.run([sys.executable, "-c", _CHILD, str(offset)], env=env, check=True,
                        capture_output=True, text=True).stdout.strip()


def main(source: str) -> None:
  cache = os.path.join(tempfile.mkdtemp(), "jax")
  shutil.copytree(source, cache)
  entries = 0
  for name in os.listdir(cache):   # a bounded cache keeps an access time beside each entry
    if name.endswith("-cache"):
      entries += 1
      atime = os.path.join(cache, name.removesuffix("-cache") + "-atime")
      if not os.path.exists(atime):
        with open(atime, "wb") as f:
          f.write(time.time_ns().to_bytes(8, "little"))
  print(f"{entries} entries; ms per iteration (two tiny programs):")
  print("  bounded (2 GiB), miss  ", _per_iteration_ms(cache, 2 << 30, 0))
  print("  unbounded, miss        ", _per_iteration_ms(cache, -1, 100))
  print("  bounded, hit           ", _per_iteration_ms(cache, 2 << 30, 0))
  print("  unbounded, hit         ", _per_iteration_ms(cache, -1, 100))
  print("  no cache               ", _per_iteration_ms(None, -1, 200))
  shutil.rmtree(os.path.dirname(cache))


if __name__ == "__main__":
  main(sys.argv[1])
