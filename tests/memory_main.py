"""One of two processes of a landscape and a LoRA fine-tune on a (1, 8) mesh (4 virtual CPU
devices each), with the host memory of their stages traced.

  python tests/memory_main.py MODEL_DIR TARGET_DIR PROMPTS WORKDIR REPORT PROCESS_ID PORT

A 2D_interpolation-random landscape (WORKDIR/landscape) loads the model, loads the target and
takes the interpolation difference, draws a random direction, writes directions.safetensors and
decodes; a fine-tune (WORKDIR/ft) trains 2 steps and exports lora.safetensors, model/, hf/ and
eval.json; then the model is converted onto the mesh (each process writing its shards) into
WORKDIR/../converted and read back. tracemalloc follows numpy's host buffers (what a process stages on its way to a
device), not the devices' own buffers, which on a pod are accelerator memory. REPORT gets each
stage's peak above the traced memory at its start, each run's peak above the traced memory
before it (Python's caches, figures and all), how often a whole leaf was read, whether the
converted copy equals the loaded shards, and, so that the
test can show its bounds bite, the peaks of what the runs must not do: gather the params tree
into one host (what the fine-tune's export did before issue #16), and read whole leaves one
after another (the loading before it).
"""

import contextlib
import functools
import inspect
import json
import os
import tracemalloc


def memory_config(model_dir, target_dir, prompts_path, mesh=(1, 8)):
  """2 prompts, 4 points, 4 tokens: the model axis spans both processes, so each holds half of
  every split leaf."""
  from visage_jax.runs import landscape

  c = landscape.default_config()
  c.model.path = model_dir
  c.prompts.update(path=prompts_path, limit=2)
  c.landscape.update(vis_type="2D_interpolation-random", target_path=target_dir, steps=1, multiplier=1.0)
  c.decode.max_new_tokens = 4
  c.engine.update(mode="continuous", max_batch=4)
  c.mesh.shape = mesh
  return c


def finetune_config(model_dir, prompts_path, mesh=(1, 8)):
  """2 steps of a rank-4 LoRA on 4 AdvBench rows >= 80; exports lora, model/, hf/ and the
  evaluation of 2 prompts, 4 tokens each."""
  from visage_jax.runs import finetune

  c = finetune.default_config()
  c.model.path = model_dir
  c.data.update(name="harmful_4", advbench_path=prompts_path)
  c.train.update(steps=2, batch_size=2, lr=3e-4, warmup_steps=0, checkpoint_every=2, max_length=128)
  c.lora.update(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
  c.export.hf = True
  c.eval.update(alignment=True, max_new_tokens=4, prompts=2, benign=False)
  c.mesh.shape = mesh
  return c


def _flush(stages: dict) -> None:
  """The traced peak since the last reset, above their start, into every open stage."""
  peak = tracemalloc.get_traced_memory()[1]
  for name, start in stages["open"]:
    stages[name] = max(stages.get(name, 0), peak - start)
  tracemalloc.reset_peak()


def traced(stages: dict, name: str, fn):
  """fn, the largest peak of its calls above the traced memory at their start kept in stages[name]
  (stages may nest: the enclosing ones see the peaks of those inside)."""
  @functools.wraps(fn)
  def run(*args, **kwargs):
    _flush(stages)
    stages["open"].append((name, tracemalloc.get_traced_memory()[0]))
    try:
      return fn(*args, **kwargs)
    finally:
      _flush(stages)
      stages["open"].pop()
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


def copy_fetches() -> None:
  """Every device-to-host fetch (jax.device_get, process_allgather) a copy in numpy's traced
  memory: on the CPU backend a fetched jax.Array is a view of its device buffer, so a host's copy
  of a gathered value (on a pod, out of accelerator memory) would go untraced."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  def copied(fetch):
    return lambda *args, **kwargs: jax.tree.map(lambda x: np.array(x, copy=True), fetch(*args, **kwargs))
  jax.device_get = copied(jax.device_get)
  multihost_utils.process_allgather = copied(multihost_utils.process_allgather)


def peak_of(fn) -> int:
  """Peak traced memory while fn runs, above the traced memory before it."""
  base = tracemalloc.get_traced_memory()[0]
  tracemalloc.reset_peak()
  fn()
  return tracemalloc.get_traced_memory()[1] - base


@contextlib.contextmanager
def tracing(stages: dict, wrap: dict):
  """Traces each {(module, name): stage} (a generator function step by step) while the block
  runs, and the block as stage "run"."""
  real = {k: getattr(*k) for k in wrap}
  for (module, name), stage in wrap.items():
    fn = real[(module, name)]
    setattr(module, name, (traced_iter if inspect.isgeneratorfunction(fn) else traced)(stages, stage, fn))
  tracemalloc.reset_peak()
  stages["open"] = [("run", tracemalloc.get_traced_memory()[0])]
  try:
    yield stages
  finally:
    _flush(stages)
    del stages["open"]
    for (module, name), fn in real.items():
      setattr(module, name, fn)


def trace_landscape(c, workdir: str) -> dict:
  """landscape.run(c, workdir) with its stages traced; returns the stages' peaks."""
  from visage_jax.checkpoints import hf_tensors, loader
  from visage_jax.directions import vectors
  from visage_jax.runs import landscape, pipeline

  stages = {"whole_reads": 0}
  whole_read = hf_tensors.LeafReader.__call__

  def counted(self):
    stages["whole_reads"] += 1
    return whole_read(self)

  wrap = {(loader, "load_params"): "load", (vectors, "random_direction"): "random",
          (vectors, "interpolation_direction"): "interpolation", (vectors, "save_safetensors"): "save",
          (pipeline, "evaluate"): "decode"}
  hf_tensors.LeafReader.__call__ = counted
  try:
    with tracing(stages, wrap):
      stages["complete"] = landscape.run(c, workdir, progress=False).complete
  finally:
    hf_tensors.LeafReader.__call__ = whole_read
  return stages


def trace_finetune(c, workdir: str) -> dict:
  """finetune.run(c, workdir) with its stages traced; returns their peaks and the summary."""
  from visage_jax.checkpoints import loader
  from visage_jax.runs import finetune

  wrap = {(loader, "load_params"): "load", (finetune, "_train"): "train", (finetune, "_export"): "export",
          (loader, "save_converted"): "model", (finetune, "export_hf"): "hf",
          (finetune, "evaluate_alignment"): "eval"}
  with tracing({}, wrap) as stages:
    summary = finetune.run(c, workdir, progress=False)
  return dict(stages=stages, summary=summary)


def main(model_dir, target_dir, prompts_path, workdir, report, process_id, port):
  import jax
  import numpy as np
  from safetensors import safe_open
  from visage_jax import distributed, model, sharding
  from visage_jax.checkpoints import hf_tensors, loader

  c = memory_config(model_dir, target_dir, prompts_path)
  c.distributed.update(coordinator_address=f"localhost:{port}", num_processes=2,
                       process_id=int(process_id), initialization_timeout=120)
  distributed.initialize(c.distributed)
  cfg = loader.load_config(model_dir)
  sizes = [4 * int(np.prod(s)) for s in
           jax.tree.leaves(model.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))]
  loader.load_tokenizer(model_dir)  # imports transformers and torch before tracing
  import orbax.checkpoint  # noqa: F401  (imported by the run's first save)
  from visage_jax.runs import finetune  # noqa: F401  (imports optax before tracing)
  copy_transfers()
  copy_fetches()
  tracemalloc.start()
  out = dict(stages=trace_landscape(c, os.path.join(workdir, "landscape")),
             finetune=trace_finetune(finetune_config(model_dir, prompts_path), os.path.join(workdir, "ft")),
             tree_bytes=sum(sizes), leaf_bytes=max(sizes))

  mesh = sharding.make_mesh((1, 8))
  _, params = loader.load_params(model_dir, shardings=mesh)
  out["spans"] = all(not x.is_fully_addressable for x in jax.tree.leaves(params))
  converted = os.path.join(os.path.dirname(os.path.abspath(workdir)), "converted")
  out["stages"]["convert"] = peak_of(lambda: loader.convert(model_dir, converted, shardings=mesh))
  _, back = loader.load_params(converted, shardings=mesh)
  out["converted_equal"] = all(
      a.index == b.index and np.array_equal(np.asarray(a.data), np.asarray(b.data))
      for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back))
      for a, b in zip(x.addressable_shards, y.addressable_shards))
  out["whole_tree"] = peak_of(lambda: sharding.to_host(params))
  file = safe_open(os.path.join(model_dir, "model.safetensors"), framework="numpy")

  def whole_leaves():
    for _, read in hf_tensors.leaf_readers(file.get_tensor, set(file.keys()), cfg, model_dir):
      read()
  out["whole_leaves"] = peak_of(whole_leaves)
  with open(report, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  import process_main
  process_main.run(main, 7)
