"""launch/ scripts: valid bash, and their dry runs print the gcloud / srun / visage-jax commands."""

import os
import shlex
import subprocess

from absl.testing import absltest, parameterized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("launch/tpu_pod.sh", "launch/slurm.sbatch", "launch/gpu_node.sh", "launch/device_bench.sh")


def dry_run(script, *args, **env):
  base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
  proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, cwd=ROOT, timeout=60,
                        env=dict(base, DRY_RUN="1", **env))
  return proc


def commands(proc):
  """The printed commands, each parsed back into its arguments as a shell would."""
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(l.split(" > ")[0]) for l in proc.stdout.strip().splitlines()]


class LaunchTest(parameterized.TestCase):

  @parameterized.parameters(*SCRIPTS)
  def test_bash_syntax(self, script):
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True, cwd=ROOT)
    self.assertEqual(proc.returncode, 0, proc.stderr)

  def test_tpu_pod(self):
    proc = dry_run("launch/tpu_pod.sh", "--config.model.path=/m/Llama-2-7b-chat-hf",
                   "--config.prompts.system_prompt=it's mine", TPU_NAME="visage-v5p", ZONE="us-east5-a",
                   CONFIG="configs/llama2_7b_chat.py", WORKDIR="/mnt/runs/l2", PROJECT="proj", VENV="~/venv")
    [cmd] = commands(proc)
    self.assertEqual(cmd[:9], ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "visage-v5p", "--zone=us-east5-a",
                               "--project=proj", "--worker=all"])
    self.assertTrue(cmd[9].startswith("--command="))
    remote = cmd[9][len("--command="):]
    self.assertTrue(remote.startswith("cd ~/visage_jax && source ~/venv/bin/activate && visage-jax landscape "))
    on_worker = shlex.split(remote.split(" && ")[-1])
    self.assertEqual(on_worker, ["visage-jax", "landscape", "--config=configs/llama2_7b_chat.py",
                                 "--workdir=/mnt/runs/l2", "--config.mesh.shape=-1,1", "--noprogress",
                                 "--config.model.path=/m/Llama-2-7b-chat-hf",
                                 "--config.prompts.system_prompt=it's mine"])

  def test_tpu_pod_needs_its_settings(self):
    proc = dry_run("launch/tpu_pod.sh", ZONE="z", CONFIG="c", WORKDIR="w")
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("set TPU_NAME", proc.stderr)
    proc = dry_run("launch/tpu_pod.sh", TPU_NAME="t", ZONE="z", CONFIG="c", WORKDIR="w", COMMAND="judge")
    self.assertIn("COMMAND=judge: expected landscape, sweep, bench, finetune or experiments", proc.stderr)

  def test_slurm_auto_and_explicit(self):
    env = dict(CONFIG="configs/sweep_system_prompts.py", WORKDIR="/shared/sweep", COMMAND="sweep", REPO="/src/vj")
    cmds = commands(dry_run("launch/slurm.sbatch", "--config.base.decode.max_new_tokens=8", **env))
    self.assertEqual(cmds[0], ["cd", "/src/vj"])
    self.assertEqual(cmds[1], ["srun", "--kill-on-bad-exit=1", "visage-jax", "sweep",
                               "--config=configs/sweep_system_prompts.py", "--workdir=/shared/sweep",
                               "--config.base.mesh.shape=-1,1", "--noprogress",
                               "--config.base.decode.max_new_tokens=8"])
    cmds = commands(dry_run("launch/slurm.sbatch", DISTRIBUTED="explicit", HEAD_NODE="gpu001", NTASKS="16",
                            MESH="-1,8", **env))
    srun = cmds[1]
    self.assertEqual(srun[:4], ["srun", "--kill-on-bad-exit=1", "bash", "-c"])
    self.assertIn("--config.distributed.process_id=$SLURM_PROCID", srun[4])   # expanded per task
    self.assertEqual(srun[6:8], ["visage-jax", "sweep"])
    self.assertIn("--config.base.mesh.shape=-1,8", srun)
    self.assertEqual(srun[-2:], ["--config.distributed.coordinator_address=gpu001:12355",
                                 "--config.distributed.num_processes=16"])
    with open(os.path.join(ROOT, "launch/slurm.sbatch")) as f:
      self.assertIn("#SBATCH --nodes=", f.read())

  def test_gpu_node_one_and_many_processes(self):
    env = dict(CONFIG="configs/demo.py", WORKDIR="runs/demo", REPO="/src/vj")
    cmds = commands(dry_run("launch/gpu_node.sh", **env))
    self.assertEqual(cmds[-1], ["visage-jax", "landscape", "--config=configs/demo.py", "--workdir=runs/demo",
                                "--config.mesh.shape=-1,1", "--noprogress"])
    proc = dry_run("launch/gpu_node.sh", "--config.decode.max_new_tokens=8", PROCESSES="4", NUM_GPUS="8", **env)
    cmds = commands(proc)
    procs = [c for c in cmds if c[0] == "env"]
    self.assertLen(procs, 4)
    for c in procs:
      i = int(c[1].split("=")[1])
      self.assertEqual(c[1], f"CUDA_VISIBLE_DEVICES={i}")
      self.assertEqual(c[2:4], ["visage-jax", "landscape"])
      self.assertIn("--config.decode.max_new_tokens=8", c)
      self.assertEqual(c[-3:], ["--config.distributed.coordinator_address=127.0.0.1:12355",
                                "--config.distributed.num_processes=4", f"--config.distributed.process_id={i}"])
    self.assertIn("> runs/demo.logs/process-3.log 2>&1 &", proc.stdout)
    self.assertEqual(procs[-1][1], "CUDA_VISIBLE_DEVICES=0")   # process 0 in the foreground
    too_many = dry_run("launch/gpu_node.sh", PROCESSES="4", NUM_GPUS="2", **env)
    self.assertIn("PROCESSES=4 but this machine has 2 GPUs", too_many.stderr)

  @parameterized.parameters(("landscape", "configs/demo.py", "mesh"),
                            ("sweep", "configs/sweep_system_prompts.py", "base.mesh"),
                            ("bench", "configs/bench_smollm2.py", "mesh"),
                            ("finetune", "configs/finetune_harmful.py", "mesh"),
                            ("finetune", "configs/align_smollm2.py", "mesh"),
                            ("experiments", "configs/experiments/all.py", "mesh"))
  def test_every_launched_command_takes_the_launch_flags(self, command, config, mesh):
    """The scripts set --config.<mesh>.shape and --config.distributed.*: each command's configs have them."""
    import importlib.util
    from visage_jax import cli
    self.assertIn(command, cli.DISTRIBUTED_COMMANDS)
    env = dict(CONFIG=config, WORKDIR="w", REPO="/src/vj", COMMAND=command, PROCESSES="2", NUM_GPUS="2")
    flags = [f for c in commands(dry_run("launch/gpu_node.sh", **env)) if c[0] == "env" for f in c if
             f.startswith("--config.")]
    spec = importlib.util.spec_from_file_location("launched", os.path.join(ROOT, config))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for flag in flags:
      *parents, field = flag[len("--config."):].split("=")[0].split(".")
      node = c
      for p in parents:
        node = node[p]
      self.assertIn(field, node, f"{config}: {flag}")
    self.assertIn(f"--config.{mesh}.shape=-1,1", flags)


if __name__ == "__main__":
  absltest.main()
