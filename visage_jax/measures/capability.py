"""Capability along the landscape's directions (the paper's Figs. 7-8): perplexity of reference
answers and multiple-choice accuracy at each grid point, so a basin wall can be read as "the
model stopped refusing" or "the model stopped working".

Both are prefill-only passes at θ + Σ_c coef_c·d_c. `mode="materialized"` (default) writes each
point's weights into one donated buffer (engine.materialize) and runs plain passes: every row of a
point shares those weights, so one weight-sized write per point buys half the FLOPs of the fused
pass. `mode="fused"` computes x·W + Σ c·(x·D) with the point's coefficients instead (no second
copy of the weights), for runs where θ, the directions and a copy do not fit together.
"""

import csv
import dataclasses
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import decode, engine, errors, model, prompts
from visage_jax.measures import continuation
from visage_jax.training import trainsets

BENIGN = "benign"          # capability.texts_path: held-out benign instructions, answered at θ
MODES = ("materialized", "fused")
MC_COLUMNS = ("question", "A", "B", "C", "D", "answer")
LETTERS = ("A", "B", "C", "D")


def _at_points(params: dict, dirs: dict, r: int, coefs: np.ndarray, mode: str,
               evaluate: Callable[[dict, dict | None, np.ndarray | None], float]) -> np.ndarray:
  """evaluate(weights, dirs or None, coef or None) at every point (row of coefs [P, C])."""
  if mode not in MODES:
    raise errors.UserError(f"capability mode {mode!r} is not one of {', '.join(MODES)}.")
  coefs = np.asarray(coefs, np.float32)
  if mode == "fused":
    return np.array([evaluate(params, dirs, c) for c in coefs])
  buffer, out = jax.tree.map(jnp.copy, params), []
  for c in coefs:
    buffer = engine.materialize(buffer, params, dirs, np.int32(r), c)
    out.append(evaluate(buffer, None, None))
  return np.array(out)


# Perplexity of reference answers.

def read_texts(path: str) -> list[dict]:
  """capability.texts_path rows {"prompt", "response"}; errors name file:line."""
  rows = prompts.load_rows(path, ("prompt", "response"))
  if not rows:
    raise errors.UserError(f"{path}: no rows; expected JSON objects with fields prompt, response.")
  return rows


def benign_rows(params: dict, cfg: model.ModelConfig, tokenizer, *, eos_ids: tuple[int, ...], template: str,
                system_prompt: str, max_new_tokens: int, path: str = "", limit: int = 0) -> list[dict]:
  """The held-out benign instructions (trainsets.benign_split; "" = packaged; the first `limit`,
  0 = all) answered greedily at `params`. Held out because the shipped safety LoRA was distilled on the other split's answers.
  Empty answers are dropped (no tokens to score). The caller saves them for a resumed run."""
  held = trainsets.benign_split(path)[1][:limit or None]
  texts = [prompts.format_prompt(g, tokenizer, template, system_prompt) for g in held]
  ids = prompts.tokenize_prompts(texts, tokenizer, template)
  outs = decode.generate(params, cfg, ids, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                         pad_id=decode.pad_id_of(tokenizer))
  rows = [dict(prompt=g, response=tokenizer.decode([t for t in o if t not in eos_ids], skip_special_tokens=True))
          for g, o in zip(held, outs)]
  return [r for r in rows if r["response"].strip()]


def encode_texts(rows: list[dict], tokenizer, *, template: str, system_prompt: str) -> continuation.Layout:
  """Each prompt formatted and tokenized as the run does, then its response without special tokens
  (no EOS: the measure is the answer's text). Prompts are packed (prompts.pack): the chat template
  and system prompt they share, over half of each benign prompt, is computed once per pass."""
  texts = [prompts.format_prompt(r["prompt"], tokenizer, template, system_prompt) for r in rows]
  prompt_ids = prompts.tokenize_prompts(texts, tokenizer, template)
  responses = [tokenizer(r["response"], add_special_tokens=False)["input_ids"] for r in rows]
  if not any(responses):
    raise errors.UserError("capability texts: every response is empty; nothing to score.")
  pad = decode.pad_id_of(tokenizer)
  tokens, mask, shared = prompts.pack(prompt_ids, pad)
  return continuation.Layout(tokens, mask, *continuation.pad_continuations(responses, pad), shared_prefix=shared)


def text_nll(params: dict, cfg: model.ModelConfig, rows: continuation.Layout, dirs: dict,
             coefs: np.ndarray, *, r: int = 0, mode: str = "materialized",
             batch_size: int = 16) -> np.ndarray:
  """[P, 2, T] (summed NLL, token count) of each response at θ + coefs[p]·dirs[r]: perplexity pools
  them; kept per text, they bootstrap over texts (uncertainty.capability_ci95)."""
  def one(weights, d, c):
    return np.stack(continuation.score(weights, cfg, rows, batch_size=batch_size, dirs=d, r=r, coef=c))
  return _at_points(params, dirs, r, coefs, mode, one)


def pooled_perplexity(sums: np.ndarray, counts: np.ndarray) -> float:
  """exp(mean NLL over every response token of every text); non-finite logits give NaN or inf."""
  return float(np.exp(sums.sum() / counts.sum()))


def perplexity(params: dict, cfg: model.ModelConfig, rows: continuation.Layout, dirs: dict,
               coefs: np.ndarray, *, r: int = 0, mode: str = "materialized",
               batch_size: int = 16) -> np.ndarray:
  """[P] pooled perplexity of every response at θ + coefs[p]·dirs[r]. dirs leaves [R, C, ...]
  (the engine's stack)."""
  items = text_nll(params, cfg, rows, dirs, coefs, r=r, mode=mode, batch_size=batch_size)
  return np.array([pooled_perplexity(sums, counts) for sums, counts in items])


# Multiple choice (MMLU CSV layout).

@dataclasses.dataclass(frozen=True)
class ChoiceSet:
  """Encoded questions: one compiled shape for every point."""
  tokens: np.ndarray      # [N, T] int32, left-padded
  mask: np.ndarray        # [N, T] bool
  answers: np.ndarray     # [N] int, index into LETTERS
  choice_ids: tuple[int, ...]   # the last token of " A", " B", " C", " D"


def read_mc(path: str) -> list[dict]:
  """Rows of an MMLU-layout CSV (question,A,B,C,D,answer[,subject]); errors name file:row, the
  header being row 1."""
  if not os.path.exists(path):
    raise errors.MissingFileError(f"{path}: no such file (expected a CSV with header "
                                  f"{','.join(MC_COLUMNS)}[,subject]).")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    found = list(reader.fieldnames or [])
    missing = [k for k in MC_COLUMNS if k not in found]
    unknown = [k for k in found if k not in MC_COLUMNS + ("subject",)]
    if missing or unknown or len(set(found)) != len(found):
      raise errors.UserError(f"{path}:1: expected the header {','.join(MC_COLUMNS)} (optionally "
                             f"subject), found {','.join(found) or 'nothing'}.")
    rows = [_mc_row(path, n, row) for n, row in enumerate(reader, 2)]
  if not rows:
    raise errors.UserError(f"{path}: no questions after the header.")
  return rows


def _mc_row(path: str, n: int, row: dict) -> dict:
  if None in row:
    raise errors.UserError(f"{path}:{n}: more fields than the header's {len(row) - 1}.")
  empty = [k for k in ("question", "answer") if not (row.get(k) or "").strip()]
  missing = [k for k in MC_COLUMNS if row.get(k) is None]
  if missing or empty:
    raise errors.UserError(f"{path}:{n}: missing or empty field(s) {', '.join(missing + empty)}.")
  answer = row["answer"].strip()
  if answer not in LETTERS:
    raise errors.UserError(f"{path}:{n}: answer {row['answer']!r} is not one of A, B, C, D.")
  return dict({k: row[k] for k in MC_COLUMNS[:-1]}, answer=answer, subject=row.get("subject") or "")


def _question(row: dict) -> str:
  return f"{row['question']}\n" + "".join(f"{k}. {row[k]}\n" for k in LETTERS) + "Answer:"


def mc_prompt(row: dict, shots: list[dict]) -> str:
  """The MMLU prompt (Hendrycks et al.): header, the shots answered, the question ending in
  "Answer:". The subject is used as written (no underscore replacement)."""
  about = f" about {row['subject']}" if row.get("subject") else ""
  head = f"The following are multiple choice questions (with answers){about}.\n\n"
  return head + "".join(f"{_question(s)} {s['answer']}\n\n" for s in shots) + _question(row)


def encode_mc(rows: list[dict], tokenizer, *, dev_rows: list[dict] = (), shots: int = 0) -> ChoiceSet:
  """Raw text with the tokenizer's default special tokens; the first `shots` dev rows for all."""
  if shots < 0 or shots > len(dev_rows):
    raise errors.UserError(f"capability.mc_shots={shots} needs that many dev rows; "
                           f"capability.mc_dev_path has {len(dev_rows)}.")
  ids = [tokenizer(mc_prompt(r, list(dev_rows[:shots])))["input_ids"] for r in rows]
  choice_ids = tuple(tokenizer(f" {k}", add_special_tokens=False)["input_ids"][-1] for k in LETTERS)
  if len(set(choice_ids)) != len(LETTERS):
    raise errors.UserError(f"the tokenizer maps ' A', ' B', ' C', ' D' to last tokens {choice_ids}; "
                           "they must differ.")
  tokens, mask = prompts.left_pad(ids, prompts.bucket_length(max(map(len, ids))), decode.pad_id_of(tokenizer))
  answers = np.array([LETTERS.index(r["answer"]) for r in rows])
  return ChoiceSet(tokens, mask, answers, choice_ids)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _choice_logits(params, tokens, mask, choice_ids, dirs=None, r=None, coef=None, *, cfg):
  """Logits [B, 4] of the choice tokens at each row's last position."""
  B, T = tokens.shape
  d, c = None, None
  if dirs is not None:
    d = jax.tree.map(lambda x: x[r], dirs)
    c = jnp.broadcast_to(coef.astype(jnp.float32), (B, coef.shape[-1]))
  out, _ = model.forward(params, tokens, mask, model.init_cache(cfg, B, T), cfg, d, c, last_only=True,
                         attend=0)
  return out[:, -1, choice_ids]


def choice_logits(params: dict, cfg: model.ModelConfig, mc: ChoiceSet, *, batch_size: int = 16,
                  dirs: dict | None = None, r: int = 0, coef: np.ndarray | None = None) -> np.ndarray:
  """[N, 4] logits of ' A'..' D' for every question, in batches of one size (one compiled shape)."""
  n_rows = mc.tokens.shape[0]
  batch_size = continuation.even_batch(n_rows, batch_size)
  extra = () if dirs is None else (dirs, np.int32(r), np.asarray(coef, np.float32))
  out = np.zeros((n_rows, len(LETTERS)), np.float32)
  for start in range(0, n_rows, batch_size):
    n = min(batch_size, n_rows - start)
    sel = np.arange(start, start + batch_size).clip(max=n_rows - 1)
    got = _choice_logits(params, mc.tokens[sel], mc.mask[sel], np.asarray(mc.choice_ids, np.int32),
                         *extra, cfg=cfg)
    out[start:start + n] = jax.device_get(got)[:n]
  return out


def mc_correct(params: dict, cfg: model.ModelConfig, mc: ChoiceSet, dirs: dict, coefs: np.ndarray, *,
               r: int = 0, mode: str = "materialized", batch_size: int = 16) -> np.ndarray:
  """[P, Q] whether each question's argmax choice logit (first on ties) is its answer."""
  def one(weights, d, c):
    logits = choice_logits(weights, cfg, mc, batch_size=batch_size, dirs=d, r=r, coef=c)
    return np.argmax(logits, axis=1) == mc.answers
  return _at_points(params, dirs, r, coefs, mode, one)


def mc_accuracy(params: dict, cfg: model.ModelConfig, mc: ChoiceSet, dirs: dict, coefs: np.ndarray, *,
                r: int = 0, mode: str = "materialized", batch_size: int = 16) -> np.ndarray:
  """[P] fraction in [0, 1] of questions answered correctly (mc_correct)."""
  correct = mc_correct(params, cfg, mc, dirs, coefs, r=r, mode=mode, batch_size=batch_size)
  return np.array([float(np.mean(c)) for c in correct])
