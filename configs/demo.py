"""Demo: a 1D random landscape of the embedded SmolLM2-135M-Instruct, small enough for 2 CPU cores.

  visage-jax landscape --config=configs/demo.py --workdir=runs/demo          # a few minutes
  visage-jax landscape --config=configs/demo.py:tiny --workdir=runs/tiny     # under a minute (CI)

Reduced protocol: 16 AdvBench prompts, 11 grid points over [-0.5, 0.5], 48 new tokens.
"""
from visage_jax import landscape


def get_config(arg=None):
  c = landscape.default_config()
  c.prompts.limit = 16
  c.landscape.update(vis_type="1D_random", steps=10, multiplier=1.0, num_directions=1)
  c.decode.max_new_tokens = 48
  if arg == "tiny":
    c.prompts.limit, c.landscape.steps, c.decode.max_new_tokens = 4, 2, 8
  return c
