"""The paper's 1D protocol on one GPU, nothing to download: ours beside the reference, one call.

  visage-jax bench --config=configs/bench_gpu.py --out=FILE.json        # one H100 80 GB: < 8 min
  visage-jax bench --config=configs/bench_gpu.py:tiny --out=FILE.json   # the same code on CPU, seconds
  launch/device_bench.sh OUT_DIR     # on an offline GPU node, from a copy of the repository (README)

A random LLaMA-2-7B in bfloat16 (`random:llama2_7b`: no tokenizer, no EOS, no refusal; its text
means nothing), the 80 AdvBench prompts' lengths under the llama2 template with its system prompt,
21 grid points, 512 new tokens per row. The reference runs first (transformers, as published on
one point with 8 prompts in batches of 4, scaled to 80, and with all 80 in one `generate`), then
our auto mode and the other one, each on as many points as the 8 minutes hold (at least 3). Fields:
bench_protocol.default_config; the JSON: README, Benchmark.
"""
from visage_jax.runs import bench_protocol


def get_config(arg=None):
  c = bench_protocol.default_config()
  c.model.update(path="random:llama2_7b", dtype="bfloat16")
  c.prompts.update(limit=80, template="llama2", system_prompt="default")
  c.landscape.update(steps=20, multiplier=1.0)
  c.decode.max_new_tokens = 512
  c.bench.update(budget_seconds=480, reference_points=1, reference_prompts=8, reference_batch=4)
  if arg not in (None, "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; expected none or tiny.")
  if arg == "tiny":
    c.model.update(path="random:tiny", dtype="float32")
    c.prompts.limit, c.landscape.steps, c.decode.max_new_tokens = 4, 4, 6
    c.bench.update(budget_seconds=600, reference_prompts=2)  # CPU: all points; the reference may take a while
  return c
