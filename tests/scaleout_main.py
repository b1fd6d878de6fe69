"""Scale-out checks run in a subprocess (virtual CPU devices need XLA_FLAGS before jax is imported).

  python tests/scaleout_main.py directions OUT.json                      # 8 devices
  python tests/scaleout_main.py checkpoints DIR HF_DIR OUT.json          # 8 devices
  python tests/scaleout_main.py gguf FILE.gguf OUT.json                  # 8 devices
  python tests/scaleout_main.py process PORT NUM_PROCESSES PID DIR OUT.json  # 4 devices each
  python tests/scaleout_main.py convert SRC DST OUT.json                 # 1 device

Each writes OUT.json with `problems` (what differed from the one-device result, empty when all
is well) and counts of what it compared, for the tests to assert on.
"""

import json
import os
import re
import sys

_DEVICES = {"directions": 8, "checkpoints": 8, "gguf": 8, "process": 4, "convert": 1}[sys.argv[1]]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={_DEVICES}")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
from visage_jax import model, sharding  # noqa: E402
from visage_jax.checkpoints import gguf_file, loader
from visage_jax.directions import vectors

MESHES = ((1, 1), (8, 1), (1, 8), (2, 4), (4, 2))
ORTHOGONALIZE_MESHES = ((2, 4),)
NORMS = ("layer", "filter", "none")
BLACKLIST = ("model.norm", "layers.0.input_layernorm")  # a whole leaf and one layer of a stack


def tiny_config() -> model.ModelConfig:
  """Every dimension divides 8, so leaves really split; the vocabulary (320 = 64 blocks of 5) takes
  the odd pairwise steps. Few distinct leaf shapes keep the compiles (the test's cost) down."""
  return model.ModelConfig.tiny(vocab_size=320, hidden_size=128, intermediate_size=128, num_heads=4,
                                num_kv_heads=4, head_dim=32, tie_word_embeddings=True)


def leaves(tree) -> dict:
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def compare(got: dict, want: dict, what: str, problems: list) -> int:
  """Bit equality of every leaf (device_get of the whole array); returns the count compared."""
  n = 0
  for (name, a), b in zip(leaves(got).items(), leaves(want).values()):
    if not np.array_equal(np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b))):
      problems.append(f"{what}: {name} differs from the one-device result")
    n += 1
  return n


def check_placement(tree, targets, what: str, problems: list) -> int:
  """Each leaf in its target sharding, each device holding exactly its own shard; returns the
  number of leaves actually split over several devices."""
  split = 0
  for (name, x), t in zip(leaves(tree).items(), jax.tree.leaves(targets)):
    if not x.sharding.is_equivalent_to(t, x.ndim):
      problems.append(f"{what}: {name} has sharding {x.sharding}, expected {t}")
    devices = {s.device for s in x.addressable_shards}
    if devices != set(t.addressable_devices):
      problems.append(f"{what}: {name} lives on {len(devices)} devices, expected {len(t.addressable_devices)}")
    shard_shape = t.shard_shape(x.shape)
    for s in x.addressable_shards:
      if s.data.shape != shard_shape:
        problems.append(f"{what}: {name} holds {s.data.shape} on {s.device}, its shard is {shard_shape}")
    split += shard_shape != x.shape
  return split


_COLLECTIVE = re.compile(r"=\s*(.*?)\s+(all-gather|all-reduce|collective-permute|all-to-all|"
                         r"reduce-scatter)(-start)?\(")


def collective_sizes(hlo: str) -> list[int]:
  """Element counts of every collective's result in compiled HLO text."""
  sizes = []
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    for dims in re.findall(r"[a-z]\d+\[([\d,]*)\]", m.group(1)) if m else ():
      sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
  return sizes


def run_directions(out_path: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  cfg = tiny_config()
  host = model.init(jax.random.key(0), cfg)
  key = jax.random.key(5)
  problems, compared, split = [], 0, {}
  refs = {n: vectors.random_direction(key, host, cfg, norm=n, blacklist=BLACKLIST) for n in NORMS}
  ref_o = vectors.orthogonalize(vectors.random_direction(jax.random.key(6), host, cfg), refs["layer"])
  for shape in MESHES:
    mesh = sharding.make_mesh(shape)
    name = f"{shape[0]}x{shape[1]}"
    params = sharding.shard_params(host, mesh)
    targets = sharding.param_shardings(host, mesh)
    for norm in NORMS:
      d = vectors.random_direction(key, params, cfg, norm=norm, blacklist=BLACKLIST)
      compared += compare(d, refs[norm], f"{name} {norm}", problems)
      split[name] = check_placement(d, targets, f"{name} {norm}", problems)
    given = vectors.random_direction(key, host, cfg, norm="layer", blacklist=BLACKLIST, shardings=targets)
    compared += compare(given, refs["layer"], f"{name} shardings=", problems)
    check_placement(given, targets, f"{name} shardings=", problems)
    if shape in ORTHOGONALIZE_MESHES:
      d2 = vectors.random_direction(jax.random.key(6), params, cfg)
      compared += compare(vectors.orthogonalize(d2, given), ref_o, f"{name} orthogonalize", problems)
  # Only partial sums cross devices: per compiled stage, no collective as large as its output.
  calls, seen = [], set()
  real_stage = vectors._stage

  def recording_stage(fn, out_shardings, **static):
    jitted = real_stage(fn, out_shardings, **static)

    def run(*args):
      out = jitted(*args)
      if id(jitted) not in seen:  # each compiled stage once
        seen.add(id(jitted))
        hlo = jitted.lower(*args).compile().as_text()
        size = max(int(np.prod(x.shape)) for x in jax.tree.leaves(out))
        calls.append([fn.__name__, max(collective_sizes(hlo), default=0), size])
      return out
    return run

  vectors._stage = recording_stage
  try:
    vectors.random_direction(key, sharding.shard_params(host, sharding.make_mesh((1, 8))), cfg,
                                blacklist=BLACKLIST)
  finally:
    vectors._stage = real_stage
  with open(out_path, "w") as f:
    json.dump(dict(problems=problems, compared=compared, split=split, collectives=calls), f)


def run_checkpoints(workdir: str, hf_dir: str, out_path: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  cfg = tiny_config()
  host = model.init(jax.random.key(1), cfg)
  path = os.path.join(workdir, "converted")
  loader.save_converted(path, cfg, sharding.shard_params(host, sharding.make_mesh((2, 4))), source="test")
  problems, compared, split = [], 0, {}
  for shape in ((4, 2), (1, 1), (1, 8)):
    mesh = sharding.make_mesh(shape)
    name = f"{shape[0]}x{shape[1]}"
    cfg2, params = loader.load_converted(path, shardings=mesh)
    if cfg2 != cfg:
      problems.append(f"{name}: config {cfg2} != {cfg}")
    compared += compare(params, host, name, problems)
    split[name] = check_placement(params, sharding.param_shardings(host, mesh), name, problems)
  _, params = loader.load_params(path, shardings=sharding.make_mesh((2, 4)))
  compared += compare(params, host, "load_params 2x4", problems)
  _, params = loader.load_params(path)
  compared += compare(params, host, "one device", problems)
  for x in jax.tree.leaves(params):
    if len(x.sharding.device_set) != 1:
      problems.append(f"one device: a leaf is on {len(x.sharding.device_set)} devices")
  # A HF directory converted through a (2, 4) mesh (leaves placed, then written shard by shard).
  hf_cfg, hf_params = loader.load_params(hf_dir)
  loader.convert(hf_dir, path + "-hf", shardings=sharding.make_mesh((2, 4)))
  _, params = loader.load_params(path + "-hf")
  compared += compare(params, hf_params, "convert via 2x4", problems)
  with open(out_path, "w") as f:
    json.dump(dict(problems=problems, compared=compared, split=split), f)


def run_gguf(path: str, out_path: str) -> None:
  """A GGUF file loaded onto meshes by blocks against its whole-tensor load: per mesh, the
  tensors dequantized whole, the rows dequantized per tensor and the largest dequantized chunk."""
  assert jax.device_count() == 8, jax.devices()
  _, want = gguf_file.load_gguf(path)
  calls, real = [], gguf_file._dequantize

  def counted(t, data, where):
    out = real(t, data, where)
    calls.append((t.name, len(t.shape) == 2 and data.size == t.data.size, data.shape[0], out.nbytes))
    return out

  gguf_file._dequantize = counted
  problems, compared, loads, default = [], 0, {}, gguf_file._CHUNK
  for shape, chunk in (((1, 8), 1024), ((2, 4), default), ((8, 1), default)):
    name, calls[:], gguf_file._CHUNK = f"{shape[0]}x{shape[1]}", [], chunk
    try:
      _, got = gguf_file.load_gguf(path, shardings=sharding.make_mesh(shape))
    finally:
      gguf_file._CHUNK = default
    compared += compare(got, want, name, problems)
    check_placement(got, sharding.param_shardings(want, sharding.make_mesh(shape)), name, problems)
    rows = {}
    for t, _, n, _ in calls:
      rows[t] = rows.get(t, 0) + n
    loads[name] = dict(whole=sorted({t for t, whole, _, _ in calls if whole}), rows=rows,
                       largest=max(b for *_, b in calls))
  with open(out_path, "w") as f:
    json.dump(dict(problems=problems, compared=compared, loads=loads), f)


def run_process(port: str, num_processes: str, pid: str, workdir: str, out_path: str) -> None:
  """One of several processes: sharded save from a (2, 4) mesh, restore into (4, 2), and a direction
  drawn over all processes' devices, each process checking the shards it holds."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", int(num_processes), int(pid), initialization_timeout=60)
  assert jax.process_count() == int(num_processes), jax.process_count()
  cfg = tiny_config()
  host = jax.device_get(model.init(jax.random.key(2), cfg))  # the same on every process
  want_d = jax.device_get(vectors.random_direction(jax.random.key(7), host, cfg, norm="filter"))
  save_mesh, load_mesh = sharding.make_mesh((2, 4)), sharding.make_mesh((4, 2))
  targets = sharding.param_shardings(host, save_mesh)
  params = jax.tree.map(lambda x, t: jax.make_array_from_callback(x.shape, t, lambda i: x[i]), host, targets)
  problems, compared = [], 0

  def check_shards(tree, want, what):
    n = 0
    for (name, x), w in zip(leaves(tree).items(), jax.tree.leaves(want)):
      if x.is_fully_addressable:
        problems.append(f"{what}: {name} is fully addressable; expected shards on every process")
      for s in x.addressable_shards:
        n += 1
        if not np.array_equal(np.asarray(s.data), w[s.index]):
          problems.append(f"{what}: {name} shard {s.index} on {s.device} differs")
    return n

  path = os.path.join(workdir, "converted")
  loader.save_converted(path, cfg, params, source="test")
  _, restored = loader.load_converted(path, shardings=load_mesh)
  compared += check_shards(restored, host, "restore 4x2")
  for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(sharding.param_shardings(host, load_mesh))):
    if not x.sharding.is_equivalent_to(t, x.ndim):
      problems.append(f"restore 4x2: sharding {x.sharding} != {t}")
  d = vectors.random_direction(jax.random.key(7), restored, cfg, norm="filter")
  compared += check_shards(d, want_d, "direction 4x2")
  files = sorted(os.listdir(path)) if jax.process_index() == 0 else []
  leaf_dir = os.path.join(path, "params", "layers.q_proj")
  writers = sorted(d for d in os.listdir(leaf_dir) if d.startswith("ocdbt.process_"))
  with open(out_path, "w") as f:
    json.dump(dict(problems=problems, compared=compared, files=files, writers=writers,
                   devices=jax.device_count(), local_devices=jax.local_device_count()), f)


def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return int(next(l for l in f if l.startswith(field + ":")).split()[1])


def _peak_kib(fn) -> int:
  """Peak resident memory while `fn` runs, above the resident memory before it (KiB)."""
  before = _rss_kib("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
  fn()
  return _rss_kib("VmHWM") - before


def run_convert(src: str, dst: str, out_path: str) -> None:
  """Peak host memory of the streaming `convert` vs reading the whole model then saving it."""
  loader.save_converted(dst + "-warmup", model.ModelConfig.tiny(),  # runtime set-up before the baseline
                             model.init(jax.random.key(0), model.ModelConfig.tiny()))
  with open(os.path.join(src, "config.json")) as f:
    cfg = model.config_from_hf(json.load(f))
  streamed = _peak_kib(lambda: loader.convert(src, dst))

  def whole():
    c, params = loader.load_params(src)
    loader.save_converted(dst + "-whole", c, params)

  whole_model = _peak_kib(whole)
  shapes = jax.tree.leaves(model.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
  files = [os.path.join(src, f) for f in os.listdir(src) if f.endswith(".safetensors")]
  with open(out_path, "w") as f:
    json.dump(dict(streamed_peak_bytes=streamed * 1024, whole_peak_bytes=whole_model * 1024,
                   checkpoint_bytes=sum(os.path.getsize(p) for p in files), shards=len(files),
                   model_bytes=4 * sum(int(np.prod(s)) for s in shapes),
                   largest_leaf_bytes=4 * max(int(np.prod(s)) for s in shapes)), f)


if __name__ == "__main__":
  {"directions": run_directions, "checkpoints": run_checkpoints, "gguf": run_gguf, "process": run_process,
   "convert": run_convert}[sys.argv[1]](*sys.argv[2:])
