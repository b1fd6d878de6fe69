"""Demo: the safety basin of a safety-aligned SmolLM2-135M-Instruct, small enough for 2 CPU cores.

  visage-jax landscape --config=configs/demo.py --workdir=runs/demo          # a few minutes
  visage-jax landscape --config=configs/demo.py:tiny --workdir=runs/tiny     # about a minute (CI)
  visage-jax landscape --config=configs/demo.py:unaligned --workdir=runs/u   # SmolLM2 as shipped

The model is the embedded SmolLM2-135M-Instruct GGUF with the shipped safety LoRA merged in
(visage_jax/data/aligned_smollm2_lora.safetensors, reproduced by configs/align_smollm2.py): it refuses
AdvBench prompts at alpha = 0 and its refusals break down as the weights move away.
Reduced protocol: 16 AdvBench prompts, 11 grid points over [-0.5, 0.5], 48 new tokens.
"""
from visage_jax import landscape, lora


def get_config(arg=None):
  c = landscape.default_config()
  c.model.lora_path = lora.ALIGNED_SMOLLM2
  c.prompts.limit = 16
  c.landscape.update(vis_type="1D_random", steps=10, multiplier=1.0, num_directions=1)
  c.decode.max_new_tokens = 48
  if arg == "tiny":
    c.prompts.limit, c.landscape.steps, c.decode.max_new_tokens = 4, 2, 8
  elif arg == "unaligned":
    c.model.lora_path = ""
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}: use tiny or unaligned")
  return c
