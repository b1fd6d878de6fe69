"""The aligned demo model's before/after table (README, "The aligned demo model"): for SmolLM2 as
shipped and each adapter, finetune.evaluate_alignment at alpha = 0 (keyword ASR on AdvBench rows
0-79, the 20 held-out benign instructions answered and the perplexity of those answers, over-refusal
on the 250 safe XSTest prompts by the prefix judge and the keywords), greedy, the model's chat
template and default system prompt, at each token budget.

  PYTHONPATH=. python tools/align_eval.py --lora=,v1,new --max_new_tokens=64,48 --out=/tmp/align_eval.jsonl
"""

import json

from absl import app, flags

from visage_jax.checkpoints import lora
from visage_jax.runs import finetune, pipeline

ADAPTERS = {"": "", "v1": lora.ALIGNED_SMOLLM2_V1, "new": lora.ALIGNED_SMOLLM2}
flags.DEFINE_list("lora", ["", "v1", "new"], "Adapters: '' (SmolLM2 as shipped), v1, new or a path.")
flags.DEFINE_list("max_new_tokens", ["64", "48"], "Greedy token budgets (64: eval.json; 48: the demo).")
flags.DEFINE_string("out", "/tmp/align_eval.jsonl",
                    "Appends one JSON line per (adapter, budget), generations included.")
FLAGS = flags.FLAGS


def main(_):
  with open(FLAGS.out, "a") as f:
    for name in FLAGS.lora:
      m = pipeline.load_model("", "float32", ADAPTERS.get(name, name))
      for tokens in map(int, FLAGS.max_new_tokens):
        ev = finetune.evaluate_alignment(m.params, m.cfg, m.tokenizer, tokens, eos_ids=m.eos_ids, xstest=250)
        f.write(json.dumps(dict(lora=name, max_new_tokens=tokens, **ev)) + "\n")
        f.flush()
        print(name or "smollm2", tokens, {k: v for k, v in ev.items() if not k.endswith("generations")},
              flush=True)


if __name__ == "__main__":
  app.run(main)
