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
  c = landscape.default_config()
  c.model.dtype = "bfloat16"
  c.prompts.update(limit=80, template="vicuna", system_prompt="default")
  c.landscape.update(vis_type="1D_random", steps=20, multiplier=1.0)
  c.decode.max_new_tokens = 512
  if arg == "2d":
    c.landscape.vis_type = "2D_random"
  elif arg == "interpolation":
    c.landscape.update(vis_type="1D_interpolation", steps=20, extra_steps=5)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}: use 2d or interpolation")
  return c
