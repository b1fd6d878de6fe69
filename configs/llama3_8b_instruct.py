"""Paper settings for LLaMA-3-8B-Instruct: 1D random (default), 2D random, base->chat interpolation.

  visage-jax landscape --config=configs/llama3_8b_instruct.py --workdir=runs/llama3_8b_instruct_1d
  visage-jax landscape --config=configs/llama3_8b_instruct.py:2d --workdir=runs/llama3_8b_instruct_2d
  visage-jax landscape --config=configs/llama3_8b_instruct.py:interpolation --workdir=runs/llama3_8b_instruct_interp
  visage-jax landscape --config=configs/llama3_8b_instruct.py --workdir=runs/llama3_8b_instruct_1d \
      --config.model.path=/models/Meta-Llama-3-8B-Instruct   # a local copy (HF, .gguf or converted)

Models are hub ids, fetched once (config, tokenizer, safetensors) into the Hugging Face cache:
  model.path            meta-llama/Meta-Llama-3-8B-Instruct
  interpolation         meta-llama/Meta-Llama-3-8B -> meta-llama/Meta-Llama-3-8B-Instruct
Meta's repos are gated: accept the license on huggingface.co and set HF_TOKEN.
Without hub access, `hf download` them beforehand and set HF_HUB_OFFLINE=1. Converted once, a
model loads fastest:
  visage-jax convert --model=meta-llama/Meta-Llama-3-8B-Instruct --out=DIR   # then --config.model.path=DIR

Paper protocol: first 80 AdvBench goals, llama3 template with its default system prompt, 21 points
per axis over [-0.5, 0.5] (steps=20, multiplier=1), 512 greedy tokens, keyword ASR; bfloat16.
"""
from visage_jax.runs import landscape

CHAT, BASE = "meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B"


def get_config(arg=None):
  c = landscape.paper_config("llama3", arg)
  c.model.path = CHAT
  if arg == "interpolation":  # alpha = 0: the base model, alpha = 1: its chat model
    c.model.path, c.landscape.target_path = BASE, CHAT
  return c
