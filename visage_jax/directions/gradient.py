"""The gradient direction: the way down the compliance loss (Booster, Huang et al. arXiv 2409.01586).

L(theta) is the mean negative log-likelihood of AdvBench's targets ("Sure, here is ...") given their
goals, pooled over every target token of every example; d = -grad L(theta) in float32, then
normalized per HF tensor like a random direction, so +alpha raises the likelihood of complying and
alpha means the same size as along a random direction (Chen et al. arXiv 2505.17646: the
worst-case landscape is far sharper than the random one).
"""

import jax
import jax.numpy as jnp

from visage_jax import errors, model
from visage_jax.directions import vectors
from visage_jax.training import sft

MICRO_BATCH = 8   # examples per backward pass: memory holds one micro-batch's activations


def encode(examples: list[dict], tokenizer, *, template: str, system_prompt: str) -> dict:
  """Goal (formatted exactly as the run formats its prompts) followed by its target tokenized
  without special tokens and no EOS: tokens, mask and loss_mask [N, T] (sft.encode_examples)."""
  rows = [dict(prompt=e["goal"], response=e["target"], eos=False) for e in examples]
  return sft.encode_examples(rows, tokenizer, template=template, system_prompt=system_prompt,
                             max_length=1 << 16)   # padded to the longest example, never cut


def _nll_sum(params: dict, tokens, mask, loss_mask, cfg: model.ModelConfig):
  total, count = model.sequence_nll(params, tokens, mask, loss_mask, cfg)
  return jnp.sum(total), jnp.sum(count)


def compliance_gradient(params: dict, batch: dict, cfg: model.ModelConfig) -> tuple[float, dict]:
  """(L(theta), grad L(theta)) with L pooled over all target tokens, in float32, accumulated over
  micro-batches of MICRO_BATCH examples (sums of NLL and of their gradients, divided once)."""
  params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  step = jax.jit(jax.value_and_grad(_nll_sum, has_aux=True), static_argnames="cfg")
  n = batch["tokens"].shape[0]
  total, count, grads = 0.0, 0.0, None
  for start in range(0, n, MICRO_BATCH):
    rows = slice(start, start + MICRO_BATCH)
    (nll, cnt), g = step(params, jnp.asarray(batch["tokens"][rows]), jnp.asarray(batch["mask"][rows]),
                         jnp.asarray(batch["loss_mask"][rows]), cfg=cfg)
    total, count = total + float(nll), count + float(cnt)
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
  if count == 0:
    raise ValueError("no target tokens to take the gradient of")
  return total / count, jax.tree.map(lambda g: g / count, grads)


def gradient_direction(params: dict, batch: dict, cfg: model.ModelConfig, *, norm: str = "layer",
                       blacklist: tuple[str, ...] = ("norm",), dtype: str = "float32") -> tuple[float, dict]:
  """(L(theta), d) with d = -grad L normalized per HF tensor like a random direction."""
  loss, grads = compliance_gradient(params, batch, cfg)
  down = jax.tree.map(jnp.negative, grads)
  del grads
  return loss, vectors.normalized_direction(down, params, cfg, norm=norm, blacklist=blacklist, dtype=dtype)


def overlap(goals: list[str], evaluated: list[str]) -> list[str]:
  """Gradient goals that are also evaluated prompts (compared stripped and case-folded)."""
  seen = {g.strip().casefold() for g in evaluated}
  return [g for g in goals if g.strip().casefold() in seen]


def row_range(text: str, n_rows: int, field: str) -> range:
  """`start:end` (Python slice bounds, end exclusive) of a file of `n_rows` rows, checked."""
  parts = str(text).split(":")
  try:
    start, end = (int(p) for p in parts) if len(parts) == 2 else (None, None)
  except ValueError:
    start = end = None
  if start is None or not 0 <= start < end <= n_rows:
    raise errors.UserError(f"{field} {text!r}: expected 'start:end' with 0 <= start < end <= {n_rows} "
                           "(the file's rows).")
  return range(start, end)
