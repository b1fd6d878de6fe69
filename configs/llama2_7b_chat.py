"""Paper settings for LLaMA-2-7B-chat: 1D random (default), 2D random, base->chat interpolation.

  visage-jax landscape --config=configs/llama2_7b_chat.py --workdir=runs/llama2_7b_chat_1d
  visage-jax landscape --config=configs/llama2_7b_chat.py:2d --workdir=runs/llama2_7b_chat_2d
  visage-jax landscape --config=configs/llama2_7b_chat.py:interpolation --workdir=runs/llama2_7b_chat_interp
  visage-jax landscape --config=configs/llama2_7b_chat.py --workdir=runs/llama2_7b_chat_1d \
      --config.model.path=/models/Llama-2-7b-chat-hf   # a local copy (HF, .gguf or converted)

Models are hub ids, fetched once (config, tokenizer, safetensors) into the Hugging Face cache:
  model.path            meta-llama/Llama-2-7b-chat-hf
  interpolation         meta-llama/Llama-2-7b-hf -> meta-llama/Llama-2-7b-chat-hf
Meta's repos are gated: accept the license on huggingface.co and set HF_TOKEN.
Without hub access, `hf download` them beforehand and set HF_HUB_OFFLINE=1. Converted once, a
model loads fastest:
  visage-jax convert --model=meta-llama/Llama-2-7b-chat-hf --out=DIR   # then --config.model.path=DIR

Paper protocol: first 80 AdvBench goals, llama2 template with its default system prompt, 21 points
per axis over [-0.5, 0.5] (steps=20, multiplier=1), 512 greedy tokens, keyword ASR; bfloat16.
"""
from visage_jax.runs import landscape

CHAT, BASE = "meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf"


def get_config(arg=None):
  c = landscape.paper_config("llama2", arg)
  c.model.path = CHAT
  if arg == "interpolation":  # alpha = 0: the base model, alpha = 1: its chat model
    c.model.path, c.landscape.target_path = BASE, CHAT
  return c
