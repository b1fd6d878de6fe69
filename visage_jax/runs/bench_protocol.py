"""The paper's protocol timed on one accelerator, ours beside the reference (configs/bench_gpu.py).

One setup (bench.load_setup: a random: model, prompts of the protocol's lengths, the grid, fixed
length: every row decodes max_new_tokens), measured in this order:
  1. the reference, in a child process that ends before this one touches the accelerator: as
     published (per point, the perturbed state dict loaded into transformers' model, `generate`
     greedy in batches of `reference_batch`, timed on `reference_prompts` prompts and scaled to
     all) and at its best (all prompts in one `generate` call);
  2. ours: the mode engine.mode=auto picks and the other one, each first on grid point 0
     (compiling), then, warm, on as many points as the rest of `budget_seconds` holds by that
     first measurement (at least `min_points`, at most the grid), spread over the grid.
JAX keeps the device memory it has allocated and our batch is sized on the memory free, so the
reference runs in its own process, where JAX allocates only what it holds (theta and d, read by
torch in place); torch and our modes each have the whole device. Speedups compare seconds per
grid point, compile excluded (it is reported, and in `protocol_seconds`).
"""

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from visage_jax import engine, errors, planner, pods, rundir
from visage_jax.runs import bench

OTHER_MODE = {"continuous": "materialized", "fused": "materialized", "materialized": "continuous"}
LIBRARIES = ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "ml_collections")


def default_config():
  """bench's settings, its `bench` section replaced by the protocol's (configs/bench_gpu.py sets
  the protocol's model and sizes)."""
  c = bench.default_config()
  c.landscape.update(vis_type="1D_random", save_directions=False)
  # budget_seconds: the whole call's wall time, loading included; margin_seconds of it are kept
  # for what the clock does not see (start, imports) and the end. reference_points: grid points
  # the reference decodes (the first ones of bench.subset), reference_prompts: prompts it times
  # as published, in batches of reference_batch, scaled to all.
  c.bench = dict(kind="protocol", budget_seconds=480, margin_seconds=45, min_points=3,
                 reference_points=1, reference_prompts=8, reference_batch=4)
  return c


def run(c, out_path: str, log=print) -> dict:
  """The reference (child process), then our two modes; writes and returns the JSON report."""
  t0 = time.perf_counter()
  ref, ref_tokens = reference_in_child(c, log)
  with bench.scratch(out_path) as path:
    t1 = time.perf_counter()
    s = bench.load_setup(c, path)
    load_seconds = time.perf_counter() - t1
    log(f"setup: {s.model.path} {s.model.cfg.param_dtype}, {s.n_points} points, {len(s.prompts.goals)} "
        f"prompts, batch {s.batch}, auto mode {s.mode} ({load_seconds:.1f} s)")
    report = _measure(c, s, ref, ref_tokens, t0, load_seconds, log)
  rundir.write_atomic(out_path, json.dumps(report, indent=1))
  return report


# ------------------------------------------------------------------ the reference (child process)


def reference_in_child(c, log) -> tuple[dict, np.ndarray | None]:
  """`reference(c)` in a fresh process (JAX's platform allocator: it frees what it drops). Its
  failure is reported, not raised: our modes are still measured."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, XLA_PYTHON_CLIENT_ALLOCATOR="platform",
             PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # the cache grows every step
  with tempfile.TemporaryDirectory(prefix="visage_reference_") as tmp:
    config, out = os.path.join(tmp, "config.json"), os.path.join(tmp, "reference")
    with open(config, "w") as f:
      f.write(c.to_json())
    t0 = time.perf_counter()
    try:
      proc = subprocess.run([sys.executable, "-m", __name__, config, out], env=env, capture_output=True,
                            text=True, timeout=c.bench.budget_seconds / 2)
      tail = proc.stderr.strip().splitlines()[-20:] or ["no output"]
      failure = None if proc.returncode == 0 else tail[-1]
    except subprocess.TimeoutExpired:
      tail, failure = [], f"did not finish in {c.bench.budget_seconds / 2:.0f} s"
    wall = time.perf_counter() - t0
    if failure:
      log("\n".join(tail + [f"reference: failed ({failure})"]))
      return dict(error=failure, wall_seconds=round(wall, 1)), None
    with open(out + ".json") as f:
      ref = dict(json.load(f), wall_seconds=round(wall, 1))
    log(f"reference: {ref}")
    return ref, np.load(out + ".npy")


def reference(c) -> tuple[dict, np.ndarray]:
  """The reference as published and batched on the setup's first `reference_points` points
  (per point, seconds scaled to all prompts) and the batched tokens [points, prompts, new]."""
  with tempfile.TemporaryDirectory(prefix="visage_reference_") as path:
    s = bench.load_setup(c, path)
    points = bench.subset(s.n_points, c.bench.reference_points)
    n_prompts, n_new = len(s.prompts.goals), s.spec.max_new_tokens
    out = dict(device=_device_name(bench.torch_device()), dtype=c.model.dtype, points=points)
    timed_as = dict(published=(c.bench.reference_batch, min(c.bench.reference_prompts, n_prompts)),
                    batched=(n_prompts, n_prompts))
    for name, (batch, timed) in timed_as.items():
      tokens, t_load, t_gen = bench.run_reference(s, batch_size=batch, points=points, max_new_tokens=n_new,
                                                  dtype=c.model.dtype, n_prompts=timed)
      per = len(points)
      out[name] = dict(batch_size=batch, prompts_timed=timed, reload_seconds=round(t_load / per, 3),
                       generate_seconds=round(t_gen / per, 3),
                       seconds_per_point=round((t_load + t_gen * n_prompts / timed) / per, 3))
  return out, tokens


def _device_name(device: str) -> str:
  import torch

  return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"


# ------------------------------------------------------------------ ours


def points_that_fit(seconds_left: float, seconds_per_point: float, n_points: int, minimum: int) -> int:
  """Grid points per mode the time left holds, at least `minimum` (and at most the grid)."""
  fit = int(seconds_left // max(seconds_per_point, 1e-9))
  return min(n_points, max(minimum, fit))


def _batch(c, s, mode: str) -> int:
  """The setup's batch for its own mode; for the other, what the memory model fits for it."""
  if mode == s.mode:
    return s.batch
  return c.engine.max_batch or engine.choose_batch(
      s.model.cfg, s.n_points * len(s.prompts.goals), s.prompts.tokens.shape[1], s.spec, n_directions=s.n_dirs,
      mode="materialized" if mode == "materialized" else "fused", mesh=s.mesh)


def _measure(c, s, ref: dict, ref_tokens, t0: float, load_seconds: float, log) -> dict:
  n_points, n_prompts, n_new = s.n_points, len(s.prompts.goals), s.spec.max_new_tokens
  modes = (s.mode, OTHER_MODE[s.mode])
  batches = {m: _batch(c, s, m) for m in modes}
  first = {}
  for m in modes:  # compiles; one point's decode predicts a point's time
    tokens, wall, compile_s = bench.run_fixed(s, mode=m, points=[0], batch=batches[m])
    first[m] = dict(wall=wall, compile=compile_s, tokens=tokens)
    log(f"{m}: first point {wall:.1f} s, {compile_s:.1f} s of it compiling")
  left = c.bench.budget_seconds - c.bench.margin_seconds - (time.perf_counter() - t0)
  k = points_that_fit(left, sum(f["wall"] - f["compile"] for f in first.values()), n_points,
                      c.bench.min_points)
  points = bench.subset(n_points, k)
  log(f"{left:.0f} s left: {k} points per mode, {points}")

  published = ref.get("published", {}).get("seconds_per_point")
  batched = ref.get("batched", {}).get("seconds_per_point")
  prompt_len = s.prompts.tokens.shape[1]
  entries = {}
  for m in modes:
    _, wall, compile_s = bench.run_fixed(s, mode=m, points=points, batch=batches[m])
    decode = wall - compile_s
    floor = bench.roofline(s, m, batches[m], k, decode, s.model.cfg.param_dtype)
    predicted = pods.predict_seconds(s.model.cfg, tuple(s.mesh.shape.values()), batches[m], mode=m,
                                     n_points=n_points, n_prompts=n_prompts, prompt_len=prompt_len,
                                     max_new_tokens=n_new)
    per_point = decode / k
    compile_all = first[m]["compile"] + compile_s
    entries[m] = dict(
        planned=m == s.mode, batch=floor["batch"], points=k, compile_seconds=round(compile_all, 3),
        decode_seconds=round(decode, 4), seconds_per_point=round(per_point, 4),
        tokens_per_second=round(k * n_prompts * n_new / max(decode, 1e-9), 2),
        step_seconds=round(decode / floor["decode_steps"], 6), decode_steps=floor["decode_steps"],
        bytes_per_step=floor["bytes_per_step"], roofline_fraction=floor.get("bandwidth_fraction"),
        fraction_of_step_floor=floor.get("fraction_of_floor"), bound=floor["bound"],
        first_point_seconds=round(first[m]["wall"], 3),
        protocol_seconds=round(compile_all + n_points * per_point, 1),
        speedup_vs_published=_ratio(published, per_point), speedup_vs_batched=_ratio(batched, per_point),
        token_agreement_vs_reference_batched=_agreement(first[m]["tokens"], ref_tokens, ref),
        predicted=dict(seconds_per_step=predicted["seconds_per_step"], bound=predicted["bound"],
                       seconds_per_point=predicted["seconds"] and predicted["seconds"] / n_points,
                       protocol_seconds=predicted["seconds"]))
    log(f"{m}: {entries[m]}")
  return dict(
      kind="protocol", device=planner.device_kind(), platform=jax.devices()[0].platform,
      versions=_versions(), model=s.model.path, dtype=s.model.cfg.param_dtype, params=planner.param_count(s.model.cfg),
      prompts=n_prompts, prompt_tokens=dict(shared_prefix=s.prompts.shared_prefix, padded=prompt_len,
                                            mean=round(float(np.mean([len(i) for i in s.prompts.ids])), 1)),
      max_new_tokens=n_new, grid_points=n_points, measured_points=points,
      budget_seconds=c.bench.budget_seconds, wall_seconds=round(time.perf_counter() - t0, 1),
      load_seconds=round(load_seconds, 2), planned_mode=s.mode, mode_reason=s.mode_reason, modes=entries,
      reference=ref, reference_published_seconds_per_point=published,
      reference_batched_seconds_per_point=batched,
      reference_protocol_seconds=dict(published=_times(published, n_points), batched=_times(batched, n_points)),
      plan=_plan(s, prompt_len, n_new))


def _ratio(a, b):
  return None if a is None or not b else round(a / b, 3)


def _times(a, n: int):
  return None if a is None else round(a * n, 1)


def _agreement(ours: np.ndarray, ref_tokens, ref: dict):
  """Greedy tokens equal to the batched reference's at point 0 (bfloat16 near-ties part them)."""
  if ref_tokens is None or ref.get("points", [None])[0] != 0:
    return None
  return round(float(np.mean(ours[0] == ref_tokens[0])), 4)


def _versions() -> dict:
  out = dict(python=platform.python_version())
  for name in LIBRARIES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _plan(s, prompt_len: int, n_new: int) -> dict:
  """What `visage-jax plan` predicts for this model on this accelerator (its spec-sheet memory)."""
  kind = planner.device_kind().lower()
  name = next((k for k, a in planner.ACCELERATORS.items() if a.name.split()[0].lower() in kind), None)
  command = (f"visage-jax plan --model={s.model.path} --dtype={s.model.cfg.param_dtype} --mesh=1,1 "
             f"--prompt_len={prompt_len} --max_new_tokens={n_new}" + (f" --accelerator={name}" if name else ""))
  if name is None:
    return dict(accelerator=None, command=command)
  row = planner.plan(s.model.cfg, planner.ACCELERATORS[name].memory_bytes, tuple(s.mesh.shape.values()),
                     prompt_len=prompt_len, max_new_tokens=n_new)
  return dict(accelerator=planner.ACCELERATORS[name].name, command=command, fits=row["fits"],
              batch=row["global_batch"], params_bytes=row["params_bytes"],
              directions_bytes=row["directions_bytes"], slot_bytes=row["slot_bytes"])


def summary(report: dict) -> str:
  """The report on one screen (what device_bench.sh writes beside the JSON)."""
  r = report
  lines = [f"{r['model']} ({r['dtype']}) on {r['device']}: {r['prompts']} prompts x {r['max_new_tokens']} new "
           f"tokens, grid of {r['grid_points']} points; {len(r['measured_points'])} points per mode, "
           f"{r['wall_seconds']:.0f} s (budget {r['budget_seconds']} s)",
           f"{'mode':<20}{'batch':>6}{'compile s':>11}{'s/point':>9}{'tokens/s':>10}{'ms/step':>9}"
           f"{'roofline':>9}{'floor s/pt':>11}{'vs published':>13}{'vs batched':>11}"]
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  for m, e in r["modes"].items():
    lines.append(f"{m + (' (auto)' if e['planned'] else ''):<20}{e['batch']:>6}{e['compile_seconds']:>11.1f}"
                 f"{e['seconds_per_point']:>9.2f}{e['tokens_per_second']:>10.0f}{e['step_seconds'] * 1e3:>9.2f}"
                 f"{fmt(e['roofline_fraction'], '.2f'):>9}{fmt(e['predicted']['seconds_per_point'], '.2f'):>11}"
                 f"{fmt(e['speedup_vs_published'], '.1f'):>13}{fmt(e['speedup_vs_batched'], '.1f'):>11}")
  ref = r["reference"]
  if "error" in ref:
    lines.append(f"reference: failed: {ref['error']}")
  else:
    pub, bat = ref["published"], ref["batched"]
    lines.append(f"reference as published: {pub['seconds_per_point']:.1f} s/point (batch {pub['batch_size']}, "
                 f"{pub['prompts_timed']} of {r['prompts']} prompts timed and scaled; reload {pub['reload_seconds']:.1f} s)")
    lines.append(f"reference batched: {bat['seconds_per_point']:.1f} s/point ({bat['batch_size']} prompts in one "
                 f"generate call), on {ref['device']}")
  planned = r["modes"][r["planned_mode"]]
  lines.append(f"the {r['grid_points']}-point protocol: {r['planned_mode']} {planned['protocol_seconds']:.0f} s "
               f"with compile (floor {fmt(planned['predicted']['protocol_seconds'], '.0f')} s); reference "
               f"{fmt(r['reference_protocol_seconds']['published'], '.0f')} s as published, "
               f"{fmt(r['reference_protocol_seconds']['batched'], '.0f')} s batched")
  lines.append(f"auto mode: {r['mode_reason']}")
  return "\n".join(lines)


def _main(argv: list[str]) -> None:
  """The child process: `python -m visage_jax.runs.bench_protocol CONFIG.json OUT` -> OUT.json, OUT.npy."""
  import ml_collections

  with open(argv[1]) as f:
    c = ml_collections.ConfigDict(json.load(f))
  out, tokens = reference(c)
  np.save(argv[2] + ".npy", tokens)
  with open(argv[2] + ".json", "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  try:
    _main(sys.argv)
  except errors.UserError as e:
    sys.exit(f"reference: {e}")
