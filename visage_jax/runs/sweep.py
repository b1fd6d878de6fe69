"""Sweeps: a grid of landscape runs executed in turn, in one process on one mesh.

`base` is a landscape config; `sweep.grid` and `sweep.runs` say which fields change. Each run is
a plain landscape workdir, WORKDIR/<run name>/, so it resumes like one: finished runs are
skipped (landscape.finished_result, without loading the model), unfinished ones continue, a
failed one is recorded with its error and the sweep goes on. sweep.csv, sweep.md, sweep.png and
report.md (markdown.py, links to the runs' reports) are rewritten after every run, so an
interrupted sweep still has its summary.
"""

import copy
import csv
import hashlib
import io
import itertools
import json
import os
import re
import time

from absl import logging

from visage_jax import distributed, errors, result, rundir
from visage_jax.reports import figures, markdown
from visage_jax.runs import landscape

SUMMARY_FILES = ("sweep.csv", "sweep.md", "sweep.png", "report.md")
COLUMNS = ("run", "status", "asr_at_0", "visage", "visage_ci95_lo", "visage_ci95_hi", "workdir", "error")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")
_VALUE_CHARS = 40


def default_config():
  """Every sweep setting; configs/sweep_*.py fill in base and the grid."""
  import ml_collections

  c = ml_collections.ConfigDict()
  # A landscape config (every field of landscape.default_config()); each run is base + overrides.
  c.base = landscape.default_config()
  # grid: ((dotted field of base, (value, ...)), ...); the runs are the product of the value
  #   lists, the first field outermost, e.g. (("prompts.system_prompt", ("default", "aoa")),).
  # runs: (dict(name="...", overrides={"dotted.field": value, ...}), ...): explicit runs, e.g. one
  #   per fine-tuned checkpoint, each crossed with the grid (name may be left out).
  # A run's directory is named after its overrides, "field=value,..." (the field's last part,
  # a path's basename), made filesystem-safe and unique; an explicit name comes first.
  c.sweep = dict(grid=(), runs=())
  # Multi-process sweeps: the very same section as base.distributed (see landscape.default_config).
  c.distributed = c.base.distributed
  return c


# ------------------------------------------------------------------ the runs


def _field_names(base) -> str:
  return ", ".join(f"{s}.{k}" for s in base.keys() if hasattr(base[s], "keys") for k in base[s].keys())


def _check_field(base, field: str, where: str) -> None:
  """Names the offending entry: a typo in a sweep must not silently add a field."""
  node = base
  for part in str(field).split("."):
    if not hasattr(node, "keys") or part not in node:
      raise errors.UserError(f"{where}: {field!r} is not a field of the landscape config (sweep base); "
                       f"fields: {_field_names(base)}.")
    node = node[part]
  if hasattr(node, "keys"):
    raise errors.UserError(f"{where}: {field!r} is a section; name one of its fields: "
                     f"{', '.join(f'{field}.{k}' for k in node.keys())}.")


def _grid(c) -> list[tuple[str, tuple]]:
  out = []
  for i, entry in enumerate(c.sweep.grid):
    if not isinstance(entry, (tuple, list)) or len(entry) != 2 or isinstance(entry[1], str) \
        or not hasattr(entry[1], "__iter__"):
      raise errors.UserError(f"sweep.grid[{i}]: expected (dotted field, (value, ...)), got {entry!r}.")
    field, values = str(entry[0]), tuple(entry[1])
    _check_field(c.base, field, f"sweep.grid[{i}]")
    if not values:
      raise errors.UserError(f"sweep.grid[{i}]: {field!r} has no values.")
    if field in [f for f, _ in out]:
      raise errors.UserError(f"sweep.grid[{i}]: {field!r} appears twice in the grid.")
    out.append((field, values))
  return out


def _explicit(c) -> list[tuple[str | None, dict]]:
  out = []
  for i, entry in enumerate(c.sweep.runs):
    entry = dict(entry)
    unknown = set(entry) - {"name", "overrides"}
    if unknown:
      raise errors.UserError(f"sweep.runs[{i}]: unknown keys {sorted(unknown)}; expected name and overrides.")
    name = entry.get("name") or None
    if name is not None and (_UNSAFE.search(str(name)) or str(name) in (".", "..")):
      raise errors.UserError(f"sweep.runs[{i}].name {name!r} is a directory name: use letters, digits "
                       "and . _ = , + -")
    overrides = dict(entry.get("overrides") or {})
    for field in overrides:
      _check_field(c.base, field, f"sweep.runs[{i}].overrides")
    out.append((name, overrides))
  return out


def _short_value(value) -> str:
  if isinstance(value, (tuple, list)):
    return "x".join(_short_value(v) for v in value)
  if isinstance(value, str):
    text = os.path.basename(value.rstrip("/")) if "/" in value else value
    text = _UNSAFE.sub("_", text or "none").strip("_") or "none"
    if len(text) > _VALUE_CHARS:   # long custom text (a system prompt): a prefix and a hash
      text = text[:_VALUE_CHARS - 9] + "-" + hashlib.sha1(value.encode()).hexdigest()[:8]
    return text
  return _UNSAFE.sub("_", str(value))


def _label(overrides: dict, keys: dict) -> str:
  return ",".join(f"{keys[f]}={_short_value(v)}" for f, v in overrides.items())


def expand(c) -> list[tuple[str, dict]]:
  """(run name, {dotted field: value}) for every run of the sweep, in order."""
  grid, explicit = _grid(c), _explicit(c)
  points = [dict(zip([f for f, _ in grid], combo)) for combo in itertools.product(*[v for _, v in grid])]
  fields = list(dict.fromkeys([f for f, _ in grid] + [f for _, o in explicit for f in o]))
  last = [f.split(".")[-1] for f in fields]
  keys = {f: f.split(".")[-1] if last.count(f.split(".")[-1]) == 1 else f for f in fields}
  runs = []
  for name, over in explicit or [(None, {})]:
    for point in points:
      clash = set(over) & set(point)
      if clash:
        raise errors.UserError(f"sweep: {sorted(clash)} set both by sweep.runs ({name or over}) and by sweep.grid.")
      head = name or _label(over, keys)
      runs.append((",".join(p for p in (head, _label(point, keys)) if p) or "base", {**over, **point}))
  names = [n for n, _ in runs]
  for i, (n, over) in enumerate(runs):
    if names.count(n) > 1:   # distinct values that read the same: tell them apart by a hash
      digest = hashlib.sha1(json.dumps(rundir.jsonable(over), sort_keys=True, default=str).encode())
      runs[i] = (f"{n}-{digest.hexdigest()[:8]}", over)
  seen = {}
  for n, over in runs:
    if n in seen:
      raise errors.UserError(f"sweep: two runs are both named {n!r} (overrides {seen[n]} and {over}); "
                       "give explicit runs distinct names and overrides.")
    seen[n] = over
  return runs


def run_config(base, overrides: dict):
  """base with the overrides applied (a copy); a value of the wrong type names its field."""
  c = copy.deepcopy(base)
  for field, value in overrides.items():
    *parents, leaf = field.split(".")
    node = c
    for part in parents:
      node = node[part]
    try:
      node[leaf] = tuple(value) if isinstance(value, list) else value
    except TypeError as e:
      raise errors.UserError(f"sweep: cannot set {field} = {value!r} ({e}).") from None
  return c


# ------------------------------------------------------------------ summaries


def _fmt(v) -> str:
  return "–" if v is None else f"{v:.2f}"


def _scores(record: result.Result) -> dict:
  """A run's summary row values: ASR at the origin, VISAGE and its 95% interval (None if absent)."""
  lo, hi = record.visage_ci95 or (None, None)
  return dict(asr_at_0=record.asr_at_zero, visage=record.visage, visage_ci95_lo=lo, visage_ci95_hi=hi)


def _fmt_interval(row: dict) -> str:
  lo, hi = row.get("visage_ci95_lo"), row.get("visage_ci95_hi")
  return "–" if lo is None else f"[{lo:.2f}, {hi:.2f}]"


def _csv_value(v):
  if v is None:
    return ""
  if isinstance(v, (tuple, list, dict)):
    return json.dumps(rundir.jsonable(v))
  return v


def summary_csv(rows: list[dict], fields: list[str]) -> str:
  out = io.StringIO()
  w = csv.DictWriter(out, fieldnames=list(COLUMNS) + fields, lineterminator="\n")
  w.writeheader()
  for row in rows:
    w.writerow({k: _csv_value(row.get(k)) for k in w.fieldnames})
  return out.getvalue()


def summary_markdown(rows: list[dict], workdir: str) -> str:
  title = os.path.basename(os.path.abspath(workdir))
  lines = [f"# Sweep {title}", "", "| run | status | ASR at α = 0 | VISAGE | VISAGE 95% CI |",
           "|---|---|---:|---:|---:|"]
  lines += [f"| {r['run']} | {r['status']} | {_fmt(r['asr_at_0'])} | {_fmt(r['visage'])} | {_fmt_interval(r)} |"
            for r in rows]
  failed = [r for r in rows if r["status"] == "failed"]
  if failed:
    lines += ["", "Failed runs:", ""]
    lines += [f"- `{r['run']}`: {' '.join(str(r['error']).split())[:500]}" for r in failed]
  return "\n".join(lines) + "\n"


def _write_summary(workdir: str, rows: list[dict], fields: list[str], records: dict) -> None:
  rundir.write_atomic(os.path.join(workdir, "sweep.csv"), summary_csv(rows, fields))
  rundir.write_atomic(os.path.join(workdir, "sweep.md"), summary_markdown(rows, workdir))
  if records:
    figures.plot_sweep(records, os.path.join(workdir, "sweep.png"))
  markdown.write_sweep_report(workdir)


# ------------------------------------------------------------------ the sweep


def run(c, workdir: str, *, overwrite: bool = False, progress: bool = True) -> list[dict]:
  """Runs (or resumes) every run of sweep config `c` under `workdir`; returns the summary rows."""
  runs = [(name, over, run_config(c.base, over)) for name, over in expand(c)]
  fields = list(dict.fromkeys(f for _, over, _ in runs for f in over))
  writer = distributed.is_writer()
  say = logging.info if writer else (lambda *a: None)
  rows, records = [], {}
  for name, over, rc in runs:
    run_dir = os.path.join(workdir, name)
    row = dict(run=name, status="pending", asr_at_0=None, visage=None, visage_ci95_lo=None,
               visage_ci95_hi=None, workdir=run_dir, error=None, **{f: over.get(f) for f in fields})
    done = landscape.finished_result(run_dir, rc.to_dict())
    if done is not None:
      row.update(status="complete", **_scores(done))
      records[name] = done
    rows.append(row)
  todo = [i for i, r in enumerate(rows) if r["status"] != "complete"]
  say("sweep %s: %d runs, %d complete, %d to run", workdir, len(rows), len(rows) - len(todo), len(todo))
  if writer:
    os.makedirs(workdir, exist_ok=True)
    _write_summary(workdir, rows, fields, records)
  for k, i in enumerate(todo):
    name, _, rc = runs[i]
    row = rows[i]
    say("sweep [%d/%d] %s: running", k + 1, len(todo), name)
    row["status"], t0 = "running", time.time()
    if writer:
      _write_summary(workdir, rows, fields, records)
    try:
      record = landscape.run(rc, row["workdir"], overwrite=overwrite, progress=progress)
    except Exception as e:  # recorded; the next runs go on
      row.update(status="failed", error=f"{type(e).__name__}: {e}")
      logging.exception("sweep: run %s failed", name)
      if writer:  # the run wrote nothing (bad input leaves no files): say why where it would be
        os.makedirs(row["workdir"], exist_ok=True)
        workdir_error(row["workdir"], row["error"])
    except BaseException:    # Ctrl-C: the summary says where the sweep stopped
      row["status"] = "interrupted"
      if writer:
        _write_summary(workdir, rows, fields, records)
      raise
    else:
      if writer:
        workdir_error(row["workdir"], None)
      row.update(status="complete" if record.complete else "failed", **_scores(record),
                 error=None if record.complete else "landscape incomplete")
      records[name] = record
      say("sweep [%d/%d] %s: ASR at 0 %s, VISAGE %s (%.0f s)", k + 1, len(todo), name,
          _fmt(row["asr_at_0"]), _fmt(row["visage"]), time.time() - t0)
    if writer:
      _write_summary(workdir, rows, fields, records)
  distributed.barrier("sweep: summary written")  # every process returns once the files exist
  return rows


def workdir_error(run_dir: str, error: str | None) -> None:
  """RUN/error.txt holds why a sweep's run failed; removed once the run succeeds."""
  path = os.path.join(run_dir, "error.txt")
  if error is None:
    if os.path.exists(path):
      os.remove(path)
    return
  rundir.write_atomic(path, error + "\n")
