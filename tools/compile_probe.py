"""Where a test run spends XLA compile time: a pytest plugin that sums the backend-compile
seconds (a persistent-cache hit counts as its load) per test and per jitted function in each
pytest process, and writes them to $PROBE_OUT/compile_<worker>.json ({"test|jit(fn)": [s, n]}).
Processes the tests start are not seen: their cost shows as test duration.

  PYTHONPATH=tools PROBE_OUT=/tmp/probe PYTEST_ADDOPTS="-p compile_probe" make test
  python tools/compile_probe.py /tmp/probe      # totals by function and by test file
"""
import collections
import json
import os
import sys

_current = ["<collection>"]
_seconds: dict[str, float] = collections.defaultdict(float)
_count: collections.Counter = collections.Counter()


def _listen(event, duration, **kwargs):
  from jax._src import dispatch
  if event == dispatch.BACKEND_COMPILE_EVENT:
    key = f"{_current[0]}|{kwargs.get('fun_name')}"
    _seconds[key] += duration
    _count[key] += 1


def pytest_configure(config):
  import jax   # XLA_FLAGS are read when the backend starts, not at import: the suite's flags hold
  jax.monitoring.register_event_duration_secs_listener(_listen)


def pytest_runtest_setup(item):
  _current[0] = item.nodeid


def pytest_sessionfinish(session, exitstatus):
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  with open(os.path.join(os.environ["PROBE_OUT"], f"compile_{worker}.json"), "w") as f:
    json.dump({k: [_seconds[k], _count[k]] for k in _seconds}, f)


def _summary(folder: str, top: int = 25) -> None:
  by_fun, by_file = collections.defaultdict(lambda: [0.0, 0]), collections.defaultdict(float)
  for name in os.listdir(folder):
    with open(os.path.join(folder, name)) as f:
      for key, (seconds, n) in json.load(f).items():
        test, fun = key.rsplit("|", 1)
        by_fun[fun][0] += seconds
        by_fun[fun][1] += n
        by_file[test.split("::")[0]] += seconds
  print(f"{sum(s for s, _ in by_fun.values()):.0f} s in {sum(n for _, n in by_fun.values())} compiles")
  for fun, (seconds, n) in sorted(by_fun.items(), key=lambda kv: -kv[1][0])[:top]:
    print(f"  {fun:40s} {seconds:7.1f} s  {n:5d} x {seconds / n:.3f} s")
  for path, seconds in sorted(by_file.items(), key=lambda kv: -kv[1])[:top]:
    print(f"  {path:40s} {seconds:7.1f} s")


if __name__ == "__main__":
  _summary(sys.argv[1])
