"""Multi-process runs: `jax.distributed.initialize` once per process, one writer, barriers.

Every process runs the same command on the same config (SPMD): one global mesh over the
devices of all processes, identical control flow, and only process 0 writes files.
"""

import os

import jax

from visage_jax import errors

AUTO = ("detect", "always", "never")
ENV_OPT_IN = "VISAGE_JAX_DISTRIBUTED"  # "1": initialize with jax's cluster detection


def cluster_env(environ=None) -> str:
  """Which launcher says this process is one of several ("" = none).

  Narrower than jax's own detection: a SLURM allocation alone (`sbatch` shell, one task)
  is not a multi-process job, an `srun` step with several tasks is.
  """
  env = os.environ if environ is None else environ
  count = lambda name: int(env.get(name, "1") or "1")
  if env.get(ENV_OPT_IN, "") not in ("", "0"):
    return ENV_OPT_IN
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if "SLURM_JOB_ID" in env and count("SLURM_STEP_NUM_TASKS") > 1:
    return "SLURM (srun step with several tasks)"
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if "," in hosts:
    return "Cloud TPU pod"
  return ""


def default_settings() -> dict:
  """The `distributed` config section of every command that may run in several processes
  (`initialize` reads it). Not part of any run's identity: a run resumes with any process count."""
  return dict(coordinator_address="", num_processes=1, process_id=0, auto="detect", initialization_timeout=300)


def check(c_distributed) -> None:
  """The `distributed` section (config_checks.validate; `initialize` checks it again, as the CLI
  calls it before any command runs)."""
  d = dict(c_distributed or {})
  address = str(d.get("coordinator_address", "") or "")
  n, pid = int(d.get("num_processes", 1)), int(d.get("process_id", 0))
  auto = d.get("auto", "detect")
  if auto not in AUTO:
    raise errors.UserError(f"distributed.auto {auto!r} is not one of {', '.join(AUTO)}.")
  if address:
    if ":" not in address:
      raise errors.UserError(f"distributed.coordinator_address {address!r}: expected host:port of process 0.")
    if n < 1 or not 0 <= pid < n:
      raise errors.UserError(f"distributed.process_id={pid}, num_processes={n}: expected "
                       "0 <= process_id < num_processes.")
  elif n != 1 or pid != 0:
    raise errors.UserError(f"distributed.num_processes={n}, process_id={pid} need "
                     "distributed.coordinator_address (host:port of process 0).")


def initialize(c_distributed) -> bool:
  """Joins the other processes when the config or the environment asks; True if it did.

  Must run before any JAX computation. Explicit `coordinator_address` (with `num_processes`
  and `process_id`) works anywhere, e.g. several processes on one machine; otherwise
  `auto` = detect (a launcher from `cluster_env`), always or never decides whether jax's
  cluster auto-detection (SLURM, Open MPI, TPU pods) is used.
  """
  check(c_distributed)
  d = dict(c_distributed or {})
  address = str(d.get("coordinator_address", "") or "")
  n, pid = int(d.get("num_processes", 1)), int(d.get("process_id", 0))
  auto = d.get("auto", "detect")
  timeout = int(d.get("initialization_timeout", 300))
  if address:
    _use_cpu_collectives()
    jax.distributed.initialize(address, n, pid, initialization_timeout=timeout)
    return True
  if auto == "never" or (auto == "detect" and not cluster_env()):
    return False
  _use_cpu_collectives()
  jax.distributed.initialize(initialization_timeout=timeout)
  return True


def _use_cpu_collectives() -> None:
  """CPU devices of different processes talk through gloo (jax's default, set explicitly)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_writer() -> bool:
  """Process 0 writes results; the others compute the same thing and write nothing."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """All processes wait here (no-op in one process), e.g. until the writer's files exist."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
