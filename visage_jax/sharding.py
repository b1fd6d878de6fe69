"""Mesh ("data", "model") and (regex, PartitionSpec) rules -> NamedSharding.

Megatron-style: q/k/v/gate/up split their output columns over "model", o/down their
input rows (one all-reduce per block), embeddings and the head split the vocabulary.
The decode batch splits over "data". A dimension that does not divide stays replicated.
"""

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "model")

# Rules match the leaf path "a/b" of the params tree; the spec is for the leaf's own axes
# (leading stacked/direction axes are padded with None).
PARAM_RULES = (
    (r"layers/(q_proj|k_proj|v_proj|gate_proj|up_proj)$", P(None, "model")),
    (r"layers/(o_proj|down_proj)$", P("model", None)),
    (r"embed_tokens$", P("model", None)),
    (r"lm_head$", P(None, "model")),
    (r".*", P()),
)


def make_mesh(shape: tuple[int, int] = (1, 1), devices=None) -> Mesh:
  """A (data, model) mesh over the first data*model devices."""
  devices = jax.devices() if devices is None else devices
  shape = tuple(int(s) for s in shape)
  if len(shape) != 2 or min(shape) < 1:
    raise ValueError(f"mesh.shape {shape} must be two positive ints (data, model).")
  n = shape[0] * shape[1]
  if n > len(devices):
    raise ValueError(f"mesh.shape {shape} needs {n} devices; {len(devices)} available "
                     f"({devices[0].platform}).")
  return Mesh(np.asarray(devices[:n]).reshape(shape), AXES)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


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
    name = _path_str(path)
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


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_params(tree, mesh: Mesh):
  return jax.device_put(tree, param_shardings(tree, mesh))
