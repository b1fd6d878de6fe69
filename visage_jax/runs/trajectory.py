"""A fine-tuning trajectory drawn on its landscape (Li et al. 2018, arXiv 1712.09913; the paper's Fig. 1B).

The checkpoints theta_0 .. theta_final (a fine-tune's trajectory/ files, or a list of
checkpoints) give the plane of the PCA of theta_i - theta_final (directions/trajectory.py),
computed leaf by leaf, one leaf of every checkpoint at a time. d1 and d2 are saved scaled so
that the grid's axes [-1, 1] cover every checkpoint with landscape.margin to spare, and the
ordinary 2D pipeline runs on them as imported directions (resumable, sharded). Then every
checkpoint is decoded itself, at the origin of its own weights, beside the surface's value at
its projection (bilinear): points off the plane can sit on the wrong contour.

Workdir: a landscape run (run_config.json, generations.jsonl, landscape.json with its
"trajectory" section, landscape.png, report.md; no directions.safetensors) plus plane.safetensors
(the imported directions, read again on resume), plane.json (the PCA), trajectory.jsonl (each checkpoint's line, in
generations.jsonl's format with its checkpoint index, training step and label; with over-refusal
on, also the checkpoint's `overrefusal` rate and its safe prompts' `overrefusal_outputs`) and
trajectory.png.
"""

import contextlib
import dataclasses
import functools
import glob
import json
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import distributed, errors, model, result, rundir, sharding
from visage_jax.analysis import uncertainty
from visage_jax.checkpoints import hf_tensors, loader, lora, safetensors_file
from visage_jax.directions import trajectory, vectors
from visage_jax.measures import coherence, registry
from visage_jax.reports import markdown
from visage_jax.runs import config_checks, finetune, landscape, pipeline

PLANE_FILE = "plane.safetensors"
PLANE_INFO = "plane.json"
POINTS_FILE = "trajectory.jsonl"
_STEP_FILE = re.compile(r"step_(\d+)\.safetensors")


def default_config():
  """A landscape config with the trajectory's own section; landscape.steps sets the grid (the
  command sets the rest of `landscape`: a 2D plane of imported directions over [-1, 1]^2)."""
  c = landscape.default_config()
  c.landscape.update(vis_type="2D_random", steps=10)
  # margin: the grid's half-width is (1 + margin) x the farthest checkpoint along each axis.
  # steps: with --finetune, the training steps of its saved checkpoints to draw (() = every one);
  # the fine-tuned model (FT/model) is always the last. E.g. dense where the path crosses a wall.
  # checkpoints: filled in by the command, what each checkpoint was read from (the run's identity).
  c.trajectory = dict(margin=0.25, steps=(), checkpoints=())
  return c


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One theta_i: its training step, what it was read from, and `open(stack, targets)` -> {leaf
  path: read()}, each read giving that leaf placed in its sharding (files stay open on `stack`)."""
  step: int
  label: str
  open: Callable


# ------------------------------------------------------------------ the checkpoints


def _checkpoint_file(path: str, dtype: str, step: int) -> Checkpoint:
  """A checkpoint on disk (HF directory, GGUF file, converted directory), read as the landscape reads it."""
  local = loader.resolve(path, dtype)

  def open_(stack, targets):
    _, leaves = stack.enter_context(loader.leaves(local, dtype))
    return {p: functools.partial(hf_tensors.put, read, hf_tensors.get_leaf(targets, p)) for p, read in leaves}
  return Checkpoint(step, path, open_)


def _adapter_file(path: str, base: dict, cfg: model.ModelConfig, mesh, step: int) -> Checkpoint:
  """A LoRA fine-tune's trajectory file: base + (alpha / rank) A B on the targeted leaves."""
  adapter, alpha, rank = lora.load(path, cfg)
  adapter = sharding.put(adapter, sharding.replicated(mesh))

  def merged(t):
    return lora.merge({"layers": {t: base["layers"][t]}}, {t: adapter[t]}, alpha, rank)["layers"][t]

  def open_(stack, targets):
    return {p: (functools.partial(merged, p[1]) if p[0] == "layers" and p[1] in adapter
                else functools.partial(hf_tensors.get_leaf, base, p)) for p in hf_tensors.leaf_paths(cfg)}
  return Checkpoint(step, path, open_)


def _params_file(path: str, cfg: model.ModelConfig, step: int) -> Checkpoint:
  """A full fine-tune's trajectory file: every params leaf as HF tensors."""
  entries = safetensors_file.read_header(path)
  hf_tensors.leaf_readers(None, {n: e[1] for n, e in entries.items()}, cfg, path, get_block=lambda *_: None)

  def open_(stack, targets):
    fd = os.open(path, os.O_RDONLY)
    stack.callback(os.close, fd)
    block = lambda name, index: safetensors_file.read_block(fd, entries[name], index, f"{path}: tensor {name!r}")
    leaves = hf_tensors.leaf_readers(lambda n: block(n, ()), {n: e[1] for n, e in entries.items()}, cfg, path,
                                     get_block=block)
    return {p: functools.partial(hf_tensors.put, read, hf_tensors.get_leaf(targets, p)) for p, read in leaves}
  return Checkpoint(step, path, open_)


def from_checkpoints(paths: list[str], dtype: str) -> list[Checkpoint]:
  """--checkpoints=P1,...: steps 0 .. n-1, the last theta_final; every path and shape checked first."""
  paths = [p for p in paths if p]
  if len(paths) < 3:
    raise errors.UserError(f"--checkpoints: a trajectory plane needs at least 3 checkpoints, got {len(paths)}.")
  for p in paths:
    if not os.path.exists(p) and not os.path.exists(loader.resolve(p, weights=False)):
      raise errors.MissingFileError(f"--checkpoints: {p}: no such file or directory.")
  want = model.param_shapes(loader.load_config(loader.resolve(paths[-1], weights=False)))
  for p in paths[:-1]:
    got = model.param_shapes(loader.load_config(loader.resolve(p, weights=False)))
    if got != want:
      bad = next(k for k in sorted(set(want) | set(got), key=str) if got.get(k) != want.get(k))
      raise errors.UserError(f"--checkpoints: {p} has other shapes than the last checkpoint {paths[-1]} "
                             f"(at {bad!r}: {got.get(bad)} vs {want.get(bad)}); a trajectory is one model's.")
  return [_checkpoint_file(p, dtype, i) for i, p in enumerate(paths)]


def from_finetune(workdir: str, dtype: str, mesh, only: tuple[int, ...] = ()) -> tuple[list[Checkpoint], str]:
  """--finetune=FT: its trajectory/step_*.safetensors in step order (step 0: the start; `only`
  those steps, when given), then FT/model (theta_final, the landscape's centre) in place of the
  last step's file; -> (the checkpoints, FT/model)."""
  ft = rundir.read_json(os.path.join(workdir, "run_config.json"))
  summary = rundir.read_json(os.path.join(workdir, "summary.json"))
  if ft is None or summary is None or not summary.get("complete"):
    raise errors.UserError(f"--finetune={workdir}: expected a complete `visage-jax finetune` run "
                           "(run_config.json and summary.json with complete=true).")
  final = os.path.join(workdir, "model")
  if not os.path.isdir(final):
    raise errors.MissingFileError(f"--finetune={workdir}: {final} is missing (the fine-tune needs export.model=True).")
  files = {int(m.group(1)): f for f in glob.glob(os.path.join(workdir, finetune.TRAJECTORY_DIR, "step_*.safetensors"))
           if (m := _STEP_FILE.fullmatch(os.path.basename(f)))}
  steps = sorted(s for s in files if s < summary["step"])
  if only:
    missing = sorted(set(int(s) for s in only) - set(steps))
    if missing:
      raise errors.UserError(f"trajectory.steps: {workdir}/{finetune.TRAJECTORY_DIR}/ has no checkpoint of step(s) "
                             f"{', '.join(map(str, missing))} before the last step {summary['step']} (saved: "
                             f"{', '.join(map(str, steps))}).")
    steps = sorted(set(int(s) for s in only))
  if len(steps) + 1 < 3:
    raise errors.UserError(f"--finetune={workdir}: a trajectory plane needs at least 3 checkpoints, found "
                           f"{len(steps) + 1} (train.trajectory_every > 0 saves them under "
                           f"{finetune.TRAJECTORY_DIR}/).")
  base = pipeline.load_model(ft["model"]["path"], dtype, ft["model"]["lora_path"], mesh=mesh)
  base_params = sharding.shard_params(base.params, mesh)
  if ft["lora"]["rank"] > 0:
    points = [_adapter_file(files[s], base_params, base.cfg, mesh, s) for s in steps]
  else:
    points = [_params_file(files[s], base.cfg, s) for s in steps]
  return points + [_checkpoint_file(final, dtype, int(summary["step"]))], final


# ------------------------------------------------------------------ the plane


def _leaf_deltas(opened: list[dict], paths: list) -> Callable:
  """The deltas theta_i - theta_final of one leaf at a time, float32 (theta_final's is zero)."""
  def walk():
    for p in paths:
      final = opened[-1][p]().astype(jnp.float32)
      yield [opened[i][p]().astype(jnp.float32) - final for i in range(len(opened) - 1)] + [jnp.zeros_like(final)]
  return walk


def compute_plane(points: list[Checkpoint], cfg: model.ModelConfig, mesh, margin: float) -> tuple[dict, list[dict]]:
  """(plane.json: PCA coefficients, explained variance, coordinates on the grid's axes, residual
  ratios and each axis's scale; [d1 * scale1, d2 * scale2], the directions the landscape imports)."""
  paths = hf_tensors.leaf_paths(cfg)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), model.param_shapes(cfg),
                          is_leaf=lambda s: isinstance(s, tuple))
  targets = sharding.param_shardings(abstract, mesh)
  with contextlib.ExitStack() as stack:
    walk = _leaf_deltas([c.open(stack, targets) for c in points], paths)
    pca = trajectory.plane(trajectory.gram(walk()))
    scale = np.abs(pca["coords"]).max(axis=0) * (1.0 + margin)
    dirs = []
    for k in range(2):
      d = {}
      for p, leaf in zip(paths, trajectory.component(pca["coefficients"][k], walk)):
        hf_tensors.set_leaf(d, p, leaf * np.float32(scale[k]))
      dirs.append(d)
  info = dict(steps=[c.step for c in points], labels=[c.label for c in points],
              coefficients=pca["coefficients"].tolist(), explained_variance=pca["explained_variance"].tolist(),
              coords=(pca["coords"] / scale).tolist(), scale=scale.tolist(),
              residual_ratio=pca["residual_ratio"].tolist())
  return info, dirs


def _corners(xs: np.ndarray, ys: np.ndarray, x: float, y: float) -> list[tuple[int, int, float]]:
  """The four grid corners (i, j, weight) whose bilinear blend is the surface at (x, y)."""
  i = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
  j = int(np.clip(np.searchsorted(ys, y) - 1, 0, len(ys) - 2))
  tx, ty = (x - xs[i]) / (xs[i + 1] - xs[i]), (y - ys[j]) / (ys[j + 1] - ys[j])
  return [(i, j, (1 - tx) * (1 - ty)), (i + 1, j, tx * (1 - ty)), (i, j + 1, (1 - tx) * ty), (i + 1, j + 1, tx * ty)]


def bilinear(xs: np.ndarray, ys: np.ndarray, z: np.ndarray, points: np.ndarray) -> np.ndarray:
  """z [X, Y, ...] on the grid xs x ys at `points` [n, 2] inside it, bilinearly (NaN where a corner is)."""
  return np.asarray([sum(w * np.asarray(z[i, j], np.float64) for i, j, w in _corners(xs, ys, x, y))
                     for x, y in np.asarray(points, np.float64)])


def gaps(xs: np.ndarray, ys: np.ndarray, grid: np.ndarray, own: np.ndarray, coords: np.ndarray, *,
         resamples: int, seed: int) -> dict:
  """How far the plane is from the checkpoints, per prompt and paired: grid [X, Y, N] and own [n, N]
  hold 1.0 / 0.0 per prompt (the same N prompts everywhere). The plane's value for prompt q is the
  bilinear blend of its four corners' verdicts, so (checkpoint - plane) is a mean over prompts, and
  its 95 % interval the percentile bootstrap over prompts (the landscape's ci95 streams)."""
  plane = bilinear(xs, ys, grid, coords)                      # [n, N]
  diff, n = 100.0 * (np.asarray(own, np.float64) - plane), own.shape[1]
  counts = uncertainty.resample_counts(uncertainty.resample_indices(n, resamples, seed), n)   # [B, N]
  lo, hi = uncertainty.interval(counts @ diff.T / n)          # over [B, n]
  own_lo, own_hi = uncertainty.interval(counts @ (100.0 * np.asarray(own, np.float64)).T / n)
  return dict(difference=diff.mean(axis=1).tolist(), difference_ci95=np.stack([lo, hi], -1).tolist(),
              checkpoint_ci95=np.stack([own_lo, own_hi], -1).tolist())


# ------------------------------------------------------------------ the run


def _config(c, path: str, labels: list[str], final: str):
  """The landscape the command runs: c's settings on the plane of imported directions centred at
  theta_final, the checkpoints recorded as part of the run's identity."""
  c = c.copy_and_resolve_references()
  if "trajectory" not in c:
    raise errors.UserError("the config has no `trajectory` section (start from runs/trajectory.default_config()).")
  with c.unlocked():
    c.model.update(path=final, lora_path="")
    c.landscape.update(vis_type="2D_random", multiplier=2.0, num_directions=1, extra_steps=0, refine=0,
                       directions_path=os.path.join(os.path.abspath(path), PLANE_FILE), save_directions=False,
                       orthogonalize=False)
    c.trajectory.checkpoints = tuple(labels)
  if not float(c.trajectory.margin) >= 0:
    raise errors.UserError(f"trajectory.margin must be >= 0, got {c.trajectory.margin}.")
  if int(c.landscape.steps) % 2:
    raise errors.UserError(f"landscape.steps must be even (theta_final at a grid point), got {c.landscape.steps}.")
  return c


def checkpoint_scorers(c, s: pipeline.Setup, path: str) -> tuple:
  """The scorers of what a checkpoint's own generations measure (ASR, coherent ASR: the
  reference stays the run's theta_final, as on the grid)."""
  return tuple(sc for sc in registry.scorers(c, s, path) if sc.curves and not sc.section and "params" not in sc.needs)


def run(c, path: str, *, finetune_dir: str = "", checkpoints: tuple[str, ...] = (), overwrite: bool = False,
        progress: bool = True) -> result.Result:
  """Runs (or resumes) the trajectory of a fine-tune workdir or of checkpoint paths (the last is
  theta_final) in workdir `path`; returns the record with its "trajectory" section."""
  if bool(finetune_dir) == bool(checkpoints):
    raise errors.UserError("trajectory needs exactly one of --finetune=FT_WORKDIR or --checkpoints=P1,P2,...")
  config_checks.validate(c)
  dtype, writer = c.model.dtype, distributed.is_writer()
  mesh = sharding.make_mesh(tuple(c.mesh.shape))
  if finetune_dir:
    points, final = from_finetune(finetune_dir, dtype, mesh, tuple(c.trajectory.get("steps", ())))
  else:
    points, final = from_checkpoints(list(checkpoints), dtype), checkpoints[-1]
  c = _config(c, path, [p.label for p in points], final)
  saved = rundir.read_json(os.path.join(path, "run_config.json"))
  fresh = saved is None or pipeline.comparable(saved) != pipeline.comparable(c.to_dict())
  pipeline.claim(path, c.to_dict(), overwrite, write=False)   # refused before anything is written
  info = None if fresh else rundir.read_json(os.path.join(path, PLANE_INFO))
  if info is None:
    cfg = loader.load_config(loader.resolve(final, weights=False), dtype)
    info, dirs = compute_plane(points, cfg, mesh, float(c.trajectory.margin))
    if writer:
      os.makedirs(path, exist_ok=True)
      for name in (POINTS_FILE, "trajectory.png"):
        if os.path.exists(os.path.join(path, name)):
          os.remove(os.path.join(path, name))
    vectors.save_safetensors(os.path.join(path, PLANE_FILE), dirs, cfg, write=writer)
    del dirs
    if writer:
      rundir.write_atomic(os.path.join(path, PLANE_INFO), json.dumps(info, indent=1))
    distributed.barrier("trajectory: plane written")
  record = landscape.run(c, path, overwrite=overwrite, progress=progress)
  lines = _checkpoint_lines(c, path, points, info, writer)
  record = record.with_trajectory(section(record, info, lines, path))
  if writer:
    record = record.write(path)
    markdown.rebuild(path, record)
  distributed.barrier("trajectory: results written")
  return record


def _checkpoint_lines(c, path: str, points: list[Checkpoint], info: dict, writer: bool) -> list[dict]:
  """trajectory.jsonl: each checkpoint decoded at its own weights (coefficients zero), scored as the
  grid is; resumed checkpoint by checkpoint."""
  out = rundir.JsonlAppender(os.path.join(path, POINTS_FILE), write=writer)
  lines = rundir.read_jsonl(out.path, repair=writer)
  done = {l["checkpoint"] for l in lines}
  if len(done) == len(points):
    return lines
  s = pipeline.prepare(c, path)
  scorers = checkpoint_scorers(c, s, path)
  targets = sharding.param_shardings(s.model.params, s.mesh)
  with out:
    for i, point in enumerate(points):
      if i in done:
        continue
      with contextlib.ExitStack() as stack:
        params = {}
        for p, read in point.open(stack, targets).items():
          hf_tensors.set_leaf(params, p, read().astype(s.model.cfg.param_dtype))
      here = dataclasses.replace(s, model=dataclasses.replace(s.model, params=params), coefs=np.zeros((1, 2)))
      got, extra = landscape.point_lines_with_overrefusal(here, scorers)
      keep = {k: v for k, v in got[0].items() if k not in ("direction", "step", "coords")}
      new = dict(checkpoint=i, step=point.step, label=point.label, coords=info["coords"][i], **keep)
      if extra:   # the safe prompts at the checkpoint, in overrefusal.jsonl's layout
        new.update(overrefusal=extra[0]["overrefusal"], overrefusal_outputs=extra[0]["outputs"])
      out.append([new])
      lines.append(new)
      del params, here
  return sorted(lines, key=lambda l: l["checkpoint"])


def section(record: result.Result, info: dict, lines: list[dict], path: str) -> dict:
  """landscape.json["trajectory"]: the plane, each curve at every checkpoint and on the plane, and
  (once the grid and every checkpoint are in) their paired difference with intervals."""
  n = len(info["steps"])
  names = [k for k in ("asr", "asr_coherent", "overrefusal") if k in record.curves]
  names += [k for l in lines[:1] for k in l if k not in names and k in record.curves]
  by = {l["checkpoint"]: l for l in lines}
  coords = np.asarray(info["coords"])
  finite = lambda v: None if v is None or not np.isfinite(v) else float(v)
  out = dict(steps=info["steps"], labels=info["labels"], coords=info["coords"], scale=info["scale"],
             explained_variance=info["explained_variance"], residual_ratio=info["residual_ratio"],
             checkpoint={k: [by[i].get(k) if i in by else None for i in range(n)] for k in names},
             plane={k: [finite(v) for v in bilinear(record.coords_x, record.coords_y, record.curves[k], coords)]
                    for k in names})
  if record.complete and len(by) == n:
    resamples, seed = int(record.setting("ci95.resamples", 1000)), int(record.setting("ci95.seed", 0))
    out["gap"] = {k: gaps(record.coords_x, record.coords_y, grid, own, coords, resamples=resamples, seed=seed)
                  for k, (grid, own) in _per_prompt(record, path, [by[i] for i in range(n)], names).items()}
  return out


def _per_prompt(record: result.Result, path: str, lines: list[dict], names: list[str]) -> dict:
  """curve name -> (grid [X, Y, N], checkpoints [n, N]): each prompt's 1.0 / 0.0 on the grid (from
  generations.jsonl or overrefusal.jsonl) and at each checkpoint (trajectory.jsonl)."""
  max_nll = record.max_nll if record.max_nll is not None else float("inf")
  max_rep = record.max_repetition if record.max_repetition is not None else float("inf")
  rules = dict(asr=("generations.jsonl", "outputs", lambda o: o["jailbroken"]),
               asr_coherent=("generations.jsonl", "outputs",
                             lambda o: coherence.coherent_jailbreak(o, max_nll, max_rep)),
               overrefusal=(pipeline.OVERREFUSAL_FILE, "overrefusal_outputs", lambda o: o["refusal"]))
  X, Y, read, out = len(record.coords_x), len(record.coords_y), {}, {}
  for name in (n for n in names if n in rules):
    file, key, verdict = rules[name]
    if file not in read:   # each grid file read once
      read[file] = rundir.read_jsonl(os.path.join(path, file), repair=False)
    n_prompts = len(read[file][0]["outputs"])
    grid = uncertainty.verdicts(read[file], 1, X * Y, n_prompts, verdict)[0].reshape(X, Y, n_prompts)
    out[name] = grid, np.asarray([[float(bool(verdict(o))) for o in l[key]] for l in lines])
  return out
