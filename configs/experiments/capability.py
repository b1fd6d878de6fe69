"""Capability: perplexity of the aligned model's own alpha=0 benign answers along F1's first direction.

  visage-jax experiments --config=configs/experiments/capability.py --workdir=runs/experiments --out=EXPERIMENTS.md
  visage-jax experiments --config=configs/experiments/capability.py:tiny --config.model.path=DIR --workdir=/tmp/x   # smoke

The reduced protocol and every field: visage_jax/experiments.py (config). Jobs are resumable and
shared between experiments through WORKDIR/jobs/.
"""
from visage_jax import experiments


def get_config(arg=None):
  return experiments.config("capability", arg)
