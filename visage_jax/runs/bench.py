"""Side-by-side benchmark: the reference method (transformers PyTorch) against our engine modes.

Every timed method does the same work: the same model, direction, grid, prompts and
max_new_tokens, decoded to fixed length (no early EOS, no refusal stop), on one
`pipeline.prepare` Setup. `default_real` is the landscape as users run it: every stage after
prepare (EOS + stop_at_refusal, scoring, generations.jsonl, landscape.json, landscape.png) in the
bench's temporary workdir (with several processes, a shared one next to the report, which process
0 alone writes); it does less work and is reported separately. Slow reference
methods are timed on a subset of grid points and extrapolated linearly (said in the JSON).
torch is imported only here: a benchmark/test dependency, never a runtime one.
"""

import contextlib
import dataclasses
import functools
import json
import os
import platform
import shutil
import tempfile
import time

import jax
import numpy as np

from visage_jax import distributed, engine, errors, model, planner, prompts, rundir, sharding
from visage_jax.checkpoints import hf_tensors, random_weights
from visage_jax.measures import registry
from visage_jax.runs import config_checks, landscape, pipeline

METHODS = ("reference_published", "reference_batched", "fused", "materialized", "continuous",
           "engine_real", "default_real")


class _CompileClock:
  """Sums XLA compile time reported by jax.monitoring while active.

  The listener is registered on enter and removed on exit: jax keeps listeners in a global list.
  """

  def __init__(self):
    self.seconds = 0.0

  def _listen(self, event, duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      self.seconds += duration

  def __enter__(self):
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


def load_setup(c, path: str) -> pipeline.Setup:
  """The landscape's own `prepare` in workdir `path`, for the config's 1D random grid with one
  direction (what every method decodes; load time reported separately). Rows are read as token
  ids, so a random: model is allowed."""
  c = c.copy_and_resolve_references()
  c.landscape.update(vis_type="1D_random", num_directions=1)
  config_checks.validate(c)
  return pipeline.prepare(c, path, text=False)


# ------------------------------------------------------------------ the reference (PyTorch)


def _torch_model(cfg: model.ModelConfig, dtype, device, pad_id: int):
  """transformers' own model of this architecture in `dtype` on `device` (weights loaded per point)."""
  import torch
  import transformers

  hf_cfg = dict(model.config_to_hf(cfg))
  hf_cfg.pop("rope_parameters", None)
  config = transformers.AutoConfig.for_model(**hf_cfg)
  with torch.device(device):
    net = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
  net.generation_config.eos_token_id = None  # fixed length: decode past EOS like the others
  net.generation_config.pad_token_id = pad_id
  return net


def _on_torch(leaf, device):
  """`leaf` as a torch tensor on `device`: a view of its buffer (dlpack) where it lies on one
  device, else a float32 host copy (to_host: every process, the leaf may span them)."""
  import torch

  if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) == 1:
    return torch.from_dlpack(leaf).to(device)
  return torch.from_numpy(np.asarray(sharding.to_host(leaf), np.float32)).to(device)


def torch_device() -> str:
  """Where the reference runs: the GPU when JAX runs on one, else the CPU."""
  return "cuda" if jax.devices()[0].platform == "gpu" else "cpu"


def run_reference(s: pipeline.Setup, *, batch_size: int, points: list[int], max_new_tokens: int,
                  dtype: str, n_prompts: int = 0):
  """The published loop on direction 0: per point, theta + alpha d in a float32 state_dict, loaded
  into transformers' model in `dtype` (on `torch_device()`), then `generate` in batches of
  `batch_size` over the first `n_prompts` prompts (0: all), after one untimed warm-up call.
  theta and d are read in place (views of our arrays). -> (tokens [points, prompts, new], load
  seconds, generate seconds)."""
  import torch

  torch_dtype, device = getattr(torch, dtype), torch.device(torch_device())
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  cfg, pad_id = s.model.cfg, s.prompts.pad_id
  ids_all = s.prompts.ids[:n_prompts or None]
  net = _torch_model(cfg, torch_dtype, device, pad_id)
  theta = hf_tensors.hf_views(s.model.params, cfg, lambda leaf: _on_torch(leaf, device))
  dirs = hf_tensors.hf_views(s.stacked, cfg, lambda leaf: _on_torch(leaf, device)[0, 0])
  if cfg.tie_word_embeddings:
    theta["lm_head.weight"], dirs["lm_head.weight"] = theta["model.embed_tokens.weight"], dirs["model.embed_tokens.weight"]

  def load(alpha):
    net.load_state_dict({k: (v.float() + alpha * dirs[k].float()).to(torch_dtype) for k, v in theta.items()})
    sync()

  def generate(rows, n_new):  # the same token ids as ours, left-padded
    ids, mask = prompts.left_pad(rows, max(map(len, rows)), pad_id)
    out = net.generate(input_ids=torch.from_numpy(ids).long().to(device),
                       attention_mask=torch.from_numpy(mask).long().to(device),
                       max_new_tokens=n_new, do_sample=False)
    return out[:, ids.shape[1]:].cpu().numpy()

  tokens = np.zeros((len(points), len(ids_all), max_new_tokens), np.int32)
  t_load, t_gen = 0.0, 0.0
  with torch.no_grad():
    load(float(s.xs[points[0]]))
    generate(ids_all[:batch_size], 2)  # warm-up: kernels chosen and loaded, not timed
    for i, p in enumerate(points):
      t0 = time.perf_counter()
      load(float(s.xs[p]))
      t1 = time.perf_counter()
      for start in range(0, len(ids_all), batch_size):
        tokens[i, start:start + batch_size] = generate(ids_all[start:start + batch_size], max_new_tokens)
      t_load, t_gen = t_load + (t1 - t0), t_gen + (time.perf_counter() - t1)
  return tokens, t_load, t_gen


# ------------------------------------------------------------------ ours


def run_fixed(s: pipeline.Setup, *, mode: str, points: list[int], batch: int = 0):
  """One engine mode at fixed length (no EOS or refusal stop) on the landscape's setup, in chunks of
  `batch` rows (0: the setup's). -> (tokens [points, prompts, new], wall, compile seconds)"""
  spec = dataclasses.replace(s.spec, stop_at_refusal=False, fixed_length=True)
  n_prompts = len(s.prompts.goals)
  out = np.full((s.n_points, n_prompts, spec.max_new_tokens), s.prompts.pad_id, np.int32)
  with _CompileClock() as clock:
    t0 = time.perf_counter()
    work = engine.Workload(s.model.params, s.model.cfg, s.stacked, s.coefs, s.prompts.tokens,
                           s.prompts.mask, s.tables, spec, points=points, mesh=s.mesh)
    for ch in engine.evaluate(work, mode=mode, max_batch=batch or s.batch):
      out[ch.points, ch.prompts] = ch.tokens[0]
    wall = time.perf_counter() - t0
  return out[points], wall, clock.seconds


def run_engine(s: pipeline.Setup) -> tuple[int, float, float]:
  """The engine alone on the landscape's work (EOS and stop_at_refusal as configured, every
  point), its chunks dropped: what default_real costs without text, scoring and files."""
  with _CompileClock() as clock:
    t0, tokens = time.perf_counter(), 0
    work = engine.Workload(s.model.params, s.model.cfg, s.stacked, s.coefs, s.prompts.tokens,
                           s.prompts.mask, s.tables, s.spec, points=list(range(s.n_points)), mesh=s.mesh)
    for ch in engine.evaluate(work, mode=s.mode, max_batch=s.batch, refill_every=s.c.engine.refill_every):
      tokens += int(np.asarray(ch.length).sum())
    wall = time.perf_counter() - t0
  return tokens, wall, clock.seconds


def run_real(s: pipeline.Setup, path: str) -> tuple[int, float, float]:
  """The landscape as users run it, every stage after prepare (decode, the configured scorers,
  files) in `path`: (generated tokens, wall, compile seconds)."""
  with _CompileClock() as clock:
    t0 = time.perf_counter()
    result = landscape.execute(s, path, registry.scorers(s.c, s, path), progress=False)
    wall = time.perf_counter() - t0
  return result.section("generated_tokens"), wall, clock.seconds


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.mean(a == b))


def run(c, out_path: str, log=print) -> dict:
  """Times every method in c.bench.methods; writes and returns the JSON report."""
  for m in c.bench.methods:
    if m not in METHODS:
      raise errors.UserError(f"bench.methods: {m!r} is not one of {', '.join(METHODS)}.")
  if random_weights.is_random(c.model.path) and "default_real" in c.bench.methods:
    raise errors.UserError(f"bench.methods: default_real scores text, and model.path {c.model.path!r} "
                           "has no tokenizer; leave default_real out.")
  with scratch(out_path) as path:
    t0 = time.perf_counter()
    s = load_setup(c, path)
    load_seconds = time.perf_counter() - t0
    report = _run_methods(c, s, path, load_seconds, log)
  if distributed.is_writer():
    rundir.write_atomic(out_path, json.dumps(report, indent=1))
  distributed.barrier("bench: report written")
  return report


@contextlib.contextmanager
def scratch(out_path: str):
  """The landscape workdir the bench times in: a temporary directory, or with several processes
  one they all see, next to `out_path` (process 0 makes it empty and removes it)."""
  if jax.process_count() == 1:
    with tempfile.TemporaryDirectory(prefix="visage_bench_") as path:
      yield path
    return
  path = os.path.join(os.path.dirname(os.path.abspath(out_path)), f".{os.path.basename(out_path)}.bench")
  if distributed.is_writer():
    shutil.rmtree(path, ignore_errors=True)
  distributed.barrier("bench: scratch cleared")
  try:
    yield path
  finally:
    distributed.barrier("bench: scratch done")
    if distributed.is_writer():
      shutil.rmtree(path, ignore_errors=True)


def _run_methods(c, s: pipeline.Setup, path: str, load_seconds: float, log) -> dict:
  """The report: each method of c.bench.methods timed on the setup, in that order."""
  n_points, n_prompts, n_new = s.n_points, len(s.prompts.goals), s.spec.max_new_tokens
  ref_points = subset(n_points, c.bench.reference_points)
  our_points = sorted(set(subset(n_points, c.bench.our_points)) | set(ref_points))
  report = dict(
      machine=dict(platform=jax.devices()[0].platform, device=str(jax.devices()[0].device_kind),
                   cpu_count=os.cpu_count(), python=platform.python_version(), jax=jax.__version__),
      model=s.model.path, points=n_points, prompts=n_prompts, max_new_tokens=n_new,
      work_generated_tokens=n_points * n_prompts * n_new, load_seconds=round(load_seconds, 2), methods={},
      batch=s.batch)
  tokens_by_method = {}
  floor_of = functools.partial(roofline, s)

  def record(name, wall, compile_s, tokens_done, extrapolated_from=None, **extra):
    scale = n_points / len(extrapolated_from) if extrapolated_from else 1.0
    entry = dict(wall_seconds=round(wall * scale, 3), compile_seconds=round(compile_s, 3),
                 generated_tokens_per_second=round(tokens_done / max(wall, 1e-9), 2),
                 extrapolated=bool(extrapolated_from), **extra)
    if extrapolated_from:
      entry["measured_points"] = extrapolated_from
      entry["measured_wall_seconds"] = round(wall, 3)
    report["methods"][name] = entry
    log(f"{name}: {entry}")

  for name in c.bench.methods:
    if name in ("reference_published", "reference_batched"):
      batch = 4 if name == "reference_published" else n_prompts
      dtype = "float32" if name == "reference_published" or jax.devices()[0].platform == "cpu" else "bfloat16"
      toks, t_load, t_gen = run_reference(s, batch_size=batch, points=ref_points, max_new_tokens=n_new,
                                          dtype=dtype)
      import torch
      report["machine"]["torch_threads"] = torch.get_num_threads()
      tokens_by_method[name] = (ref_points, toks)
      record(name, t_load + t_gen, 0.0, len(ref_points) * n_prompts * n_new,
             extrapolated_from=ref_points if len(ref_points) < n_points else None,
             batch_size=batch, dtype=dtype, reload_seconds=round(t_load, 3),
             roofline=floor_of("materialized", batch, len(ref_points), t_gen, dtype))
    elif name in ("default_real", "engine_real"):  # real work varies per point: never extrapolated
      if c.engine.mode == "auto":
        report["auto_mode"] = dict(mode=s.mode, reason=s.mode_reason)
      done, wall, comp = run_engine(s) if name == "engine_real" else run_real(s, path)
      record(name, wall - comp, comp, done, mode=s.mode, generated_tokens=done, equal_work=False,
             wall_seconds_including_compile=round(wall, 3))
    else:
      toks, wall, comp = run_fixed(s, mode=name, points=our_points)
      tokens_by_method[name] = (our_points, toks)
      done = len(our_points) * n_prompts * n_new
      record(name, wall - comp, comp, done,
             extrapolated_from=our_points if len(our_points) < n_points else None,
             mode=name, generated_tokens=done, equal_work=True, wall_seconds_including_compile=round(wall, 3),
             roofline=floor_of(name, s.batch, len(our_points), wall - comp, s.model.cfg.param_dtype))

  _compare(report, tokens_by_method, s.xs)
  _overhead(report)
  return report


def _overhead(report: dict) -> None:
  """What the landscape's host work (text, scorers, files) adds to the engine alone."""
  m = report["methods"]
  if "default_real" in m and "engine_real" in m:
    report["command_overhead_vs_engine"] = round(
        m["default_real"]["wall_seconds"] / max(m["engine_real"]["wall_seconds"], 1e-9) - 1, 4)


def roofline(s: pipeline.Setup, mode: str, batch: int, n_pts: int, decode_wall: float, dtype) -> dict:
  """Per-step floor (planner.step_roofline) at the mean cache length, the fraction of it achieved,
  and of the memory-bandwidth roofline (the step's bytes over its time, against the peak)."""
  n_prompts, n_new = len(s.prompts.goals), s.spec.max_new_tokens
  cfg = dataclasses.replace(s.model.cfg, param_dtype=str(dtype), dtype=str(dtype))
  if mode == "materialized":
    batch = min(batch, n_prompts)
    steps = n_pts * -(-n_prompts // batch) * n_new
  else:
    steps = -(-(n_pts * n_prompts) // batch) * n_new
  r = planner.step_roofline(cfg, mode=mode, batch=batch, cache_len=s.prompts.tokens.shape[1] + n_new // 2)
  if r["floor_seconds_per_step"] is None:
    return dict(r, batch=batch, decode_steps=steps, peaks=f"none for {planner.device_kind()!r}")
  floor = r["floor_seconds_per_step"] * steps
  bandwidth = r["bytes_per_step"] * steps / max(decode_wall, 1e-9)
  return dict(r, batch=batch, decode_steps=steps, floor_seconds=round(floor, 3),
              fraction_of_floor=round(floor / max(decode_wall, 1e-9), 4),
              bandwidth_fraction=round(bandwidth / r["peak_bandwidth"], 4),
              peaks="nominal, planner.DEVICE_PEAKS")


def _compare(report: dict, tokens_by_method: dict, alphas: np.ndarray) -> None:
  """Speedups against the references, and greedy-token agreement where both ran the same points."""
  ref_name = next((m for m in ("reference_batched", "reference_published") if m in tokens_by_method), None)
  for name, entry in report["methods"].items():
    for base in ("reference_published", "reference_batched"):
      if base in report["methods"]:
        entry[f"speedup_vs_{base}"] = round(report["methods"][base]["wall_seconds"] / max(entry["wall_seconds"], 1e-9), 2)
    if ref_name and name in tokens_by_method and name != ref_name:
      ref_pts, ref_toks = tokens_by_method[ref_name]
      pts, toks = tokens_by_method[name]
      if not set(ref_pts) <= set(pts):
        continue
      sel = [pts.index(p) for p in ref_pts]
      entry[f"token_agreement_vs_{ref_name}"] = round(_agreement(toks[sel], ref_toks), 4)
      entry[f"rows_that_differ_vs_{ref_name}"] = _differences(toks[sel], ref_toks, ref_pts, alphas)


def _differences(toks: np.ndarray, ref: np.ndarray, points: list[int], alphas: np.ndarray,
                 limit: int = 20) -> list[dict]:
  """Where greedy tokens part from the reference: per differing row, its point, alpha, prompt and
  the first differing position (a near-tie in the logits there; the rest of the row follows it)."""
  rows = []
  for i, p in enumerate(points):
    for j in np.flatnonzero((toks[i] != ref[i]).any(axis=-1)):
      rows.append(dict(point=int(p), alpha=round(float(alphas[p]), 4), prompt=int(j),
                       first_differing_token=int(np.argmax(toks[i, j] != ref[i, j]))))
  return rows[:limit]


def subset(n_points: int, k: int) -> list[int]:
  """k grid points spread over the grid (ends and centre included), or all when k <= 0."""
  if k <= 0 or k >= n_points:
    return list(range(n_points))
  return sorted({int(round(i)) for i in np.linspace(0, n_points - 1, k)})


def default_config():
  c = landscape.default_config()
  # reference_points / our_points: grid points timed for the reference methods / our fixed-length
  # modes (0 = all), extrapolated linearly to the full grid and flagged in the JSON.
  # kind: methods (this module) | protocol (bench_protocol: configs/bench_gpu.py).
  c.bench = dict(kind="methods", methods=METHODS, reference_points=3, our_points=0)
  return c


def table(report: dict) -> str:
  """The report as a markdown table (what BENCHMARKS.md and closing notes show)."""
  cols = ("wall_seconds", "compile_seconds", "generated_tokens_per_second", "speedup_vs_reference_published",
          "speedup_vs_reference_batched")
  head = "| method | " + " | ".join(cols) + " | tokens agree | notes |"
  rows = [head, "|" + "---|" * (len(cols) + 3)]
  for name, e in report["methods"].items():
    agree = next((f"{v:.4f}" for k, v in e.items() if k.startswith("token_agreement")), "")
    notes = []
    floor = e.get("roofline", {}).get("fraction_of_floor")
    if floor is not None:
      notes.append(f"{floor:.1%} of the {e['roofline']['bound']}-bound step floor")
    if e.get("extrapolated"):
      notes.append(f"extrapolated from points {e['measured_points']}")
    if "mode" in e:
      notes.append(f"mode {e['mode']}")
    if not e.get("equal_work", True):
      notes.append(f"EOS + stop_at_refusal: {e['generated_tokens']} tokens")
    rows.append(f"| {name} | " + " | ".join(str(e.get(c, "")) for c in cols) + f" | {agree} | {'; '.join(notes)} |")
  return "\n".join(rows)
