"""Perturbation directions as params-shaped pytrees: random (normalized per HF tensor) or interpolation.

Random directions follow the reference's `rand_norm_gaussian_like`: for every original
Hugging Face tensor theta_t, z ~ N(0, I) of the HF shape, d_t = z / |z| * |theta_t| ("layer"),
per output row ("filter", Li et al. 2018) or z / |z| ("none", the reference's unit direction);
blacklisted names (default "norm") get zeros. Each tensor's key is folded from the seed and
its HF name, so a direction does not depend on devices, sharding or tensor order.
"""

import dataclasses
import functools
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import checkpoints, model

NORMS = ("layer", "filter", "none")


def _name_key(key: jax.Array, name: str) -> jax.Array:
  return jax.random.fold_in(key, zlib.crc32(name.encode()))


@functools.partial(jax.jit, static_argnames=("shape", "norm", "transposed"))
def _draw_stack(keys, theta, *, shape, norm, transposed):
  """keys [L], theta [L, *ours] -> directions [L, *ours]; z is drawn in the HF layout."""
  def one(k, t):
    z = jax.random.normal(k, shape, jnp.float32)
    if transposed:
      z = z.T
    t = t.astype(jnp.float32)
    if norm == "filter" and z.ndim == 2:
      # HF rows are outputs: our axis -1 when transposed, axis 0 otherwise.
      axis = 0 if transposed else 1
      zn = jnp.linalg.norm(z, axis=axis, keepdims=True)
      return z / zn * jnp.linalg.norm(t, axis=axis, keepdims=True)
    z = z / jnp.linalg.norm(z)
    return z * jnp.linalg.norm(t) if norm in ("layer", "filter") else z
  return jax.vmap(one)(keys, theta)


def random_direction(seed: int | jax.Array, params: dict, cfg: model.ModelConfig, *,
                     norm: str = "layer", blacklist: tuple[str, ...] = ("norm",)) -> dict:
  """One random direction (float32, params-shaped), normalized per original HF tensor."""
  if norm not in NORMS:
    raise ValueError(f"landscape.norm {norm!r} is not one of {', '.join(NORMS)}.")
  key = jax.random.key(seed) if isinstance(seed, int) else seed
  home = jax.devices()[0]  # one device: reductions in one fixed order, whatever the mesh
  out = {}
  for path, names in checkpoints.hf_tensor_names(cfg).items():
    theta = jax.device_put(checkpoints.get_leaf(params, path), home)
    stacked = path[0] == "layers"
    theta_l = theta if stacked else theta[None]
    transposed = checkpoints.HF_NAMES[path][1]
    hf_shape = tuple(theta_l.shape[1:][::-1] if transposed else theta_l.shape[1:])
    keys = jnp.stack([_name_key(key, n) for n in names])
    d = _draw_stack(keys, theta_l, shape=hf_shape, norm=norm, transposed=transposed)
    black = np.array([any(b.lower() in n.lower() for b in blacklist) for n in names])
    if black.any():
      d = jnp.where(jnp.asarray(black).reshape((-1,) + (1,) * (d.ndim - 1)), 0.0, d)
    checkpoints._set_leaf(out, path, d if stacked else d[0])
  return out


def orthogonalize(d2: dict, d1: dict) -> dict:
  """d2 minus its projection on d1, per tensor, rescaled to d2's per-tensor norms."""
  def one(b, a):
    axes = tuple(range(1, a.ndim)) if a.ndim > 1 else None
    dot = jnp.sum(a * b, axis=axes, keepdims=True)
    aa = jnp.sum(a * a, axis=axes, keepdims=True)
    c = b - jnp.where(aa > 0, dot / jnp.where(aa > 0, aa, 1), 0) * a
    cn = jnp.sqrt(jnp.sum(c * c, axis=axes, keepdims=True))
    bn = jnp.sqrt(jnp.sum(b * b, axis=axes, keepdims=True))
    return jnp.where(cn > 0, c / jnp.where(cn > 0, cn, 1) * bn, c)
  return jax.tree.map(one, d2, d1)


def interpolation_direction(params_a: dict, params_b: dict) -> dict:
  """d = theta_B - theta_A (float32), so alpha = 1 lands on B."""
  return jax.tree.map(lambda a, b: b.astype(jnp.float32) - a.astype(jnp.float32), params_a, params_b)


def check_matches(direction: dict, params: dict, what: str) -> None:
  """A direction tree must have the params' structure and shapes."""
  p_struct, d_struct = jax.tree.structure(params), jax.tree.structure(direction)
  if p_struct != d_struct:
    raise ValueError(f"{what}: direction tree {d_struct} does not match the model's params {p_struct}.")
  for (path, p), d in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(direction)):
    if p.shape != d.shape:
      raise ValueError(f"{what}: {jax.tree_util.keystr(path)} has shape {d.shape}, the model's is {p.shape}.")


def stack(directions: list[dict]) -> dict:
  """[dict] -> one tree with a leading axis (the vmap / perturbation-component axis)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *directions)


def save_safetensors(path: str, directions: list[dict], cfg: model.ModelConfig) -> None:
  """float32, keys '<direction index>/<HF tensor name>', HF shapes; written atomically."""
  from safetensors.numpy import save_file

  tensors = {}
  for i, d in enumerate(directions):
    for name, t in checkpoints.to_hf_tensors(d, cfg).items():
      tensors[f"{i}/{name}"] = np.ascontiguousarray(t, np.float32)
  tmp = path + ".tmp"
  save_file(tensors, tmp, metadata={"format": "visage_jax.directions", "count": str(len(directions))})
  os.replace(tmp, path)


def load_safetensors(path: str, cfg: model.ModelConfig, count: int | None = None) -> list[dict]:
  """Reads `save_safetensors` files (or any PyTorch tool writing the same keys); checks every tensor."""
  from safetensors.numpy import load_file

  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: directions file not found.")
  try:
    tensors = load_file(path)
  except Exception as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e}).") from None
  indices = sorted({int(k.split("/", 1)[0]) for k in tensors if k.split("/", 1)[0].isdigit()})
  if not indices:
    raise ValueError(f"{path}: no tensors named '<direction index>/<HF tensor name>'.")
  if count is not None and len(indices) < count:
    raise ValueError(f"{path}: holds {len(indices)} direction(s), the landscape needs {count}.")
  f32 = dataclasses.replace(cfg, param_dtype="float32")
  out = []
  for i in indices[:count]:
    sub = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}/")}
    extra = set(sub) - {n for names in checkpoints.hf_tensor_names(cfg).values() for n in names}
    if extra:
      raise ValueError(f"{path}: direction {i} has tensors the model lacks: {sorted(extra)[:5]}.")
    out.append(checkpoints.from_hf_tensors(sub.__getitem__, set(sub), f32, source=f"{path} (direction {i})"))
  return out
