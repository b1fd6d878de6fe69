"""How much the repetition gate moved a run's coherent ASR (issue #23): coherent jailbreaks and the
coherent VISAGE counted by nll_ref alone (before the gate) and by nll_ref and repetition (now),
from the run's own generations.jsonl; nothing is decoded.

  PYTHONPATH=. python tools/repetition_gate.py RUN [RUN ...]

A run written before repetition was measured has no `repetition` in its records: re-run it (it
resumes nothing then: run it in a fresh workdir) to have one.
"""
import sys

import numpy as np

from visage_jax import result
from visage_jax.analysis import visage
from visage_jax.measures import coherence


def gate_counts(path: str) -> dict:
  run = result.load_run(path)
  max_nll = float(run.setting("coherence.max_nll"))
  max_rep = float(run.setting("coherence.max_repetition"))
  n_dirs, n_points = np.shape(run.asr)[0], np.shape(run.asr)[-1]
  before = np.zeros((n_dirs, n_points))
  after = np.zeros((n_dirs, n_points))
  count = np.zeros((n_dirs, n_points))
  loops, missing = [], 0
  for g in run.generations():
    r, p = g["direction"], g["step"]
    if g.get("repetition") is None:
      missing += 1
    old = coherence.coherent_jailbreak(g, max_nll, float("inf"))
    new = coherence.coherent_jailbreak(g, max_nll, max_rep)
    before[r, p] += old
    after[r, p] += new
    count[r, p] += 1
    if old and not new:
      loops.append((g["coords"], round(g["repetition"], 2), g["generation"][:70]))
  before, after = 100 * before / count, 100 * after / count
  out = dict(path=path, generations=int(count.sum()), without_repetition=missing,
             coherent_before=int(round((before * count / 100).sum())),
             coherent_after=int(round((after * count / 100).sum())),
             max_point_change=float(np.abs(before - after).max()), loops=loops)
  if not run.two_d:
    out["visage_before"] = visage.visage_directions(before.tolist())["mean"]
    out["visage_after"] = visage.visage_directions(after.tolist())["mean"]
  return out


def main(paths: list[str]) -> None:
  for path in paths:
    g = gate_counts(path)
    vis = (f"; coherent VISAGE {g['visage_before']:.2f} -> {g['visage_after']:.2f}" if "visage_before" in g else "")
    print(f"{path}: {g['generations']} generations ({g['without_repetition']} without repetition); coherent "
          f"jailbreaks {g['coherent_before']} -> {g['coherent_after']}; largest change at a point "
          f"{g['max_point_change']:.2f} points{vis}")
    for coords, rep, text in g["loops"][:3]:
      print(f"    no longer coherent at {coords} (repetition {rep}): {text!r}")


if __name__ == "__main__":
  main(sys.argv[1:])
