"""Which directions break the aligned SmolLM2's safety basin, and how likely a random one is to (F5).

  visage-jax landscape --config=configs/directions.py:census --workdir=runs/f5/census        # 32 random directions
  visage-jax landscape --config=configs/directions.py:census_overrefusal --workdir=runs/f5/census_or   # 8, + XSTest
  visage-jax landscape --config=configs/directions.py:gradient --workdir=runs/f5/gradient    # -grad compliance loss
  visage-jax landscape --config=configs/directions.py:refusal --workdir=runs/f5/refusal      # Arditi et al.'s ablation
  visage-jax landscape --config=configs/directions.py:alignment --workdir=runs/f5/alignment  # toward SmolLM2 unaligned
  visage-jax walls runs/f5/census runs/f5/gradient runs/f5/refusal runs/f5/alignment --out=runs/f5/walls
  visage-jax cosine runs/f5/gradient runs/f5/refusal runs/f5/alignment

The demo's model (the embedded SmolLM2-135M-Instruct with the shipped safety LoRA), its 16
AdvBench prompts and 48 tokens, keyword and coherent ASR. census: 32 random directions on 11
points over [-0.25, 0.25] (the demo's range), drawn from the seed in groups and not saved.
census_overrefusal: the census's first 8 directions (same seed) with over-refusal on the demo's
16 safe XSTest prompts decoded beside the harmful ones (twice the rows per point).
gradient: -grad of the compliance loss on AdvBench rows 400-519, normalized per tensor like a
random direction, 21 points over [-0.002, 0.002] (measured: on the demo's [-0.25, 0.25] grid and on
[-0.02, 0.02] every point but the origin is broken, the wall lies inside the first step). refusal: the refusal direction at the layer chosen on rows
380-399, 13 points over [-1.5, 1.5] (step 0.25) so alpha = 1 (the ablation) and -1 (refusal added)
are points, with over-refusal on XSTest's first 50 safe prompts (homonyms and figurative language).
alignment: interpolation from the aligned model (alpha = 0) to SmolLM2 as shipped (alpha = 1,
theta_base - theta_aligned: AsFT's alignment direction reversed), 2 extra steps each side.
Results: EXPERIMENTS.md, F5.
"""
from visage_jax.checkpoints import loader, lora
from visage_jax.runs import landscape

ARGS = ("census", "census_overrefusal", "gradient", "refusal", "alignment")


def get_config(arg="census"):
  arg = arg or "census"
  if arg not in ARGS:
    raise ValueError(f"configs/directions.py needs an argument, one of {', '.join(ARGS)} (got {arg!r}).")
  c = landscape.default_config()
  c.model.lora_path = lora.ALIGNED_SMOLLM2
  c.prompts.limit = 16
  c.decode.max_new_tokens = 48
  c.coherence.enabled = True
  c.landscape.update(steps=20, multiplier=0.5)
  if arg == "census":
    c.landscape.update(vis_type="1D_random", num_directions=32, steps=10, seed=1)
  elif arg == "census_overrefusal":   # how skittish along random directions; 8 to fit a CPU
    c.landscape.update(vis_type="1D_random", num_directions=8, steps=10, seed=1)
    c.overrefusal.update(prompts_path="xstest", limit=16)
  elif arg == "gradient":   # [-0.02, 0.02] breaks at its first step (|alpha| = 0.002): 10x finer
    c.landscape.update(vis_type="1D_gradient", multiplier=0.004)
  elif arg == "refusal":
    c.landscape.update(vis_type="1D_refusal", steps=12, multiplier=3.0)
    c.overrefusal.update(prompts_path="xstest", limit=50)   # does adding refusal (alpha < 0) make it skittish?
  else:
    c.landscape.update(vis_type="1D_interpolation", steps=10, extra_steps=2, target_path=_unaligned())
  return c


def _unaligned() -> str:
  """SmolLM2 as shipped: the embedded GGUF the aligned model is its LoRA on."""
  return loader.default_model_path()
