"""`random:<preset>` models: random weights of a known shape, for timings that download nothing.

The presets are the planner's paper models (planner.MODELS: llama2_7b, llama3_8b, mistral_7b, ...)
and `tiny` (model.ModelConfig.tiny, for CPU). The weights are model.init's from a fixed seed,
drawn straight into their shardings. Such a model has no tokenizer: its prompts are stand-in token
ids (prompts.stand_in_ids), no id ends a row and no keyword refuses, so every row decodes its whole
budget, the worst case a timing wants. Its generations mean nothing: `bench` and `plan` take it,
every command that reads text refuses it.
"""

import functools

import jax

from visage_jax import model, planner
from visage_jax.checkpoints import hf_tensors
from visage_jax.errors import CheckpointError

PREFIX = "random:"
SEED = 0


def is_random(path: str) -> bool:
  return path.startswith(PREFIX)


def refuse_text(path: str) -> None:
  """Where text is read (a landscape, generate, fine-tuning, a judge), a random: model cannot be."""
  if is_random(path):
    raise CheckpointError(f"model {path!r}: random weights have no tokenizer and their generations "
                          "mean nothing; only `visage-jax bench` and `plan` take a random: model.")


def config(path: str, dtype: str = "float32") -> model.ModelConfig:
  """The preset's architecture in `dtype` (params and compute)."""
  name = path[len(PREFIX):]
  if name == "tiny":
    return model.ModelConfig.tiny(dtype=dtype, param_dtype=dtype)
  if name not in planner.MODELS:
    raise CheckpointError(f"{path}: no random preset {name!r}; presets: tiny, {', '.join(planner.MODELS)}.")
  return planner.known_model(name, dtype)


def load(path: str, dtype: str = "float32", shardings=None) -> tuple[model.ModelConfig, dict]:
  """(cfg, params) of the preset, each leaf created where it lives (None: the default device; a
  Mesh; or a tree of shardings): no host or device ever holds more than its shards."""
  cfg = config(path, dtype)
  init = jax.jit(functools.partial(model.init, cfg=cfg),
                 out_shardings=hf_tensors.resolve_shardings(shardings, cfg))
  return cfg, init(jax.random.key(SEED))
