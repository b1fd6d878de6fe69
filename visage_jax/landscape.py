"""One landscape run: grid, directions, chunks, resumable results in the workdir.

Workdir files: run_config.json (the resolved config; a different one is refused),
directions.safetensors, generations.jsonl (one line per (direction, grid point), appended
and fsynced as each point completes), landscape.json (rewritten atomically after every
chunk; `complete` turns true at the end) and landscape.png.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import (checkpoints, decode, directions, distributed, engine, errors, judges, lora,
                        planner, plotting, prompts, sharding, visage)

VIS_TYPES = ("1D_random", "1D_interpolation", "2D_random", "2D_interpolation", "2D_interpolation-random")
RUN_FILES = ("run_config.json", "directions.safetensors", "generations.jsonl", "landscape.json",
             "landscape.png")
_IGNORED_FOR_RESUME = (("engine", "max_batch"), ("engine", "refill_every"))
_IGNORED_SECTIONS = ("distributed",)  # how many processes compute a run does not change it


def _random_axis(steps: int, multiplier: float) -> np.ndarray:
  return np.linspace(-multiplier / 2, multiplier / 2, steps + 1)


def _interpolation_axis(steps: int, extra: int) -> np.ndarray:
  return np.linspace(-extra / steps, 1 + extra / steps, steps + 2 * extra + 1)


def grid_coords(vis_type: str, steps: int, multiplier: float = 1.0,
                extra_steps: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
  """The reference's `grid_coords`: x (and y) coordinates of the landscape."""
  if vis_type not in VIS_TYPES:
    raise errors.UserError(f"landscape.vis_type {vis_type!r} is not one of {', '.join(VIS_TYPES)}.")
  if int(steps) < 1:
    raise errors.UserError(f"landscape.steps must be >= 1, got {steps}.")
  if extra_steps < 0:
    raise errors.UserError(f"landscape.extra_steps must be >= 0, got {extra_steps}.")
  rand, interp = _random_axis(steps, multiplier), _interpolation_axis(steps, extra_steps)
  return {
      "1D_random": (rand, None),
      "1D_interpolation": (interp, None),
      "2D_random": (rand, rand),
      "2D_interpolation": (interp, interp),
      "2D_interpolation-random": (interp, rand),
  }[vis_type]


def grid_points(xs: np.ndarray, ys: np.ndarray | None) -> np.ndarray:
  """Perturbation coefficients [P, C]; point i*len(ys)+j is (xs[i], ys[j])."""
  if ys is None:
    return xs[:, None].astype(np.float64)
  return np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1).reshape(-1, 2)


# ------------------------------------------------------------------ files


def write_atomic(path: str, text: str) -> None:
  """Temp file, fsync, rename: a reader never sees half a file (also used by finetune)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def jsonable(obj):
  """ConfigDict.to_dict() output with tuples as lists, for JSON and comparisons."""
  if isinstance(obj, dict):
    return {k: jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  return obj


def _comparable(cfg_dict: dict) -> dict:
  out = json.loads(json.dumps(jsonable(cfg_dict)))
  for section, key in _IGNORED_FOR_RESUME:
    out.get(section, {}).pop(key, None)
  for section in _IGNORED_SECTIONS:
    out.pop(section, None)
  return out


def read_generations(path: str, repair: bool = True) -> list[dict]:
  """Completed lines; a torn last line (killed mid-write) is dropped (from the file if `repair`)."""
  if not os.path.exists(path):
    return []
  lines, good_bytes = [], 0
  with open(path, "rb") as f:
    for raw in f:
      try:
        lines.append(json.loads(raw))
      except json.JSONDecodeError:
        break
      if not raw.endswith(b"\n"):
        lines.pop()
        break
      good_bytes += len(raw)
  if repair and good_bytes != os.path.getsize(path):
    with open(path, "r+b") as f:
      f.truncate(good_bytes)
  return lines


def prepare_workdir(workdir: str, cfg_dict: dict, overwrite: bool, write: bool = True) -> None:
  """Creates the run dir or checks it belongs to the same config (else a clear refusal).

  `write=False` (processes other than the writer) only checks, so every process refuses alike.
  """
  saved_path = os.path.join(workdir, "run_config.json")
  if os.path.exists(saved_path):
    with open(saved_path) as f:
      saved = json.load(f)
    if _comparable(saved) != _comparable(cfg_dict):
      if not overwrite:
        a, b = _comparable(saved), _comparable(cfg_dict)
        diffs = [f"{s}.{k}: {a.get(s, {}).get(k)!r} -> {b.get(s, {}).get(k)!r}"
                 for s in sorted(set(a) | set(b)) for k in sorted(set(a.get(s, {})) | set(b.get(s, {})))
                 if a.get(s, {}).get(k) != b.get(s, {}).get(k)]
        raise errors.UserError(f"{workdir} holds a run with a different config ({'; '.join(diffs[:5])}); "
                         "use another --workdir, or --overwrite to discard it.")
      for name in RUN_FILES:
        p = os.path.join(workdir, name)
        if write and os.path.exists(p):
          os.remove(p)
  if write:
    os.makedirs(workdir, exist_ok=True)
    write_atomic(saved_path, json.dumps(jsonable(cfg_dict), indent=2))


def finished_result(workdir: str, cfg_dict: dict) -> dict | None:
  """landscape.json of a complete run of this config in `workdir`, else None: what resuming
  would leave unchanged (sweeps skip such runs without loading the model)."""
  try:
    with open(os.path.join(workdir, "run_config.json")) as f:
      saved = json.load(f)
    with open(os.path.join(workdir, "landscape.json")) as f:
      result = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  if _comparable(saved) != _comparable(cfg_dict) or not result.get("complete"):
    return None
  return result


# ------------------------------------------------------------------ the run


def validate(c) -> None:
  """Fails before any work on settings that cannot produce a landscape."""
  ls = c.landscape
  grid_coords(ls.vis_type, ls.steps, ls.multiplier, ls.get("extra_steps", 0))
  if ls.num_directions < 1:
    raise errors.UserError(f"landscape.num_directions must be >= 1, got {ls.num_directions}.")
  if ls.vis_type != "1D_random" and ls.num_directions != 1:
    raise errors.UserError(f"landscape.num_directions={ls.num_directions}: only 1D_random draws several "
                     f"directions; {ls.vis_type} uses exactly one (a line or a plane).")
  if "interpolation" in ls.vis_type and not ls.target_path:
    raise errors.UserError(f"{ls.vis_type} needs landscape.target_path (the checkpoint at alpha = 1).")
  if ls.vis_type == "2D_interpolation" and not ls.target2_path:
    raise errors.UserError("2D_interpolation needs landscape.target2_path (the third checkpoint).")
  if c.decode.max_new_tokens < 1:
    raise errors.UserError(f"decode.max_new_tokens must be >= 1, got {c.decode.max_new_tokens}.")
  if c.engine.mode not in ("auto",) + planner.MODES:
    raise errors.UserError(f"engine.mode {c.engine.mode!r} is not one of auto, {', '.join(planner.MODES)}.")


def build_directions(c, params, cfg, mesh=None) -> list[dict]:
  """The C components of the perturbation for each of R directions: [[d_c for c] for r].

  With a mesh, random directions are drawn straight into the params' sharding on it."""
  ls = c.landscape
  key = jax.random.key(ls.seed)
  blacklist = tuple(ls.blacklist)
  shardings = None if mesh is None else sharding.param_shardings(params, mesh)

  def rand(i):
    return directions.random_direction(jax.random.fold_in(key, i), params, cfg, norm=ls.norm,
                                       blacklist=blacklist, shardings=shardings)

  def interp(path):
    _, other = checkpoints.load_params(path, cfg.param_dtype)
    directions.check_matches(other, params, path)
    return directions.interpolation_direction(params, other)

  if ls.vis_type == "1D_random":
    return [[rand(i)] for i in range(ls.num_directions)]
  if ls.vis_type == "2D_random":
    d1, d2 = rand(0), rand(1)
    return [[d1, directions.orthogonalize(d2, d1) if ls.orthogonalize else d2]]
  if ls.vis_type == "1D_interpolation":
    return [[interp(ls.target_path)]]
  if ls.vis_type == "2D_interpolation":
    return [[interp(ls.target_path), interp(ls.target2_path)]]
  d1, d2 = interp(ls.target_path), rand(1)
  return [[d1, directions.orthogonalize(d2, d1) if ls.orthogonalize else d2]]


def _flatten(dirs: list[list[dict]]) -> list[dict]:
  return [d for comps in dirs for d in comps]


def _regroup(flat: list[dict], n_comp: int) -> list[list[dict]]:
  return [flat[i:i + n_comp] for i in range(0, len(flat), n_comp)]


def summarize(c, cfg_dict, xs, ys, lines: list[dict], n_prompts: int, n_dirs: int,
              model_path: str, extra: dict) -> dict:
  """landscape.json from the generation lines written so far."""
  n_points = len(xs) * (1 if ys is None else len(ys))
  asr = [[None] * n_points for _ in range(n_dirs)]
  bad = [[False] * n_points for _ in range(n_dirs)]
  for line in lines:
    asr[line["direction"]][line["step"]] = line["asr"]
    bad[line["direction"]][line["step"]] = line["nonfinite"]
  complete = all(v is not None for row in asr for v in row)
  disagreements = [dict(direction=l["direction"], step=l["step"], prompt=q)
                   for l in lines for q in l.get("judge_disagreements", [])]
  if ys is None:
    vis = visage.visage_directions(asr) if complete else None
  else:
    asr = np.asarray(asr[0], dtype=object).reshape(len(xs), len(ys)).tolist()
    bad = np.asarray(bad[0]).reshape(len(xs), len(ys)).tolist()
    vis = visage.visage_2d(asr) if complete else None
  out = dict(vis_type=c.landscape.vis_type, coords_x=list(map(float, xs)),
             coords_y=None if ys is None else list(map(float, ys)), asr=asr, visage=vis,
             nonfinite=bad, n_prompts=n_prompts, model=model_path, seed=c.landscape.seed,
             complete=complete, judge_disagreements=disagreements, config=jsonable(cfg_dict))
  out.update(extra)
  return out


def run(c, workdir: str, *, overwrite: bool = False, progress: bool = True) -> dict:
  """Runs (or resumes) the landscape described by config `c` in `workdir`; returns landscape.json."""
  validate(c)
  cfg_dict = c.to_dict()
  model_path = c.model.path or checkpoints.default_model_path()
  goals = prompts.load_goals(c.prompts.path, c.prompts.limit)  # fails before touching workdir
  writer = distributed.is_writer()
  mesh = sharding.make_mesh(tuple(c.mesh.shape))
  prepare_workdir(workdir, cfg_dict, overwrite, write=False)  # refuse early; write once inputs load

  t0 = time.time()
  cfg, params = checkpoints.load_params(model_path, c.model.dtype)
  if c.model.lora_path:
    params = lora.apply_file(params, cfg, c.model.lora_path)
  tok = checkpoints.load_tokenizer(model_path)
  if c.landscape.directions_path and not os.path.exists(c.landscape.directions_path):
    raise errors.MissingFileError(f"landscape.directions_path {c.landscape.directions_path!r}: "
                                  "no such file (expected a safetensors file from export-directions).")
  texts = [prompts.format_prompt(g, tok, c.prompts.template, c.prompts.system_prompt) for g in goals]
  ids = prompts.tokenize_prompts(texts, tok, c.prompts.template)
  pad_id = decode.pad_id_of(tok)
  tokens, mask, shared_prefix = prompts.pack(ids, pad_id)

  xs, ys = grid_coords(c.landscape.vis_type, c.landscape.steps, c.landscape.multiplier,
                       c.landscape.extra_steps)
  coefs = grid_points(xs, ys)
  n_comp = coefs.shape[1]
  dirs = _run_directions(c, workdir, cfg_dict, overwrite, params, cfg, n_comp, writer, mesh)
  gen_path = os.path.join(workdir, "generations.jsonl")
  lines = read_generations(gen_path, repair=writer)  # before any process can append
  for r, comps in enumerate(dirs):
    for d in comps:
      directions.check_matches(d, params, f"direction {r}")
  n_dirs = len(dirs)
  load_seconds = time.time() - t0

  dtype = jnp.dtype(cfg.param_dtype)
  stacked = directions.stack([directions.stack(comps) for comps in dirs])
  stacked = jax.tree.map(lambda x: x.astype(dtype), stacked)
  params = sharding.shard_params(params, mesh)
  stacked = sharding.shard_params(stacked, mesh)
  tables = judges.build_keyword_tables(tok, cfg.vocab_size)
  eos_ids = decode.eos_ids_of(tok)
  spec = decode.DecodeSpec(max_new_tokens=c.decode.max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                           stop_at_refusal=c.decode.stop_at_refusal, shared_prefix=shared_prefix)

  have = {(l["direction"], l["step"]) for l in lines}
  todo = [p for p in range(len(coefs)) if any((r, p) not in have for r in range(n_dirs))]
  batch = c.engine.max_batch or engine.choose_batch(
      cfg, len(coefs) * len(goals), tokens.shape[1], spec, n_directions=n_dirs, mode="fused", mesh=mesh)
  mode, why = c.engine.mode, "set in the config"
  if mode == "auto":
    mode, why = planner.choose_mode(cfg, n_prompts=len(goals), n_directions=n_dirs, batch=batch)
  extra = dict(mode=mode, mode_reason=why, batch=batch, load_seconds=round(load_seconds, 2),
               mesh=dict(shape=list(mesh.devices.shape), platform=mesh.devices.flat[0].platform,
                         processes=jax.process_count()))
  json_path = os.path.join(workdir, "landscape.json")

  def write_summary():
    result = summarize(c, cfg_dict, xs, ys, lines, len(goals), n_dirs, model_path, extra)
    if writer:
      write_atomic(json_path, json.dumps(result, indent=1))
    return result

  pending: dict[tuple[int, int], dict[int, dict]] = {}
  bar = _progress(len(todo) * len(goals) * n_dirs, enabled=progress and writer)
  t_decode, n_tokens = time.time(), 0
  work = engine.Workload(params, cfg, stacked, coefs, tokens, mask, tables, spec, points=todo, mesh=mesh)
  with open(gen_path if writer else os.devnull, "a") as out_file:
    for chunk in engine.evaluate(work, mode=mode, max_batch=batch, refill_every=c.engine.refill_every):
      for ri, r in enumerate(chunk.directions):
        for b in range(len(chunk.points)):
          p, q = int(chunk.points[b]), int(chunk.prompts[b])
          n = int(chunk.length[ri, b])
          ids_b = chunk.tokens[ri, b, :n].tolist()
          text = tok.decode(ids_b, skip_special_tokens=True)
          jailbroken = judges.is_jailbroken(text)
          refused_dev = bool(chunk.refused[ri, b])
          stopped = n < spec.max_new_tokens and (not ids_b or ids_b[-1] not in eos_ids)
          pending.setdefault((r, p), {})[q] = dict(
              prompt=goals[q], generation=text, jailbroken=jailbroken, tokens=n,
              truncated=bool(refused_dev and stopped), nonfinite=bool(chunk.nonfinite[ri, b]),
              agrees=refused_dev != jailbroken)
          n_tokens += n
        bar.update(len(chunk.points))
      for (r, p), outs in list(pending.items()):
        if len(outs) < len(goals):
          continue
        del pending[(r, p)]
        if (r, p) in have:
          continue
        ordered = [outs[q] for q in range(len(goals))]
        line = dict(direction=r, step=p, coords=list(map(float, coefs[p])),
                    asr=judges.attack_success_rate([o["jailbroken"] for o in ordered]),
                    nonfinite=any([o.pop("nonfinite") for o in ordered]),
                    judge_disagreements=[q for q, o in enumerate(ordered) if not o.pop("agrees")],
                    outputs=ordered)
        out_file.write(json.dumps(line) + "\n")
        lines.append(line)
        have.add((r, p))
      if writer:
        out_file.flush()
        os.fsync(out_file.fileno())
      elapsed = time.time() - t_decode
      extra.update(decode_seconds=round(elapsed, 2), generated_tokens=n_tokens,
                   tokens_per_second=round(n_tokens / max(elapsed, 1e-9), 1))
      bar.set_postfix(tok_s=f"{n_tokens / max(elapsed, 1e-9):.0f}")
      write_summary()
  bar.close()
  result = write_summary()
  if result["complete"] and writer:
    plotting.plot_landscape(result, os.path.join(workdir, "landscape.png"))
  distributed.barrier("landscape: results written")
  return result


def _run_directions(c, workdir: str, cfg_dict: dict, overwrite: bool, params, cfg, n_comp: int,
                    writer: bool, mesh=None) -> list[list[dict]]:
  """The workdir's directions when resuming; else drawn (or imported) and saved by the writer.

  The workdir is claimed (run_config.json written) only once the directions exist, so bad input
  leaves no files behind. With several processes every process then reads the writer's file
  back: all hold the same bits, and only the writer draws (or loads the interpolation targets).
  """
  dir_file = os.path.join(workdir, "directions.safetensors")
  fresh = writer and not (os.path.exists(dir_file) and saved_config(workdir) == _comparable(cfg_dict))
  dirs = None
  if fresh:
    if c.landscape.directions_path:
      n = c.landscape.num_directions * n_comp
      dirs = _regroup(directions.load_safetensors(c.landscape.directions_path, cfg, n), n_comp)
    else:
      dirs = build_directions(c, params, cfg, mesh if jax.process_count() == 1 else None)
  prepare_workdir(workdir, cfg_dict, overwrite, write=writer)
  if fresh:
    directions.save_safetensors(dir_file, _flatten(dirs), cfg)
  distributed.barrier("landscape: directions saved")
  if dirs is None or jax.process_count() > 1:
    dirs = _regroup(directions.load_safetensors(dir_file, cfg), n_comp)
  return dirs


def saved_config(workdir: str) -> dict | None:
  """The comparable run_config.json of `workdir`, or None when there is none."""
  try:
    with open(os.path.join(workdir, "run_config.json")) as f:
      return _comparable(json.load(f))
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _progress(total: int, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, unit="gen", desc="landscape", disable=not enabled, dynamic_ncols=True)


def default_config():
  """Every landscape setting with the paper's protocol as defaults; configs/ override fields."""
  import ml_collections

  c = ml_collections.ConfigDict()
  # HF directory, .gguf file or converted dir ("" = embedded SmolLM2); dtype of params and compute;
  # lora_path: a LoRA adapter (safetensors, PEFT names) merged into theta before anything else.
  c.model = dict(path="", dtype="float32", lora_path="")
  # CSV with a `goal` column or JSONL with `prompt` ("" = the packaged AdvBench, Zou et al. 2023);
  # first `limit` rows (paper: 80 AdvBench rows).
  # template: auto | raw | llama2 | vicuna | mistral | llama3; system_prompt: default | none |
  # llama2 | aoa | any text.
  c.prompts = dict(path="", limit=80, template="auto", system_prompt="default")
  # vis_type: 1D_random | 1D_interpolation | 2D_random | 2D_interpolation | 2D_interpolation-random.
  # Random axes: alpha in linspace(-multiplier/2, multiplier/2, steps+1); interpolation axes:
  # -extra_steps/steps .. 1+extra_steps/steps. norm: layer | filter | none; tensors whose HF
  # name contains a blacklist entry are not perturbed. target_path: the checkpoint at alpha=1
  # (interpolation), target2_path: the third one (2D_interpolation). directions_path: import
  # a safetensors file instead of drawing directions.
  c.landscape = dict(vis_type="1D_random", steps=20, multiplier=1.0, extra_steps=0, num_directions=1,
                     norm="layer", blacklist=("norm",), seed=0, orthogonalize=False,
                     directions_path="", target_path="", target2_path="")
  # Greedy decoding; stop_at_refusal ends a row at its first refusal keyword (ASR unchanged).
  c.decode = dict(max_new_tokens=512, stop_at_refusal=True)
  # mode: auto (cost model of the device) | fused (one theta, many points per batch) |
  # materialized (theta + alpha d per point) | continuous (fused, ended rows refilled every
  # refill_every steps); max_batch: decode rows per chunk or slots (0 = from the memory model).
  c.engine = dict(mode="auto", max_batch=0, refill_every=8)
  c.mesh = dict(shape=(1, 1))  # ("data", "model"); -1 = all remaining devices, e.g. (-1, 1)
  # Multi-process runs (every process runs the same command and config; process 0 writes the
  # files; the mesh must span all processes' devices, e.g. mesh.shape=(-1, 1)). Explicit:
  # coordinator_address "host:port" of process 0 with num_processes and this process's
  # process_id (e.g. several processes on one machine). Else auto: detect (jax's cluster
  # auto-detection when launched as an srun step of several tasks, by Open MPI, on a Cloud TPU
  # pod, or with JAX_COORDINATOR_ADDRESS or VISAGE_JAX_DISTRIBUTED=1 set) | always | never.
  # Not part of a run's identity: a run resumes with any number of processes.
  c.distributed = dict(coordinator_address="", num_processes=1, process_id=0, auto="detect",
                       initialization_timeout=300)
  return c


def paper_config(template: str, arg: str | None = None):
  """The paper's protocol for a 7B-class chat model (configs/<model>.py): 80 AdvBench goals,
  the model's template with its default system prompt, 21 points over [-0.5, 0.5], 512 tokens,
  bfloat16; arg '2d' = 2D random, 'interpolation' = base -> chat with 5 extra steps each side."""
  c = default_config()
  c.model.dtype = "bfloat16"
  c.prompts.update(limit=80, template=template, system_prompt="default")
  c.landscape.update(vis_type="1D_random", steps=20, multiplier=1.0)
  c.decode.max_new_tokens = 512
  if arg == "2d":
    c.landscape.vis_type = "2D_random"
  elif arg == "interpolation":
    c.landscape.update(vis_type="1D_interpolation", steps=20, extra_steps=5)
  elif arg:
    raise errors.UserError(f"unknown config argument {arg!r}: use 2d or interpolation")
  return c
