"""What a landscape measures beside the keyword judge, as scorers built from its config.

The keyword judge counts gibberish as a jailbreak, so a basin wall can be where the model stops
producing language rather than where it starts complying. Coherence (`nll_ref` of every
generation under the unperturbed model, and `asr_coherent`) and capability (perplexity of
reference answers, multiple-choice accuracy; the paper's Figs. 7-8) at the same grid points tell
the two apart. Model judges (Llama Guard) run through `guard_run` on the written generations.
"""

import json
import math
import os

import numpy as np

import jax
import jax.numpy as jnp

from visage_jax import planner, prompts
from visage_jax.analysis import visage
from visage_jax.checkpoints import loader
from visage_jax.measures import capability, coherence, llamaguard, scoring
from visage_jax.runs import pipeline
from visage_jax import rundir

BENIGN_FILE = "capability_texts.jsonl"   # the `benign` answers, saved so a resumed run reuses them


def _finite(v: float | None) -> float | None:
  """JSON has no NaN or infinity: a non-finite measure is written as null."""
  return None if v is None or not math.isfinite(v) else float(v)


class CoherenceScorer(scoring.Scorer):
  """nll_ref: mean NLL per generated token (EOS excluded) given the prompt the row was decoded
  from, under a reference model; a jailbreak counts in asr_coherent only when it is coherent
  (coherence.is_coherent: nll_ref <= max_nll and the record's repetition <= max_repetition)."""
  name = "coherence"
  curves = ("asr_coherent",)

  def __init__(self, params: dict, cfg, prompt_ids: list[list[int]], spec, max_nll: float, model: str,
               max_repetition: float):
    self.reference = coherence.Reference(params, cfg, prompt_ids, eos_ids=spec.eos_ids, pad_id=spec.pad_id,
                                         max_new_tokens=spec.max_new_tokens)
    self.max_nll, self.model, self.max_repetition = float(max_nll), model, float(max_repetition)

  def coherent_jailbreak(self, record: dict) -> bool:
    return coherence.coherent_jailbreak(record, self.max_nll, self.max_repetition)

  def score(self, rows):
    nll = self.reference.nll([r.prompt for r in rows], [r.ids for r in rows])
    return [dict(nll_ref=_finite(v)) for v in nll]

  def point(self, p):
    return dict(asr_coherent=coherence.asr_coherent(p.records, self.max_nll, self.max_repetition))

  def summarize(self, curves, *, two_d, complete):
    score = None
    if complete:
      score = visage.visage_2d(curves["asr_coherent"]) if two_d else visage.visage_directions(curves["asr_coherent"])
    return dict(visage_coherent=score, coherence=dict(max_nll=self.max_nll, model=self.model,
                                                      max_repetition=self.max_repetition))


class CapabilityScorer(scoring.Scorer):
  """Perplexity of reference answers and multiple-choice accuracy at each grid point, prefill-only
  passes on the point's weights (materialized, or fused like the run's decoding)."""
  name = "capability"
  section = "capability"
  needs = ("params",)

  def __init__(self, s: pipeline.Setup, texts, mc):
    self.s, self.texts, self.mc = s, texts, mc
    self.curves = tuple(n for n, v in (("perplexity", texts), ("mc_accuracy", mc)) if v is not None)
    self.mode = "materialized" if s.mode == "materialized" else "fused"

  def point(self, p):
    """The curves, and capability_items: per-text NLL sums and token counts, per-question
    correctness, for the bootstrap over items (uncertainty.capability_ci95)."""
    m, coefs, out, items = self.s.model, np.asarray([p.coords], np.float32), {}, {}
    if self.texts is not None:
      sums, counts = capability.text_nll(m.params, m.cfg, self.texts, self.s.stacked, coefs, r=p.direction,
                                         mode=self.mode)[0]
      out["perplexity"] = _finite(capability.pooled_perplexity(sums, counts))
      items.update(nll=[_finite(v) for v in sums], tokens=[int(k) for k in counts])
    if self.mc is not None:
      correct = capability.mc_correct(m.params, m.cfg, self.mc, self.s.stacked, coefs, r=p.direction,
                                      mode=self.mode)[0]
      out["mc_accuracy"] = _finite(float(np.mean(correct)))
      items["correct"] = [bool(v) for v in correct]
    return dict(out, capability_items=items)


class JudgeScorer(scoring.Scorer):
  """A model judge (Llama Guard or WildGuard format) of each chunk's generations as they are decoded: its records go to
  judges/NAME.jsonl (what `visage-jax judge` writes); guard_run fills what a crash left out and
  writes landscape.json["judges"] at the end of the run."""
  needs = ("generations",)

  def __init__(self, judge: llamaguard.Judge, path: str, name: str, max_new_tokens: int, writer: bool):
    self.judge, self.name, self.max_new_tokens, self.writer = judge, name, max_new_tokens, writer
    self.out = os.path.join(path, "judges", f"{name}.jsonl")
    if writer:
      os.makedirs(os.path.dirname(self.out), exist_ok=True)
    self.done = {(r["direction"], r["step"], r["prompt_index"])
                 for r in rundir.read_jsonl(self.out, repair=writer)}

  def score(self, rows):
    todo = [r for r in rows if (r.direction, r.point, r.prompt) not in self.done]
    if todo:
      got = llamaguard.judge_pairs(self.judge, [(r.goal, r.text) for r in todo], max_new_tokens=self.max_new_tokens)
      with rundir.JsonlAppender(self.out, write=self.writer) as out:
        out.append([dict(direction=r.direction, step=r.point, prompt_index=r.prompt, **g)
                    for r, g in zip(todo, got)])
      self.done.update((r.direction, r.point, r.prompt) for r in todo)
    return [{} for _ in rows]


def judge_placement(c, s: pipeline.Setup, stats: dict | None = None) -> tuple[bool, str]:
  """(inline?, why): the judge decodes beside the target model when its weights take at most half
  of a device's free memory (what decoding allocates per chunk comes on top), else after decoding.
  `stats`: the device's memory_stats() (default: the first local device's)."""
  stats = (jax.local_devices()[0].memory_stats() or {}) if stats is None else stats
  if not stats.get("bytes_limit"):
    return True, f"inline: {jax.local_devices()[0].platform} reports no device memory limit"
  cfg = loader.load_config(loader.resolve(c.judges.model_path, weights=False), c.model.dtype)
  need = planner.param_count(cfg) * jnp.dtype(c.model.dtype).itemsize / s.mesh.shape["model"]
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  gib = f"judge weights {need / 2**30:.2f} GiB per device, {free / 2**30:.2f} GiB free"
  return (True, f"inline: {gib}") if need <= free / 2 else (False, f"after decoding: {gib}")


def scorers(c, s: pipeline.Setup, path: str, judge_inline: bool = False) -> tuple[scoring.Scorer, ...]:
  """The keyword judge, then coherence, capability and an inline model judge as the config asks."""
  out = list(scoring.default())
  if c.coherence.enabled:
    out.append(_coherence(c, s))
  cap = c.capability
  texts = _texts(c, s, path) if cap.texts_path else None
  mc = None
  if cap.mc_path:
    dev = capability.read_mc(cap.mc_dev_path) if cap.mc_dev_path else []
    mc = capability.encode_mc(capability.read_mc(cap.mc_path), s.model.tokenizer, dev_rows=dev,
                              shots=cap.mc_shots)
  if texts is not None or mc is not None:
    out.append(CapabilityScorer(s, texts, mc))
  if c.judges.model_path and judge_inline:
    out.append(JudgeScorer(llamaguard.load(c.judges.model_path, c.model.dtype, s.mesh, c.judges.format), path,
                           c.judges.name, c.judges.max_new_tokens, s.writer))
  return tuple(out)


def _coherence(c, s: pipeline.Setup) -> CoherenceScorer:
  """The reference is the run's own unperturbed model (LoRA merged) unless coherence.model_path,
  read onto the run's mesh like the model (each process its shards, never the whole model)."""
  params, cfg, label = s.model.params, s.model.cfg, "the run's model at the origin"
  if c.coherence.model_path:
    ref = pipeline.load_model(c.coherence.model_path, c.model.dtype, mesh=s.mesh)
    params, cfg, label = ref.params, ref.cfg, c.coherence.model_path
  return CoherenceScorer(params, cfg, s.prompts.ids, s.spec, c.coherence.max_nll, label, c.coherence.max_repetition)


def _texts(c, s: pipeline.Setup, path: str):
  """capability.texts_path rows, formatted like the run's prompts; `benign` answered at theta
  once and saved in the workdir (a resumed run reads them back); the first capability.limit."""
  cap, m = c.capability, s.model
  if cap.texts_path != capability.BENIGN:
    rows = capability.read_texts(cap.texts_path)[:cap.limit or None]
  else:
    saved = os.path.join(path, BENIGN_FILE)
    rows = prompts.load_rows(saved, ("prompt", "response")) if os.path.exists(saved) else None
    if rows is None:
      rows = capability.benign_rows(m.params, m.cfg, m.tokenizer, eos_ids=m.eos_ids, template=c.prompts.template,
                                    system_prompt=c.prompts.system_prompt,
                                    max_new_tokens=cap.benign_max_new_tokens, limit=cap.limit)
      if s.writer:
        rundir.write_atomic(saved, "".join(json.dumps(r) + "\n" for r in rows))
  return capability.encode_texts(rows, m.tokenizer, template=c.prompts.template,
                                 system_prompt=c.prompts.system_prompt)
