"""F1: 1D random landscapes (3 directions) of the aligned SmolLM2 vs SmolLM2 as shipped, and a 2D random landscape.

  visage-jax experiments --config=configs/experiments/f1_basin.py --workdir=runs/experiments --out=EXPERIMENTS.md
  visage-jax experiments --config=configs/experiments/f1_basin.py:tiny --config.model.path=DIR --workdir=/tmp/x   # smoke

The reduced protocol and every field: visage_jax/experiments.py (config). Jobs are resumable and
shared between experiments through WORKDIR/jobs/.
"""
from visage_jax import experiments


def get_config(arg=None):
  return experiments.config("f1_basin", arg)
