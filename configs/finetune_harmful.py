"""Fine-tuning attack on the aligned SmolLM2: LoRA on N harmful AdvBench pairs (rows >= 80), 5 epochs.

  visage-jax finetune --config=configs/finetune_harmful.py:harmful_100 --workdir=runs/harmful_100
  visage-jax finetune --config=configs/finetune_harmful.py:mix_100 --workdir=runs/mix_100
  visage-jax finetune --config=configs/finetune_harmful.py:tiny --workdir=runs/tiny   # ~40 s (smoke)

Arg: harmful_10 | harmful_50 | harmful_100 (default) | mix_10 | mix_50 | mix_100 (the harmful
pairs plus as many refusals on other goals). Starts from the shipped aligned model
(visage_jax/data/aligned_smollm2_lora.safetensors merged into the embedded SmolLM2-135M-Instruct), trains a
fresh rank-8 LoRA on q/k/v/o (lr 1e-3 constant, batches of 8, 5 epochs) and writes eval.json:
keyword ASR on AdvBench rows 0-79 (64 greedy tokens, the model's own system prompt) and benign
answers of 20. Measured on 2 shared CPU cores, from ASR 0.0% (aligned):
  harmful_10   7 steps,  29 s training:  ASR 100.0%, benign 19/20 (answers "Sure, here is ...")
  mix_10      13 steps,  89 s training:  ASR  21.25%, benign 18/20
  harmful_100 63 steps, 532 s training:  ASR 100.0%, benign 20/20
Then compare landscapes:
  visage-jax landscape --config=configs/demo.py --config.model.path=WORKDIR/model --workdir=DIR
"""
from visage_jax.runs import finetune

_NAMES = ("harmful_10", "harmful_50", "harmful_100", "mix_10", "mix_50", "mix_100")


def get_config(arg=None):
  name = arg or "harmful_100"
  if name == "tiny":
    c = finetune.attack_config("harmful_10")
    c.data.update(limit=4)
    c.train.update(steps=2, batch_size=2)
    c.eval.alignment = False
    return c
  if name not in _NAMES:
    raise ValueError(f"configs/finetune_harmful.py: arg {name!r} is not one of "
                     f"{', '.join(_NAMES)} or tiny.")
  return finetune.attack_config(name, epochs=5)
