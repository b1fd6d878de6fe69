"""The 70B question before paying for it: which mesh a pod slice or a multi-GPU machine runs a
landscape on, what each chip holds, and how long the paper's protocol takes there.

planner's memory model (plan, min_model_shards) and cost model (choose_mode, step_roofline,
DEVICE_PEAKS) applied to every device of a pod; `visage-jax plan` prints pod_table.
"""

import dataclasses
import types

from visage_jax import model, planner


@dataclasses.dataclass(frozen=True)
class Pod:
  """A slice or a multi-GPU machine: `devices` JAX devices (chips) of one accelerator on `hosts`.

  Google names v4 and v5p slices by TensorCores, two per chip, and JAX sees one device per chip
  (megacore); v5e slices by chips, one TensorCore each. So v4-32 is 16 chips on 4 hosts, v5p-16
  is 8 chips on 2 hosts, v5e-64 is 64 chips on 16 hosts (4 chips per multi-host VM).
  """
  name: str
  accelerator: str   # key of planner.ACCELERATORS
  devices: int
  hosts: int
  device_kind: str   # as jax reports it, matched against planner.DEVICE_PEAKS


PODS = {
    "v4-32": Pod("TPU v4-32", "tpu_v4", 16, 4, "TPU v4"),
    "v5p-16": Pod("TPU v5p-16", "tpu_v5p", 8, 2, "TPU v5p"),
    "v5e-64": Pod("TPU v5e-64", "tpu_v5e", 64, 16, "TPU v5 lite"),
    "8xh100": Pod("8x H100", "h100", 8, 1, "NVIDIA H100 80GB HBM3"),
    "8xh200": Pod("8x H200", "h200", 8, 1, "NVIDIA H200"),
}
PAPER_1D = dict(n_points=21, n_prompts=80, max_new_tokens=512)   # Peng et al. 2024: 1D random
SAME = 0.01   # predictions within 1 % are a tie, won by the smaller model axis (less traffic)


def device(pod: Pod):
  """A stand-in for one of the pod's devices, for planner.device_peaks and choose_mode."""
  return types.SimpleNamespace(platform="pod", device_kind=pod.device_kind)


def predict_seconds(cfg: model.ModelConfig, mesh_shape, batch: int, *, mode: str, n_points: int,
                    n_prompts: int, prompt_len: int, max_new_tokens: int, n_directions: int = 1,
                    device=None) -> dict:
  """The roofline floor of a landscape decoded at fixed length on a (data, model) mesh.

  Chunks of `batch` rows (materialized: one point's prompts) each take max_new_tokens steps. A
  step moves and computes step_roofline's bytes and FLOPs for one data shard's rows at the mean
  cache length, spread over the model axis (the KV cache only when the kv heads divide it).
  Prefill, communication and early stops (EOS, refusals) are not counted.
  """
  data, m = (int(s) for s in mesh_shape)
  rows = min(batch, n_prompts) if mode == "materialized" else batch
  chunks = (n_points * -(-n_prompts // rows) if mode == "materialized"
            else -(-n_points * n_prompts // rows))
  r = planner.step_roofline(cfg, mode=mode, batch=-(-rows // data), cache_len=prompt_len + max_new_tokens // 2,
                            n_directions=n_directions, device=device)
  out = dict(mode=mode, rows_per_chunk=rows, chunks=chunks, steps=chunks * max_new_tokens,
             seconds_per_step=None, seconds=None, bound="unknown")
  if r["peak_flops"] is None:
    return out
  kv_split = m if cfg.num_kv_heads % m == 0 else 1
  t_mem = (r["weight_bytes"] / m + r["kv_cache_bytes"] / kv_split) / r["peak_bandwidth"]
  t_flop = r["flops_per_step"] / m / r["peak_flops"]
  step = max(t_mem, t_flop)
  return dict(out, seconds_per_step=step, seconds=step * out["steps"],
              bound="memory" if t_mem >= t_flop else "compute")


def plan_on_mesh(cfg: model.ModelConfig, pod: Pod, mesh_shape, *, n_points: int, n_prompts: int,
                 **kw) -> dict:
  """plan() on the mesh, the mode engine.mode=auto picks there (choose_mode on the global fused
  batch, as pipeline does; continuous when materialized's extra buffer does not fit) and the
  predicted time of the landscape."""
  mem = planner.ACCELERATORS[pod.accelerator].memory_bytes
  row = dict(planner.plan(cfg, mem, mesh_shape, **kw), pod=pod.name, devices=pod.devices,
             hosts=pod.hosts, memory_bytes=mem)
  if not row["fits"]:
    return row
  mat = planner.plan(cfg, mem, mesh_shape, **dict(kw, mode="materialized"))
  mode, why = planner.choose_mode(cfg, n_prompts=n_prompts, n_directions=kw.get("n_directions", 1),
                                  batch=row["global_batch"], device=device(pod), materialized_fits=mat["fits"])
  if mode == "materialized":
    row.update(mat)
  new = {k: kw[k] for k in ("prompt_len", "max_new_tokens", "n_directions") if k in kw}
  row.update(predict_seconds(cfg, mesh_shape, row["global_batch"], mode=mode, n_points=n_points,
                             n_prompts=n_prompts, device=device(pod), **new), mode_reason=why)
  return row


def plan_pod(cfg: model.ModelConfig, pod: Pod, **kw) -> dict:
  """The pod's row: every power-of-two model axis from planner.min_model_shards up (the smallest
  on which weights, directions and one slot fit), data = the rest; the fastest prediction wins."""
  mem = planner.ACCELERATORS[pod.accelerator].memory_bytes
  mem_kw = {k: v for k, v in kw.items() if k not in ("n_points", "n_prompts")}
  m = planner.min_model_shards(cfg, mem, max_shards=pod.devices, **mem_kw)
  best = dict(pod=pod.name, devices=pod.devices, hosts=pod.hosts, memory_bytes=mem, fits=False)
  while m is not None and m <= pod.devices and pod.devices % m == 0:
    row = plan_on_mesh(cfg, pod, (pod.devices // m, m), **kw)
    if row["fits"] and row["seconds"] is not None and (
        not best["fits"] or row["seconds"] < (1 - SAME) * best["seconds"]):
      best = row
    m *= 2
  return best


def pod_table(rows: list[dict]) -> str:
  """A markdown table of plan_pod() rows."""
  gib = lambda n, d=1: f"{n / planner.GiB:.{d}f}"
  used = lambda r: r["fixed_bytes"] + r["slots_per_device"] * r["slot_bytes"]
  cols = [("pod", lambda r: r["pod"]), ("chips (hosts)", lambda r: f"{r['devices']} ({r['hosts']})"),
          ("mesh", lambda r: "x".join(map(str, r["mesh"]))),
          ("params+dirs GiB/chip", lambda r: gib(r["params_bytes"] + r["directions_bytes"], 2)),
          ("used GiB/chip", lambda r: f"{gib(used(r))} of {gib(r['memory_bytes'])}"),
          ("slots/chip", lambda r: str(r["slots_per_device"])), ("batch", lambda r: str(r["global_batch"])),
          ("mode", lambda r: r["mode"]), ("chunks", lambda r: str(r["chunks"])),
          ("ms/step", lambda r: f"{r['seconds_per_step'] * 1e3:.1f}"),
          ("predicted floor", lambda r: f"{r['seconds'] / 60:.1f} min ({r['bound']}-bound)")]
  cells = [[n for n, _ in cols]] + [
      [f(r) for _, f in cols] if r["fits"] else
      [r["pod"], f"{r['devices']} ({r['hosts']})", "does not fit"] + [""] * (len(cols) - 3) for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
  return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                   + [line(row) for row in cells[1:]])


def pods_text(models, protocol: dict, **kw) -> str:
  """`visage-jax plan`'s pod section: models [(label, cfg)] on every pod, with its heading."""
  rows = [dict(plan_pod(cfg, pod, **kw, **protocol), pod=f"{label} on {pod.name}")
          for label, cfg in models for pod in PODS.values()]
  return (f"Pods (engine.mode=auto): {protocol['n_points']} points x {protocol['n_prompts']} prompts x "
          f"{kw['max_new_tokens']} tokens, every row decoded to the end; the mesh with the lowest "
          f"predicted floor (roofline of planner.DEVICE_PEAKS; prefill and communication not counted)\n"
          + pod_table(rows))
