"""Benchmark on the CI-class CPU: SmolLM2-135M-Instruct, 1D random, 21 points x 32 AdvBench prompts x 64 tokens.

  visage-jax bench --config=configs/bench_smollm2.py --out=runs/bench_smollm2.json        # ~30 min on 2 cores
  visage-jax bench --config=configs/bench_smollm2.py:tiny --out=/tmp/bench.json            # smoke, ~1 min

The reference methods run 3 of the 21 points (ends and centre) and are extrapolated linearly;
our modes run all 21. Fixed-length decoding for every timed method; `default_real` is our
landscape run as users run it (EOS + stop_at_refusal, engine.mode=auto).
"""
from visage_jax.runs import bench


def get_config(arg=None):
  c = bench.default_config()
  c.prompts.limit = 32
  c.landscape.update(vis_type="1D_random", steps=20, multiplier=1.0)
  c.decode.max_new_tokens = 64
  c.bench.reference_points = 3
  if arg == "tiny":
    c.prompts.limit, c.landscape.steps, c.decode.max_new_tokens = 4, 2, 6
    c.bench.reference_points = 2
  return c
