"""Paper settings for Vicuna-7B-v1.5: 1D random (default), 2D random, base->chat interpolation.

  visage-jax landscape --config=configs/vicuna_7b.py --workdir=runs/vicuna_7b_1d
  visage-jax landscape --config=configs/vicuna_7b.py:2d --workdir=runs/vicuna_7b_2d
  visage-jax landscape --config=configs/vicuna_7b.py:interpolation --workdir=runs/vicuna_7b_interp
  visage-jax landscape --config=configs/vicuna_7b.py --workdir=runs/vicuna_7b_1d \
      --config.model.path=/models/vicuna-7b-v1.5   # a local copy (HF, .gguf or converted)

Models are hub ids, fetched once (config, tokenizer, safetensors) into the Hugging Face cache:
  model.path            lmsys/vicuna-7b-v1.5
  interpolation         meta-llama/Llama-2-7b-hf -> lmsys/vicuna-7b-v1.5
The base (Meta) repo is gated: accept the license on huggingface.co and set HF_TOKEN.
Without hub access, `hf download` them beforehand and set HF_HUB_OFFLINE=1. Converted once, a
model loads fastest:
  visage-jax convert --model=lmsys/vicuna-7b-v1.5 --out=DIR   # then --config.model.path=DIR

Paper protocol: first 80 AdvBench goals, vicuna template with its default system prompt, 21 points
per axis over [-0.5, 0.5] (steps=20, multiplier=1), 512 greedy tokens, keyword ASR; bfloat16.
"""
from visage_jax.runs import landscape

CHAT, BASE = "lmsys/vicuna-7b-v1.5", "meta-llama/Llama-2-7b-hf"


def get_config(arg=None):
  c = landscape.paper_config("vicuna", arg)
  c.model.path = CHAT
  if arg == "interpolation":  # alpha = 0: the base model, alpha = 1: its chat model
    c.model.path, c.landscape.target_path = BASE, CHAT
  return c
