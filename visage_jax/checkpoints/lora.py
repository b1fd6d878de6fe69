"""LoRA adapters on the params tree: init, merge into theta, PEFT-named safetensors I/O.

Merged adapters are ordinary params, so a LoRA fine-tune is landscaped like any checkpoint
(landscape's `model.lora_path`); the shipped safety adapter of the demo is packaged data (visage_jax/data/).
"""

import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import errors, model, resources, rundir
from visage_jax.checkpoints import hf_tensors

LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALIGNED_SMOLLM2 = resources.path(resources.ALIGNED_SMOLLM2_LORA)
ALIGNED_SMOLLM2_V1 = resources.path(resources.ALIGNED_SMOLLM2_LORA_V1)
_PEFT_PREFIX = "base_model.model."


def init(key: jax.Array, params: dict, cfg: model.ModelConfig, rank: int,
              targets: tuple[str, ...]) -> dict:
  """{target: {"a": [L, in, r], "b": [L, r, out]}}: A uniform(±1/sqrt(in)) as PEFT, B zero."""
  if rank < 1:
    raise errors.UserError(f"lora.rank must be >= 1 for LoRA, got {rank}.")
  bad = [t for t in targets if t not in LINEAR_LEAVES]
  if bad or not targets:
    raise errors.UserError(f"lora.targets {tuple(targets)}: expected a non-empty subset of "
                     f"{', '.join(LINEAR_LEAVES)}.")
  lora = {}
  for t in targets:
    L, n_in, n_out = params["layers"][t].shape
    k = jax.random.fold_in(key, zlib.crc32(t.encode()))
    bound = 1.0 / np.sqrt(n_in)
    lora[t] = {"a": jax.random.uniform(k, (L, n_in, rank), jnp.float32, -bound, bound),
               "b": jnp.zeros((L, rank, n_out), jnp.float32)}
  return lora


def merge(params: dict, lora: dict, alpha: float, rank: int) -> dict:
  """theta + (alpha / rank) A B for each targeted leaf: a plain params tree for landscapes."""
  layers = dict(params["layers"])
  for t, ab in lora.items():
    if ab["a"].shape[-1] != rank:
      raise errors.UserError(f"LoRA {t}: A has rank {ab['a'].shape[-1]}, expected {rank}.")
    w = layers[t]
    delta = jnp.einsum("lir,lro->lio", ab["a"], ab["b"]) * (alpha / rank)
    layers[t] = (w.astype(jnp.float32) + delta).astype(w.dtype)
  return {**params, "layers": layers}


def save(path: str, lora: dict, cfg: model.ModelConfig, alpha: float) -> None:
  """PEFT tensor names and layout (lora_A [r, in], lora_B [out, r] per layer); rank, alpha, targets
  in the metadata."""
  from safetensors.numpy import save_file

  names = hf_tensors.hf_tensor_names(cfg)
  out = {}
  for t, ab in lora.items():
    a, b = np.asarray(jax.device_get(ab["a"])), np.asarray(jax.device_get(ab["b"]))
    for i, name in enumerate(names[("layers", t)]):
      base = _PEFT_PREFIX + name[:-len(".weight")]
      out[base + ".lora_A.weight"] = np.ascontiguousarray(a[i].T)
      out[base + ".lora_B.weight"] = np.ascontiguousarray(b[i].T)
  rank = next(iter(lora.values()))["a"].shape[-1]
  with rundir.atomic(path) as tmp:
    save_file(out, tmp, metadata=dict(rank=str(rank), alpha=repr(float(alpha)),
                                      targets=",".join(lora), format="pt"))


def load(path: str, cfg: model.ModelConfig) -> tuple[dict, float, int]:
  """-> (lora tree, alpha, rank) from a file written by save; shapes checked against cfg."""
  from safetensors import safe_open

  if not os.path.exists(path):
    raise errors.MissingFileError(f"{path}: LoRA adapter not found.")
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
    if not {"rank", "alpha", "targets"} <= set(meta):
      raise errors.UserError(f"{path}: metadata needs rank, alpha and targets; found {sorted(meta)}.")
    rank, alpha = int(meta["rank"]), float(meta["alpha"])
    names, shapes = hf_tensors.hf_tensor_names(cfg), model.param_shapes(cfg)["layers"]
    targets = meta["targets"].split(",")
    if set(targets) - set(LINEAR_LEAVES):
      raise errors.UserError(f"{path}: targets {targets}; expected names from {', '.join(LINEAR_LEAVES)}.")
    lora = {}
    for t in targets:
      _, n_in, n_out = shapes[t]
      a, b = [], []
      for name in names[("layers", t)]:
        base = _PEFT_PREFIX + name[:-len(".weight")]
        try:
          at, bt = f.get_tensor(base + ".lora_A.weight"), f.get_tensor(base + ".lora_B.weight")
        except Exception:
          raise errors.UserError(f"{path}: missing {base}.lora_A/B.weight for this model.") from None
        if at.shape != (rank, n_in) or bt.shape != (n_out, rank):
          raise errors.UserError(f"{path}: {base} LoRA shapes {at.shape}, {bt.shape}; expected "
                           f"{(rank, n_in)}, {(n_out, rank)}.")
        a.append(at.T)
        b.append(bt.T)
      lora[t] = {"a": jnp.asarray(np.stack(a), jnp.float32), "b": jnp.asarray(np.stack(b), jnp.float32)}
  return lora, alpha, rank


def apply_file(params: dict, cfg: model.ModelConfig, path: str) -> dict:
  """params with the adapter at `path` merged in (the landscape's model.lora_path)."""
  lora, alpha, rank = load(path, cfg)
  return merge(params, lora, alpha, rank)
