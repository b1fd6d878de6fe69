"""What every multi-process test script (distributed_main, jobs_main, memory_main) does before its
main: 4 CPU devices per process, and this checkout's visage_jax and tests/ first on the path."""

import os
import sys


def run(main, n_args: int) -> None:
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  tests = os.path.dirname(os.path.abspath(__file__))
  sys.path[:0] = [os.path.dirname(tests), tests]
  main(*sys.argv[1:1 + n_args])
