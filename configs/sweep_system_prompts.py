"""Sweep: the aligned demo model (configs/demo.py) under four system prompts.

  visage-jax sweep --config=configs/sweep_system_prompts.py --workdir=runs/sweep_sp        # 4 demo runs
  visage-jax sweep --config=configs/sweep_system_prompts.py:tiny --workdir=runs/sweep_tiny # a few minutes

Runs WORKDIR/system_prompt={default,none,aoa,llama2}/ in turn (the model's own prompt, none,
the paper's role-play AOA prompt, LLaMA-2's safety prompt); WORKDIR/sweep.md compares their
ASR at alpha = 0 and VISAGE, sweep.png overlays their landscapes. Reduced protocol as in
configs/demo.py: 16 AdvBench prompts, 11 points over [-0.5, 0.5], 48 new tokens.
"""
from visage_jax.checkpoints import lora
from visage_jax.runs import sweep


def get_config(arg=None):
  c = sweep.default_config()
  c.base.model.lora_path = lora.ALIGNED_SMOLLM2
  c.base.prompts.limit = 16
  c.base.landscape.update(vis_type="1D_random", steps=10, multiplier=1.0, num_directions=1)
  c.base.decode.max_new_tokens = 48
  c.sweep.grid = (("prompts.system_prompt", ("default", "none", "aoa", "llama2")),)
  if arg == "tiny":
    c.base.prompts.limit, c.base.landscape.steps, c.base.decode.max_new_tokens = 4, 2, 8
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}: use tiny")
  return c
