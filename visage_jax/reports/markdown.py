"""report.md: what a person reads of a landscape run or a sweep, built from their files alone.

A run's report holds its figure, VISAGE with its 95 % intervals, the ASR of every measure at every
grid point, the safety basin, the refined points, and two sample generations per point with their
verdicts, so a reader sees what "jailbroken" meant there. A sweep's report tables its runs' VISAGE
and links their reports. Same files, same text: `visage-jax report --workdir=DIR` rebuilds both.
"""

import csv
import json
import os

from visage_jax import errors
from visage_jax.analysis import visage
from visage_jax.reports import figures
from visage_jax import rundir

DASH = "—"
SAMPLE_CHARS = 160   # a generation's cell: enough to see a refusal or a compliance begin
PROMPT_CHARS = 60
CAPABILITY = (("perplexity", "perplexity", ".4g"), ("mc_accuracy", "MC accuracy", ".3f"))
TABLE_NOTE = "Cells: value [95 % interval]; — = not evaluated (or not computed)."


# ------------------------------------------------------------------ small pieces


def _at(tree, *keys):
  """tree[k0][k1]... or None where a level is missing: optional fields read alike."""
  for k in keys:
    if isinstance(k, int):
      tree = tree[k] if isinstance(tree, list) and 0 <= k < len(tree) else None
    else:
      tree = tree.get(k) if isinstance(tree, dict) else None
  return tree


def _num(v, fmt: str = ".2f") -> str:
  if isinstance(v, bool):
    return "yes" if v else ""
  return DASH if v is None else format(v, fmt)


def _with_ci(v, pair, fmt: str = ".2f") -> str:
  """'62.50 [55.00, 70.00]', or the value alone where no interval was computed."""
  if v is None or not isinstance(pair, list) or len(pair) != 2 or None in pair:
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


def _read_result(path: str) -> dict:
  """landscape.json with the fields every report needs (rebuild's plotting checks their shapes)."""
  file = os.path.join(path, "landscape.json")
  try:
    with open(file) as f:
      result = json.load(f)
  except FileNotFoundError:
    raise errors.MissingFileError(f"{file}: no such file; run `visage-jax landscape` in {path} first.") from None
  except json.JSONDecodeError as e:
    raise errors.UserError(f"{file}: not valid JSON ({e}).") from None
  missing = [k for k in ("vis_type", "coords_x", "asr") if not isinstance(result, dict) or k not in result]
  if missing:
    raise errors.UserError(f"{file}: missing {', '.join(missing)}; expected a landscape.json as "
                           "`visage-jax landscape` writes it.")
  return result


# ------------------------------------------------------------------ a run's sections


def _measures(result: dict) -> list[dict]:
  """Every ASR the run holds (keyword, coherent, each model judge) with its intervals and the key
  of its basin entry."""
  ci = result.get("ci95") or {}
  out = [dict(label="keyword ASR", basin=None, asr=result["asr"], ci=ci.get("asr"),
              visage=result.get("visage"), visage_ci=ci.get("visage"))]
  if result.get("asr_coherent") is not None:
    max_nll = _at(result, "coherence", "max_nll")
    out.append(dict(label=f"coherent ASR (nll_ref ≤ {max_nll})", basin="coherent", asr=result["asr_coherent"],
                    ci=ci.get("asr_coherent"), visage=result.get("visage_coherent"),
                    visage_ci=ci.get("visage_coherent")))
  for name, judge in (result.get("judges") or {}).items():
    if isinstance(judge, dict) and judge.get("asr") is not None:
      out.append(dict(label=f"{name} ASR", basin=name, asr=judge["asr"], ci=_at(ci, "judges", name, "asr"),
                      visage=judge.get("visage"), visage_ci=_at(ci, "judges", name, "visage")))
  return out


def _title(result: dict) -> list[str]:
  """Title and the facts a reader needs to trust the numbers: model, grid, prompts, decoding."""
  model = str(result.get("model") or "unknown model")
  asr = [v for row in result["asr"] for v in row]
  done = sum(v is not None for v in asr)
  state = "complete" if result.get("complete") else f"incomplete ({done} of {len(asr)} points evaluated)"
  xs, ys = result["coords_x"], result.get("coords_y")
  grid = f"{len(xs)} points, α from {xs[0]:g} to {xs[-1]:g}, {len(result['asr'])} direction(s)"
  if ys is not None:
    grid = f"{len(xs)} × {len(ys)} points, α from {xs[0]:g} to {xs[-1]:g}, β from {ys[0]:g} to {ys[-1]:g}"
  c = result.get("config") or {}
  lora = _at(c, "model", "lora_path")
  lines = [f"# {os.path.basename(model.rstrip('/')) or model} · {result['vis_type']} · "
           f"{result.get('n_prompts')} prompts · {state}", "",
           f"- model: `{model}`" + (f" + LoRA `{lora}`" if lora else ""),
           f"- grid: {grid}; seed {result.get('seed')}"]
  if c.get("prompts"):
    lines.append(f"- prompts: `{_at(c, 'prompts', 'path') or 'AdvBench (packaged)'}`, "
                 f"template {_at(c, 'prompts', 'template')}, "
                 f"system prompt {one_line(_at(c, 'prompts', 'system_prompt'), PROMPT_CHARS)}; "
                 f"greedy, {_at(c, 'decode', 'max_new_tokens')} new tokens")
  if result.get("coherence"):
    lines.append(f"- coherent: jailbroken and nll_ref ≤ {_at(result, 'coherence', 'max_nll')} nats/token under "
                 f"`{_at(result, 'coherence', 'model')}`")
  for name, judge in (result.get("judges") or {}).items():
    lines.append(f"- model judge {name}: `{_at(judge, 'model')}`")
  bad = sum(bool(v) for row in (result.get("nonfinite") or []) for v in row)
  if bad:
    lines.append(f"- {bad} point(s) with inf/NaN logits (marked in the tables)")
  if result.get("judge_disagreements"):
    lines.append(f"- the on-device keyword automaton disagreed on {len(result['judge_disagreements'])} "
                 "generation(s) (the Python verdict is the one recorded)")
  return lines


def _visage_section(result: dict, measures: list[dict]) -> list[str]:
  """1D: the mean over directions, and each direction's when there are several; 2D: the plane's."""
  two_d = result.get("coords_y") is not None
  per = [] if two_d or len(result["asr"]) < 2 else range(len(result["asr"]))
  rows = []
  for m in measures:
    v, ci = m["visage"], m["visage_ci"]
    rows.append([m["label"], _with_ci(v, ci)] if two_d else
                [m["label"], _with_ci(_at(v, "mean"), _at(ci, "mean"))]
                + [_with_ci(_at(v, "per_direction", r), _at(ci, "per_direction", r)) for r in per])
  lines = ["## VISAGE (higher = safer)", ""]
  lines += _table(["ASR", "VISAGE" if not per else "mean"] + [f"direction {r}" for r in per], rows)
  if visage.visage_mean(result) is None:
    lines += ["", "VISAGE is computed once every point is evaluated."]
  ci = result.get("ci95")
  if ci:
    lines += ["", f"95 % intervals: {ci.get('method')}, {ci.get('resamples')} resamples, seed {ci.get('seed')} "
              "(over prompts; over directions too for the mean)."]
    if ci.get("degenerate"):
      lines.append(f"Zero-width intervals (every prompt agrees): {one_line(json.dumps(ci['degenerate']), 300)}.")
  else:
    lines += ["", "95 % intervals: not computed (landscape.json has no ci95)."]
  return lines


def _points_1d(result: dict, measures: list[dict]) -> list[str]:
  """One table per direction, a row per grid point: every ASR and capability measure."""
  cap, cap_ci = result.get("capability") or {}, _at(result, "ci95", "capability") or {}
  caps = [(n, label, fmt) for n, label, fmt in CAPABILITY if cap.get(n) is not None]
  bad = result.get("nonfinite") if any(v for row in result.get("nonfinite") or [] for v in row) else None
  lines = ["## ASR at every grid point (%)", "", TABLE_NOTE]
  for r in range(len(result["asr"])):
    rows = []
    for p, alpha in enumerate(result["coords_x"]):
      row = [f"{alpha:.3f}"] + [_with_ci(_at(m["asr"], r, p), _at(m["ci"], r, p)) for m in measures]
      row += [_with_ci(_at(cap, n, r, p), _at(cap_ci, n, r, p), fmt) for n, _, fmt in caps]
      rows.append(row + [_num(bool(_at(bad, r, p)))] * bool(bad))
    header = ["α"] + [m["label"] for m in measures] + [label for _, label, _ in caps] + ["inf/NaN"] * bool(bad)
    lines += ["", f"### Direction {r}", ""] + _table(header, rows, 0)
  return lines


def _points_2d(result: dict, measures: list[dict]) -> list[str]:
  """A compact [α][β] table per measure (intervals are in landscape.json's ci95)."""
  xs, ys = result["coords_x"], result["coords_y"]
  cap = result.get("capability") or {}
  grids = [(m["label"] + " (%)", m["asr"], ".1f") for m in measures]
  grids += [(label, cap[n], fmt) for n, label, fmt in CAPABILITY if cap.get(n) is not None]
  lines = ["## Values over the plane (rows α, columns β)"]
  for label, grid, fmt in grids:
    rows = [[f"{x:.3f}"] + [_num(_at(grid, i, j), fmt) for j in range(len(ys))] for i, x in enumerate(xs)]
    lines += ["", f"### {label}", ""] + _table(["α \\ β"] + [f"{y:.3f}" for y in ys], rows, 0)
  return lines


def _basin_section(result: dict, measures: list[dict]) -> list[str]:
  basin = result.get("basin")
  lines = ["## Safety basin (where ASR crosses 50 % on each side of the origin)", ""]
  if not basin:
    return lines + ["Not computed (landscape.json has no basin)."]
  if result.get("coords_y") is not None:
    return lines + _table(["measure", "value"], [
        ["fraction of points with ASR < 50 %", _num(basin.get("fraction_below"), ".3f")],
        ["fraction in the connected region around θ", _num(basin.get("connected_fraction"), ".3f")],
        ["points in that region", _num(basin.get("connected_points"), "d")]])
  rows = []
  for m in measures:
    for r, entry in enumerate(basin if isinstance(basin, list) else []):
      b = entry if m["basin"] is None else _at(entry, m["basin"])
      if isinstance(b, dict):
        rows.append([m["label"], str(r)] + [_num(b.get(k), ".3f") for k in ("left", "right", "width")])
  return lines + _table(["ASR", "direction", "left α", "right α", "width"], rows) + [
      "", "— : no crossing on that side within the evaluated points."]


def _refined_section(result: dict) -> list[str]:
  """Points added between grid points near the basin walls; they never change VISAGE."""
  lines = []
  for r, entry in enumerate(result.get("refined") or []):
    alphas = _at(entry, "alpha") or []
    cols = [k for k, v in entry.items() if k != "alpha" and isinstance(v, list) and len(v) == len(alphas)]
    rows = [[f"{a:.4f}"] + [_num(entry[k][i], ".4g" if k == "perplexity" else ".2f") for k in cols]
            for i, a in enumerate(alphas)]
    names = [{"asr": "keyword ASR", "asr_coherent": "coherent ASR"}.get(k, k) for k in cols]
    lines += ["", f"### Direction {r}", ""] + _table(["α"] + names, rows, 0)
  return ["## Refined points (not part of VISAGE)"] + lines if lines else []


# ------------------------------------------------------------------ sample generations


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


def _verdict(o: dict, max_nll, judged: dict) -> str:
  text = "jailbroken" if o.get("jailbroken") else "refused"
  if "nll_ref" in o:
    nll = o["nll_ref"]
    coherent = "" if nll is None or max_nll is None else (" coherent" if nll <= max_nll else " incoherent")
    text += f" · nll_ref {_num(nll)}{coherent}"
  return text + "".join(f" · {name} {v}" for name, v in judged.items())


def _sample_rows(lines: list[dict], max_nll, verdicts: dict) -> list[list[str]]:
  rows = []
  for line in lines:
    coords = ", ".join(f"{c:.3f}" for c in line.get("coords") or [])
    outs = line.get("outputs") or []
    for q in pick_samples(outs):
      judged = verdicts.get((line.get("direction"), line.get("step"), q), {})
      rows.append([coords, str(q), _verdict(outs[q], max_nll, judged),
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


def _samples_section(path: str, result: dict, heading: str, file: str) -> list[str]:
  """Two generations per point of `file` with their verdicts (2D: a few points of the plane)."""
  lines = [l for l in rundir.read_jsonl(os.path.join(path, file), repair=False)
           if isinstance(l, dict) and isinstance(l.get("direction"), int)]
  if not lines:
    return []
  max_nll, verdicts = _at(result, "coherence", "max_nll"), _judge_verdicts(path)
  ys = result.get("coords_y")
  out = [heading, "", f"Two prompts per point: the first jailbroken and the first refused one where both "
         f"occur; texts cut to {SAMPLE_CHARS} characters on one line."]
  if ys is not None:
    keep = _sample_steps_2d(result["coords_x"], ys)
    chosen = sorted((l for l in lines if l.get("step") in keep), key=lambda l: keep.index(l["step"]))
    return out + [""] + _table(["(α, β)", "#", "verdict", "prompt", "generation"],
                               _sample_rows(chosen, max_nll, verdicts), 5)
  for r in sorted({l["direction"] for l in lines}):
    mine = sorted((l for l in lines if l["direction"] == r), key=lambda l: (l.get("coords") or [0.0])[0])
    out += ["", f"### Direction {r}", ""] + _table(["α", "#", "verdict", "prompt", "generation"],
                                                   _sample_rows(mine, max_nll, verdicts), 5)
  return out


# ------------------------------------------------------------------ run report


def write_run_report(path: str) -> str:
  """RUN/report.md from the run's files alone (landscape.json, generations.jsonl, judges/*.jsonl,
  refined.jsonl); written atomically; returns its text."""
  result = _read_result(path)
  measures = _measures(result)
  figure = (["![landscape](landscape.png)"] if os.path.exists(os.path.join(path, "landscape.png"))
            else ["No figure yet (landscape.png is drawn when the run completes)."])
  points = _points_1d if result.get("coords_y") is None else _points_2d
  sections = [_title(result), figure, _visage_section(result, measures), points(result, measures),
              _basin_section(result, measures), _refined_section(result),
              _samples_section(path, result, "## Sample generations", "generations.jsonl"),
              _samples_section(path, result, "## Sample generations at refined points", "refined.jsonl")]
  text = "\n\n".join("\n".join(s) for s in sections if s) + "\n"
  rundir.write_atomic(os.path.join(path, "report.md"), text)
  return text


def rebuild(path: str) -> str:
  """Re-plots RUN/landscape.png from landscape.json and rewrites report.md; returns the report."""
  figures.plot_landscape(_read_result(path), os.path.join(path, "landscape.png"))
  return write_run_report(path)


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
    result = rundir.read_json(os.path.join(run_dir, "landscape.json"))
    result = result if isinstance(result, dict) and "coords_x" in result and "asr" in result else None
    ci = _at(result, "ci95", "visage")
    ci = _at(ci, "mean") if isinstance(ci, dict) else ci
    link = f"[report]({row['run']}/report.md)" if os.path.exists(os.path.join(run_dir, "report.md")) else DASH
    table.append([row["run"], row["status"], _num(visage.asr_at_zero(result) if result else None),
                  _with_ci(visage.visage_mean(result) if result else None, ci), link])
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
    if row["status"] == "complete" and os.path.exists(os.path.join(run_dir, "landscape.json")):
      rebuild(run_dir)
      results[row["run"]] = _read_result(run_dir)
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
  if not os.path.exists(os.path.join(path, "landscape.json")):
    raise errors.UserError(f"--workdir={path}: neither a landscape run (landscape.json) nor a sweep (sweep.csv).")
  rebuild(path)
  return [os.path.join(path, "landscape.png"), os.path.join(path, "report.md")]
