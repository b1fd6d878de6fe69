"""Greedy generations of the demo model (SmolLM2-135M-Instruct + the shipped LoRA, configs/demo.py)
and of SmolLM2 as shipped (configs/demo.py:unaligned), near the origin of the demo's direction, on
safe prompts (XSTest safe, held-out benign instructions) and harmful ones (AdvBench): the raw
material of the hand-labelled set tests/data/refusal_labels.jsonl and of the repetition threshold
(measures/repetition.py). Loops come from alpha = -0.225 along the demo's random direction.

  PYTHONPATH=. python tools/refusal_generations.py --out=/tmp/refusal_generations.jsonl  # ~10 min, 2 cores
"""

import json
import sys

import jax
from absl import app, flags

from configs import demo
from visage_jax import decode, prompts, rundir
from visage_jax.runs import pipeline
from visage_jax.training import trainsets

flags.DEFINE_string("out", "/tmp/refusal_generations.jsonl", "Output JSONL.")
flags.DEFINE_integer("max_new_tokens", 48, "Greedy tokens per prompt (the demo's).")
FLAGS = flags.FLAGS


def prompt_sets() -> dict[str, list[str]]:
  """Every 5th safe XSTest prompt (5 of each of its 10 types), the 20 held-out benign
  instructions, AdvBench rows 0-39 (the LoRA trained on rows >= 80)."""
  xstest = [r["prompt"] for r in prompts.load_xstest()][::5]
  _, benign = trainsets.benign_split("")
  return {"xstest": xstest, "benign": benign, "advbench": prompts.load_goals("", 40)}


def main(_):
  c = demo.get_config()
  sets = prompt_sets()
  # (model, alpha, prompt set, prompts): the origin in full; a few points along the demo's direction.
  plan = []
  for name, lora_path in (("demo", c.model.lora_path), ("smollm2", "")):
    plan.append((name, lora_path, 0.0, [(s, g) for s, gs in sets.items() for g in gs]))
  near = [("advbench", g) for g in sets["advbench"][:16]] + [("xstest", g) for g in sets["xstest"][::5]]
  for alpha in (-0.125, 0.125):
    plan.append(("demo", c.model.lora_path, alpha, near))
  plan.append(("demo", c.model.lora_path, -0.225, [("advbench", g) for g in sets["advbench"][:16]]))

  loaded, rows = {}, []
  for name, lora_path, alpha, items in plan:
    if name not in loaded:
      loaded[name] = pipeline.load_model(c.model.path, c.model.dtype, lora_path)
    m = loaded[name]
    params = m.params
    if alpha:
      ((d,),), _ = pipeline.build_directions(c, m, [])
      params = jax.tree.map(lambda p, v: p + alpha * v, m.params, d)
    goals = [g for _, g in items]
    p = pipeline.pack_prompts(goals, m.tokenizer, c.prompts.template, c.prompts.system_prompt)
    outs = decode.generate(params, m.cfg, p.ids, max_new_tokens=FLAGS.max_new_tokens,
                           eos_ids=m.eos_ids, pad_id=p.pad_id)
    for (prompt_set, goal), ids in zip(items, outs):
      rows.append(dict(model=name, alpha=alpha, prompt_set=prompt_set, prompt=goal,
                       completion=m.tokenizer.decode(ids, skip_special_tokens=True), ids=ids))
    print(f"{name} alpha={alpha}: {len(items)} generations", file=sys.stderr, flush=True)
  rundir.write_atomic(FLAGS.out, "".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
  app.run(main)
