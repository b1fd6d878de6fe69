"""Paper settings for LLaMA-2-7B-chat: 1D random (default), 2D random, base->chat interpolation.

  visage-jax landscape --config=configs/llama2_7b_chat.py --workdir=runs/llama2_7b_chat_1d \
      --config.model.path=/path/to/Llama-2-7b-chat-hf
  visage-jax landscape --config=configs/llama2_7b_chat.py:2d --workdir=runs/llama2_7b_chat_2d --config.model.path=...
  visage-jax landscape --config=configs/llama2_7b_chat.py:interpolation --workdir=runs/llama2_7b_chat_interp \
      --config.model.path=/path/to/Llama-2-7b-hf --config.landscape.target_path=/path/to/Llama-2-7b-chat-hf

Paper protocol: first 80 AdvBench goals, llama2 template with its default system prompt, 21 points
per axis over [-0.5, 0.5] (steps=20, multiplier=1), 512 greedy tokens, keyword ASR. Model paths are
local (meta-llama/Llama-2-7b-chat-hf converted with `visage-jax convert` loads fastest); bfloat16 on accelerators.
"""
from visage_jax import landscape


def get_config(arg=None):
  return landscape.paper_config("llama2", arg)
