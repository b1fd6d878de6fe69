"""Paper settings for Vicuna-7B-v1.5: 1D random (default), 2D random, base->chat interpolation.

  visage-jax landscape --config=configs/vicuna_7b.py --workdir=runs/vicuna_7b_1d \
      --config.model.path=/path/to/vicuna-7b-v1.5
  visage-jax landscape --config=configs/vicuna_7b.py:2d --workdir=runs/vicuna_7b_2d --config.model.path=...
  visage-jax landscape --config=configs/vicuna_7b.py:interpolation --workdir=runs/vicuna_7b_interp \
      --config.model.path=/path/to/Llama-2-7b-hf --config.landscape.target_path=/path/to/vicuna-7b-v1.5

Paper protocol: first 80 AdvBench goals, vicuna template with its default system prompt, 21 points
per axis over [-0.5, 0.5] (steps=20, multiplier=1), 512 greedy tokens, keyword ASR. Model paths are
local (lmsys/vicuna-7b-v1.5 converted with `visage-jax convert` loads fastest); bfloat16 on accelerators.
"""
from visage_jax import landscape


def get_config(arg=None):
  return landscape.paper_config("vicuna", arg)
