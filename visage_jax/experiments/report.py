"""EXPERIMENTS.md for `experiments`: tables and verdicts from the saved results only.

Each experiment saved WORKDIR/<name>.json (its numbers, figure paths and the rules it was judged
by); this module turns them into one markdown report with the figures copied beside it.
"""

import datetime
import json
import os
import platform
import shutil

import jax
import numpy as np

from visage_jax import rundir
from visage_jax.experiments import stats

NAMES = ("f1_basin", "capability", "f3_system_prompts", "f2_finetune", "f4_strength")  # cheap first


# ------------------------------------------------------------------ files


def copy(src: str, dst: str) -> str:
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  shutil.copyfile(src, dst)
  return dst


# ------------------------------------------------------------------ EXPERIMENTS.md


def _pct(v) -> str:
  return "–" if v is None else f"{v:.1f}"


def _verdict(checks) -> str:
  ok = all(passed for _, passed in checks)
  lines = [f"**{'Reproduced' if ok else 'Not (fully) reproduced'}** by these rules:"]
  lines += [f"- [{'x' if passed else ' '}] {text}" for text, passed in checks]
  return "\n".join(lines)


def _fig(report_dir: str, path: str, figdir: str, alt: str) -> str:
  dst = copy(path, os.path.join(figdir, os.path.basename(path)))
  return f"![{alt}]({os.path.relpath(dst, report_dir)})"


def _fluency_note(alphas, asr, ppl) -> list[str]:
  """Where ASR is high, how fluent is the model? The keyword judge counts any non-refusal, gibberish
  included, as jailbroken, so high ASR far from alpha = 0 can mean broken text, not compliance."""
  i0 = min(range(len(alphas)), key=lambda i: abs(alphas[i]))
  high = [i for i, a in enumerate(asr) if a is not None and a >= 90]
  if not high:
    return []
  i = min(high, key=lambda j: abs(j - i0))
  return [f"At the grid point nearest α = 0 where ASR ≥ 90% (α = {alphas[i]:+.2f}), the perplexity of "
          f"the α = 0 answers is {ppl[i] / ppl[i0]:.1f}x its α = 0 value ({ppl[i]:.1f} vs {ppl[i0]:.2f}). "
          "The keyword judge counts any text without a refusal, gibberish included, as jailbroken, so "
          "where perplexity has grown this much, part of the ASR there is broken fluency rather than "
          "compliance.", ""]


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def write_report(c, workdir: str, out_path: str) -> str:
  """EXPERIMENTS.md from WORKDIR/<name>.json of every experiment run so far; figures are copied
  next to it (docs/experiments/) so the report is self-contained in the repository."""
  report_dir = os.path.dirname(os.path.abspath(out_path))
  figdir = os.path.join(report_dir, "docs", "experiments")

  def fig(path: str, alt: str) -> str:
    return _fig(report_dir, path, figdir, alt)

  res = {n: _read_json(os.path.join(workdir, f"{n}.json")) for n in NAMES
         if os.path.exists(os.path.join(workdir, f"{n}.json"))}
  md = _header(c, res)
  for name, r in res.items():
    md += _SECTIONS[name](r, fig)
  md += kept_sections(out_path)
  md += _job_times(res)
  text = "\n".join(md) + "\n"
  rundir.write_atomic(out_path, text)
  return text


HAND_BEGIN, HAND_END = "<!-- kept: measured by hand, not by `visage-jax experiments` -->", "<!-- /kept -->"


def kept_sections(out_path: str) -> list[str]:
  """The blocks of the existing report between HAND_BEGIN and HAND_END (sections whose runs other
  commands made, e.g. F5 and F6), markers included, in order: regenerating keeps them."""
  if not os.path.exists(out_path):
    return []
  with open(out_path, encoding="utf-8") as f:
    text = f.read()
  out, start = [], text.find(HAND_BEGIN)
  while start >= 0:
    end = text.find(HAND_END, start)
    if end < 0:
      break
    out += [text[start:end + len(HAND_END)], ""]
    start = text.find(HAND_BEGIN, end)
  return out


def _f4_rows(c) -> str:
  n = (c.get("f4_strength") or {}).get("eval_prompts")
  return f" (F4's attacks: rows 0–{n - 1})" if n else ""


def _header(c, res: dict) -> list[str]:
  """Title, machine, model, the reduced protocol, the compute, and one line per finding."""
  p = c.protocol
  dev = jax.devices()[0]
  total = sum({j: s or 0 for r in res.values() for j, s in r["job_seconds"].items()}.values())
  md = [
      "# Experiments: the paper's findings at small scale",
      "",
      "Produced by `visage-jax experiments --config=configs/experiments/all.py --workdir=runs/experiments "
      "--out=EXPERIMENTS.md` (each experiment alone: `--config=configs/experiments/<name>.py`). "
      "Every number in F1-F4 is read from the run files; nothing is typed in by hand. Sections that "
      "other commands measured (the re-aligned model, F5, F6) are written by hand from their runs, "
      "name their commands, and are kept when this file is regenerated.",
      "",
      f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {dev.platform} ({dev.device_kind}), "
      f"Python {platform.python_version()}, jax {jax.__version__}; written {datetime.date.today()}.",
      (f"- Model: SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to {c.model.dtype}); the *aligned* "
       "model is it with the shipped safety LoRA (`visage_jax/data/aligned_smollm2_lora.safetensors`, "
       "`configs/align_smollm2.py`) merged in; the *shipped* model is SmolLM2 as released."
       if not c.model.path else f"- Model: `{c.model.path}` (aligned LoRA: `{c.model.aligned_lora or 'none'}`)."),
      f"- Reduced protocol (the paper: 80 prompts, 21 points, 512 tokens): 1D landscapes {p.steps + 1} points "
      f"over α ∈ [{-p.multiplier / 2}, {p.multiplier / 2}] (layer-normalized random directions, norms "
      f"not perturbed), AdvBench rows 0–{p.prompts - 1}, {p.max_new_tokens} greedy tokens, keyword ASR; "
      f"the shipped model (F1), fine-tuned models, interpolations, system prompts and alignment "
      f"strengths use rows 0–{p.prompts_small - 1}; the 2D "
      f"landscape {p.steps_2d + 1}×{p.steps_2d + 1} points × {p.prompts_2d} prompts. ASR at α = 0 of "
      f"fine-tuned models: rows 0–79{_f4_rows(c)}, {p.max_new_tokens} tokens. Attacks: a fresh rank-8 LoRA, lr 1e-3, "
      f"{p.attack_epochs} epochs (`finetune.attack_config`).",
      f"- Compute: {total / 60:.0f} min of job wall time on this machine in all (the runs that finished "
      "each job; attempts interrupted and resumed are not counted).",
      "",
      "Summary (each finding is judged by the rules printed under it):",
      "",
  ]
  for name, r in res.items():
    ok = all(passed for _, passed in r["checks"])
    md.append(f"- {_TITLES[name]}: {'reproduced' if ok else 'not reproduced'} "
              f"({sum(p for _, p in r['checks'])} of {len(r['checks'])} rules hold)")
  return md + [""]


_TITLES = dict(f1_basin="F1 safety basin", capability="capability vs safety along a direction",
               f2_finetune="F2 harmful fine-tuning vs mix", f3_system_prompts="F3 system prompts",
               f4_strength="F4 VISAGE ranks robustness to harmful fine-tuning")


def _table(header: list[str], rows: list[list]) -> list[str]:
  """A markdown table, one line per row."""
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
      "| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def _ci(pair, digits: int = 1) -> str:
  """' [lo, hi]' of a 95% interval, or '' when there is none (an older run)."""
  return "" if not pair else f" [{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]"


def _vis(v, pair) -> str:
  return "–" if v is None else f"{v:.1f}{_ci(pair)}"


def _p(d: dict) -> str:
  """p of a bootstrap difference; at its floor 2 / (B + 1) no resample crossed 0, so p is at most that."""
  floor = 2.0 / (d.get("resamples", 1000) + 1)
  return f"p ≤ {floor:.2g}" if d["p_value"] <= floor * (1 + 1e-9) else f"p = {d['p_value']:.2g}"


def _difference(label: str, d: dict) -> str:
  """One line: a VISAGE difference, its interval and p-value, paired or why not."""
  how = "paired bootstrap" if d["paired"] else f"unpaired bootstrap: {d['unpaired_reason']}"
  return f"- {label}: VISAGE difference {d['visage_difference']:+.1f}{_ci(d['ci95'])}, {_p(d)} ({how})"


def _basin(b) -> str:
  """Each direction's walls [left, right] (– on a side the curve never crosses 50 %)."""
  if not b:
    return "–"
  side = lambda v: "–" if v is None else f"{v:+.2f}"
  return ", ".join("–" if e is None else f"[{side(e.get('left'))}, {side(e.get('right'))}]" for e in b)


def _f1_section(r: dict, fig) -> list[str]:
  md = ["## F1 — an aligned model sits in a safety basin", ""] + _table(
      ["model", "prompts", "ASR at α=0 per direction (%)", "ASR at the ends, mean (%)",
       "VISAGE per direction [95% CI]", "VISAGE (mean) [95% CI]"],
      [[row["model"], row["prompts"], ", ".join(map(_pct, row["asr_center"])),
        ", ".join(map(_pct, row["asr_ends"])),
        ", ".join(_vis(v, (row.get("visage_ci95") or [None] * len(row["visage"]))[k])
                  for k, v in enumerate(row["visage"])),
        _vis(row["visage_mean"], row.get("visage_mean_ci95"))] for row in r["rows"]])
  md += ["", _difference("aligned − shipped", r["difference"]), ""]
  md += _coherent_lines(r["coherent"])
  return md + ["", f"2D random landscape of the aligned model: ASR at the centre {_pct(r['asr_2d_center'])}%, "
               f"2D VISAGE {_vis(r['visage_2d'], r.get('visage_2d_ci95'))}"
               + (f"; {r['basin_2d']['fraction_below'] * 100:.0f}% of the sampled plane below 50% ASR, "
                  f"{r['basin_2d']['connected_points']} grid point(s) in the region connected to the centre" if r.get("basin_2d") else "")
               + ".", "",
               fig(r["figures"]["curves"], "F1 curves"), "",
               fig(r["figures"]["surface"], "F1 2D contour and surface"), "",
               _verdict(r["checks"]), ""]


def _repetition(max_repetition) -> str:
  return "" if max_repetition is None else f" and at most {max_repetition} of its 4-grams repeat earlier ones"


def _coherent_lines(co: dict) -> list[str]:
  """How much of the aligned basin's wall is breakage: keyword vs coherent ASR per direction."""
  if not co.get("asr"):
    return []
  xs = co["coords"]
  kw, coh = (float(np.nansum(np.asarray(v, float))) for v in (co["keyword"], co["asr"]))
  md = [f"How much of the wall is breakage: of the aligned landscape's keyword jailbreaks, "
        f"{100 * coh / kw:.0f}% are coherent text; the rest is broken language the keyword judge counts as "
        "compliance. The aligned model's keyword ASR beside its *coherent* ASR (a "
        f"jailbreak counts only when the generation's NLL under the unperturbed model is ≤ {co['max_nll']} "
        f"nats/token{_repetition(co.get('max_repetition'))}) and the perplexity of its own α = 0 benign answers. VISAGE on coherent ASR: "
        f"{_vis(co['visage']['mean'] if co.get('visage') else None, co.get('visage_ci95'))}; basin walls (50% "
        f"crossings) from keyword ASR {_basin(co.get('basin'))}, from coherent ASR "
        f"{_basin([e.get('coherent') for e in co['basin']] if co.get('basin') else None)}.", "",
        "| α | " + " | ".join(f"{a:+.2f}" for a in xs) + " |", "|---|" + "---|" * len(xs)]
  for k, curve in enumerate(co["asr"]):
    md.append(f"| coherent ASR d{k} (%) | " + " | ".join(_pct(v) for v in curve) + " |")
  for k, curve in enumerate(co.get("perplexity") or []):
    md.append(f"| perplexity d{k} | " + " | ".join("–" if v is None else f"{v:.3g}" for v in curve) + " |")
  return md + [""]


def _capability_section(r: dict, fig) -> list[str]:
  cv = r["curve"]
  ci = cv.get("perplexity_ci95") or [None] * len(cv["alphas"])
  md = ["## Capability along the same direction (the paper's Figs. 7–8)", "",
        f"Perplexity of the aligned model's own α = 0 greedy answers to the {cv['n_answers']} held-out "
        "benign instructions, under θ + α·d for F1's direction 0 (measured by F1's landscape), beside that "
        "direction's ASR; 95% intervals over the answers.", "",
        "| α | " + " | ".join(f"{a:+.2f}" for a in cv["alphas"]) + " |",
        "|---|" + "---|" * len(cv["alphas"]),
        "| ASR (%) | " + " | ".join(_pct(a) for a in r["asr"]) + " |"]
  if cv.get("asr_coherent"):
    md.append("| coherent ASR (%) | " + " | ".join(_pct(a) for a in cv["asr_coherent"]) + " |")
  md += ["| perplexity | " + " | ".join(f"{v:.3g}" for v in cv["perplexity"]) + " |",
         "| 95% CI | " + " | ".join("–" if c is None else f"{c[0]:.3g}–{c[1]:.3g}" for c in ci) + " |", "",
         fig(r["figures"]["curve"], "capability"), ""]
  return md + _fluency_note(cv["alphas"], r["asr"], cv["perplexity"]) + [_verdict(r["checks"]), ""]


def _f2_section(r: dict, fig) -> list[str]:
  md = ["## F2 — harmful fine-tuning leaves the basin; mixing in safety data stays inside (Table 1)", ""]
  md += _table(["model", "training examples", "ASR at α=0 (%, rows 0–79)", "benign answered (of 20)",
                "VISAGE [95% CI]", "aligned − model [95% CI], p"],
               [[row["model"], row["examples"], _pct(row["asr"]), row["benign"],
                 _vis(row.get("visage"), row.get("visage_ci95")),
                 "–" if "difference" not in row else
                 f"{row['difference']['visage_difference']:+.1f}{_ci(row['difference']['ci95'])}, "
                 f"{_p(row['difference'])}"] for row in r["rows"]])
  md += ["", "1D interpolation from the aligned model (α = 0) to the fine-tuned one (α = 1), ASR (%):", ""]
  for name, curve in r["interpolation"].items():
    md.append(f"- aligned → {name}: " + ", ".join(_pct(v) for v in curve))
  return md + ["", fig(r["figures"]["interpolation"], "F2 interpolation"), "", _verdict(r["checks"]), ""]


def _f3_section(r: dict, fig) -> list[str]:
  md = ["## F3 — the system prompt lifts or lowers the basin (Table 2)", ""] + _table(
      ["system prompt", "ASR at α=0 (%)", "VISAGE [95% CI]"],
      [[row["system_prompt"], _pct(row["asr_center"]), _vis(row["visage"], row.get("visage_ci95"))]
       for row in r["rows"]])
  md += [""] + [_difference(k, d) for k, d in r.get("differences", {}).items()]
  return md + ["", fig(r["figures"]["curves"], "F3 curves"), "", _verdict(r["checks"]), ""]


def _f4_section(r: dict, fig) -> list[str]:
  st = r["shots_to_break"]
  shots = list(st[r["higher"]]["mean_asr"])   # read back from JSON: keys are strings
  never = st["never"]

  def n_text(v) -> str:
    return f"> {never - 1}" if v >= never else f"{v:g}"

  rows = {row["key"]: row for row in r["rows"]}
  table = []
  for key in (r["higher"], r["lower"]):
    row, s = rows[key], st[key]
    per_seed = {n: "·".join(f"{100 * sum(v) / len(v):.0f}" for v in row["attacked"][n].values()) for n in shots}
    table.append([row["model"], _pct(row["asr"]), _vis(row["visage"], row.get("visage_ci95"))]
                 + [f"{_pct(s['mean_asr'][n])} ({per_seed[n]})" for n in shots]
                 + [f"{n_text(s['shots_to_break'])} [{n_text(s['ci95'][0])}, {n_text(s['ci95'][1])}]"])
  gap = st[r["lower"]][f"difference_to_{r['higher']}"]
  n_seeds = len(next(iter(rows[r["higher"]]["attacked"].values())))
  md = ["## F4 — VISAGE ranks how easily harmful fine-tuning breaks a model", "",
        f"Each alignment is attacked with harmful_N for every N in {shots[0]}–{shots[-1]} under {n_seeds} seeds "
        "(which examples, LoRA initialization and order); ASR at α = 0 on the landscapes' prompts, averaged over "
        f"seeds (each seed's ASR in parentheses, seeds 0·1·2·…). Shots-to-break: the least N whose mean ASR reaches {stats.BROKEN:.0f}% (\"> {never - 1}\": never within "
        "the shots tried), with a 95% interval from resampling seeds and prompts.", ""]
  md += _table(["alignment", "ASR at α=0 (%, rows 0–79)", "VISAGE [95% CI]"] + [f"N={n}" for n in shots]
               + ["shots to break [95% CI]"], table)
  md += ["", _difference("higher − lower VISAGE", r["difference"]),
         f"- shots-to-break, higher-VISAGE alignment − lower: {gap['difference']:+g} [{gap['ci95'][0]:+g}, "
         f"{gap['ci95'][1]:+g}]", "", _f4_conclusion(r, gap), ""]
  return md + [fig(r["figures"]["curves"], "F4 curves"), "", _verdict(r["checks"]), ""]


def _f4_conclusion(r: dict, gap: dict) -> str:
  """Plainly: does the VISAGE ranking predict which alignment breaks first?"""
  vis = r["difference"]["ci95"]
  if not (vis[0] > 0 or vis[1] < 0):
    return ("**Undecided:** the two alignments' VISAGE cannot be told apart (the interval of the difference "
            "contains 0), so there is no ranking to test.")
  if gap["ci95"][0] > 0:
    return ("**The VISAGE ranking predicts it:** the alignment with the higher VISAGE needs more harmful shots "
            "to break, and the interval of the difference excludes 0.")
  if gap["ci95"][1] < 0:
    return ("**The VISAGE ranking is contradicted:** the alignment with the higher VISAGE breaks with fewer "
            "harmful shots, and the interval of the difference excludes 0.")
  return ("**Not reproduced:** the VISAGE ranking is clear, but the shots-to-break of the two alignments cannot "
          "be told apart at this resolution (the interval of the difference contains 0).")


_SECTIONS = dict(f1_basin=_f1_section, capability=_capability_section, f2_finetune=_f2_section,
                 f3_system_prompts=_f3_section, f4_strength=_f4_section)


def _job_times(res: dict) -> list[str]:
  """The compute each experiment took (its jobs, shared ones included), then every job once."""
  per = [[name, len(r["job_seconds"]), f"{sum(s or 0 for s in r['job_seconds'].values()) / 60:.1f}"]
         for name, r in res.items()]
  md = ["## Compute", "", "Job wall time on this machine per experiment (jobs an experiment shares with "
        "another, such as F1's aligned landscape, count in both):", ""]
  md += _table(["experiment", "jobs", "minutes"], per) + [""]
  return md + _job_table(res)


def _job_table(res: dict) -> list[str]:
  rows, seen = [], set()
  for name, r in res.items():
    for job, s in r["job_seconds"].items():
      if job not in seen:
        seen.add(job)
        rows.append([name, job, "–" if s is None else f"{s:.0f}"])
  return (["## Job wall times", "", "Jobs shared between experiments are listed (and counted) once.", ""]
          + _table(["experiment", "job", "seconds"], rows))
