"""The training step of fine-tuning, as pure functions: examples -> padded token batches with a
response mask, the response-token loss, AdamW with warmup and schedule, and one jitted update
that accumulates micro-batches (full fine-tuning or LoRA). `finetune.py` runs them with effects."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from visage_jax import decode, errors, model, prompts
from visage_jax.checkpoints import lora

SCHEDULES = ("cosine", "constant")


# ------------------------------------------------------------------ data


def encode_examples(examples: list[dict], tokenizer, *, template: str, system_prompt: str,
                    max_length: int) -> dict:
  """Prompt (chat-formatted) + response + EOS, right-padded to one length (a multiple of 16).

  Returns tokens [N, T] int32, mask [N, T] (real tokens) and loss_mask [N, T] (response and EOS:
  the positions whose token is predicted). An example with "eos": False (an answer cut at a
  budget) gets no EOS. Over-long examples are an error, never truncated.
  """
  if tokenizer.eos_token_id is None:
    raise errors.UserError("the tokenizer has no eos_token_id; responses must end with EOS.")
  rows = []
  for i, ex in enumerate(examples):
    text = prompts.format_prompt(ex["prompt"], tokenizer, template, system_prompt)
    p = prompts.tokenize_prompts([text], tokenizer, template)[0]
    r = tokenizer(ex["response"], add_special_tokens=False)["input_ids"]
    r += [tokenizer.eos_token_id] if ex.get("eos", True) else []
    if len(p) + len(r) > max_length:
      raise errors.UserError(f"example {i} has {len(p) + len(r)} tokens (prompt {len(p)}, response+EOS "
                       f"{len(r)}), more than train.max_length={max_length}; shorten it or raise "
                       "train.max_length.")
    rows.append((p, r))
  if not rows:
    raise errors.UserError("no training examples.")
  length = min(max_length, -(-max(len(p) + len(r) for p, r in rows) // 16) * 16)
  pad = decode.pad_id_of(tokenizer)
  tokens = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), bool)
  loss_mask = np.zeros((len(rows), length), bool)
  for i, (p, r) in enumerate(rows):
    tokens[i, :len(p) + len(r)] = p + r
    mask[i, :len(p) + len(r)] = True
    loss_mask[i, len(p):len(p) + len(r)] = True
  return dict(tokens=tokens, mask=mask, loss_mask=loss_mask)


def batch_indices(step: int, n: int, per_step: int, seed: int) -> np.ndarray:
  """Example indices of one optimizer step: epochs of fixed permutations, a function of step only."""
  pos = np.arange(step * per_step, (step + 1) * per_step)
  epochs = pos // n
  perms = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
  return np.array([perms[e][o] for e, o in zip(epochs, pos % n)], np.int64)


# ------------------------------------------------------------------ loss


def _nll_sum(params: dict, batch: dict, cfg: model.ModelConfig) -> tuple[jax.Array, jax.Array]:
  """(sum of NLL over the batch's loss_mask targets, their count): sums, so accumulation is exact."""
  total, count = model.sequence_nll(params, batch["tokens"], batch["mask"], batch["loss_mask"], cfg)
  return jnp.sum(total), jnp.sum(count)


def loss_fn(params: dict, batch: dict, cfg: model.ModelConfig) -> jax.Array:
  """Mean token cross-entropy over the response+EOS positions of the batch."""
  total, count = _nll_sum(params, batch, cfg)
  return total / jnp.maximum(count, 1.0)


# ------------------------------------------------------------------ optimizer and step


def make_optimizer(*, lr: float, steps: int, warmup_steps: int, schedule: str, weight_decay: float,
                   clip_norm: float, decay_mask=None) -> tuple[optax.GradientTransformation,
                                                               optax.Schedule]:
  """AdamW after global-norm clipping; linear warmup, then cosine to zero or constant."""
  if schedule not in SCHEDULES:
    raise errors.UserError(f"train.schedule {schedule!r} is not one of {', '.join(SCHEDULES)}.")
  warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
  rest = (optax.cosine_decay_schedule(lr, max(steps - warmup_steps, 1)) if schedule == "cosine"
          else optax.constant_schedule(lr))
  sched = optax.join_schedules([warmup, rest], [warmup_steps]) if warmup_steps > 0 else rest
  chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
  chain.append(optax.adamw(sched, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*chain), sched


def make_train_step(cfg: model.ModelConfig, opt: optax.GradientTransformation,
                    lora_alpha: float = 0.0, lora_rank: int = 0, shardings=None):
  """jit(state, frozen, batch [A, B, T]) -> (state, metrics): A micro-batches, one update.

  Full fine-tuning trains state["trainable"] = params (frozen is None); LoRA trains the adapter
  and differentiates through lora.merge(frozen, adapter) only. The state is donated. `shardings`
  (of the state: sharding.param_shardings, whose rules also shard the Adam moments like the params)
  pins the new state's layout: one compiled program.
  """
  def effective(trainable, frozen):
    return trainable if frozen is None else lora.merge(frozen, trainable, lora_alpha, lora_rank)

  def step(state, frozen, batch):
    grad_fn = jax.value_and_grad(lambda tr, mb: _nll_sum(effective(tr, frozen), mb, cfg),
                                 has_aux=True)

    def micro(carry, mb):
      g_acc, s_acc, n_acc = carry
      (s, n), g = grad_fn(state["trainable"], mb)
      return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n), None

    zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
    (g, s, n), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), batch)
    g = jax.tree.map(lambda x: x / jnp.maximum(n, 1.0), g)
    updates, opt_state = opt.update(g, state["opt_state"], state["trainable"])
    new = dict(step=state["step"] + 1, trainable=optax.apply_updates(state["trainable"], updates),
               opt_state=opt_state)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new["trainable"])]))
    return new, dict(loss=s / jnp.maximum(n, 1.0), tokens=n, grad_norm=optax.tree.norm(g), updated_finite=finite)

  if shardings is None:
    return jax.jit(step, donate_argnums=0)
  metrics = jax.sharding.NamedSharding(jax.tree.leaves(shardings)[0].mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, donate_argnums=0, out_shardings=(shardings, metrics))
