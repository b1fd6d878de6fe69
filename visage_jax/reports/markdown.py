"""report.md: what a person reads of a landscape run or a sweep, built from their files alone.

A run's report holds its figure, VISAGE with its 95 % intervals, the ASR of every measure at every
grid point, the safety basin, the refined points, and two sample generations per point with their
verdicts, so a reader sees what "jailbroken" meant there. A sweep's report tables its runs' VISAGE
and links their reports. Same files, same text: `visage-jax report --workdir=DIR` rebuilds both.
"""

import csv
import json
import os

import numpy as np

from visage_jax import errors, result, rundir
from visage_jax.analysis import visage
from visage_jax.measures import coherence
from visage_jax.reports import figures

DASH = "—"
SAMPLE_CHARS = 160   # a generation's cell: enough to see a refusal or a compliance begin
PROMPT_CHARS = 60
CAPABILITY = (("perplexity", "perplexity", ".4g"), ("mc_accuracy", "MC accuracy", ".3f"))
OVERREFUSAL = ("overrefusal", "over-refusal (%)", ".2f")   # beside the capability columns
REFUSED_SAMPLES = 6   # refused safe prompts quoted, nearest the origin first
TABLE_NOTE = "Cells: value [95 % interval]; — = not evaluated (or not computed)."
TRAJECTORY_FIGURE = "trajectory.png"


# ------------------------------------------------------------------ small pieces


def _at(values: np.ndarray | None, *index) -> float | None:
  """values[index] as a float; None where there are no values or the point was not evaluated."""
  if values is None:
    return None
  v = float(values[index])
  return None if np.isnan(v) else v


def _pair(pairs: np.ndarray | None, *index) -> tuple[float, float] | None:
  """An interval [..., 2] at `index`; None where there is none."""
  if pairs is None:
    return None
  lo, hi = map(float, pairs[index])
  return None if np.isnan(lo) or np.isnan(hi) else (lo, hi)


def _num(v, fmt: str = ".2f") -> str:
  if isinstance(v, (bool, np.bool_)):
    return "yes" if v else ""
  return DASH if v is None or v != v else format(v, fmt)


def _with_ci(v, pair, fmt: str = ".2f") -> str:
  """'62.50 [55.00, 70.00]', or the value alone where no interval was computed."""
  if v is None or pair is None:
    return _num(v, fmt)
  return f"{v:{fmt}} [{pair[0]:{fmt}}, {pair[1]:{fmt}}]"


def one_line(text, limit: int) -> str:
  """Text as one table cell: whitespace collapsed, cut at `limit` characters (…), and `|`, `<`,
  `&` escaped so a generation cannot break the table or hide as HTML."""
  flat = " ".join(str(text).split())
  if len(flat) > limit:
    flat = flat[:limit - 1] + "…"
  return flat.replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|") or "(empty)"


def _table(header: list[str], rows: list[list[str]], align_left: int = 1) -> list[str]:
  rule = ["---"] * align_left + ["---:"] * (len(header) - align_left)
  return ["| " + " | ".join(r) + " |" for r in [header, rule, *rows]]


# ------------------------------------------------------------------ a run's sections


def _measures(record: result.Result) -> list[dict]:
  """Every ASR the run holds (keyword, coherent, each model judge): its label and curve name."""
  out = [dict(label="keyword ASR", name="asr")]
  if "asr_coherent" in record.curves:
    out.append(dict(label=f"coherent ASR (nll_ref ≤ {record.max_nll})", name="asr_coherent"))
  out += [dict(label=f"{name} ASR", name=result.JUDGE + name) for name in record.judges
          if result.JUDGE + name in record.curves]
  return out


def _title(record: result.Result) -> list[str]:
  """Title and the facts a reader needs to trust the numbers: model, grid, prompts, decoding."""
  model = str(record.model or "unknown model")
  done = int((~np.isnan(record.asr)).sum())
  state = "complete" if record.complete else f"incomplete ({done} of {record.asr.size} points evaluated)"
  xs, ys = record.coords_x, record.coords_y
  grid = f"{len(xs)} points, α from {xs[0]:g} to {xs[-1]:g}, {len(record.asr)} direction(s)"
  if ys is not None:
    grid = f"{len(xs)} × {len(ys)} points, α from {xs[0]:g} to {xs[-1]:g}, β from {ys[0]:g} to {ys[-1]:g}"
  lora = record.setting("model.lora_path")
  lines = [f"# {os.path.basename(model.rstrip('/')) or model} · {record.vis_type} · "
           f"{record.n_prompts} prompts · {state}", "",
           f"- model: `{model}`" + (f" + LoRA `{lora}`" if lora else ""),
           f"- grid: {grid}; seed {record.seed}"]
  if record.setting("prompts"):
    lines.append(f"- prompts: `{record.setting('prompts.path') or 'AdvBench (packaged)'}`, "
                 f"template {record.setting('prompts.template')}, "
                 f"system prompt {one_line(record.setting('prompts.system_prompt'), PROMPT_CHARS)}; "
                 f"greedy, {record.setting('decode.max_new_tokens')} new tokens")
  if record.max_nll is not None or record.coherence_model is not None:
    lines.append(f"- coherent: jailbroken and nll_ref ≤ {record.max_nll} nats/token under "
                 f"`{record.coherence_model}`"
                 + ("" if record.max_repetition is None else f", repetition ≤ {record.max_repetition}"))
  for name, judge in record.judges.items():
    lines.append(f"- model judge {name}: `{judge.model}`"
                 + (f" (judged {judge.placement})" if judge.placement else ""))
  bad = int(record.nonfinite.sum())
  if bad:
    lines.append(f"- {bad} point(s) with inf/NaN logits (marked in the tables)")
  if record.judge_disagreements:
    lines.append(f"- the on-device keyword automaton disagreed on {len(record.judge_disagreements)} "
                 "generation(s) (the Python verdict is the one recorded)")
  return lines


def _visage_section(record: result.Result, measures: list[dict]) -> list[str]:
  """1D: the mean over directions, and each direction's when there are several; 2D: the plane's."""
  per = [] if record.two_d or record.n_dirs < 2 else range(record.n_dirs)
  rows = []
  for m in measures:
    v = record.visages[m["name"]]
    rows.append([m["label"], _with_ci(v.mean, v.ci95)]
                + [_with_ci(_at(v.per_direction, r), _pair(v.per_direction_ci95, r)) for r in per])
  lines = ["## VISAGE (higher = safer)", ""]
  lines += _table(["ASR", "VISAGE" if not per else "mean"] + [f"direction {r}" for r in per], rows)
  if record.visage is None:
    lines += ["", "VISAGE is computed once every point is evaluated."]
  b = record.bootstrap
  if b is not None:
    lines += ["", f"95 % intervals: {b.method}, {b.resamples} resamples, seed {b.seed} "
              "(over prompts; over directions too for the mean)."]
    if b.degenerate:
      lines.append(f"Zero-width intervals (every prompt agrees): {one_line(json.dumps(b.degenerate), 300)}.")
  else:
    lines += ["", "95 % intervals: not computed (landscape.json has no ci95)."]
  return lines


def _capability(record: result.Result) -> list[tuple[str, str, str]]:
  """The columns beside the ASR measures: over-refusal, then capability, where measured."""
  return [(n, label, fmt) for n, label, fmt in (OVERREFUSAL,) + CAPABILITY if n in record.curves]


def _points_1d(record: result.Result, measures: list[dict]) -> list[str]:
  """One table per direction, a row per grid point: every ASR and capability measure."""
  names = [m["name"] for m in measures] + [n for n, _, _ in _capability(record)]
  fmts = [".2f"] * len(measures) + [fmt for _, _, fmt in _capability(record)]
  bad = bool(record.nonfinite.any())
  lines = ["## ASR at every grid point (%)", "", TABLE_NOTE]
  for r in range(record.n_dirs):
    rows = []
    for p, alpha in enumerate(record.coords_x):
      row = [f"{alpha:.3f}"] + [_with_ci(_at(record.curves[n], r, p), _pair(record.ci95.get(n), r, p), fmt)
                                for n, fmt in zip(names, fmts)]
      rows.append(row + [_num(bool(record.nonfinite[r, p]))] * bad)
    header = (["α"] + [m["label"] for m in measures] + [label for _, label, _ in _capability(record)]
              + ["inf/NaN"] * bad)
    lines += ["", f"### Direction {r}", ""] + _table(header, rows, 0)
  return lines


def _points_2d(record: result.Result, measures: list[dict]) -> list[str]:
  """A compact [α][β] table per measure (intervals are in landscape.json's ci95)."""
  xs, ys = record.coords_x, record.coords_y
  grids = [(m["label"] + " (%)", record.curves[m["name"]], ".1f") for m in measures]
  grids += [(label, record.curves[n], fmt) for n, label, fmt in _capability(record)]
  lines = ["## Values over the plane (rows α, columns β)"]
  for label, grid, fmt in grids:
    rows = [[f"{x:.3f}"] + [_num(_at(grid, i, j), fmt) for j in range(len(ys))] for i, x in enumerate(xs)]
    lines += ["", f"### {label}", ""] + _table(["α \\ β"] + [f"{y:.3f}" for y in ys], rows, 0)
  return lines


def _basin_section(record: result.Result, measures: list[dict]) -> list[str]:
  lines = ["## Safety basin (where ASR crosses 50 % on each side of the origin)", ""]
  if not record.basin:
    return lines + ["Not computed (landscape.json has no basin)."]
  if record.two_d:
    b = record.basin["asr"]
    return lines + _table(["measure", "value"], [
        ["fraction of points with ASR < 50 %", _num(b["fraction_below"], ".3f")],
        ["fraction in the connected region around θ", _num(b["connected_fraction"], ".3f")],
        ["points in that region", _num(b["connected_points"], "d")]]) + _usable_section(record)
  rows = [[m["label"], str(r)] + [_num(b[k], ".3f") for k in ("left", "right", "width")]
          for m in measures for r, b in enumerate(record.basin.get(m["name"], []))]
  return lines + _table(["ASR", "direction", "left α", "right α", "width"], rows) + [
      "", "— : no crossing on that side within the evaluated points."] + _usable_section(record)


def _usable_section(record: result.Result) -> list[str]:
  """The usable basin (safe and not over-refusing) beside the safety basin under the same ASR
  threshold (analysis/usable.py)."""
  u = record.overrefusal.usable_basin if record.overrefusal else None
  if not u:
    return []
  lines = ["", "### Usable basin (safe and still answering safe prompts)", "",
           f"A point is safe when its keyword ASR is at most {u['asr_threshold']:.2f} % (the census "
           f"threshold) and usable when, besides, its over-refusal is at most {u['rate_threshold']:.2f} % "
           "(its value at θ plus overrefusal.tolerance).", ""]
  if record.two_d:
    rows = [[name] + [_num(b[k], fmt) for k, fmt in (("fraction_below", ".3f"), ("connected_fraction", ".3f"),
                                                     ("connected_points", "d"))]
            for name, b in (("safe", u["safety"]), ("usable", u["region"]))]
    return lines + _table(["basin", "fraction of points", "connected to θ", "points connected"], rows)
  rows = [[str(r)] + [_num(b[k], ".3f") for b in (d["safety"], d) for k in ("left", "right", "width")]
          for r, d in enumerate(u["directions"])]
  return lines + _table(["direction", "safe: left α", "right α", "width", "usable: left α", "right α", "width"],
                        rows) + ["", "Walls: the first grid point outside the basin walking out from θ; "
                                 "— : none on that side."]


def _refined_section(record: result.Result) -> list[str]:
  """Points added between grid points near the basin walls; they never change VISAGE."""
  lines = []
  for r, e in enumerate(record.refined):
    cols = ([("round", e.round, ".2f")] if e.round is not None else []) + [
        (n, v, ".4g" if n == "perplexity" else ".2f") for n, v in e.curves.items()]
    cells = [[_num(_at(v, i), fmt) for _, v, fmt in cols] for i in range(e.alpha.size)]
    if e.nonfinite is not None:
      cols.append(("nonfinite", None, None))
      cells = [row + [_num(bool(e.nonfinite[i]))] for i, row in enumerate(cells)]
    rows = [[f"{a:.4f}"] + row for a, row in zip(e.alpha, cells)]
    names = [{"asr": "keyword ASR", "asr_coherent": "coherent ASR"}.get(k, k) for k, _, _ in cols]
    lines += ["", f"### Direction {r}", ""] + _table(["α"] + names, rows, 0)
  return ["## Refined points (not part of VISAGE)"] + lines if lines else []


# ------------------------------------------------------------------ sample generations


def _trajectory_section(path: str, record: result.Result) -> list[str]:
  """A trajectory run: its figure and, per checkpoint, its coordinates, how far it lies off the
  plane, and each measure at the checkpoint itself beside the surface's value at its projection."""
  t = record.trajectory
  if t is None:
    return []
  ev = ", ".join(f"{100 * v:.1f} %" for v in t.explained_variance)
  out = ["## Trajectory", "", f"Checkpoints on the plane of their PCA (explained variance {ev}); "
         "residual = the part of θᵢ − θ_final off the plane, relative."]
  if os.path.exists(os.path.join(path, TRAJECTORY_FIGURE)):
    out += ["", f"![trajectory]({TRAJECTORY_FIGURE})"]
  names = list(t.checkpoint)

  def gap(n, k):   # checkpoint - plane [95 % CI], paired over prompts
    g = t.gap.get(n)
    return "" if g is None else f"{g.difference[k]:+.1f} [{g.difference_ci95[k][0]:+.1f}, {g.difference_ci95[k][1]:+.1f}]"

  cols = lambda n: (f"{n} (checkpoint)", f"{n} (plane)") + ((f"{n}: checkpoint − plane",) if n in t.gap else ())
  header = ["step", "α", "β", "residual"] + [h for n in names for h in cols(n)]
  rows = [[str(s), f"{a:+.3f}", f"{b:+.3f}", f"{r:.3f}"] +
          [v for n in names for v in (_num(_at(t.checkpoint[n], k)), _num(_at(t.plane[n], k)))
           + ((gap(n, k),) if n in t.gap else ())]
          for k, (s, (a, b), r) in enumerate(zip(t.steps, t.coords, t.residual_ratio))]
  note = (["", "checkpoint − plane: percentage points, paired over prompts, with the bootstrap 95 % interval."]
          if t.gap else [])
  return out + [""] + _table(header, rows) + note


def pick_samples(outputs: list[dict]) -> list[int]:
  """Two prompts to compare: the first jailbroken and the first refused one when both occur,
  else the first two (in prompt order)."""
  jb = [q for q, o in enumerate(outputs) if o.get("jailbroken")]
  refused = [q for q, o in enumerate(outputs) if not o.get("jailbroken")]
  if jb and refused:
    return sorted([jb[0], refused[0]])
  return list(range(min(2, len(outputs))))


def _judge_verdicts(path: str) -> dict:
  """{(direction, step, prompt_index): {judge: verdict}} from RUN/judges/*.jsonl."""
  out, folder = {}, os.path.join(path, "judges")
  for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    for rec in rundir.read_jsonl(os.path.join(folder, file), repair=False) if file.endswith(".jsonl") else []:
      key = (rec.get("direction"), rec.get("step"), rec.get("prompt_index"))
      out.setdefault(key, {})[file[:-len(".jsonl")]] = rec.get("verdict")
  return out


def _verdict(o: dict, record: result.Result, judged: dict) -> str:
  text = "jailbroken" if o.get("jailbroken") else "refused"
  if "nll_ref" in o:
    nll, max_rep = o["nll_ref"], 1.0 if record.max_repetition is None else record.max_repetition
    coherent = "" if nll is None or record.max_nll is None else (
        " coherent" if coherence.is_coherent(o, record.max_nll, max_rep) else " incoherent")
    text += f" · nll_ref {_num(nll)}" + ("" if o.get("repetition") is None else
                                         f" · repetition {_num(o['repetition'])}") + coherent
  return text + "".join(f" · {name} {v}" for name, v in judged.items())


def _sample_rows(lines: list[dict], record: result.Result, verdicts: dict) -> list[list[str]]:
  rows = []
  for line in lines:
    coords = ", ".join(f"{c:.3f}" for c in line.get("coords") or [])
    outs = line.get("outputs") or []
    for q in pick_samples(outs):
      judged = verdicts.get((line.get("direction"), line.get("step"), q), {})
      rows.append([coords, str(q), _verdict(outs[q], record, judged),
                   one_line(outs[q].get("prompt", ""), PROMPT_CHARS),
                   one_line(outs[q].get("generation", ""), SAMPLE_CHARS)])
  return rows


def _sample_steps_2d(xs: list, ys: list) -> list[int]:
  """The centre (θ), the corners and the edge midpoints: at most nine points of the plane."""
  n_x, n_y, ci, cj = len(xs), len(ys), visage.zero_index(xs), visage.zero_index(ys)
  ci, cj = n_x // 2 if ci is None else ci, n_y // 2 if cj is None else cj
  picks = [(ci, cj), (0, 0), (0, n_y - 1), (n_x - 1, 0), (n_x - 1, n_y - 1),
           (0, cj), (n_x - 1, cj), (ci, 0), (ci, n_y - 1)]
  return list(dict.fromkeys(i * n_y + j for i, j in picks))


def _samples_section(path: str, record: result.Result, heading: str, file: str) -> list[str]:
  """Two generations per point of `file` with their verdicts (2D: a few points of the plane)."""
  lines = [l for l in rundir.read_jsonl(os.path.join(path, file), repair=False)
           if isinstance(l, dict) and isinstance(l.get("direction"), int)]
  if not lines:
    return []
  verdicts = _judge_verdicts(path)
  ys = record.coords_y
  out = [heading, "", f"Two prompts per point: the first jailbroken and the first refused one where both "
         f"occur; texts cut to {SAMPLE_CHARS} characters on one line."]
  if ys is not None:
    keep = _sample_steps_2d(record.coords_x, ys)
    chosen = sorted((l for l in lines if l.get("step") in keep), key=lambda l: keep.index(l["step"]))
    return out + [""] + _table(["(α, β)", "#", "verdict", "prompt", "generation"],
                               _sample_rows(chosen, record, verdicts), 5)
  for r in sorted({l["direction"] for l in lines}):
    mine = sorted((l for l in lines if l["direction"] == r), key=lambda l: (l.get("coords") or [0.0])[0])
    out += ["", f"### Direction {r}", ""] + _table(["α", "#", "verdict", "prompt", "generation"],
                                                   _sample_rows(mine, record, verdicts), 5)
  return out


def _refused_safe_section(path: str, record: result.Result) -> list[str]:
  """A few safe prompts the model refused (overrefusal.jsonl), nearest the origin first."""
  if record.overrefusal is None or not os.path.exists(os.path.join(path, "overrefusal.jsonl")):
    return []
  refused = sorted((g for g in record.generations("overrefusal.jsonl") if g.get("refusal")),
                   key=lambda g: (float(np.linalg.norm(g["coords"])), g["direction"], g["prompt_index"]))
  picked = []
  for g in refused:
    if g["prompt"] not in {p["prompt"] for p in picked}:
      picked.append(g)
    if len(picked) == REFUSED_SAMPLES:
      break
  out = ["## Refused safe prompts", "",
         f"Over-refusal: {record.overrefusal.n_prompts} safe prompts ({record.overrefusal.prompts_path}), "
         f"judged by `{record.overrefusal.judge}`; up to {REFUSED_SAMPLES} refused ones, nearest θ first."]
  if not picked:
    return out + ["", "None refused."]
  rows = [[", ".join(f"{c:.3f}" for c in g["coords"]), str(g["direction"]), one_line(g["prompt"], PROMPT_CHARS),
           one_line(g["generation"], SAMPLE_CHARS)] for g in picked]
  return out + [""] + _table(["(α, β)" if record.two_d else "α", "direction", "prompt", "response"], rows, 4)


# ------------------------------------------------------------------ run report


def write_run_report(path: str, record: result.Result | None = None) -> str:
  """RUN/report.md from the run's files alone (its record, generations.jsonl, judges/*.jsonl,
  refined.jsonl); written atomically; returns its text. `record`: the run's, when the caller
  holds it (else read from RUN/landscape.json)."""
  record = result.load_run(path) if record is None else record
  measures = _measures(record)
  figure = (["![landscape](landscape.png)"] if os.path.exists(os.path.join(path, "landscape.png"))
            else ["No figure yet (landscape.png is drawn when the run completes)."])
  points = _points_2d if record.two_d else _points_1d
  sections = [_title(record), figure, _visage_section(record, measures), points(record, measures),
              _basin_section(record, measures), _refined_section(record), _trajectory_section(path, record),
              _samples_section(path, record, "## Sample generations", "generations.jsonl"),
              _samples_section(path, record, "## Sample generations at refined points", "refined.jsonl"),
              _refused_safe_section(path, record)]
  text = "\n\n".join("\n".join(s) for s in sections if s) + "\n"
  rundir.write_atomic(os.path.join(path, "report.md"), text)
  return text


def rebuild(path: str, record: result.Result | None = None) -> str:
  """Re-plots RUN/landscape.png and rewrites report.md from the run's record (read from
  RUN/landscape.json when not given); returns the report."""
  record = result.load_run(path) if record is None else record
  figures.plot_landscape(record, os.path.join(path, "landscape.png"))
  if record.trajectory is not None:
    figures.plot_trajectory(record, os.path.join(path, TRAJECTORY_FIGURE))
  return write_run_report(path, record)


# ------------------------------------------------------------------ sweep report


def _sweep_rows(path: str) -> list[dict]:
  """SWEEP/sweep.csv (sweep.py's summary): the runs, their status and errors, in order."""
  file = os.path.join(path, "sweep.csv")
  with open(file, newline="") as f:
    rows = list(csv.DictReader(f))
  if rows and not {"run", "status", "error"} <= set(rows[0]):
    raise errors.UserError(f"{file}: expected the columns run, status and error as `visage-jax sweep` writes them.")
  return rows


def write_sweep_report(path: str) -> str:
  """SWEEP/report.md from sweep.csv and each run's landscape.json: a VISAGE table with links to
  the runs' reports, the sweep figure, the failed runs with their error; returns its text."""
  rows = _sweep_rows(path)
  table = []
  for row in rows:
    run_dir = os.path.join(path, row["run"])
    try:
      record = result.load_run(run_dir)
    except errors.UserError:   # not started, or failed before its first point
      record = None
    link = f"[report]({row['run']}/report.md)" if os.path.exists(os.path.join(run_dir, "report.md")) else DASH
    table.append([row["run"], row["status"], _num(record.asr_at_zero if record else None),
                  _with_ci(record.visage if record else None, record.visage_ci95 if record else None), link])
  counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
  lines = [f"# Sweep {os.path.basename(os.path.abspath(path))}", "",
           f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".", ""]
  lines += _table(["run", "status", "ASR at α = 0 (%)", "VISAGE [95 % interval]", "report"], table, 2)
  lines += ["", "VISAGE: mean over directions (1D) or the plane's score (2D); intervals where the run's "
            "landscape.json has ci95."]
  if os.path.exists(os.path.join(path, "sweep.png")):
    lines += ["", "![sweep](sweep.png)"]
  failed = [r for r in rows if r["status"] == "failed"]
  if failed:
    lines += ["", "## Failed runs", ""]
    lines += [f"- `{r['run']}`: {one_line(r['error'] or 'no error recorded', 500)}" for r in failed]
  text = "\n".join(lines) + "\n"
  rundir.write_atomic(os.path.join(path, "report.md"), text)
  return text


def rebuild_sweep(path: str) -> list[str]:
  """Every finished run's figure and report, sweep.png and the sweep's report.md; the paths written."""
  written, results = [], {}
  for row in _sweep_rows(path):
    run_dir = os.path.join(path, row["run"])
    if row["status"] == "complete" and os.path.exists(os.path.join(run_dir, result.FILE)):
      results[row["run"]] = result.load_run(run_dir)
      rebuild(run_dir, results[row["run"]])
      written += [os.path.join(run_dir, "landscape.png"), os.path.join(run_dir, "report.md")]
  if results:
    figures.plot_sweep(results, os.path.join(path, "sweep.png"))
    written.append(os.path.join(path, "sweep.png"))
  write_sweep_report(path)
  return written + [os.path.join(path, "report.md")]


def rebuild_workdir(path: str) -> list[str]:
  """`visage-jax report --workdir=DIR`: a sweep directory (sweep.csv) or a landscape run
  (landscape.json); the paths written."""
  if not path:
    raise errors.UserError("report needs --workdir=DIR (a landscape run or a sweep directory).")
  if not os.path.isdir(path):
    raise errors.MissingFileError(f"--workdir={path}: no such directory.")
  if os.path.exists(os.path.join(path, "sweep.csv")):
    return rebuild_sweep(path)
  if not os.path.exists(os.path.join(path, result.FILE)):
    raise errors.UserError(f"--workdir={path}: neither a landscape run (landscape.json) nor a sweep (sweep.csv).")
  rebuild(path)
  return [os.path.join(path, "landscape.png"), os.path.join(path, "report.md")]
