"""Peak host memory of a bfloat16 landscape's setup (`pipeline.prepare`, 1D_random, 3 directions):
VmHWM above its start; on CPU the device buffers live in host memory. BENCHMARKS.md, issue #16.

  python tests/prepare_memory_main.py REPO MODEL_DIR WORKDIR   # the first call writes MODEL_DIR

REPO is the checkout to measure (another commit's worktree, for a before/after).
"""

import os
import sys


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    return int(next(l for l in f if l.startswith(field)).split()[1]) * 1024


def main(repo, model_dir, workdir):
  sys.path[:0] = [repo, os.path.join(repo, "tests")]
  import jax
  import fixtures
  from visage_jax.runs import landscape, pipeline

  if not os.path.exists(model_dir):   # 135 MB in bfloat16, gate/up/down 33.6 MB each
    fixtures.save_tiny_hf(model_dir, "llama", tokenizer=fixtures.toy_tokenizer("bpe"), seed=1, hidden_size=512,
                          intermediate_size=2048, num_hidden_layers=16, num_attention_heads=8,
                          num_key_value_heads=8)
    return
  c = landscape.default_config()
  c.model.update(path=model_dir, dtype="bfloat16")
  c.prompts.update(path=fixtures.advbench_path(), limit=2)
  c.landscape.update(steps=1, num_directions=3, save_directions=False)
  m = pipeline.load_model(model_dir, "bfloat16")   # warm the loader's caches
  size = sum(x.nbytes for x in jax.tree.leaves(m.params))
  del m
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")   # VmHWM := VmRSS
  start = _status("VmRSS")
  pipeline.prepare(c, workdir)
  print(f"params {size / 1e6:.0f} MB (bfloat16); prepare peaked {(_status('VmHWM') - start) / 1e6:.0f} MB above its start")


if __name__ == "__main__":
  main(*sys.argv[1:4])
