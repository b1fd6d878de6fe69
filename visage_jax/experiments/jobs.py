"""The experiments' jobs: fine-tunings (finetune.run) and landscapes (landscape.run), each
resumable in WORKDIR/jobs/<job>, named by what they compute so experiments share them, timed
across resumptions; and the reduced-protocol configs every job is built from.
"""

import json
import os
import time

from visage_jax import distributed, result, rundir
from visage_jax.runs import finetune, landscape


def mesh_shape(c) -> tuple:
  """Every job's mesh: the experiment config's mesh.shape (one device in a config without it)."""
  return tuple(c.mesh.shape) if "mesh" in c else (1, 1)


def job_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "jobs", name)


def timed(workdir: str, name: str, fn):
  """Runs fn() and adds its wall time to the job's seconds (so resumed jobs add up)."""
  path = os.path.join(job_dir(workdir, name), "job_seconds.json")
  t0 = time.time()
  out = fn()
  before = (rundir.read_json(path) or {}).get("seconds", 0.0)
  if distributed.is_writer():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rundir.write_atomic(path, json.dumps(dict(seconds=round(before + time.time() - t0, 1))))
  distributed.barrier(f"experiments: {name} timed")
  return out


def figure(path: str, draw) -> str:
  """`draw(path)` in process 0 alone (the others compute the same experiment); the path for all."""
  if distributed.is_writer():
    draw(path)
  return path


def job_seconds(workdir: str, name: str) -> float | None:
  path = os.path.join(job_dir(workdir, name), "job_seconds.json")
  return (rundir.read_json(path) or {}).get("seconds")


def run_landscape(c, workdir: str, name: str, lc) -> result.Result:
  """A landscape job: the finished run's record, or the run (resumed where it stopped)."""
  d = job_dir(workdir, name)
  done = landscape.finished_result(d, lc.to_dict())
  if done is not None and done.summarized:
    return done   # else: not run yet, unfinished, or summarized by an older version
  print(f"[experiments] landscape {name}", flush=True)
  return timed(workdir, name, lambda: landscape.run(lc, d, progress=c.progress))


def run_finetune(c, workdir: str, name: str, fc) -> dict:
  """A fine-tuning job: its summary.json (with eval) once complete; model in <job>/model."""
  d = job_dir(workdir, name)
  done = rundir.read_json(os.path.join(d, "summary.json")) or {}
  if done.get("complete") and ("eval" in done or not fc.eval.alignment):
    return done
  print(f"[experiments] finetune {name}", flush=True)
  return timed(workdir, name, lambda: finetune.run(fc, d, progress=c.progress))


def finetuned_model(workdir: str, name: str) -> str:
  return os.path.join(job_dir(workdir, name), "model")


def landscape_config(c, *, model_path: str = "", lora_path: str | None = None, system_prompt="default",
                     vis_type="1D_random", n_prompts: int | None = None, steps: int | None = None,
                     num_directions: int = 1, target_path: str = "", measures: bool = False):
  """The reduced-protocol landscape of one model; defaults: the aligned model, default prompt.
  `measures`: coherence (asr_coherent) and capability (perplexity of the held-out benign answers)
  at every point too, to tell where a basin wall is compliance and where it is breakage."""
  p = c.protocol
  lc = landscape.default_config()
  lc.model.update(path=model_path or c.model.path, dtype=c.model.dtype,
                  lora_path=c.model.aligned_lora if lora_path is None else lora_path)
  lc.prompts.update(path=c.data.advbench_path, limit=n_prompts or p.prompts, system_prompt=system_prompt)
  lc.landscape.update(vis_type=vis_type, steps=steps or p.steps, multiplier=p.multiplier,
                      num_directions=num_directions, target_path=target_path)
  lc.decode.max_new_tokens = p.max_new_tokens
  lc.mesh.shape = mesh_shape(c)
  if measures:
    lc.coherence.enabled = True
    lc.capability.update(texts_path="benign", benign_max_new_tokens=p.max_new_tokens)
  return lc


def aligned_1d(c):
  """F1's aligned landscape (`protocol.directions` directions, coherence and capability on); also
  F4's strong alignment and the capability curve."""
  return landscape_config(c, num_directions=c.protocol.directions, measures=True)


def attack_config(c, data_name: str, *, model_path: str = "", lora_path: str | None = None,
                  seed: int = 0):
  """finetune.attack_config on the aligned model (or on `model_path` with `lora_path`); `seed`
  draws the attack's examples (data.seed) and its LoRA initialization and order (train.seed)."""
  fc = finetune.attack_config(data_name, epochs=c.protocol.attack_epochs)
  fc.data.seed = fc.train.seed = seed
  fc.model.update(path=model_path or c.model.path, dtype=c.model.dtype,
                  lora_path=c.model.aligned_lora if lora_path is None else lora_path)
  fc.data.update(advbench_path=c.data.advbench_path, benign_path=c.data.benign_path)
  fc.eval.max_new_tokens = c.protocol.max_new_tokens
  fc.train.max_length = c.protocol.max_length
  fc.mesh.shape = mesh_shape(c)
  return fc
