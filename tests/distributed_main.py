"""One of two processes of a landscape run, each with 4 virtual CPU devices: one mesh of 8.

  python tests/distributed_main.py MODEL_DIR PROMPTS WORKDIR REPORT PROCESS_ID PORT

Runs the landscape, then (writer) cuts generations.jsonl to its first two lines and removes
landscape.json, and resumes: the final result must equal the uninterrupted one. REPORT gets
both results, the process's view of the mesh, every path under WORKDIR it opened for
writing, replaced or removed, and for each random direction drawn whether every leaf spans
both processes (drawn where it lives, not on one device).
"""

import builtins
import json
import os


def tiny_config(model_dir, prompts_path, mesh=(-1, 2)):
  """4 prompts, 3 points, 2 directions, 8 tokens; by default 4 x 2 over 8 devices: data across
  the processes, weights split in pairs."""
  from visage_jax.runs import landscape

  c = landscape.default_config()
  c.model.path = model_dir
  c.prompts.update(path=prompts_path, limit=4)
  c.landscape.update(steps=2, multiplier=2.0, num_directions=2)
  c.decode.max_new_tokens = 8
  c.engine.update(mode="continuous", max_batch=8)
  c.mesh.shape = mesh
  return c


def record_writes(workdir: str, log: list) -> None:
  """Logs every path under `workdir` this process opens for writing, replaces or removes."""
  root = os.path.realpath(workdir) + os.sep
  mine = lambda p: isinstance(p, (str, os.PathLike)) and (os.path.realpath(p) + os.sep).startswith(root)
  real_open, real_replace, real_remove = builtins.open, os.replace, os.remove

  def open_(file, mode="r", *args, **kwargs):
    if mine(file) and any(m in mode for m in "wax+"):
      log.append(("open", os.path.relpath(file, root), mode))
    return real_open(file, mode, *args, **kwargs)

  def replace_(src, dst, *args, **kwargs):
    if mine(dst):
      log.append(("replace", os.path.relpath(dst, root)))
    return real_replace(src, dst, *args, **kwargs)

  def remove_(path, *args, **kwargs):
    if mine(path):
      log.append(("remove", os.path.relpath(path, root)))
    return real_remove(path, *args, **kwargs)

  builtins.open, os.replace, os.remove = open_, replace_, remove_


def _to_host_check() -> dict:
  """sharding.to_host of a value replicated on every device of both processes (read from a local
  shard, no collective) and of one split across them (all-gathered): both the whole value."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  from visage_jax import sharding

  mesh, spec = sharding.make_mesh((4, 2)), jax.sharding.PartitionSpec
  value = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  replicated = sharding.put(value, jax.sharding.NamedSharding(mesh, spec()))
  split = sharding.put(value, jax.sharding.NamedSharding(mesh, spec(*sharding.AXES)))
  gathers, real = [], multihost_utils.process_allgather
  multihost_utils.process_allgather = lambda x, **kw: gathers.append(x.shape) or real(x, **kw)
  try:
    got = sharding.to_host({"replicated": replicated, "split": split})
  finally:
    multihost_utils.process_allgather = real
  return dict(spans=[not x.is_fully_addressable for x in (replicated, split)], gathers=len(gathers),
              equal={k: bool(np.array_equal(v, value)) for k, v in got.items()})


def main(model_dir, prompts_path, workdir, report, process_id, port):
  import jax
  from visage_jax import distributed
  from visage_jax.directions import vectors
  from visage_jax.runs import landscape

  c = tiny_config(model_dir, prompts_path)
  c.distributed.update(coordinator_address=f"localhost:{port}", num_processes=2,
                       process_id=int(process_id), initialization_timeout=120)
  joined = distributed.initialize(c.distributed)
  writes, spans = [], []
  record_writes(workdir, writes)
  draw = vectors.random_direction

  def spying_draw(*args, **kwargs):
    d = draw(*args, **kwargs)
    spans.append(all(not x.is_fully_addressable for x in jax.tree.leaves(d)))
    return d

  vectors.random_direction = spying_draw
  first = landscape.run(c, workdir, progress=False).to_json()
  if distributed.is_writer():
    gen = os.path.join(workdir, "generations.jsonl")
    with open(gen) as f:
      head = f.readlines()[:2]
    with open(gen, "w") as f:
      f.writelines(head)
    os.remove(os.path.join(workdir, "landscape.json"))
  distributed.barrier("test: run cut")
  resumed = landscape.run(c, workdir, progress=False).to_json()
  out = dict(to_host=_to_host_check(), joined=joined, process_index=jax.process_index(),
             process_count=jax.process_count(), device_count=jax.device_count(),
             local_device_count=jax.local_device_count(),
             mesh=resumed["mesh"], first=dict(asr=first["asr"], visage=first["visage"]),
             asr=resumed["asr"], visage=resumed["visage"], complete=resumed["complete"], writes=writes,
             spans=spans)
  with open(report, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  import process_main
  process_main.run(main, 6)
