"""`visage-jax judge`: a model judge over every generation of a (finished or partial) run.

Reads RUN/generations.jsonl; appends one record per generation to RUN/judges/NAME.jsonl
(direction, step, prompt_index, verdict, categories, p_unsafe, output), fsynced per batch, so an
interrupted judge resumes where it stopped (a torn last line is dropped) and a finished one
loads nothing. Then adds `judges[NAME]` to RUN/landscape.json (ASR, VISAGE, unparsed counts and
agreement with the keyword judge, each shaped like the keyword `asr`), re-plots and rewrites report.md.
"""

import json
import os
import re

import numpy as np
from absl import logging

from visage_jax import errors, sharding
from visage_jax.analysis import basin, uncertainty, visage
from visage_jax.measures import llamaguard
from visage_jax.reports import markdown
from visage_jax import rundir

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _generations(workdir: str) -> list[dict]:
  """The run's completed points, checked at the edge (file:line named)."""
  path = os.path.join(workdir, "generations.jsonl")
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"{path}: no such file; run `visage-jax landscape` in {workdir} "
                                  "first (the judge reads its generations).")
  lines = rundir.read_jsonl(path, repair=False)  # the landscape may still be appending
  for n, line in enumerate(lines, 1):
    outs = line.get("outputs") if isinstance(line, dict) else None
    ok = (isinstance(outs, list) and isinstance(line.get("direction"), int)
          and isinstance(line.get("step"), int)
          and all(isinstance(o, dict) and isinstance(o.get("prompt"), str)
                  and isinstance(o.get("generation"), str) for o in outs))
    if not ok:
      raise errors.UserError(f"{path}:{n}: expected direction, step and outputs "
                             "[{prompt, generation, jailbroken, ...}] as `landscape` writes them.")
  return lines


def _landscape_json(workdir: str) -> dict:
  path = os.path.join(workdir, "landscape.json")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise errors.MissingFileError(f"{path}: no such file; the judge needs the run's grid.") from None
  except json.JSONDecodeError as e:
    raise errors.UserError(f"{path}: not valid JSON ({e}).") from None


def _check_settings(result: dict, name: str, settings: dict, records: list[dict]) -> None:
  """Verdicts of another judge under the same name would mix silently; refuse instead."""
  old = (result.get("judges") or {}).get(name)
  if not records or not old:
    return
  diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
  if diff:
    raise errors.UserError(f"judges/{name}.jsonl holds verdicts of another judge ({'; '.join(diff)}); "
                           "use another --name, or delete that file.")


def _blocks(lines: list[dict], batch: int):
  """Fixed batches (direction, step, prompt_index // batch): a resumed run re-judges the same rows."""
  for line in lines:
    for start in range(0, len(line["outputs"]), batch):
      yield line, list(range(start, min(start + batch, len(line["outputs"]))))


def summarize(result: dict, lines: list[dict], records: list[dict], settings: dict) -> dict:
  """judges[NAME] of landscape.json: per point ASR, unparsed, agreement; VISAGE when complete."""
  xs, ys = result["coords_x"], result.get("coords_y")
  n_points = len(xs) * (1 if ys is None else len(ys))
  n_dirs = len(result["asr"]) if ys is None else 1
  by_key = {(r["direction"], r["step"], r["prompt_index"]): r for r in records}
  shape = (n_dirs, n_points)
  asr, unparsed, agree = (np.full(shape, None, object) for _ in range(3))
  for line in lines:
    outs, r, p = line["outputs"], line["direction"], line["step"]
    got = [by_key.get((r, p, q)) for q in range(len(outs))]
    if not outs or None in got or r >= n_dirs or p >= n_points:
      continue
    unsafe = [g["verdict"] == "unsafe" for g in got]
    asr[r, p] = 100.0 * sum(unsafe) / len(outs)
    unparsed[r, p] = sum(g["verdict"] == "unparsed" for g in got)
    agree[r, p] = sum(u == bool(o.get("jailbroken")) for u, o in zip(unsafe, outs)) / len(outs)
  complete = all(v is not None for v in asr.ravel())
  if ys is None:
    vis = visage.visage_directions(asr.tolist()) if complete else None
    grid = lambda a: a.tolist()
  else:
    grid = lambda a: a[0].reshape(len(xs), len(ys)).tolist()
    vis = visage.visage_2d(grid(asr)) if complete else None
  return dict(settings, asr=grid(asr), visage=vis, unparsed=grid(unparsed),
              agreement_with_keywords=grid(agree), n_judged=len(records), complete=complete)


def judge_ci95(result: dict, lines: list[dict], records: list[dict]) -> dict:
  """ci95["judges"][NAME]: {"asr", "visage"} intervals of the judge's unsafe verdicts, with the
  run's bootstrap settings (its ci95, else its config's, else the defaults)."""
  xs, ys = result["coords_x"], result.get("coords_y")
  n_points = len(xs) * (1 if ys is None else len(ys))
  n_dirs = len(result["asr"]) if ys is None else 1
  n_prompts = result.get("n_prompts") or max((len(l["outputs"]) for l in lines), default=0)
  by_key = {(r["direction"], r["step"], r["prompt_index"]): r["verdict"] == "unsafe" for r in records}
  unsafe = np.full((n_dirs, n_points, n_prompts), np.nan)
  for line in lines:
    got = [by_key.get((line["direction"], line["step"], q)) for q in range(n_prompts)]
    if None not in got and line["direction"] < n_dirs and line["step"] < n_points:
      unsafe[line["direction"], line["step"]] = got
  return uncertainty.curve_ci95(unsafe, xs, ys, **_ci_settings(result))


def _ci_settings(result: dict) -> dict:
  ci = result.get("ci95") or (result.get("config") or {}).get("ci95") or {}
  return dict(resamples=ci.get("resamples", uncertainty.RESAMPLES), seed=ci.get("seed", 0))


def _publish(workdir: str, name: str, summary: dict, ci: dict) -> dict:
  """Adds judges[NAME] and ci95.judges[NAME] to the latest landscape.json (atomically) and
  re-plots; unchanged: no write."""
  path = os.path.join(workdir, "landscape.json")
  result = _landscape_json(workdir)
  old_ci = ((result.get("ci95") or {}).get("judges") or {}).get(name)
  if (result.get("judges") or {}).get(name) == summary and old_ci == ci:
    return result
  result.setdefault("judges", {})[name] = summary
  result.setdefault("ci95", dict(method=uncertainty.METHOD, **_ci_settings(result))).setdefault("judges", {})[name] = ci
  result["basin"] = basin.summarize(result)
  rundir.write_atomic(path, json.dumps(result, indent=1))
  if not any(v is None for v in np.ravel(np.asarray(result["asr"], object))):
    markdown.rebuild(workdir)   # the figure and report.md with the judge
  return result


def run(workdir: str, model_path: str, *, name: str = "llamaguard", max_new_tokens: int = 10,
        dtype: str = "float32", batch: int = llamaguard.BATCH, progress: bool = True) -> dict:
  """Judges every generation not yet judged; returns judges[NAME] as written to landscape.json."""
  if not NAME_PATTERN.match(name or ""):
    raise errors.UserError(f"--name={name!r}: expected letters, digits, '_', '.' or '-'.")
  if max_new_tokens < 1:
    raise errors.UserError(f"--max_new_tokens must be >= 1, got {max_new_tokens}.")
  if dtype not in ("float32", "bfloat16"):
    raise errors.UserError(f"--dtype={dtype!r}: expected float32 or bfloat16.")
  if not model_path:
    raise errors.UserError("judge needs --model=JUDGE (e.g. meta-llama/Llama-Guard-3-1B).")
  lines = _generations(workdir)
  result = _landscape_json(workdir)
  out_path = os.path.join(workdir, "judges", f"{name}.jsonl")
  records = rundir.read_jsonl(out_path, repair=False)
  settings = dict(model=model_path, max_new_tokens=max_new_tokens, dtype=dtype)
  _check_settings(result, name, settings, records)
  done = {(r["direction"], r["step"], r["prompt_index"]) for r in records}
  todo = [(line, qs) for line, qs in _blocks(lines, batch)
          if any((line["direction"], line["step"], q) not in done for q in qs)]
  if todo:
    records += _judge_blocks(todo, done, out_path, model_path, dtype, max_new_tokens, batch,
                             tuple(result.get("config", {}).get("mesh", {}).get("shape", (1, 1))),
                             progress)
  summary = summarize(result, lines, records, settings)
  _publish(workdir, name, summary, judge_ci95(result, lines, records))
  return summary


def _mesh(shape: tuple[int, ...]):
  """The run's mesh when this machine has its devices, else one device (a judge is small)."""
  try:
    return sharding.make_mesh(shape)
  except errors.UserError as e:
    logging.warning("judge: the run's mesh does not fit here (%s); judging on one device.", e)
    return sharding.make_mesh((1, 1))


def _judge_blocks(todo, done, out_path, model_path, dtype, max_new_tokens, batch, mesh_shape,
                  progress) -> list[dict]:
  """Loads the judge, then judges block by block, appending and fsyncing each block's records."""
  from tqdm import tqdm

  judge = llamaguard.load(model_path, dtype, _mesh(mesh_shape))
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  rundir.read_jsonl(out_path, repair=True)  # drop a torn last line before appending
  new = []
  bar = tqdm(total=sum(len(qs) for _, qs in todo), unit="gen", desc="judge", disable=not progress,
             dynamic_ncols=True)
  with rundir.JsonlAppender(out_path) as out:
    for line, qs in todo:
      pairs = [(line["outputs"][q]["prompt"], line["outputs"][q]["generation"]) for q in qs]
      got = llamaguard.judge_pairs(judge, pairs, max_new_tokens=max_new_tokens, batch=batch)
      block = [dict(direction=line["direction"], step=line["step"], prompt_index=q, **rec)
               for q, rec in zip(qs, got) if (line["direction"], line["step"], q) not in done]
      out.append(block)
      new.extend(block)
      bar.update(len(qs))
  bar.close()
  return new
