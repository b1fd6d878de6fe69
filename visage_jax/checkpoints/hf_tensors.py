"""Params leaves <-> Hugging Face tensors: the reversible name map, and leaves built one at a
time from a HF-named tensor getter (checked by name and shape) and placed in their shardings;
where the format reads blocks, each process builds only the blocks of its own shards.

Directions are normalized per original HF tensor and exported in HF naming through this map;
every checkpoint format (HF safetensors, GGUF, directions files) is read through `leaf_readers`.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from visage_jax import model, sharding
from visage_jax.errors import CheckpointError

# params leaf -> (HF name pattern, transposed). "{i}" is the layer index of a stacked leaf.
HF_NAMES = {
    ("embed_tokens",): ("model.embed_tokens.weight", False),
    ("layers", "input_layernorm"): ("model.layers.{i}.input_layernorm.weight", False),
    ("layers", "q_proj"): ("model.layers.{i}.self_attn.q_proj.weight", True),
    ("layers", "k_proj"): ("model.layers.{i}.self_attn.k_proj.weight", True),
    ("layers", "v_proj"): ("model.layers.{i}.self_attn.v_proj.weight", True),
    ("layers", "o_proj"): ("model.layers.{i}.self_attn.o_proj.weight", True),
    ("layers", "post_attention_layernorm"): ("model.layers.{i}.post_attention_layernorm.weight", False),
    ("layers", "gate_proj"): ("model.layers.{i}.mlp.gate_proj.weight", True),
    ("layers", "up_proj"): ("model.layers.{i}.mlp.up_proj.weight", True),
    ("layers", "down_proj"): ("model.layers.{i}.mlp.down_proj.weight", True),
    ("norm",): ("model.norm.weight", False),
    ("lm_head",): ("lm_head.weight", True),
}


def leaf_paths(cfg: model.ModelConfig) -> list[tuple[str, ...]]:
  """Every params leaf path, ("layers", "q_proj"): the form of a leaf's name across the package
  (`flax.traverse_util.flatten_dict`'s keys; "/"-joined where a string is needed)."""
  return list(traverse_util.flatten_dict(model.param_shapes(cfg)))


def is_stacked(path) -> bool:
  return path[0] == "layers"


def hf_tensor_names(cfg: model.ModelConfig) -> dict[tuple[str, ...], list[str]]:
  """Each params leaf path -> the HF tensor names it holds (one per layer when stacked)."""
  out = {}
  for path in leaf_paths(cfg):
    pattern, _ = HF_NAMES[path]
    out[path] = ([pattern.format(i=i) for i in range(cfg.num_layers)] if is_stacked(path)
                 else [pattern])
  return out


def leaf_for_hf_name(name: str, cfg: model.ModelConfig) -> tuple[tuple[str, ...], int | None, bool]:
  """HF tensor name -> (leaf path, layer index or None, transposed)."""
  for path, names in hf_tensor_names(cfg).items():
    if name in names:
      return path, (names.index(name) if is_stacked(path) else None), HF_NAMES[path][1]
  raise KeyError(f"{name!r} is not a tensor of this {cfg.model_type} model")


def get_leaf(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def pop_leaf(tree: dict, path: tuple[str, ...]):
  """Removes and returns tree[path] (its dicts stay, maybe empty)."""
  return get_leaf(tree, path[:-1]).pop(path[-1])


def set_leaf(tree: dict, path, value):
  """tree[path] = value in place, creating the dicts on the way (get_leaf's inverse)."""
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def hf_views(params: dict, cfg: model.ModelConfig, as_array: Callable) -> dict:
  """{HF name: tensor in HF layout} as views of `as_array(leaf)` (numpy, torch: anything that
  slices and transposes without copying)."""
  out = {}
  for path, names in hf_tensor_names(cfg).items():
    leaf = as_array(get_leaf(params, path))
    slices = list(leaf) if is_stacked(path) else [leaf]
    out.update((name, t.T if HF_NAMES[path][1] else t) for name, t in zip(names, slices))
  return out


def to_hf_tensors(params: dict, cfg: model.ModelConfig) -> dict[str, np.ndarray]:
  """params -> {HF name: array in HF layout}; the inverse of `from_hf_tensors`."""
  host = lambda leaf: np.asarray(jax.device_get(leaf))
  return {name: np.ascontiguousarray(t) for name, t in hf_views(params, cfg, host).items()}


def gather_hf_tensor(tree: dict, path: tuple[str, ...], layer: int | None) -> np.ndarray:
  """One HF tensor of a params-shaped tree on any mesh, in HF layout: only that tensor is gathered,
  from every process holding a part of it (a collective: every process calls it)."""
  leaf = get_leaf(tree, path)
  t = np.asarray(sharding.to_host(leaf if layer is None else leaf[layer]))
  return t.T if HF_NAMES[path][1] else t


def hf_entries(tree: dict, cfg: model.ModelConfig) -> list[tuple]:
  """(HF name, dtype, HF shape, its `gather_hf_tensor`) per HF tensor of a params-shaped tree,
  names sorted: what safetensors_file.write_streamed writes."""
  out = []
  for path, names in hf_tensor_names(cfg).items():
    leaf, stacked = get_leaf(tree, path), is_stacked(path)
    shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
    hf_shape = shape[::-1] if HF_NAMES[path][1] else shape
    out += [(name, np.dtype(leaf.dtype), hf_shape,
             functools.partial(gather_hf_tensor, tree, path, i if stacked else None))
            for i, name in enumerate(names)]
  return sorted(out, key=lambda e: e[0])


@dataclasses.dataclass(frozen=True)
class LeafReader:
  """How one params leaf is read from its HF tensors: whole (`read()`), or, where the format
  reads blocks (`get_block`), only the block at an index, so a process reads and holds only the
  layers, rows and columns its devices hold."""
  get_tensor: Callable        # HF name -> the whole tensor
  get_block: Callable | None  # (HF name, index in HF layout) -> that block; None: whole tensors only
  hf_names: tuple[str, ...]   # one per layer when stacked
  transposed: bool
  shape: tuple[int, ...]      # the leaf's
  hf_shape: tuple[int, ...]   # each HF tensor's
  dtype: np.dtype
  source: str

  def __call__(self) -> np.ndarray:
    """The whole leaf, its HF tensors read one at a time into the stacked buffer."""
    leaf = np.empty(self.shape, self.dtype)
    rows = leaf[None] if len(self.shape) == len(self.hf_shape) else leaf
    for i, name in enumerate(self.hf_names):
      t = self.get_tensor(name)
      if tuple(t.shape) != self.hf_shape:
        raise CheckpointError(f"{self.source}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                              f"{self.hf_shape} from the model config.")
      rows[i] = self._cast(t)
      del t
    return leaf

  def block(self, index: tuple) -> np.ndarray:
    """leaf[index], each layer's HF tensor read at the transposed index (bits as in `read()`)."""
    index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
    out = np.empty(tuple(len(range(n)[s]) for n, s in zip(self.shape, index)), self.dtype)
    stacked = len(self.shape) > len(self.hf_shape)
    own = index[1:] if stacked else index
    layers = range(len(self.hf_names))[index[0]] if stacked else [0]
    rows = out if stacked else out[None]
    for j, layer in enumerate(layers):
      rows[j] = self._cast(self.get_block(self.hf_names[layer], own[::-1] if self.transposed else own))
    return out

  def _cast(self, t) -> np.ndarray:
    t = np.asarray(t.astype(np.float32) if t.dtype != self.dtype else t)
    return t.T if self.transposed else t


def leaf_readers(get_tensor, names, cfg: model.ModelConfig, source: str, get_block=None) -> list:
  """[(leaf path, LeafReader)] for every params leaf; read() builds the leaf from its HF tensors,
  one tensor at a time, and its caller holds the only reference, so a leaf is freed as soon as it
  has been handed on: host memory holds about one stacked leaf plus one tensor, never the model.
  Every name is checked before anything is read (and every shape, when `names` maps them to
  their shapes, as `get_block` needs), else every shape as it is read."""
  shapes = model.param_shapes(cfg)
  dtype = np.dtype(jnp.dtype(cfg.param_dtype))
  assert get_block is None or isinstance(names, dict), "block reads need the tensors' shapes"
  plan = []
  for path, hf_names in hf_tensor_names(cfg).items():
    transposed = HF_NAMES[path][1]
    want = tuple(get_leaf(shapes, path))
    per_layer = want[1:] if is_stacked(path) else want
    hf_shape = tuple(per_layer[::-1] if transposed else per_layer)
    for name in hf_names:
      if name not in names:
        raise CheckpointError(f"{source}: missing tensor {name!r} (expected shape {hf_shape}).")
      if isinstance(names, dict) and tuple(names[name]) != hf_shape:
        raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(names[name])}, expected "
                              f"{hf_shape} from the model config.")
    plan.append((path, LeafReader(get_tensor, get_block, tuple(hf_names), transposed, want, hf_shape,
                                  dtype, source)))
  return plan


def from_hf_tensors(get_tensor, names: set[str], cfg: model.ModelConfig, source: str) -> dict:
  """Builds params from a HF-named tensor getter, checking every name and shape."""
  return assemble(leaf_readers(get_tensor, names, cfg, source), None)


def resolve_shardings(shardings, cfg: model.ModelConfig):
  """None, a Mesh (-> `sharding.param_shardings`) or a params-shaped tree of shardings."""
  if not isinstance(shardings, jax.sharding.Mesh):
    return shardings
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(cfg.param_dtype)),
                          model.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
  return sharding.param_shardings(abstract, shardings)


def put(read, target):
  """read() on device: the default one, or each device of `target` receiving only its shard.

  A reader of blocks reads only this process's shards, each distinct block once (devices along
  a replicated axis share it); others read the whole leaf, freed once placed."""
  if target is None:
    return jnp.asarray(read())
  if getattr(read, "get_block", None) is None:
    leaf = read()
    return jax.make_array_from_callback(leaf.shape, target, lambda index: leaf[index])
  blocks = {}

  def block(index):
    key = tuple((s.start, s.stop) for s in index)
    if key not in blocks:
      blocks[key] = read.block(index)
    return blocks[key]
  return jax.make_array_from_callback(read.shape, target, block)


def placed(leaves, shardings) -> list:
  """[(path, read)] -> [(path, read placed in its sharding)]."""
  return [(path, functools.partial(put, read, get_leaf(shardings, path))) for path, read in leaves]


def assemble(leaves, shardings) -> dict:
  params = {}
  for path, read in leaves:
    set_leaf(params, path, put(read, None if shardings is None else get_leaf(shardings, path)))
  return params
