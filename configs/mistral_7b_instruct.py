"""Paper settings for Mistral-7B-Instruct: 1D random (default), 2D random, base->chat interpolation.

  visage-jax landscape --config=configs/mistral_7b_instruct.py --workdir=runs/mistral_7b_instruct_1d \
      --config.model.path=/path/to/Mistral-7B-Instruct-v0.2
  visage-jax landscape --config=configs/mistral_7b_instruct.py:2d --workdir=runs/mistral_7b_instruct_2d --config.model.path=...
  visage-jax landscape --config=configs/mistral_7b_instruct.py:interpolation --workdir=runs/mistral_7b_instruct_interp \
      --config.model.path=/path/to/Mistral-7B-v0.1 --config.landscape.target_path=/path/to/Mistral-7B-Instruct-v0.2

Paper protocol: first 80 AdvBench goals, mistral template with its default system prompt, 21 points
per axis over [-0.5, 0.5] (steps=20, multiplier=1), 512 greedy tokens, keyword ASR. Model paths are
local (mistralai/Mistral-7B-Instruct-v0.2 converted with `visage-jax convert` loads fastest); bfloat16 on accelerators.
"""
from visage_jax import landscape


def get_config(arg=None):
  return landscape.paper_config("mistral", arg)
