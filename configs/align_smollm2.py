"""A safety-aligned SmolLM2-135M-Instruct that refuses harm, not words: LoRA on refusals of
AdvBench rows >= 80 + self-distilled answers to benign and to borderline instructions.

  visage-jax finetune --config=configs/align_smollm2.py --workdir=runs/align       # ~15-60 min, 2 cores
  visage-jax finetune --config=configs/align_smollm2.py:v1 --workdir=runs/v1 # the first, skittish one
  visage-jax finetune --config=configs/align_smollm2.py:tiny --workdir=runs/tiny   # ~1 min (smoke)

Rank-8 LoRA (alpha 16) on q/k/v/o, 100 steps of 8, lr 1e-3 cosine: refusals (24 variants) to
every AdvBench goal after row 80, the 152 benign training instructions and, twice, the 215
borderline instructions (visage_jax/data/borderline_instructions.jsonl: safe requests that sound
unsafe, "kill a process", written for this project; none is an XSTest prompt), each answered by
the model itself (its first 32 greedy tokens; borderline answers kept when neither the prefix
judge nor the keywords see a refusal). eval.json: keyword ASR on AdvBench rows 0-79, the 20
held-out benign instructions answered and their perplexity, and over-refusal on the 250 safe
XSTest prompts by the prefix judge and the keywords (64 greedy tokens, the model's own system
prompt and chat template). This run's WORKDIR/lora.safetensors is
visage_jax/data/aligned_smollm2_lora.safetensors (lora.ALIGNED_SMOLLM2, merged by the demo and the
experiments); landscapes run on WORKDIR/model directly. Measured (2 shared, loaded CPU cores:
distillation 630 s, training 2243 s, evaluation 474 s): ASR 1.25% (1/80), over-refusal on the 250
safe XSTest prompts 6.4% by the prefix judge and 7.6% by the keywords, benign answered 19/20,
benign perplexity 1.52.

:v1 is the first recipe (no borderline instructions; 13.6 min on 2 quiet cores, two runs
bit-identical): ASR 98.75% -> 0.0% (0/80), benign answered 20/20, but over-refusal on the 250 safe
XSTest prompts 35.6% by both judges (SmolLM2 as shipped: 1.2% and 2.0%). Its adapter is kept as
visage_jax/data/aligned_smollm2_lora_v1.safetensors (lora.ALIGNED_SMOLLM2_V1). Both measured:
README, "The aligned demo model".
"""
from visage_jax.runs import finetune


def get_config(arg=None):
  if arg not in (None, "tiny", "v1"):
    raise ValueError(f"configs/align_smollm2.py: unknown arg {arg!r} (use tiny or v1).")
  c = finetune.align_config(steps=100, borderline_repeat=0 if arg == "v1" else 2)
  if arg == "tiny":
    c.data.update(limit=16, distill_tokens=4)
    c.train.update(steps=2, batch_size=2, warmup_steps=1)
    c.eval.alignment = False
  return c
