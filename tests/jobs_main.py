"""One of two processes (4 virtual CPU devices each, one 4 x 2 mesh of 8) running a sweep of two
tiny landscapes, a LoRA fine-tune (whole, and stopped after 2 steps for a one-process resume), a
bench of the sweep's landscape and the tiny F3 experiment.

  python tests/jobs_main.py MODEL_DIR PROMPTS DATA WORKDIR REPORT PROCESS_ID PORT

REPORT gets the sweep rows, the fine-tune summaries, the bench report, the experiment's results
and every path under WORKDIR this process opened for writing, replaced or removed
(distributed_main.record_writes).
"""

import json
import os


def sweep_config(model_dir, prompts_path, mesh):
  """Two runs (seeds 0 and 1) of distributed_main's tiny landscape with one direction."""
  import distributed_main
  from visage_jax.runs import sweep

  c = sweep.default_config()
  c.base = distributed_main.tiny_config(model_dir, prompts_path, mesh=mesh)
  c.base.landscape.num_directions = 1
  c.sweep.grid = (("landscape.seed", (0, 1)),)
  return c


def finetune_config(model_dir, data_path, mesh):
  """3 steps of a rank-4 LoRA, 4 rows x 2 micro-batches per step, its trajectory at steps 0, 2, 3;
  exports lora, model/ and hf/, and
  evaluates 2 prompts (rows padded to the mesh's data axis)."""
  from visage_jax.runs import finetune

  c = finetune.default_config()
  c.model.path, c.data.path = model_dir, data_path
  c.train.update(steps=3, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=1, checkpoint_every=2,
                 max_length=64, trajectory_every=2)
  c.lora.update(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
  c.export.hf = True
  c.eval.update(alignment=True, max_new_tokens=4, prompts=2, benign=False)
  c.mesh.shape = mesh
  return c


def bench_config(model_dir, prompts_path, mesh):
  """The sweep's first landscape timed as users run it, in the bench's shared scratch workdir (its
  programs are compiled: 2 s; a fixed-length mode or the torch reference adds 4 s of compile or
  import to each process, and their multi-process paths are the landscape's and the fine-tune's)."""
  import distributed_main
  from visage_jax.runs import bench

  c = distributed_main.tiny_config(model_dir, prompts_path, mesh=mesh)
  c.bench = bench.default_config().bench
  c.bench.methods = ("default_real",)
  return c


def experiments_config(model_dir, mesh):
  """F3 of the tiny experiments: landscapes under 2 system prompts, 2 prompts x 3 points x 4 tokens
  (on the sweep's mesh, whose loading and drawing programs are compiled: 10 s instead of 24)."""
  import findings_test

  c = findings_test.tiny_config(model_dir, "f3_system_prompts")
  c.mesh.shape = mesh
  return c


def main(model_dir, prompts_path, data_path, workdir, report, process_id, port):
  import jax
  import distributed_main
  from visage_jax import distributed
  from visage_jax.experiments import findings
  from visage_jax.runs import bench, finetune, sweep
  from visage_jax import rundir

  c = sweep_config(model_dir, prompts_path, (-1, 2))
  c.distributed.update(coordinator_address=f"localhost:{port}", num_processes=2,
                       process_id=int(process_id), initialization_timeout=120)
  distributed.initialize(c.distributed)
  writes = []
  distributed_main.record_writes(workdir, writes)
  rows = sweep.run(c, os.path.join(workdir, "sweep"), progress=False)
  fc = finetune_config(model_dir, data_path, (-1, 2))
  whole = finetune.run(fc, os.path.join(workdir, "ft"), progress=False)
  part = finetune.run(fc, os.path.join(workdir, "ft_resume"), progress=False, max_steps_this_run=2)
  timed = bench.run(bench_config(model_dir, prompts_path, (-1, 2)), os.path.join(workdir, "bench.json"),
                    log=lambda m: None)
  exp = findings.run(experiments_config(model_dir, (-1, 2)), os.path.join(workdir, "exp"),
                        os.path.join(workdir, "exp_report", "EXPERIMENTS.md"))
  out = dict(process_index=jax.process_index(), process_count=jax.process_count(),
             device_count=jax.device_count(), rows=rows, whole=whole, part=part, bench=timed,
             experiments=rundir.jsonable(exp), writes=writes)
  with open(report, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  import process_main
  process_main.run(main, 7)
