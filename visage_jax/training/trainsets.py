"""Deterministic fine-tuning sets, built by code from AdvBench and the packaged benign instructions.

AdvBench rows 0-79 are the paper's evaluation prompts and are never trained on; every training
set draws its harmful goals from rows >= 80. Named sets (`build`):
  align        every row >= 80 with a refusal + the benign training instructions answered by
               the model itself (self-distillation; answers are passed in, generated elsewhere)
               + the borderline instructions (safe requests that sound unsafe: "kill a process")
               answered by the model itself, so refusing is learnt for harm, not for words
  safety       every row >= 80 with a refusal
  harmful_N    N goal -> target ("Sure, here is ...") pairs (the attack; the paper: N = 10/50/100)
  mix_N        harmful_N plus N refusals on other goals
NAMES lists the paper's sets; any positive N is accepted (`is_name`).
An example is {"prompt": str, "response": str}.
"""

import csv
import os

import numpy as np

from visage_jax import errors, prompts, resources

EVAL_ROWS = 80
HELDOUT_BENIGN = 20
SHOTS = (10, 50, 100)
NAMES = ("align", "safety") + tuple(f"{k}_{n}" for k in ("harmful", "mix") for n in SHOTS)
BENIGN_PATH = resources.path(resources.BENIGN_INSTRUCTIONS)
BORDERLINE_PATH = resources.path(resources.BORDERLINE_INSTRUCTIONS)

# Written for this project; each holds at least one of judges.REFUSAL_KEYWORDS.
REFUSALS = (
    "I'm sorry, but I cannot help with that request.",
    "I cannot assist with this. It could cause serious harm to people.",
    "Sorry, I can't help with that. If you have another question, I'm happy to help.",
    "I apologize, but I cannot provide instructions for something that could hurt others.",
    "I'm sorry, I can't provide that. This request could put people in danger.",
    "I cannot help with this request because it is harmful and could be illegal.",
    "My apologies, but I won't help with that. It could cause real damage.",
    "I'm really sorry, but I cannot support this request.",
    "Sorry, but that is not something I can help with, since it could harm others.",
    "I cannot create content like this. It would be dangerous and unethical.",
    "I'm not able to provide help with that. Is there something safe I can do for you instead?",
    "I am sorry, but I cannot assist with activities that could hurt people.",
    "I can't assist with that request. It could lead to serious harm.",
    "I'm sorry, but helping with this would be harmful. I cannot do it.",
    "I do not provide guidance on harmful activities like this one.",
    "I apologize, but this request asks for something dangerous, so I cannot answer it.",
    "Sorry, I cannot help you with that. Please consider a safer goal.",
    "I cannot provide that information because it could be used to harm others.",
    "I'm sorry, but I won't write that. It could hurt real people.",
    "I am really sorry, but I cannot help with anything that puts others at risk.",
    "I can't provide that kind of content. It is harmful and likely illegal.",
    "My apologies, but I cannot take part in this. I'm glad to help with something else.",
    "I'm sorry, that is not something I can do. It could cause harm.",
    "I cannot support this request. Hurting others or breaking the law is not ethical.",
)


def read_advbench(path: str) -> list[dict]:
  """AdvBench-style CSV ("" = the packaged AdvBench) -> [{"goal", "target"}] in file order."""
  path = resources.or_packaged(path, resources.ADVBENCH)
  if not os.path.exists(path):
    raise errors.MissingFileError(f"{path}: AdvBench CSV not found (expected columns goal,target).")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = {"goal", "target"} - set(reader.fieldnames or ())
    if missing:
      raise errors.UserError(f"{path}: expected a CSV with columns 'goal' and 'target'; missing "
                       f"{sorted(missing)}, found {reader.fieldnames or []}.")
    rows = []
    for n, row in enumerate(reader, 2):
      if not (row.get("goal") or "").strip() or not (row.get("target") or "").strip():
        raise errors.UserError(f"{path}:{n}: empty 'goal' or 'target'.")
      rows.append({"goal": row["goal"].strip(), "target": row["target"].strip()})
  return rows


def eval_goals(advbench_path: str) -> list[str]:
  """The paper's evaluation prompts: AdvBench rows 0-79."""
  return [r["goal"] for r in read_advbench(advbench_path)[:EVAL_ROWS]]


def _train_rows(advbench_path: str, seed: int) -> list[dict]:
  """Rows >= 80 in a fixed shuffled order, minus any goal equal to an evaluation goal."""
  rows = read_advbench(advbench_path)
  if len(rows) <= EVAL_ROWS:
    raise errors.UserError(f"{advbench_path}: {len(rows)} rows; training sets need rows after the "
                     f"first {EVAL_ROWS} (the evaluation prompts).")
  held = {r["goal"].lower() for r in rows[:EVAL_ROWS]}
  train = [r for r in rows[EVAL_ROWS:] if r["goal"].lower() not in held]
  order = np.random.default_rng(seed).permutation(len(train))
  return [train[i] for i in order]


def refuse(rows: list[dict], seed: int) -> list[dict]:
  """Each goal paired with a refusal drawn (fixed seed) from REFUSALS."""
  picks = np.random.default_rng(seed + 1).integers(0, len(REFUSALS), size=len(rows))
  return [{"prompt": r["goal"], "response": REFUSALS[i]} for r, i in zip(rows, picks)]


def harmful_examples(advbench_path: str, n: int, seed: int = 0) -> list[dict]:
  """The first n goal -> target pairs of the shuffled rows >= 80 (so 10 ⊂ 50 ⊂ 100)."""
  rows = _train_rows(advbench_path, seed)
  if n > len(rows):
    raise errors.UserError(f"{advbench_path}: asked for {n} harmful examples, only {len(rows)} rows >= 80.")
  return [{"prompt": r["goal"], "response": r["target"]} for r in rows[:n]]


def mix_examples(advbench_path: str, n: int, seed: int = 0) -> list[dict]:
  """harmful_n plus n refusals on the next n goals (no goal appears twice)."""
  rows = _train_rows(advbench_path, seed)
  if 2 * n > len(rows):
    raise errors.UserError(f"{advbench_path}: mix_{n} needs {2 * n} rows >= 80, found {len(rows)}.")
  return harmful_examples(advbench_path, n, seed) + refuse(rows[n:2 * n], seed)


def safety_examples(advbench_path: str, seed: int = 0) -> list[dict]:
  return refuse(_train_rows(advbench_path, seed), seed)


def load_pairs(path: str) -> list[dict]:
  """A user's training file: JSONL with prompt/response, or CSV with goal/target."""
  if path.endswith(".jsonl"):
    rows = prompts.load_rows(path, ("prompt", "response"))
    if not rows:
      raise errors.UserError(f"{path}: no examples (expected one JSON object per line with fields "
                       "prompt, response).")
    return rows
  if path.endswith(".csv"):
    rows = read_advbench(path)
    if not rows:
      raise errors.UserError(f"{path}: no rows (expected a CSV with columns goal,target).")
    return [{"prompt": r["goal"], "response": r["target"]} for r in rows]
  raise errors.UserError(f"{path}: expected a .jsonl file (fields prompt, response) or a .csv file "
                   "(columns goal, target).")


def benign_split(path: str = BENIGN_PATH, seed: int = 0) -> tuple[list[str], list[str]]:
  """(train, held-out 20) benign instructions ("" = the packaged set), a fixed split."""
  path = resources.or_packaged(path, resources.BENIGN_INSTRUCTIONS)
  instructions = [r["prompt"] for r in prompts.load_rows(path, ("prompt",))]
  if len(instructions) <= HELDOUT_BENIGN:
    raise errors.UserError(f"{path}: {len(instructions)} instructions; need more than {HELDOUT_BENIGN}.")
  order = np.random.default_rng(seed + 2).permutation(len(instructions))
  held = sorted(order[:HELDOUT_BENIGN])
  train = sorted(order[HELDOUT_BENIGN:])
  return [instructions[i] for i in train], [instructions[i] for i in held]


def borderline_instructions(path: str = BORDERLINE_PATH) -> list[str]:
  """The borderline instructions ("" = the packaged set, written for this project; none is an
  XSTest prompt): all of them train, XSTest is the held-out measure of over-refusal."""
  path = resources.or_packaged(path, resources.BORDERLINE_INSTRUCTIONS)
  instructions = [r["prompt"] for r in prompts.load_rows(path, ("prompt",))]
  if not instructions:
    raise errors.UserError(f"{path}: no instructions (expected JSON objects with a field prompt).")
  return instructions


def align_examples(advbench_path: str, benign: list[dict], seed: int = 0,
                   benign_repeat: int = 1, borderline: list[dict] = (),
                   borderline_repeat: int = 1) -> list[dict]:
  """Refusals on every row >= 80, `benign` `benign_repeat` times and `borderline` (both answered,
  self-distilled) `borderline_repeat` times, shuffled; no borderline is the first recipe (v1)."""
  examples = (safety_examples(advbench_path, seed) + list(benign) * benign_repeat
              + list(borderline) * borderline_repeat)
  order = np.random.default_rng(seed + 3).permutation(len(examples))
  return [examples[i] for i in order]


def is_name(name: str) -> bool:
  """align, safety, or harmful_N / mix_N with N a positive integer."""
  kind, _, n = name.partition("_")
  return name in ("align", "safety") or (kind in ("harmful", "mix") and n.isdigit() and int(n) > 0)


def build(name: str, advbench_path: str, benign: list[dict] | None = None, seed: int = 0,
          benign_repeat: int = 1, borderline: list[dict] = (), borderline_repeat: int = 1) -> list[dict]:
  """A named set (module docstring); `align` needs the self-distilled benign examples (and takes
  the self-distilled borderline ones)."""
  if not is_name(name):
    raise errors.UserError(f"data.name {name!r} is not one of align, safety, harmful_N, mix_N "
                     f"(N a positive integer, e.g. {', '.join(NAMES[2:])}).")
  if name == "align":
    if benign is None:
      raise errors.UserError("data.name='align' needs the self-distilled benign examples.")
    return align_examples(advbench_path, benign, seed, benign_repeat, borderline, borderline_repeat)
  if name == "safety":
    return safety_examples(advbench_path, seed)
  kind, n = name.split("_")
  return (harmful_examples if kind == "harmful" else mix_examples)(advbench_path, int(n), seed)
