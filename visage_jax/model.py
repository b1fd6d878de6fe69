"""The LLaMA family (LLaMA-2/3, Mistral, Vicuna, SmolLM2) as pure functions over a params pytree.

Einsum letters, used throughout the package:
  P grid points, B prompts (batch rows), T query, S cache, N/K query/kv heads,
  G query heads per kv head, H head dim, D model, F MLP, V vocab, L layers,
  C perturbation components (directions summed into one weight, 1 or 2).

Params are nested dicts of arrays with layers stacked on a leading L axis, so the
decoder is one `jax.lax.scan` and compile time does not grow with depth. Linear
kernels are stored [in, out] (HF stores [out, in]); checkpoints.py maps each
leaf back to its Hugging Face tensor names.

Every weight read goes through `_dense` / `_embed` / `_scale`, which optionally add
sum_c coef[b, c] * (x . D_c): the landscape engine evaluates many perturbed models
theta + alpha * d in one batch without materializing any of them.
"""

import dataclasses
import math
from typing import Any

import flax
import jax
from flax import traverse_util
import jax.numpy as jnp

from visage_jax import errors

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static architecture; hashable so it can be a jit static argument."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF dict
  sliding_window: int | None = None
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  model_type: str = "llama"
  dtype: str = "float32"        # compute dtype
  param_dtype: str = "float32"  # storage dtype of the params tree

  @classmethod
  def tiny(cls, **overrides):
    """2 layers, width 64: the test model."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16)
    base.update(overrides)
    return cls(**base)

  @property
  def rope_type(self) -> str:
    return dict(self.rope_scaling or ()).get("rope_type", "default")


def config_from_hf(hf: dict, *, dtype: str = "float32", param_dtype: str | None = None,
                   source: str = "config.json") -> ModelConfig:
  """Reads a HF config dict: published keys (rope_theta, rope_scaling) and transformers-5 rope_parameters."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise errors.UserError(f"{source}: model_type {model_type!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)} (LLaMA-2/3, Vicuna, Mistral, SmolLM2).")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise errors.UserError(f"{source}: {flag}=true is not supported by the LLaMA family implementation.")
  if hf.get("hidden_act", "silu") != "silu":
    raise errors.UserError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported; expected 'silu'.")
  try:
    d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling")
    if legacy:
      rope.update(legacy)
    if "type" in rope and "rope_type" not in rope:
      rope["rope_type"] = rope.pop("type")
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise errors.UserError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                       f"{', '.join(SUPPORTED_ROPE_TYPES)}.")
    scaling = None if rope_type == "default" else tuple(sorted(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items()))
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if hf.get("use_sliding_window") is False:
      window = None
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=d,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=n,
        num_kv_heads=int(hf.get("num_key_value_heads") or n),
        head_dim=int(hf.get("head_dim") or d // n),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        rope_scaling=scaling, sliding_window=int(window) if window else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        model_type=model_type, dtype=dtype, param_dtype=param_dtype or dtype)
  except KeyError as e:
    raise errors.UserError(f"{source}: missing field {e.args[0]!r} needed for a {model_type} model.") from None


def config_to_hf(cfg: ModelConfig) -> dict:
  """The transformers config.json of this architecture (for export and for caching converted trees)."""
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[cfg.model_type]
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  rope.update({k: list(v) if isinstance(v, tuple) else v for k, v in (cfg.rope_scaling or ())})
  out = dict(
      architectures=[arch], model_type=cfg.model_type, vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
      rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, rope_parameters=rope,
      tie_word_embeddings=cfg.tie_word_embeddings,
      max_position_embeddings=cfg.max_position_embeddings,
      torch_dtype=cfg.param_dtype)
  if cfg.model_type == "mistral":
    out["sliding_window"] = cfg.sliding_window
  return out


def param_shapes(cfg: ModelConfig) -> dict:
  """The params tree as shapes: the single source of truth for its structure."""
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  NH, KH = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = {
      "embed_tokens": (V, D),
      "layers": {
          "input_layernorm": (L, D),
          "q_proj": (L, D, NH), "k_proj": (L, D, KH), "v_proj": (L, D, KH), "o_proj": (L, NH, D),
          "post_attention_layernorm": (L, D),
          "gate_proj": (L, D, F), "up_proj": (L, D, F), "down_proj": (L, F, D),
      },
      "norm": (D,),
  }
  if not cfg.tie_word_embeddings:
    shapes["lm_head"] = (D, V)
  return shapes


def init(key: jax.Array, cfg: ModelConfig) -> dict:
  """Random params (normal * 0.02, norms near one): for tests and timing-only benchmarks."""
  flat = sorted(traverse_util.flatten_dict(param_shapes(cfg)).items())  # jax's leaf order: keys sorted
  keys = jax.random.split(key, len(flat))
  dtype = jnp.dtype(cfg.param_dtype)

  def one(k, shape, is_norm):
    if is_norm:
      return (1.0 + 0.1 * jax.random.normal(k, shape)).astype(dtype)
    return (0.02 * jax.random.normal(k, shape)).astype(dtype)

  return traverse_util.unflatten_dict({path: one(k, shape, "norm" in path[-1])
                                      for k, (path, shape) in zip(keys, flat)})


@flax.struct.dataclass
class KVCache:
  """Keys/values for every layer; slot s of row b is valid iff mask[b, s]."""
  k: jax.Array      # [L, B, K, S, H]  (the layouts attention's two products read without a
  v: jax.Array      # [L, B, K, H, S]   transpose: each step streams the cache as it lies)
  mask: jax.Array   # [B, S] bool
  pos: jax.Array    # [B] int32, position id of the next token of each row
  index: jax.Array  # [B] int32, next slot each row writes (rows advance independently when
                    #     continuous batching refills some of them)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
  L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  dtype = jnp.dtype(cfg.dtype)
  return KVCache(k=jnp.zeros((L, batch, K, length, H), dtype), v=jnp.zeros((L, batch, K, H, length), dtype),
                 mask=jnp.zeros((batch, length), bool), pos=jnp.zeros((batch,), jnp.int32),
                 index=jnp.zeros((batch,), jnp.int32))


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [H/2] including linear and llama3 scaling, as transformers computes them."""
  h = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  scaling = dict(cfg.rope_scaling or ())
  if cfg.rope_type == "linear":
    inv = inv / scaling["factor"]
  elif cfg.rope_type == "llama3":
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    inv = jnp.where(medium, smoothed, scaled)
  return inv


def _rope(x, positions, inv_freq):
  """Rotate-half RoPE (HF layout); x [B, T, *, H], positions [B, T]."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _rms_norm(x, scale, eps):
  """HF LlamaRMSNorm: normalize in float32, cast back, then scale; scale is [D] or per-row [B, D]."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if scale.ndim == 2:
    scale = scale[:, None, :]
  return scale.astype(x.dtype) * xf.astype(x.dtype)


def _dense(x, w, dw, coef):
  """x . (W + sum_c coef[b, c] D_c) without forming the perturbed weights; x [B, T, in]."""
  y = jnp.einsum("bti,io->bto", x, w.astype(x.dtype))
  if dw is not None:
    xd = jnp.einsum("bti,cio->bcto", x, dw.astype(x.dtype))
    y = y + jnp.einsum("bc,bcto->bto", coef.astype(x.dtype), xd)
  return y


def _scale(w, dw, coef):
  """A norm scale [D], or per-row [B, D] when it is perturbed."""
  if dw is None:
    return w
  return w[None] + jnp.einsum("bc,cd->bd", coef, dw.astype(coef.dtype))


def _write_rows(cache, new, index):
  """cache [B, S, ...] <- new [B, T, ...] at per-row offsets index [B]."""
  return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))(cache, new, index)


def _layer(cfg, inv_freq, coef, attend, carry, layer):
  """One decoder block; `carry` is the residual stream, `layer` the per-layer slices.

  Attention reads the cache as it was before this call (old slots) and the T new keys/values
  separately, and returns only the new ones: the caller writes them into the cache once, after
  all layers, so no step copies the whole cache (it stays in place in the decode loop's carry).
  Only the first `attend` old slots are read (None: all of them).
  """
  x, positions, old_mask, new_mask = carry
  p, d, k_cache, v_cache = layer
  if attend is not None:
    k_cache, v_cache = k_cache[:, :, :attend], v_cache[..., :attend]
  dget = (lambda name: None) if d is None else d.get
  B, T, _ = x.shape
  dtype = x.dtype

  h = _rms_norm(x, _scale(p["input_layernorm"], dget("input_layernorm"), coef), cfg.rms_norm_eps)
  q = _dense(h, p["q_proj"], dget("q_proj"), coef).reshape(B, T, cfg.num_heads, cfg.head_dim)
  k = _dense(h, p["k_proj"], dget("k_proj"), coef).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
  v = _dense(h, p["v_proj"], dget("v_proj"), coef).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
  q, k = _rope(q, positions, inv_freq), _rope(k, positions, inv_freq)
  k, v = k.astype(k_cache.dtype), v.astype(v_cache.dtype)

  G = cfg.num_heads // cfg.num_kv_heads
  qg = q.reshape(B, T, cfg.num_kv_heads, G, cfg.head_dim)
  s_old = jnp.einsum("btkgh,bksh->bkgts", qg, k_cache.astype(dtype)).astype(jnp.float32)
  s_new = jnp.einsum("btkgh,bukh->bkgtu", qg, k.astype(dtype)).astype(jnp.float32)
  scores = jnp.concatenate([s_old, s_new], axis=-1) * (cfg.head_dim ** -0.5)
  S = k_cache.shape[2]
  mask = jnp.concatenate([old_mask[..., :S], new_mask], axis=-1)              # [B, T, S + T]
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  attn = (jnp.einsum("bkgts,bkhs->btkgh", probs[..., :S], v_cache.astype(dtype))
          + jnp.einsum("bkgtu,bukh->btkgh", probs[..., S:], v.astype(dtype)))
  attn = attn.reshape(B, T, cfg.num_heads * cfg.head_dim)
  x = x + _dense(attn, p["o_proj"], dget("o_proj"), coef)

  h = _rms_norm(x, _scale(p["post_attention_layernorm"], dget("post_attention_layernorm"), coef),
                cfg.rms_norm_eps)
  gate = _dense(h, p["gate_proj"], dget("gate_proj"), coef)
  up = _dense(h, p["up_proj"], dget("up_proj"), coef)
  x = x + _dense(jax.nn.silu(gate) * up, p["down_proj"], dget("down_proj"), coef)
  return (x, positions, old_mask, new_mask), (k, v)


def forward(params: dict, tokens: jax.Array, token_mask: jax.Array, cache: KVCache,
            cfg: ModelConfig, dirs: dict | None = None, coef: jax.Array | None = None,
            last_only: bool = False, attend: int | None = None, residuals: bool = False):
  """Runs T new tokens through the model, appending them to the cache.

  tokens, token_mask: [B, T] (mask False marks left padding); dirs: a params-shaped
  tree with a leading C axis (or None); coef: [B, C]. Returns (logits [B, T, V] f32, cache);
  `last_only` computes the head for the last position only (prefill: [B, 1, V]).
  `attend` (static): attention reads only the first `attend` cache slots, so early decode steps
  do not stream the empty end of the cache; the caller guarantees every valid slot lies below it.
  `residuals` (static) also returns the residual stream entering each layer at the last position,
  [L, B, D] float32 (HF `output_hidden_states[l][:, -1]` for l < L): the refusal direction's input.
  """
  dtype = jnp.dtype(cfg.dtype)
  B, T = tokens.shape
  S = cache.mask.shape[1]
  token_mask = token_mask.astype(bool)
  offsets = jnp.cumsum(token_mask, axis=1) - 1
  positions = cache.pos[:, None] + jnp.maximum(offsets, 0)                   # [B, T]
  q_slot = cache.index[:, None] + jnp.arange(T)                                # [B, T] slots written
  s_slot = jnp.arange(S)
  # Old slots: valid cached entries (all before q_slot); new: causal among the T new tokens.
  old_mask = jnp.broadcast_to(cache.mask[:, None, :], (B, T, S))
  new_mask = (jnp.arange(T)[None, None, :] <= jnp.arange(T)[None, :, None]) & token_mask[:, None, :]
  if cfg.sliding_window is not None:
    old_mask = old_mask & (s_slot[None, None, :] > q_slot[:, :, None] - cfg.sliding_window)
    new_mask = new_mask & (q_slot[:, None, :] > q_slot[:, :, None] - cfg.sliding_window)
  kv_mask = _write_rows(cache.mask, token_mask, cache.index)

  if coef is not None:
    coef = coef.astype(jnp.float32)
  dget = (lambda name: None) if dirs is None else dirs.get
  x = _embed(params["embed_tokens"], dget("embed_tokens"), coef, tokens).astype(dtype)
  inv_freq = rope_inv_freq(cfg)

  layer_dirs = None if dirs is None else {k: jnp.moveaxis(v, 1, 0) for k, v in dirs["layers"].items()}
  attend = None if attend is None or attend >= S else attend

  def step(carry, layer):
    out, kv = _layer(cfg, inv_freq, coef, attend, carry, layer)
    return out, (kv, carry[0][:, -1].astype(jnp.float32)) if residuals else kv

  (x, _, _, _), ys = jax.lax.scan(
      step, (x, positions, old_mask, new_mask), (params["layers"], layer_dirs, cache.k, cache.v))
  (k_new, v_new), stream = ys if residuals else (ys, None)
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  # One scatter of the new rows per step (in place); slots past the end are dropped. The indexed
  # (row, slot) pairs come first in the updates: k_new/v_new [L, B, T, K, H] -> [B, T, L, K, H].
  k_all = cache.k.at[:, rows, :, q_slot].set(jnp.moveaxis(k_new, 0, 2), mode="drop")
  v_all = cache.v.at[:, rows, :, :, q_slot].set(jnp.moveaxis(v_new, 0, 2), mode="drop")

  if last_only:
    x = x[:, -1:]
  x = _rms_norm(x, _scale(params["norm"], dget("norm"), coef), cfg.rms_norm_eps)
  if cfg.tie_word_embeddings:
    head = params["embed_tokens"].T
    dhead = None if dirs is None else jnp.swapaxes(dirs["embed_tokens"], 1, 2)
  else:
    head, dhead = params["lm_head"], dget("lm_head")
  logits = _dense(x, head, dhead, coef).astype(jnp.float32)
  new_cache = KVCache(k=k_all, v=v_all, mask=kv_mask,
                      pos=cache.pos + token_mask.sum(axis=1).astype(jnp.int32),
                      index=cache.index + T)
  return (logits, new_cache, stream) if residuals else (logits, new_cache)


def _embed(table, dtable, coef, tokens):
  x = table[tokens]
  if dtable is not None:
    x = x.astype(jnp.float32) + jnp.einsum("bc,cbtd->btd", coef, dtable[:, tokens].astype(jnp.float32))
  return x


def residual_stream(params: dict, tokens: jax.Array, token_mask: jax.Array, cfg: ModelConfig) -> jax.Array:
  """The residual stream entering each layer at each row's last token, [L, B, D] float32 (rows
  left-padded, so the last position is every prompt's last token)."""
  cache = init_cache(cfg, tokens.shape[0], tokens.shape[1])
  return forward(params, tokens, token_mask, cache, cfg, last_only=True, residuals=True)[2]


def logits(params: dict, tokens: jax.Array, cfg: ModelConfig, token_mask: jax.Array | None = None,
           dirs: dict | None = None, coef: jax.Array | None = None) -> jax.Array:
  """Full-sequence logits [B, T, V] without a persistent cache (parity tests, scoring)."""
  if token_mask is None:
    token_mask = jnp.ones(tokens.shape, bool)
  cache = init_cache(cfg, tokens.shape[0], tokens.shape[1])
  out, _ = forward(params, tokens, token_mask, cache, cfg, dirs, coef)
  return out


def sequence_nll(params: dict, tokens: jax.Array,  # [B, T]
                 token_mask: jax.Array,              # [B, T] real tokens (False: padding)
                 target_mask: jax.Array,             # [B, T] the tokens scored, e.g. a response + EOS
                 cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """(summed NLL [B], count [B]) of each row's target tokens, each given every token before it.

  Sums, not means, so batches and micro-batches add up exactly; mean NLL = sum / count and
  perplexity = exp(mean). The first token has no prediction, so it is never scored.
  """
  out = logits(params, tokens, cfg, token_mask)[:, :-1]                             # [B, T-1, V]
  target = tokens[:, 1:]
  picked = jnp.take_along_axis(out, target[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(out, axis=-1) - picked
  w = target_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * w, axis=1), jnp.sum(w, axis=1)


def cast_params(params: dict, dtype: str) -> dict:
  return jax.tree.map(lambda x: x.astype(dtype), params)
