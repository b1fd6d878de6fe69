"""F6, the road out of the basin: the aligned demo model through F2's harmful fine-tune, drawn on its landscape.

  visage-jax finetune --config=configs/trajectory.py:finetune --workdir=runs/f6/ft
  visage-jax trajectory --config=configs/trajectory.py --finetune=runs/f6/ft --workdir=runs/f6/trajectory

The fine-tune is configs/finetune_harmful.py's harmful_100 (F2: a fresh rank-8 LoRA on q/k/v/o of the
aligned SmolLM2, 5 epochs, 63 steps, ~5 minutes on 2 CPU cores) with the trained adapter saved at
every step. The trajectory draws steps 0-7 (measured: the aligned model's harmful ASR goes from 0
to 100 % within the first 7 steps, so the wall is crossed there), then every 7th step and the
fine-tuned model: 16 checkpoints. It runs the demo's protocol (16 AdvBench prompts, 48 new tokens,
coherence on, over-refusal on the first 16 safe XSTest prompts) on an 11 x 11 grid of the
checkpoints' PCA plane around the fine-tuned model, then decodes each checkpoint itself (harmful
and safe prompts); trajectory.png draws the path.
Tiny variants (seconds each, CI): `:finetune_tiny` (4 steps, a checkpoint per step) and `:tiny`.
"""
from visage_jax.runs import finetune, trajectory

STEPS = tuple(range(8)) + tuple(range(14, 63, 7))   # 0..7, 14, 21, ..., 56; the fine-tuned model (63) last


def get_config(arg=None):
  if arg in ("finetune", "finetune_tiny"):
    c = finetune.attack_config("harmful_100", epochs=5)
    c.train.trajectory_every = 1
    if arg == "finetune_tiny":
      c = finetune.attack_config("harmful_10")
      c.data.limit = 4
      c.train.update(steps=4, batch_size=2, trajectory_every=1)
      c.eval.alignment = False
    return c
  c = trajectory.default_config()
  c.prompts.limit = 16
  c.landscape.steps = 10
  c.decode.max_new_tokens = 48
  c.coherence.enabled = True
  c.overrefusal.update(prompts_path="xstest", limit=16)   # as the demo: the first 16 safe XSTest prompts
  c.trajectory.update(margin=0.25, steps=STEPS)
  if arg == "tiny":
    c.prompts.limit, c.landscape.steps, c.decode.max_new_tokens = 2, 2, 4
    c.overrefusal.limit = 2
    c.trajectory.steps = ()
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}: use finetune, finetune_tiny or tiny")
  return c
