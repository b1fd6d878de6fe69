"""F3: VISAGE of the aligned model under system prompts default / none / aoa / llama2 (Table 2 analog).

  visage-jax experiments --config=configs/experiments/f3_system_prompts.py --workdir=runs/experiments --out=EXPERIMENTS.md
  visage-jax experiments --config=configs/experiments/f3_system_prompts.py:tiny --config.model.path=DIR --workdir=/tmp/x   # smoke

The reduced protocol and every field: visage_jax/experiments.py (config). Jobs are resumable and
shared between experiments through WORKDIR/jobs/.
"""
from visage_jax import experiments


def get_config(arg=None):
  return experiments.config("f3_system_prompts", arg)
