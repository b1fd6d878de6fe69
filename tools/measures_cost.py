"""What coherence and capability cost beside the keyword judge: the same landscape command run
keyword-only and with its measures, back to back on one machine, each in a fresh workdir.

  python tools/measures_cost.py                               # the demo, one round (~4 minutes on 2 cores)
  python tools/measures_cost.py --rounds=2 --keep=/tmp/cost   # alternate twice, keep the runs
  python tools/measures_cost.py --flag=--config.overrefusal.prompts_path=   # both runs without over-refusal

BENCHMARKS.md quotes it (issue 21: the demo with its measures at most 1.6x keyword-only). The
GGUF conversion cache is warmed first by a tiny run, so neither configuration pays the
conversion. Each round runs both commands in alternation (keyword-only first); the ratio is of
the commands' whole wall times (load, compile, decode, measures, files), per round and of the
medians.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

KEYWORD_ONLY = ("--config.coherence.enabled=False", "--config.capability.texts_path=")


def landscape(config: str, workdir: str, flags=()) -> tuple[float, dict]:
  """(wall seconds, landscape.json) of one `visage-jax landscape` command in a fresh process."""
  cmd = [sys.executable, "-m", "visage_jax.cli", "landscape", f"--config={config}", f"--workdir={workdir}",
         "--noprogress", *flags]
  t0 = time.perf_counter()
  done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wall = time.perf_counter() - t0
  if done.returncode:
    sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
  with open(os.path.join(workdir, "landscape.json")) as f:
    return wall, json.load(f)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/demo.py")
  ap.add_argument("--rounds", type=int, default=1)
  ap.add_argument("--keep", default="", help="write the runs here (default: a temporary folder, removed)")
  ap.add_argument("--flag", action="append", default=[], help="a config flag given to both runs (repeatable)")
  args = ap.parse_args()
  root = args.keep or tempfile.mkdtemp(prefix="measures_cost_")
  os.makedirs(root, exist_ok=True)
  landscape(f"{args.config}:tiny", os.path.join(root, "warm"))   # the GGUF conversion cache
  rows = []
  for k in range(args.rounds):
    keyword, _ = landscape(args.config, os.path.join(root, f"keyword_{k}"), (*args.flag, *KEYWORD_ONLY))
    full, result = landscape(args.config, os.path.join(root, f"measures_{k}"), args.flag)
    rows.append((keyword, full))
    print(f"round {k}: keyword-only {keyword:.1f} s, with coherence and capability {full:.1f} s "
          f"(decode_seconds {result.get('decode_seconds')}), ratio {full / keyword:.2f}", flush=True)
  keyword, full = (statistics.median(r[i] for r in rows) for i in (0, 1))
  print(json.dumps(dict(config=args.config, flags=args.flag, rounds=args.rounds, keyword_only_s=round(keyword, 1),
                        measures_s=round(full, 1), ratio=round(full / keyword, 3))))
  if not args.keep:
    shutil.rmtree(root)


if __name__ == "__main__":
  main()
