"""Memory per device before paying for a pod, and the time a decode step takes on it.

The package's one memory model: engine.choose_batch sizes chunks with it on the live device,
and `visage-jax plan` prints it for the paper's models on common accelerators. Its cost model
(choose_mode, step_roofline) predicts a decode step from nominal device peaks; the engine only
schedules. A slot is one decode row (a grid point and a prompt); fused decoding vmaps the R
directions over each row, so a fused slot holds R KV caches. Parameters follow sharding.PARAM_RULES on a (data, model)
mesh (a dimension that does not divide stays whole), the batch splits over data.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from visage_jax import errors, model, sharding

GB, GiB = 10**9, 2**30
HEADROOM = 0.7   # of the memory left after weights, given to slots; the rest covers XLA temporaries
CPU_BUDGET = 2 << 30   # CPU: compute-bound, bigger batches stop paying off (also capped at 64 rows)
MAX_SLOTS = 1024       # per device on an accelerator
MODES = ("fused", "materialized", "continuous")
UNKNOWN_DEVICE_MODE = "continuous"   # choose_mode's pick without peak figures; see there

# Nominal peak FLOP/s and memory bandwidth (bytes/s), matched on the device kind, for the cost model.
DEVICE_PEAKS = {
    "cpu": (1.0e11, 2.0e10),
    "H100": (9.89e14, 3.35e12),
    "H200": (9.89e14, 4.8e12),
    "A100": (3.12e14, 2.0e12),
    "TPU v4": (2.75e14, 1.2e12),
    "TPU v5 lite": (1.97e14, 8.2e11),
    "TPU v5p": (4.59e14, 2.76e12),
}


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str
  memory_bytes: int   # HBM per device as on the spec sheet (GPUs in GB, TPUs in GiB)


ACCELERATORS = {
    "h100": Accelerator("H100 80 GB", 80 * GB),
    "h200": Accelerator("H200 141 GB", 141 * GB),
    "a100": Accelerator("A100 80 GB", 80 * GB),
    "tpu_v4": Accelerator("TPU v4", 32 * GiB),
    "tpu_v5e": Accelerator("TPU v5e", 16 * GiB),
    "tpu_v5p": Accelerator("TPU v5p", 95 * GiB),
}

_LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                  num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                  max_position_embeddings=4096)

# The published config.json of each checkpoint (meta-llama/*, mistralai/*, lmsys/*), written out.
MODELS = {
    "llama2_7b": ("LLaMA-2-7B", model.ModelConfig(**_LLAMA2_7B)),
    "llama2_13b": ("LLaMA-2-13B", model.ModelConfig(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
        num_kv_heads=40, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096)),
    "llama2_70b": ("LLaMA-2-70B", model.ModelConfig(
        vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096)),
    "llama3_8b": ("LLaMA-3-8B", model.ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192)),
    "mistral_7b": ("Mistral-7B-v0.2", model.ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=32768, model_type="mistral")),
    "vicuna_7b": ("Vicuna-7B-v1.5", model.ModelConfig(**_LLAMA2_7B)),
}


def known_model(name: str, dtype: str = "bfloat16") -> model.ModelConfig:
  """A paper model's shape by name (llama2_7b, ...) in `dtype`, with no checkpoint at hand."""
  if name not in MODELS:
    raise errors.UserError(f"model {name!r} is not a known model; known: {', '.join(MODELS)} "
                     "(or give a local checkpoint path).")
  return dataclasses.replace(MODELS[name][1], dtype=dtype, param_dtype=dtype)


def accelerator(name: str) -> Accelerator:
  if name not in ACCELERATORS:
    raise errors.UserError(f"accelerator {name!r} is not known; known: {', '.join(ACCELERATORS)}.")
  return ACCELERATORS[name]


def _mesh_shape(mesh_shape) -> tuple[int, int]:
  shape = tuple(int(s) for s in mesh_shape)
  if len(shape) != 2 or min(shape) < 1:
    raise errors.UserError(f"mesh shape {mesh_shape} must be two positive ints (data, model).")
  return shape


def param_count(cfg: model.ModelConfig) -> int:
  return sum(math.prod(s) for s in jax.tree.leaves(model.param_shapes(cfg),
                                                    is_leaf=lambda x: isinstance(x, tuple)))


def params_per_device(cfg: model.ModelConfig, model_shards: int) -> int:
  """Parameters one device holds when the model axis has `model_shards` devices (PARAM_RULES)."""
  mesh = jax.sharding.AbstractMesh((1, int(model_shards)), sharding.AXES)
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), model.param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
  total = 0
  for leaf, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(sharding.param_shardings(shapes, mesh))):
    spec = tuple(s.spec) + (None,) * (len(leaf.shape) - len(s.spec))
    total += math.prod(dim // math.prod(mesh.shape[a] for a in _axes(ax))
                       for dim, ax in zip(leaf.shape, spec))
  return total


def _axes(entry) -> tuple:
  return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def _split(n: int, shards: int) -> int:
  """How many ways a dimension of size n splits over `shards` devices (whole when it does not divide)."""
  return shards if n % shards == 0 else 1


def kv_bytes_per_slot(cfg: model.ModelConfig, seq_len: int, model_shards: int = 1) -> int:
  """Keys and values of every layer for one row, split over model when the kv heads divide."""
  item = jnp.dtype(cfg.dtype).itemsize
  return 2 * cfg.num_layers * seq_len * cfg.num_kv_heads * cfg.head_dim * item // _split(
      cfg.num_kv_heads, model_shards)


def activation_bytes_per_slot(cfg: model.ModelConfig, prompt_len: int, seq_len: int,
                              model_shards: int = 1) -> int:
  """Prefill's largest float32 live values for one row: hidden states, MLP, logits, attention scores."""
  m = model_shards
  return (prompt_len * 4 * cfg.hidden_size * 4
          + prompt_len * 2 * cfg.intermediate_size * 4 // _split(cfg.intermediate_size, m)
          + cfg.vocab_size * 8 // _split(cfg.vocab_size, m)
          + cfg.num_heads * prompt_len * seq_len * 4 // _split(cfg.num_heads, m))


def slot_bytes(cfg: model.ModelConfig, prompt_len: int, max_new_tokens: int, *, n_directions: int = 1,
               mode: str = "fused", model_shards: int = 1) -> int:
  """Memory one decode row needs on a device: KV cache + activations, times R when fused."""
  if mode not in MODES:
    raise errors.UserError(f"engine.mode {mode!r} is not one of {', '.join(MODES)}.")
  seq = prompt_len + max_new_tokens
  per = (kv_bytes_per_slot(cfg, seq, model_shards)
         + activation_bytes_per_slot(cfg, prompt_len, seq, model_shards))
  return per * (n_directions if mode == "fused" else 1)


def plan(cfg: model.ModelConfig, memory_bytes: int, mesh_shape=(1, 1), *, prompt_len: int,
         max_new_tokens: int, n_directions: int = 1, n_components: int = 1,
         mode: str = "fused") -> dict:
  """Bytes per device and the batch that fits, for a landscape on a (data, model) mesh.

  Directions are R*C params-shaped trees in the params dtype; materialized mode also writes
  theta + alpha*d into one extra params-sized buffer. Slots share HEADROOM of what is left,
  at most MAX_SLOTS per device, as engine.choose_batch sizes a run.
  """
  data, shards = _mesh_shape(mesh_shape)
  item = jnp.dtype(cfg.param_dtype).itemsize
  params = params_per_device(cfg, shards) * item
  dirs = params * n_directions * n_components
  buffer = params if mode == "materialized" else 0
  fixed = params + dirs + buffer
  per_slot = slot_bytes(cfg, prompt_len, max_new_tokens, n_directions=n_directions, mode=mode,
                        model_shards=shards)
  free = memory_bytes - fixed
  slots = min(MAX_SLOTS, int(HEADROOM * free) // per_slot) if free > 0 else 0
  return dict(params=param_count(cfg), params_bytes=params, directions_bytes=dirs,
              buffer_bytes=buffer, kv_bytes_per_slot=kv_bytes_per_slot(cfg, prompt_len + max_new_tokens, shards),
              activation_bytes_per_slot=activation_bytes_per_slot(
                  cfg, prompt_len, prompt_len + max_new_tokens, shards),
              slot_bytes=per_slot, fixed_bytes=fixed, free_bytes=free, slots_per_device=slots,
              global_batch=slots * data, mesh=(data, shards), fits=slots > 0)


def min_model_shards(cfg: model.ModelConfig, memory_bytes: int, *, max_shards: int = 64, **kw) -> int | None:
  """The smallest power-of-two model axis on which one slot fits beside the weights (None: none)."""
  m = 1
  while m <= max_shards:
    if plan(cfg, memory_bytes, (1, m), **kw)["fits"]:
      return m
    m *= 2
  return None


def _gib(n: int, digits: int = 2) -> str:
  return f"{n / GiB:.{digits}f}"


def table(rows: list[dict]) -> str:
  """A markdown table of plan() rows, each with `model` and `accelerator` names (and `min_model`)."""
  cols = [("model", lambda r: r["model"]), ("accelerator", lambda r: r["accelerator"]),
          ("mesh", lambda r: "x".join(map(str, r["mesh"]))),
          ("params GiB", lambda r: _gib(r["params_bytes"])),
          ("directions GiB", lambda r: _gib(r["directions_bytes"]))]
  if any(r["buffer_bytes"] for r in rows):
    cols.append(("buffer GiB", lambda r: _gib(r["buffer_bytes"])))
  cols += [("KV/slot GiB", lambda r: _gib(r["kv_bytes_per_slot"], 3)),
           ("act/slot GiB", lambda r: _gib(r["activation_bytes_per_slot"], 3)),
           ("slots/device", lambda r: str(r["slots_per_device"]) if r["fits"] else "does not fit"),
           ("batch", lambda r: str(r["global_batch"]) if r["fits"] else "-")]
  if any("min_model" in r for r in rows):
    cols.append(("fits at model=", lambda r: str(r.get("min_model") or "> 64")))
  cells = [[name for name, _ in cols]] + [[f(r) for _, f in cols] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
  return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                   + [line(row) for row in cells[1:]])


def device_kind(device=None) -> str:
  device = device or jax.devices()[0]
  return "cpu" if device.platform == "cpu" else str(getattr(device, "device_kind", ""))


def device_peaks(device=None) -> tuple[float, float] | None:
  """(peak FLOP/s, bytes/s) of `device` (default: the first) from DEVICE_PEAKS; None if not listed."""
  kind = device_kind(device)
  if kind == "cpu":
    return DEVICE_PEAKS["cpu"]
  return next((peaks for name, peaks in DEVICE_PEAKS.items() if name.lower() in kind.lower()), None)


def choose_mode(cfg: model.ModelConfig, *, n_prompts: int, n_directions: int, batch: int,
                device=None, materialized_fits: bool = True) -> tuple[str, str]:
  """Roofline cost model of one decode step: materialized points vs rows fused across points.

  Per generated token a row costs 2*N FLOPs (4*N fused: x.W and x.D); a step reads the
  weights once (fused: weights + R directions). Materialized batches one point's prompts;
  fused batches `batch` rows of any points. The cheaper per-token time wins; fused runs
  as continuous batching (refilled slots), which only ever removes idle work. A device
  without peak figures gets UNKNOWN_DEVICE_MODE, continuous: decode is memory-bound on
  every accelerator listed, where the model picks it (named in the reason, not guessed).
  Materialized needs one more params-sized buffer: where it does not fit (`materialized_fits`
  False) the pick is continuous, the reason says why.
  """
  peaks = device_peaks(device)
  if peaks is None:
    return UNKNOWN_DEVICE_MODE, (f"unknown accelerator {device_kind(device)!r}: no peak figures in "
                                 f"planner.DEVICE_PEAKS; chose {UNKNOWN_DEVICE_MODE} by default "
                                 "(decode is memory-bound on every accelerator listed)")
  flops, bandwidth = peaks
  n = param_count(cfg)
  wbytes = n * jnp.dtype(cfg.param_dtype).itemsize
  b_mat = max(1, min(n_prompts, batch))
  t_mat = max(wbytes / bandwidth, 2 * n * b_mat / flops) / b_mat
  b_fus = max(1, batch)
  t_fus = max(wbytes * (1 + n_directions) / bandwidth, 4 * n * b_fus * n_directions / flops) / (b_fus * n_directions)
  if t_mat <= t_fus:
    why = (f"compute-bound: {t_mat * 1e3:.3f} ms/token materialized (batch {b_mat}) "
           f"<= {t_fus * 1e3:.3f} ms/token fused (batch {b_fus})")
    if materialized_fits:
      return "materialized", why
    return "continuous", f"{why}; but materialized's theta + alpha*d buffer does not fit"
  return "continuous", (f"memory-bound: {t_fus * 1e3:.3f} ms/token fused (batch {b_fus}) < "
                        f"{t_mat * 1e3:.3f} ms/token materialized (batch {b_mat})")


def step_roofline(cfg: model.ModelConfig, *, mode: str, batch: int, cache_len: int,
                  n_directions: int = 1, device=None) -> dict:
  """The floor of one decode step: bytes it must move and FLOPs it must do, over the device peaks.

  Weights are read once per step (fused/continuous also read the R directions); every row reads
  its KV cache (`cache_len` positions) and does 2*N FLOPs per linear pass (fused: x.W and x.D,
  4*N) plus attention. Prefill is not counted, so a run's achieved fraction is a lower bound.
  Without peak figures for the device, the peaks and the floor are None and the bound "unknown".
  """
  n = param_count(cfg)
  item = jnp.dtype(cfg.param_dtype).itemsize
  fused = mode != "materialized"
  rows = batch * (n_directions if fused else 1)
  weight_bytes = n * item * (1 + (n_directions if fused else 0))
  kv_bytes = rows * 2 * cfg.num_layers * cache_len * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  flops = rows * ((4 if fused else 2) * n + 4 * cfg.num_layers * cache_len * cfg.num_heads * cfg.head_dim)
  counts = dict(bytes_per_step=int(weight_bytes + kv_bytes), weight_bytes=int(weight_bytes),
                kv_cache_bytes=int(kv_bytes), flops_per_step=int(flops))
  peaks = device_peaks(device)
  if peaks is None:
    return dict(counts, peak_flops=None, peak_bandwidth=None, floor_seconds_per_step=None, bound="unknown")
  flops_peak, bandwidth = peaks
  t_mem, t_flop = (weight_bytes + kv_bytes) / bandwidth, flops / flops_peak
  return dict(counts, peak_flops=flops_peak, peak_bandwidth=bandwidth,
              floor_seconds_per_step=max(t_mem, t_flop), bound="memory" if t_mem >= t_flop else "compute")
