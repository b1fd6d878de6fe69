"""Mesh ("data", "model") and (regex, PartitionSpec) rules -> NamedSharding.

Megatron-style: q/k/v/gate/up split their output columns over "model", o/down their
input rows (one all-reduce per block), embeddings and the head split the vocabulary.
The decode batch splits over "data". A dimension that does not divide stays replicated.
"""

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from visage_jax import errors

AXES = ("data", "model")

# Rules match the leaf path ("layers", "q_proj") of the params tree joined as "layers/q_proj" (any
# tree: an optimizer state's leaf is "opt_state/0/mu/layers/q_proj"); the spec is for the leaf's
# own axes (leading stacked/direction axes are padded with None).
PARAM_RULES = (
    (r"layers/(q_proj|k_proj|v_proj|gate_proj|up_proj)$", P(None, "model")),
    (r"layers/(o_proj|down_proj)$", P("model", None)),
    (r"embed_tokens$", P("model", None)),
    (r"lm_head$", P(None, "model")),
    (r".*", P()),
)


def make_mesh(shape: tuple[int, int] = (1, 1), devices=None) -> Mesh:
  """A (data, model) mesh over the first data*model devices; -1 = all remaining devices.

  Devices are global (every process's), so with several processes the mesh must span all
  of them: data splits across processes, model stays within one when it fits.
  """
  devices = jax.devices() if devices is None else devices
  shape = tuple(int(s) for s in shape)
  if len(shape) != 2 or min(shape) < -1 or 0 in shape or shape.count(-1) > 1:
    raise errors.UserError(f"mesh.shape {shape} must be two positive ints (data, model), one of them "
                     "may be -1 (all remaining devices).")
  if -1 in shape:
    other = shape[0] * shape[1] * -1
    if len(devices) % other:
      raise errors.UserError(f"mesh.shape {shape}: {len(devices)} devices do not split into groups of {other}.")
    shape = tuple(len(devices) // other if s == -1 else s for s in shape)
  n = shape[0] * shape[1]
  if n > len(devices):
    raise errors.UserError(f"mesh.shape {shape} needs {n} devices; {len(devices)} available "
                     f"({devices[0].platform}).")
  if jax.process_count() > 1 and n != len(devices):
    raise errors.UserError(f"mesh.shape {shape} uses {n} of the {len(devices)} devices of "
                     f"{jax.process_count()} processes; a multi-process run needs a mesh over all of "
                     "them, e.g. mesh.shape=(-1, 1).")
  return Mesh(np.asarray(devices[:n]).reshape(shape), AXES)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Right-aligns a leaf spec to `shape` and drops axes that do not divide."""
  spec = tuple(spec)
  if len(spec) > len(shape):
    spec = spec[len(spec) - len(shape):]
  full = (None,) * (len(shape) - len(spec)) + spec
  return P(*[a if a is None or shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(full)])


def param_shardings(tree, mesh: Mesh, rules=PARAM_RULES):
  """NamedShardings for a params-shaped tree (also directions, with extra leading axes)."""
  def one(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    for pattern, spec in rules:
      if re.search(pattern, name):
        return NamedSharding(mesh, _fit(spec, leaf.shape, mesh))
    raise AssertionError(name)
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
  """Splits `axis` of a batch array over "data"."""
  spec = [None] * ndim
  spec[axis] = "data"
  return NamedSharding(mesh, P(*spec))


def fit(mesh: Mesh, shape: tuple[int, ...], *axes) -> NamedSharding:
  """NamedSharding of P(*axes) for an array of `shape`; axes the mesh does not divide stay whole."""
  return NamedSharding(mesh, _fit(P(*axes), shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put(tree, shardings):
  """jax.device_put of host values, also onto a mesh spanning several processes.

  There every process holds the same host value and fills only its own devices
  (jax.device_put would first all-gather each value to check that it is the same).
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(x, s):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, s)
    x = np.asarray(x)
    x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(one, tree, shardings)


def to_host(tree):
  """jax.device_get for arrays that may span processes: every process gets the whole value."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:   # a local copy is the whole value: no collective (one per decode step)
        return jax.device_get(x.addressable_data(0))
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
  return jax.tree.map(one, tree)


def shard_params(tree, mesh: Mesh):
  return put(tree, param_shardings(tree, mesh))
