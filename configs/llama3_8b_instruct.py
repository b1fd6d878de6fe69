"""Paper settings for LLaMA-3-8B-Instruct: 1D random (default), 2D random, base->chat interpolation.

  visage-jax landscape --config=configs/llama3_8b_instruct.py --workdir=runs/llama3_8b_instruct_1d \
      --config.model.path=/path/to/Meta-Llama-3-8B-Instruct
  visage-jax landscape --config=configs/llama3_8b_instruct.py:2d --workdir=runs/llama3_8b_instruct_2d --config.model.path=...
  visage-jax landscape --config=configs/llama3_8b_instruct.py:interpolation --workdir=runs/llama3_8b_instruct_interp \
      --config.model.path=/path/to/Meta-Llama-3-8B --config.landscape.target_path=/path/to/Meta-Llama-3-8B-Instruct

Paper protocol: first 80 AdvBench goals, llama3 template with its default system prompt, 21 points
per axis over [-0.5, 0.5] (steps=20, multiplier=1), 512 greedy tokens, keyword ASR. Model paths are
local (meta-llama/Meta-Llama-3-8B-Instruct converted with `visage-jax convert` loads fastest); bfloat16 on accelerators.
"""
from visage_jax import landscape


def get_config(arg=None):
  return landscape.paper_config("llama3", arg)
