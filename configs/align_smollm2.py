"""A safety-aligned SmolLM2-135M-Instruct: LoRA on refusals of AdvBench rows >= 80 + self-distillation.

  visage-jax finetune --config=configs/align_smollm2.py --workdir=runs/align       # ~13 min, 2 CPU cores
  visage-jax finetune --config=configs/align_smollm2.py:tiny --workdir=runs/tiny   # ~1 min (smoke)

Rank-8 LoRA (alpha 16) on q/k/v/o, 100 steps of 8, lr 1e-3 cosine: refusals (24 variants) to
every AdvBench goal after row 80, plus the 152 benign training instructions answered by the
model itself (its first 32 greedy tokens). eval.json: keyword ASR on AdvBench rows 0-79 (64
greedy tokens, the model's own system prompt and chat template) and the 20 held-out benign
instructions answered. Measured on 2 shared CPU cores (two runs, bit-identical adapters): load +
distillation 79-86 s, training 609-642 s (~6.3 s/step), evaluation 60-81 s, 13.6 min in all;
ASR 98.75% -> 0.0% (0/80), benign answered 20/20 -> 20/20.
This run's WORKDIR/lora.safetensors (3.7 MB) is visage_jax/data/aligned_smollm2_lora.safetensors
(lora.ALIGNED_SMOLLM2, merged by the demo and the experiments); landscapes run on WORKDIR/model directly.
"""
from visage_jax.runs import finetune


def get_config(arg=None):
  c = finetune.align_config(steps=100)
  if arg == "tiny":
    c.data.update(limit=16, distill_tokens=4)
    c.train.update(steps=2, batch_size=2, warmup_steps=1)
    c.eval.alignment = False
  elif arg:
    raise ValueError(f"configs/align_smollm2.py: unknown arg {arg!r} (use tiny).")
  return c
