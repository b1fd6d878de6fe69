"""Paper settings for Mistral-7B-Instruct-v0.2: 1D random (default), 2D random, base->chat interpolation.

  visage-jax landscape --config=configs/mistral_7b_instruct.py --workdir=runs/mistral_7b_instruct_1d
  visage-jax landscape --config=configs/mistral_7b_instruct.py:2d --workdir=runs/mistral_7b_instruct_2d
  visage-jax landscape --config=configs/mistral_7b_instruct.py:interpolation --workdir=runs/mistral_7b_instruct_interp
  visage-jax landscape --config=configs/mistral_7b_instruct.py --workdir=runs/mistral_7b_instruct_1d \
      --config.model.path=/models/Mistral-7B-Instruct-v0.2   # a local copy (HF, .gguf or converted)

Models are hub ids, fetched once (config, tokenizer, safetensors) into the Hugging Face cache:
  model.path            mistralai/Mistral-7B-Instruct-v0.2
  interpolation         mistralai/Mistral-7B-v0.1 -> mistralai/Mistral-7B-Instruct-v0.2
Without hub access, `hf download` them beforehand and set HF_HUB_OFFLINE=1. Converted once, a
model loads fastest:
  visage-jax convert --model=mistralai/Mistral-7B-Instruct-v0.2 --out=DIR   # then --config.model.path=DIR

Paper protocol: first 80 AdvBench goals, mistral template with its default system prompt, 21 points
per axis over [-0.5, 0.5] (steps=20, multiplier=1), 512 greedy tokens, keyword ASR; bfloat16.
"""
from visage_jax.runs import landscape

CHAT, BASE = "mistralai/Mistral-7B-Instruct-v0.2", "mistralai/Mistral-7B-v0.1"


def get_config(arg=None):
  c = landscape.paper_config("mistral", arg)
  c.model.path = CHAT
  if arg == "interpolation":  # alpha = 0: the base model, alpha = 1: its chat model
    c.model.path, c.landscape.target_path = BASE, CHAT
  return c
