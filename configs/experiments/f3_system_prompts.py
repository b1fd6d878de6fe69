"""F3: VISAGE of the aligned model under system prompts default / none / aoa / llama2 (Table 2 analog).

  visage-jax experiments --config=configs/experiments/f3_system_prompts.py --workdir=runs/experiments --out=EXPERIMENTS.md
  visage-jax experiments --config=configs/experiments/f3_system_prompts.py:tiny --config.model.path=DIR --workdir=/tmp/x   # smoke

Jobs: aligned_1d_<system prompt>.
Jobs are resumable in WORKDIR/jobs/ and shared between experiments, which is why every file here
states the same reduced protocol (tests/configs_test.py checks that they agree). The mechanism
(jobs, checks, report) is visage_jax/experiments.py.
"""
import ml_collections

from visage_jax import distributed, errors
from visage_jax.checkpoints import lora


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = "f3_system_prompts"
  # path: base model ("" = embedded SmolLM2-135M-Instruct); aligned_lora: the safety LoRA that
  # makes it the aligned model ("" = the base model is already aligned, e.g. a tiny test model).
  c.model = dict(path="", aligned_lora=lora.ALIGNED_SMOLLM2, dtype="float32")
  c.data = dict(advbench_path="", benign_path="")  # "" = the packaged files
  # The reduced protocol (the paper: 80 prompts, 21 points, 512 tokens): 1D landscapes have
  # steps+1 points over [-multiplier/2, multiplier/2] (steps even, so alpha = 0 is a point) and
  # `prompts` AdvBench rows (F1's aligned model and the capability curve) or `prompts_small` rows
  # (the shipped model, fine-tuned models, interpolations, system prompts, alignment strengths:
  # the runs that answer in full and cost most on a CPU); F1 draws `directions` random directions
  # and a 2D landscape of (steps_2d+1)^2 points x prompts_2d. Attacks (finetune.attack_config)
  # train attack_epochs epochs on examples of at most max_length tokens. Fine-tuned models are
  # evaluated at alpha = 0 on AdvBench rows 0-79 (finetune.evaluate_alignment).
  c.protocol = dict(prompts=32, prompts_small=16, steps=10, multiplier=1.0, max_new_tokens=64,
                    directions=3, steps_2d=4, prompts_2d=12, attack_epochs=5, max_length=128)
  # F3 runs the aligned model's landscape under each system prompt (default, a name in
  # prompts.NAMED_SYSTEM_PROMPTS, or the text itself).
  c.f3_system_prompts = dict(system_prompts=("default", "none", "aoa", "llama2"))
  # Multi-process runs: every process runs every job on one mesh over all their devices (e.g.
  # --config.mesh.shape=-1,1, data-parallel), process 0 writes; distributed as in a landscape config.
  c.mesh = dict(shape=(1, 1))   # ("data", "model") of every landscape and fine-tuning
  c.distributed = distributed.default_settings()
  c.progress = True
  if arg == "tiny":
    c.protocol.update(prompts=2, prompts_small=2, steps=2, max_new_tokens=4, directions=2, steps_2d=2,
                      prompts_2d=2, attack_epochs=1, max_length=1024)
    c.f3_system_prompts.system_prompts = ("default", "none")
  elif arg:
    raise errors.UserError(f"experiment config arg {arg!r}: use tiny or nothing.")
  return c
