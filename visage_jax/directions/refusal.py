"""The refusal direction (Arditi et al., NeurIPS 2024, arXiv 2406.11717) as a weight direction.

r_l = mean residual stream entering layer l at the last prompt token over harmful prompts minus
the same over harmless ones; r = r_l / |r_l|. Projecting r out of everything that writes to the
residual stream (the token embedding, every attention output and MLP down projection) is Arditi
et al.'s directional ablation, and as a weight edit it is linear: theta + 1 * D with
D_E = -E r r^T (embedding rows are residual vectors) and D_W = -r r^T W (HF orientation
[d_model, .]). So D is not renormalized: alpha = 1 is the ablation itself. A tied embedding is one
tensor, edited once, which also edits the unembedding (as Arditi et al.'s code does for tied models).
"""

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import model

WRITERS = (("layers", "o_proj"), ("layers", "down_proj"))   # ours: [L, in, D], HF W^T
KL_LIMIT = 0.1              # the ablation may move harmless next-token distributions this much
CANDIDATE_DEPTH = 0.8       # candidate layers l < 0.8 L (Arditi et al. skip the last layers)


def mean_stream(params: dict, tokens: np.ndarray, mask: np.ndarray, cfg: model.ModelConfig,
                batch: int = 16) -> np.ndarray:
  """Mean over prompts (left-padded rows) of the residual stream entering each layer at the last
  token: [L, D] float64 on the host."""
  fn = jax.jit(model.residual_stream, static_argnames="cfg")
  total = None
  for start in range(0, tokens.shape[0], batch):
    part = np.asarray(fn(params, jnp.asarray(tokens[start:start + batch]), jnp.asarray(mask[start:start + batch]),
                         cfg=cfg), np.float64).sum(axis=1)
    total = part if total is None else total + part
  return total / tokens.shape[0]


def refusal_directions(params: dict, cfg: model.ModelConfig, harmful: tuple, harmless: tuple) -> np.ndarray:
  """r_l / |r_l| for every layer l, [L, D] float32; `harmful` and `harmless` are (tokens, mask)."""
  r = mean_stream(params, *harmful, cfg) - mean_stream(params, *harmless, cfg)
  norm = np.linalg.norm(r, axis=1, keepdims=True)
  # zero where the two means agree (e.g. layer 0 when every prompt ends in the same template token)
  return np.where(norm > 0, r / np.where(norm > 0, norm, 1.0), 0.0).astype(np.float32)


def ablation_direction(params: dict, r: np.ndarray, dtype: str = "float32") -> dict:
  """The params-shaped D with theta + D = theta with `r` (unit, [D]) projected out of every writer
  to the residual stream; zero elsewhere. Computed in float32, cast to `dtype`."""
  r = jnp.asarray(r, jnp.float32)

  def edit(w):   # rows of w (its last axis) are residual vectors: w - (w r) r^T
    w = w.astype(jnp.float32)
    return (-(w @ r)[..., None] * r).astype(dtype)

  d = jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)
  d["embed_tokens"] = edit(params["embed_tokens"])
  for outer, inner in WRITERS:
    d[outer][inner] = edit(params[outer][inner])
  return d


def norm_ratios(params: dict, d: dict) -> dict:
  """|D| / |theta| over all tensors and per edited leaf: how far alpha = 1 is, comparable with a
  random direction normalized per tensor (whose ratio is 1 for every perturbed tensor)."""
  sq = lambda x: float(jnp.sum(jnp.square(x.astype(jnp.float32))))
  per = {"embed_tokens": (sq(d["embed_tokens"]) / sq(params["embed_tokens"])) ** 0.5}
  for outer, inner in WRITERS:
    per[f"{outer}.{inner}"] = (sq(d[outer][inner]) / sq(params[outer][inner])) ** 0.5
  total_d = sum(sq(x) for x in jax.tree.leaves(d))
  total_p = sum(sq(x) for x in jax.tree.leaves(params))
  return dict(total=(total_d / total_p) ** 0.5, per_tensor=per)


def candidate_layers(num_layers: int) -> list[int]:
  return [l for l in range(num_layers) if l < CANDIDATE_DEPTH * num_layers]


def _next_token_logprobs(params, tokens, mask, cfg):
  cache = model.init_cache(cfg, tokens.shape[0], tokens.shape[1])
  out, _ = model.forward(params, tokens, mask, cache, cfg, last_only=True)
  return jax.nn.log_softmax(out[:, -1].astype(jnp.float32), axis=-1)


_logprobs = jax.jit(_next_token_logprobs, static_argnames="cfg")


def refusal_score(logprobs: np.ndarray, refusal_tokens: list[int]) -> np.ndarray:
  """Per prompt, the log-odds that the first generated token is one of `refusal_tokens`."""
  lp = np.asarray(logprobs, np.float64)
  p = np.exp(lp[:, refusal_tokens]).sum(axis=1)
  p = np.clip(p, 1e-12, 1 - 1e-12)
  return np.log(p) - np.log1p(-p)


def kl(base: np.ndarray, other: np.ndarray) -> float:
  """Mean over prompts of KL(base || other) of next-token distributions given as log-probs."""
  b, o = np.asarray(base, np.float64), np.asarray(other, np.float64)
  return float(np.mean(np.sum(np.exp(b) * (b - o), axis=1)))


def select_layer(params: dict, cfg: model.ModelConfig, directions: np.ndarray, refusal_tokens: list[int],
                 validation: tuple, harmless: tuple) -> dict:
  """Arditi et al.'s selection: for each candidate layer, the mean refusal score on the harmful
  validation prompts after ablating r_l, and the KL its ablation causes on harmless prompts; the
  layer with the lowest score among those with KL < KL_LIMIT. -> {layer, candidates: [...]}."""
  base = np.asarray(_logprobs(params, *map(jnp.asarray, harmless), cfg=cfg))
  rows = []
  for layer in candidate_layers(cfg.num_layers):
    if not np.any(directions[layer]):
      rows.append(dict(layer=layer, refusal_score=None, kl=None))   # no direction at this layer
      continue
    edited = jax.tree.map(lambda p, d: (p.astype(jnp.float32) + d.astype(jnp.float32)).astype(p.dtype),
                          params, ablation_direction(params, directions[layer]))
    score = float(np.mean(refusal_score(_logprobs(edited, *map(jnp.asarray, validation), cfg=cfg),
                                        refusal_tokens)))
    moved = kl(base, _logprobs(edited, *map(jnp.asarray, harmless), cfg=cfg))
    rows.append(dict(layer=layer, refusal_score=score, kl=moved))
  allowed = [r for r in rows if r["kl"] is not None and r["kl"] < KL_LIMIT and np.isfinite(r["refusal_score"])]
  chosen = min(allowed, key=lambda r: r["refusal_score"])["layer"] if allowed else None
  return dict(layer=chosen, candidates=rows)
