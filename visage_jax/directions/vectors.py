"""Perturbation directions as params-shaped pytrees: random (normalized per HF tensor) or interpolation.

Random directions follow the reference's `rand_norm_gaussian_like`: for every original
Hugging Face tensor theta_t, z ~ N(0, I) of the HF shape, d_t = z / |z| * |theta_t| ("layer"),
per output row ("filter", Li et al. 2018) or z / |z| ("none", the reference's unit direction);
blacklisted names (default "norm") get zeros. Each tensor's key is folded from the seed and
its HF name, so a direction does not depend on devices, sharding or tensor order.

Each device draws only its shards (partitionable threefry), and the norms are sums in one
order fixed by the tensor's shape (pairwise within 64 blocks, then over the block sums), so
the bits are the same on one device and on any mesh.
"""

import dataclasses
import functools
import math
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from visage_jax import errors, model, sharding
from visage_jax.checkpoints import hf_tensors, safetensors_file

NORMS = ("layer", "filter", "none")
_BLOCKS = 64  # partial sums per reduced axis; a "model" mesh axis dividing 64 keeps every block on one device


def _pairwise(x: jax.Array, axis: int) -> jax.Array:
  """Sums `axis` (kept, size 1) as a binary tree of adds fixed by the length alone."""
  while x.shape[axis] > 1:
    n = x.shape[axis]
    s = (jax.lax.slice_in_dim(x, 0, n - 1, stride=2, axis=axis)
         + jax.lax.slice_in_dim(x, 1, n, stride=2, axis=axis))
    x = jnp.concatenate([s, jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis) if n % 2 else s
  return x


def _unsharded(sharding, axis: int):
  """`sharding` with `axis` no longer split (None stays None: no constraint)."""
  if sharding is None:
    return None
  spec = list(sharding.spec) + [None] * (axis + 1 - len(sharding.spec))
  spec[axis] = None
  return NamedSharding(sharding.mesh, P(*spec))


def _ordered_sum(x: jax.Array, axis: int, sharding=None) -> jax.Array:
  """Sum over `axis` (kept) in one order on every mesh: pairwise inside `_BLOCKS` equal blocks (each
  held by one device when the axis is split evenly), then pairwise over the gathered block sums."""
  n, shape = x.shape[axis], x.shape
  nb = math.gcd(n, _BLOCKS)
  blocks = x.reshape(shape[:axis] + (nb, n // nb) + shape[axis + 1:])
  partial = _pairwise(blocks, axis + 1).reshape(shape[:axis] + (nb,) + shape[axis + 1:])
  if sharding is not None:
    partial = jax.lax.with_sharding_constraint(partial, _unsharded(sharding, axis))
  return _pairwise(partial, axis)


def _total(x: jax.Array, axes: tuple[int, ...], sharding=None) -> jax.Array:
  """`_ordered_sum` over several axes (kept), the last one first."""
  for axis in reversed(axes):
    x = _ordered_sum(x, axis, sharding)
    sharding = _unsharded(sharding, axis)
  return x


@functools.lru_cache(maxsize=None)
def _stage(fn, out_shardings, **static):
  """`fn` jitted once per static arguments and output sharding.

  The arithmetic runs in stages whose results are materialized: XLA may contract a multiply and
  an add into an FMA, or recompute a value inside several fusions, differently in programs that
  fuse differently, and a sharded program does. So no stage adds products it computed or
  recomputes an input (the draw is one elementwise chain per element), and every program does
  the same operations on the same values: the same bits on any mesh (tests/directions_test.py).
  """
  return jax.jit(functools.partial(fn, **static), out_shardings=out_shardings)


def _stacked(sharding, stacked: bool):
  """The NamedSharding of a leaf seen as a stack [L, ...] (None off a mesh)."""
  if not isinstance(sharding, NamedSharding):
    return None
  return sharding if stacked else NamedSharding(sharding.mesh, P(None, *sharding.spec))


def _draw(key_data, crcs, *, impl, hf_shape, transposed, stacked):
  """z ~ N(0, I) per HF tensor from fold_in(key, crc32(name)), drawn in the HF layout; partitionable
  threefry gives each device the bits of its own shard only."""
  key = jax.random.wrap_key_data(key_data, impl=impl)
  z = jax.vmap(lambda c: jax.random.normal(jax.random.fold_in(key, c), hf_shape, jnp.float32))(crcs)
  z = jnp.swapaxes(z, 1, 2) if transposed else z
  return z if stacked else z[0]


def _squares(z, theta):
  t = theta.astype(jnp.float32)
  return z * z, t * t


def _normalize(z, z_sq, t_sq, *, norm, transposed, black, stacked, sharding):
  """d = z / |z| * |theta| per HF tensor (or per output row, or unit), blacklisted tensors zero."""
  if not stacked:
    z, z_sq, t_sq = z[None], z_sq[None], t_sq[None]
  sharding = _stacked(sharding, stacked)
  if z.ndim == 2:  # stacked vectors: rows are the whole tensor
    d = z / jnp.sqrt(_total(z_sq, (1,), sharding))
    if norm != "none":
      d = d * jnp.sqrt(_total(t_sq, (1,), sharding))
  else:
    row, col = (2, 1) if transposed else (1, 2)  # HF rows are outputs
    axes = (col,) if norm == "filter" else (row, col)
    d = z / jnp.sqrt(_total(z_sq, axes, sharding))
    if norm != "none":
      d = d * jnp.sqrt(_total(t_sq, axes, sharding))
  d = jnp.where(jnp.asarray(black).reshape((-1,) + (1,) * (d.ndim - 1)), 0.0, d)
  return d if stacked else d[0]


def _zeros(*, shape, dtype):
  return jnp.zeros(shape, dtype)


def _cast(d, *, dtype):
  return d.astype(dtype)


def _in_dtype(d: jax.Array, dtype: str, where) -> jax.Array:
  """d in `dtype`, cast in place on its devices (a no-op when it already is)."""
  return d if d.dtype == jnp.dtype(dtype) else _stage(_cast, where, dtype=dtype)(d)


def _target_sharding(theta, sharding):
  if sharding is not None:
    return sharding
  if isinstance(theta, jax.Array):
    return theta.sharding
  return SingleDeviceSharding(jax.local_devices()[0])


def random_direction(seed: int | jax.Array, params: dict, cfg: model.ModelConfig, *,
                     norm: str = "layer", blacklist: tuple[str, ...] = ("norm",),
                     shardings: dict | None = None, dtype: str = "float32") -> dict:
  """One random direction (params-shaped), normalized per original HF tensor.

  Each leaf is drawn where it lives: in `shardings` (a params-shaped tree, e.g.
  `sharding.param_shardings(params, mesh)`), else in the params' own sharding; no device
  holds more than its shards. The bits are the same on every mesh and device count. The
  arithmetic is float32; each leaf is cast to `dtype` as soon as it is normalized, so a
  bfloat16 model never holds a whole float32 direction, only one float32 leaf (#16).
  """
  if norm not in NORMS:
    raise errors.UserError(f"landscape.norm {norm!r} is not one of {', '.join(NORMS)}.")
  key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
  impl = str(jax.random.key_impl(key))
  key_data = np.asarray(jax.random.key_data(key))
  out = {}
  for path, names in hf_tensors.hf_tensor_names(cfg).items():
    theta = hf_tensors.get_leaf(params, path)
    target = _target_sharding(theta, None if shardings is None else hf_tensors.get_leaf(shardings, path))
    black = tuple(any(b.lower() in n.lower() for b in blacklist) for n in names)
    if all(black):
      hf_tensors.set_leaf(out, path, _stage(_zeros, target, shape=tuple(theta.shape), dtype=dtype)())
      continue
    transposed, stacked = hf_tensors.HF_NAMES[path][1], hf_tensors.is_stacked(path)
    ours = tuple(theta.shape[1:] if stacked else theta.shape)
    crcs = np.array([zlib.crc32(n.encode()) for n in names], np.uint32)
    draw = _stage(_draw, target, impl=impl, hf_shape=ours[::-1] if transposed else ours,
                  transposed=transposed, stacked=stacked)
    hf_tensors.set_leaf(out, path, _normalized_leaf(draw(key_data, crcs), theta, target, path, black, norm, dtype))
  return out


def _normalized_leaf(z, theta, target, path, black, norm: str, dtype: str):
  """One leaf of a direction: `z` (float32, our layout; consumed) scaled per HF tensor as `norm`
  says, blacklisted tensors zero, cast to `dtype` once normalized (one float32 leaf at a time)."""
  transposed, stacked = hf_tensors.HF_NAMES[path][1], hf_tensors.is_stacked(path)
  z_sq, t_sq = _stage(_squares, target)(z, jax.device_put(theta, target))
  d = _stage(_normalize, target, norm=norm,
             transposed=transposed, black=black, stacked=stacked, sharding=target)(z, z_sq, t_sq)
  del z, z_sq, t_sq
  return _in_dtype(d, dtype, target)


def normalized_direction(raw: dict, params: dict, cfg: model.ModelConfig, *, norm: str = "layer",
                         blacklist: tuple[str, ...] = ("norm",), dtype: str = "float32") -> dict:
  """A params-shaped float32 tree (a gradient, say) made a direction by the rule random ones
  follow: each HF tensor rescaled to |theta_t| (`layer`), per output row (`filter`) or to unit
  norm (`none`), blacklisted tensors zero; so alpha means the same size along it."""
  if norm not in NORMS:
    raise errors.UserError(f"landscape.norm {norm!r} is not one of {', '.join(NORMS)}.")
  out = {}
  for path, names in hf_tensors.hf_tensor_names(cfg).items():
    theta, z = hf_tensors.get_leaf(params, path), hf_tensors.get_leaf(raw, path)
    target = _target_sharding(theta, None)
    black = tuple(any(b.lower() in n.lower() for b in blacklist) for n in names)
    if all(black):
      hf_tensors.set_leaf(out, path, _stage(_zeros, target, shape=tuple(theta.shape), dtype=dtype)())
      continue
    hf_tensors.set_leaf(out, path, _normalized_leaf(jax.device_put(z.astype(jnp.float32), target), theta,
                                                    target, path, black, norm, dtype))
  return out


def _products(a, b):
  return a * b, a * a, b * b


def _project(a, ab, aa, *, axes, sharding):
  dot, norm_a = _total(ab, axes, sharding), _total(aa, axes, sharding)
  return jnp.where(norm_a > 0, dot / jnp.where(norm_a > 0, norm_a, 1), 0) * a


def _subtract(b, proj):
  c = b - proj
  return c, c * c


def _rescale(c, c_sq, b_sq, *, axes, sharding):
  cn, bn = jnp.sqrt(_total(c_sq, axes, sharding)), jnp.sqrt(_total(b_sq, axes, sharding))
  return jnp.where(cn > 0, c / jnp.where(cn > 0, cn, 1) * bn, c)


def orthogonalize(d2: dict, d1: dict) -> dict:
  """d2 minus its projection on d1, per tensor, rescaled to d2's per-tensor norms; staged like the
  draw (`_stage`), so the bits are the same on any mesh."""
  def one(b, a):
    axes = tuple(range(1, a.ndim)) if a.ndim > 1 else (0,)
    where = a.sharding
    mesh_sharding = where if isinstance(where, NamedSharding) else None
    ab, aa, bb = _stage(_products, where)(a, b)
    proj = _stage(_project, where, axes=axes, sharding=mesh_sharding)(a, ab, aa)
    c, cc = _stage(_subtract, where)(b, proj)
    return _stage(_rescale, where, axes=axes, sharding=mesh_sharding)(c, cc, bb)
  return jax.tree.map(one, d2, d1)


def interpolation_direction(params_a: dict, params_b: dict, dtype: str = "float32") -> dict:
  """d = theta_B - theta_A, so alpha = 1 lands on B: taken in float32 and cast to `dtype` leaf by
  leaf (a bfloat16 model holds one float32 leaf of it at a time)."""
  return jax.tree.map(lambda a, b: (b.astype(jnp.float32) - a.astype(jnp.float32)).astype(dtype),
                      params_a, params_b)


def cast(direction: dict, dtype: str) -> dict:
  """A direction in `dtype` (the params'): what the engine adds to them."""
  return jax.tree.map(lambda d: _in_dtype(d, dtype, d.sharding), direction)


def check_matches(direction: dict, params: dict, what: str) -> None:
  """A direction tree must have the params' structure and shapes."""
  p_struct, d_struct = jax.tree.structure(params), jax.tree.structure(direction)
  if p_struct != d_struct:
    raise errors.UserError(f"{what}: direction tree {d_struct} does not match the model's params {p_struct}.")
  for path, p in traverse_util.flatten_dict(params).items():
    d = hf_tensors.get_leaf(direction, path)
    if p.shape != d.shape:
      raise errors.UserError(f"{what}: {'/'.join(path)} has shape {d.shape}, the model's is {p.shape}.")


def stack(directions: list[dict]) -> dict:
  """[dict] -> one tree with a leading axis (the vmap / perturbation-component axis)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *directions)


def _stack_grid(*parts, shape):
  return jnp.stack(parts).reshape(shape)


def stack_grouped(groups: list[list[dict]], mesh) -> dict:
  """[[d_c for c] for r] -> one tree of [R, C, ...] leaves, each stacked straight into its place
  on `mesh` (the params' rules, `sharding.param_shardings`).

  Consumes `groups`: each leaf leaves its direction as soon as it is stacked, so the directions
  are held once plus one stacked leaf, never twice (#16)."""
  flat = [d for comps in groups for d in comps]
  shape = (len(groups), len(groups[0]))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(shape + x.shape, x.dtype), flat[0])
  targets = sharding.param_shardings(abstract, mesh)
  out = {}
  for path, a in traverse_util.flatten_dict(abstract).items():
    parts = [hf_tensors.pop_leaf(d, path) for d in flat]
    hf_tensors.set_leaf(out, path, _stage(_stack_grid, hf_tensors.get_leaf(targets, path), shape=a.shape)(*parts))
    del parts
  return out


def save_safetensors(path: str, directions: list[dict], cfg: model.ModelConfig, write: bool = True) -> None:
  """float32, keys '<direction index>/<HF tensor name>', HF shapes; written atomically.

  Streamed one HF tensor at a time (gathered from every process when a direction spans several),
  so no host holds more than one tensor of it. Every process calls it; only `write` ones write.
  """
  entries = sorted(((f"{i}/{name}", np.float32, hf_shape, produce) for i, d in enumerate(directions)
                    for name, _, hf_shape, produce in hf_tensors.hf_entries(d, cfg)), key=lambda e: e[0])
  safetensors_file.write_streamed(path, entries, write=write, metadata={
      "count": str(len(directions)), "format": "visage_jax.directions"})


def load_safetensors(path: str, cfg: model.ModelConfig, count: int | None = None,
                     shardings=None, dtype: str = "float32") -> list[dict]:
  """Reads `save_safetensors` files (or any PyTorch tool writing the same keys); checks every tensor.

  With `shardings` (params-shaped), each leaf is placed there and every process reads only the
  blocks of its own shards (`safetensors_file.read_block`, as checkpoints are read), so no host
  holds a whole direction. Leaves are `dtype`, cast one tensor at a time as they are read.
  """
  if not os.path.exists(path):
    raise errors.MissingFileError(f"{path}: directions file not found.")
  entries = safetensors_file.read_header(path)
  tensors: dict[int, dict[str, tuple]] = {}   # direction index -> {HF name: entry}
  for key, entry in entries.items():
    index, _, name = key.partition("/")
    if index.isdigit():
      tensors.setdefault(int(index), {})[name] = entry
  indices = sorted(tensors)
  if not indices:
    raise errors.UserError(f"{path}: no tensors named '<direction index>/<HF tensor name>'.")
  if count is not None and len(indices) < count:
    raise errors.UserError(f"{path}: holds {len(indices)} direction(s), the landscape needs {count}.")
  as_read = dataclasses.replace(cfg, param_dtype=dtype)
  known = {n for names in hf_tensors.hf_tensor_names(cfg).values() for n in names}
  fd = os.open(path, os.O_RDONLY)
  try:
    out = []
    for i in indices[:count]:
      extra = set(tensors[i]) - known
      if extra:
        raise errors.UserError(f"{path}: direction {i} has tensors the model lacks: {sorted(extra)[:5]}.")
      block = lambda name, index, own=tensors[i], i=i: safetensors_file.read_block(
          fd, own[name], index, f"{path}: tensor {f'{i}/{name}'!r}")
      leaves = hf_tensors.leaf_readers(lambda name: block(name, ()), {n: e[1] for n, e in tensors[i].items()},
                                       as_read, f"{path} (direction {i})", get_block=block)
      out.append(hf_tensors.assemble(leaves, shardings))
  finally:
    os.close(fd)
  return out
