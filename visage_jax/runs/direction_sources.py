"""The gradient and refusal directions of a landscape config: their prompts read and formatted
exactly as the run formats its own, the refusal layer chosen, and what the record keeps of them
(landscape.json["direction_source"]). The arithmetic is directions/gradient.py and refusal.py."""

import jax
import numpy as np

from visage_jax import decode, errors, prompts, resources
from visage_jax.directions import gradient, refusal
from visage_jax.measures import keywords
from visage_jax.training import trainsets

REFUSAL_PROBE_TOKENS = 16   # greedy tokens read to find the model's refusals on the validation rows


def _rows(path: str, spec: str, field: str) -> list[dict]:
  rows = trainsets.read_advbench(path)
  return [rows[i] for i in gradient.row_range(spec, len(rows), field)]


def _packed(goals: list[str], m, c) -> tuple[np.ndarray, np.ndarray]:
  """Goals formatted with the run's template and system prompt, left-padded: (tokens, mask)."""
  texts = [prompts.format_prompt(g, m.tokenizer, c.prompts.template, c.prompts.system_prompt) for g in goals]
  ids = prompts.tokenize_prompts(texts, m.tokenizer, c.prompts.template)
  return prompts.left_pad(ids, max(map(len, ids)), decode.pad_id_of(m.tokenizer))


def gradient_direction(c, m, goals: list[str], dtype: str) -> tuple[dict, dict]:
  """(d, info): d = -grad of the compliance loss on gradient.rows of gradient.prompts_path,
  normalized like a random direction (landscape.norm, landscape.blacklist)."""
  g, ls = c.gradient, c.landscape
  examples = _rows(g.prompts_path, g.rows, "gradient.rows")
  shared = gradient.overlap([e["goal"] for e in examples], goals)
  if shared and not g.allow_overlap:
    raise errors.UserError(f"gradient.rows {g.rows!r}: {len(shared)} gradient goal(s) are also evaluated "
                           f"prompts (e.g. {shared[0]!r}); use other rows or set gradient.allow_overlap=True.")
  batch = gradient.encode(examples, m.tokenizer, template=c.prompts.template, system_prompt=c.prompts.system_prompt)
  loss, d = gradient.gradient_direction(m.params, batch, m.cfg, norm=ls.norm, blacklist=tuple(ls.blacklist),
                                        dtype=dtype)
  return d, dict(kind="gradient", rows=g.rows, n_examples=len(examples),
                 target_tokens=int(np.asarray(batch["loss_mask"]).sum()), loss=float(loss))


def _refusal_tokens(m, c, goals: list[str]) -> list[int]:
  """First tokens of the model's own greedy answers at theta that the keyword judge calls refusals."""
  texts = [prompts.format_prompt(g, m.tokenizer, c.prompts.template, c.prompts.system_prompt) for g in goals]
  ids = prompts.tokenize_prompts(texts, m.tokenizer, c.prompts.template)
  out = decode.generate(m.params, m.cfg, ids, max_new_tokens=REFUSAL_PROBE_TOKENS,
                        eos_ids=m.eos_ids, pad_id=decode.pad_id_of(m.tokenizer))
  first = sorted({o[0] for o in out
                  if o and not keywords.is_jailbroken(m.tokenizer.decode(o, skip_special_tokens=True))})
  if not first:
    raise errors.UserError(f"refusal.validation_rows {c.refusal.validation_rows!r}: the model refuses none of "
                           "them at theta (keyword judge), so there is no refusal to ablate; the refusal "
                           "direction needs a model that refuses.")
  return first


def refusal_direction(c, m, dtype: str) -> tuple[dict, dict]:
  """(D, info): Arditi et al.'s ablation of the refusal direction at refusal.layer (-1: chosen by
  the lowest refusal score under the KL limit), as a weight direction with alpha = 1 the ablation."""
  r = c.refusal
  harmful = [e["goal"] for e in _rows("", r.harmful_rows, "refusal.harmful_rows")]
  validation = [e["goal"] for e in _rows("", r.validation_rows, "refusal.validation_rows")]
  harmless = prompts.load_goals(r.harmless_path or resources.path(resources.BENIGN_INSTRUCTIONS),
                                r.harmless_limit or None)
  n_layers = m.cfg.num_layers
  if not -1 <= int(r.layer) < n_layers:
    raise errors.UserError(f"refusal.layer {r.layer}: expected -1 (chosen) or a layer 0..{n_layers - 1}.")
  directions = refusal.refusal_directions(m.params, m.cfg, _packed(harmful, m, c), _packed(harmless, m, c))
  info = dict(kind="refusal", harmful_rows=r.harmful_rows, n_harmful=len(harmful), n_harmless=len(harmless))
  layer = int(r.layer)
  if layer < 0:
    chosen = refusal.select_layer(m.params, m.cfg, directions, _refusal_tokens(m, c, validation),
                                  _packed(validation, m, c), _packed(harmless, m, c))
    info.update(validation_rows=r.validation_rows, candidates=chosen["candidates"], kl_limit=refusal.KL_LIMIT)
    if chosen["layer"] is None:
      raise errors.UserError(f"refusal.layer=-1: no candidate layer's ablation keeps the harmless next-token "
                             f"distributions within KL {refusal.KL_LIMIT}; set refusal.layer to a layer.")
    layer = chosen["layer"]
  d = refusal.ablation_direction(m.params, directions[layer], dtype)
  info.update(layer=layer, norm_ratio=refusal.norm_ratios(m.params, d))
  return d, info


def info_json(info: dict) -> dict:
  """`info` with numpy and jax scalars as plain floats (for landscape.json)."""
  return jax.tree.map(lambda v: float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) else v, info)
