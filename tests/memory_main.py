"""One of two processes of a landscape on a (1, 8) mesh (4 virtual CPU devices each), with the
host memory of its stages traced.

  python tests/memory_main.py MODEL_DIR TARGET_DIR PROMPTS WORKDIR REPORT PROCESS_ID PORT

A 2D_interpolation-random landscape loads the model, loads the target and takes the
interpolation difference, draws a random direction, writes directions.safetensors and
decodes; then the model is converted onto the mesh (each process writing its shards) into
WORKDIR/../converted and read back. tracemalloc follows numpy's host buffers (what a process
stages on its way to a device), not the devices' own buffers, which on a pod are accelerator
memory. REPORT gets each stage's peak above the traced memory at its start, the run's peak
above the traced memory before it (Python's caches, figures and all), how often a whole leaf
was read, whether the converted copy equals the loaded shards, and, so that the test can show
its bounds bite, the peaks of what the run must not do: gather the params tree into one host,
and read whole leaves one after another (the loading before issue #16).
"""

import functools
import json
import os
import tracemalloc


def memory_config(model_dir, target_dir, prompts_path, mesh=(1, 8)):
  """2 prompts, 4 points, 4 tokens: the model axis spans both processes, so each holds half of
  every split leaf."""
  from visage_jax import landscape

  c = landscape.default_config()
  c.model.path = model_dir
  c.prompts.update(path=prompts_path, limit=2)
  c.landscape.update(vis_type="2D_interpolation-random", target_path=target_dir, steps=1, multiplier=1.0)
  c.decode.max_new_tokens = 4
  c.engine.update(mode="continuous", max_batch=4)
  c.mesh.shape = mesh
  return c


def traced(stages: dict, name: str, fn):
  """fn, the largest peak of its calls above the traced memory at their start kept in stages[name]."""
  @functools.wraps(fn)
  def run(*args, **kwargs):
    stages["run"] = max(stages["run"], tracemalloc.get_traced_memory()[1] - stages["base"])
    start = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
      return fn(*args, **kwargs)
    finally:
      peak = tracemalloc.get_traced_memory()[1]
      stages[name] = max(stages.get(name, 0), peak - start)
      stages["run"] = max(stages["run"], peak - stages["base"])
      tracemalloc.reset_peak()
  return run


def traced_iter(stages: dict, name: str, fn):
  """A generator function whose every step (not its consumer's work) is traced as `name`."""
  step = traced(stages, name, next)

  @functools.wraps(fn)
  def run(*args, **kwargs):
    it = fn(*args, **kwargs)
    while True:
      try:
        yield step(it)
      except StopIteration:
        return
  return run


def copy_transfers() -> None:
  """Every host-to-device transfer a copy: on the CPU backend XLA adopts a 64-byte-aligned numpy
  buffer as the device buffer instead of copying it, which would leave some devices' shards in
  the traced host memory (on a pod they are accelerator memory). Each shard is put on its device
  from a copy in an anonymous mapping, 16 bytes off its page so that XLA must copy it: the
  test's stand-in for an accelerator's transfer buffer, outside the traced heap."""
  import mmap

  import jax
  import numpy as np
  from jax._src import core
  from jax._src.interpreters import pxla

  real = pxla.batched_device_put

  def staged(x):
    y = np.frombuffer(mmap.mmap(-1, x.nbytes + 16), x.dtype, x.size, offset=16).reshape(x.shape)
    y[...] = x
    return y

  def put(aval, sharding, xs, devices, *args, **kwargs):
    if not all(isinstance(x, np.ndarray) and x.nbytes for x in xs):
      return real(aval, sharding, xs, devices, *args, **kwargs)
    one = [real(core.ShapedArray(x.shape, x.dtype), jax.sharding.SingleDeviceSharding(d), [staged(x)], [d])
           for x, d in zip(xs, devices)]
    return real(aval, sharding, one, devices, *args, **kwargs)
  pxla.batched_device_put = put


def peak_of(fn) -> int:
  """Peak traced memory while fn runs, above the traced memory before it."""
  base = tracemalloc.get_traced_memory()[0]
  tracemalloc.reset_peak()
  fn()
  return tracemalloc.get_traced_memory()[1] - base


def trace_run(c, workdir: str) -> dict:
  """landscape.run(c, workdir) with its stages traced; returns the stages' peaks."""
  from visage_jax import checkpoints, directions, landscape, pipeline, tensors

  stages = {"run": 0, "whole_reads": 0}
  whole_read = tensors.LeafReader.__call__

  def counted(self):
    stages["whole_reads"] += 1
    return whole_read(self)

  tensors.LeafReader.__call__ = counted
  checkpoints.load_params = traced(stages, "load", checkpoints.load_params)
  directions.random_direction = traced(stages, "random", directions.random_direction)
  directions.interpolation_direction = traced(stages, "interpolation", directions.interpolation_direction)
  directions.save_safetensors = traced(stages, "save", directions.save_safetensors)
  pipeline.evaluate = traced_iter(stages, "decode", pipeline.evaluate)
  tracemalloc.start()
  stages["base"] = tracemalloc.get_traced_memory()[0]
  stages["complete"] = landscape.run(c, workdir, progress=False)["complete"]
  stages["run"] = max(stages["run"], tracemalloc.get_traced_memory()[1] - stages.pop("base"))
  tensors.LeafReader.__call__ = whole_read
  return stages


def main(model_dir, target_dir, prompts_path, workdir, report, process_id, port):
  import jax
  import numpy as np
  from safetensors import safe_open
  from visage_jax import checkpoints, distributed, model, sharding, tensors

  c = memory_config(model_dir, target_dir, prompts_path)
  c.distributed.update(coordinator_address=f"localhost:{port}", num_processes=2,
                       process_id=int(process_id), initialization_timeout=120)
  distributed.initialize(c.distributed)
  cfg = checkpoints.load_config(model_dir)
  sizes = [4 * int(np.prod(s)) for s in
           jax.tree.leaves(model.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))]
  checkpoints.load_tokenizer(model_dir)  # imports transformers and torch before tracing
  import orbax.checkpoint  # noqa: F401  (imported by the run's first save)
  copy_transfers()
  out = dict(stages=trace_run(c, workdir), tree_bytes=sum(sizes), leaf_bytes=max(sizes))

  mesh = sharding.make_mesh((1, 8))
  _, params = checkpoints.load_params.__wrapped__(model_dir, shardings=mesh)
  out["spans"] = all(not x.is_fully_addressable for x in jax.tree.leaves(params))
  converted = os.path.join(os.path.dirname(os.path.abspath(workdir)), "converted")
  out["stages"]["convert"] = peak_of(lambda: checkpoints.convert(model_dir, converted, shardings=mesh))
  _, back = checkpoints.load_params.__wrapped__(converted, shardings=mesh)
  out["converted_equal"] = all(
      a.index == b.index and np.array_equal(np.asarray(a.data), np.asarray(b.data))
      for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back))
      for a, b in zip(x.addressable_shards, y.addressable_shards))
  out["whole_tree"] = peak_of(lambda: jax.tree.map(np.array, sharding.to_host(params)))
  file = safe_open(os.path.join(model_dir, "model.safetensors"), framework="numpy")

  def whole_leaves():
    for _, read in tensors.leaf_readers(file.get_tensor, set(file.keys()), cfg, model_dir):
      read()
  out["whole_leaves"] = peak_of(whole_leaves)
  with open(report, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  import process_main
  process_main.run(main, 7)
