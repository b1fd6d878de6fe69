"""F4: two alignment strengths; VISAGE ranks how many harmful shots break each.

  visage-jax experiments --config=configs/experiments/f4_strength.py --workdir=runs/experiments --out=EXPERIMENTS.md
  visage-jax experiments --config=configs/experiments/f4_strength.py:tiny --config.model.path=DIR --workdir=/tmp/x   # smoke

The reduced protocol and every field: visage_jax/experiments.py (config). Jobs are resumable and
shared between experiments through WORKDIR/jobs/.
"""
from visage_jax import experiments


def get_config(arg=None):
  return experiments.config("f4_strength", arg)
