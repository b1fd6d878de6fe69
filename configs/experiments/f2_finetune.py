"""F2: the aligned model fine-tuned on 10/50/100 harmful shots and on the mix (Table 1 analog) + 1D interpolations.

  visage-jax experiments --config=configs/experiments/f2_finetune.py --workdir=runs/experiments --out=EXPERIMENTS.md
  visage-jax experiments --config=configs/experiments/f2_finetune.py:tiny --config.model.path=DIR --workdir=/tmp/x   # smoke

The reduced protocol and every field: visage_jax/experiments.py (config). Jobs are resumable and
shared between experiments through WORKDIR/jobs/.
"""
from visage_jax import experiments


def get_config(arg=None):
  return experiments.config("f2_finetune", arg)
