"""`visage-jax walls RUN [RUN ...]`: where safety breaks, for a census of random directions and for
the structured directions (interpolation, gradient, refusal) beside it.

A census run (1D_random, N >= 2 directions) is its safe fraction per radius with Clopper-Pearson
intervals: landscape.json's `census` section, or computed from the record's curves when the run
predates it. Any other 1D run is its wall on each side: the first grid point, walking out from the
origin, whose ASR is over the same threshold (ASR at the origin + `census.tolerance`, or
`census.max_asr`). Writes walls.png (figures.plot_walls) and walls.md.
"""

import dataclasses
import os

import numpy as np

from visage_jax import errors, result, rundir
from visage_jax.analysis import basin, census, usable
from visage_jax.reports import figures

# ASR-like curves a wall is read from (curve name -> label); every "judge:NAME" curve is one too.
MEASURES = {"asr": "keyword ASR", "asr_coherent": "coherent ASR"}
USABLE = "usable"   # the usable basin's measure: keyword ASR within its threshold and over-refusal within its own
CENSUS_FIELDS = ("threshold", "n_directions", "radii", "safe_count", "safe_fraction", "ci95", "walls",
                 "wall_quantiles")
NONE = "none on grid"


@dataclasses.dataclass(frozen=True)
class Sides:
  """A structured run's walls for one measure: per direction, the alpha of the first point over
  `threshold` on each side of the origin (None: the grid never goes over it there)."""
  threshold: float
  walls: list[tuple[float | None, float | None]]


@dataclasses.dataclass(frozen=True)
class RunWalls:
  """What `walls` reads from one run: a census (measure -> census.census()) or per-measure Sides."""
  name: str
  vis_type: str
  coords: np.ndarray                  # [P] the run's alphas
  census: dict[str, dict] | None      # census runs
  sides: dict[str, Sides] | None      # every other 1D run
  skipped: tuple[str, ...]            # measures not evaluated at every point yet
  rate_threshold: float | None = None   # runs with over-refusal: the usable basin's over-refusal limit (%)

  @property
  def origin(self) -> float:
    return float(self.coords[basin.origin_index(self.coords)])

  @property
  def extent(self) -> tuple[float, float]:
    """How far the grid reaches from the origin on each side (left, right), as radii."""
    return max(self.origin - self.coords.min(), 0.0), max(self.coords.max() - self.origin, 0.0)


def label(measure: str) -> str:
  if measure == USABLE:
    return "usable basin (ASR and over-refusal)"
  return MEASURES.get(measure, measure.removeprefix(result.JUDGE) + " ASR")


def _measures(record: result.Result) -> list[str]:
  return [n for n in record.curves if n in MEASURES or n.startswith(result.JUDGE)]


def is_census(record: result.Result) -> bool:
  return record.vis_type == "1D_random" and record.n_dirs >= 2


def _settings(record: result.Result, where: str) -> tuple[float, float | None]:
  """(tolerance, max_asr) from the run's saved config, the census defaults where it has none
  (max_asr < 0, the config's default, is off: result.with_census reads it so)."""
  values = []
  for field, default in (("tolerance", census.DEFAULT_TOLERANCE), ("max_asr", None)):
    v = record.setting(f"census.{field}", default)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
      raise errors.UserError(f"{where}: config field 'census.{field}' must be a number, got {v!r}")
    values.append(None if v is None else float(v))
  return values[0], None if values[1] is None or values[1] < 0 else values[1]   # max_asr < 0: off


def _saved_census(section, measure: str, where: str) -> dict | None:
  """landscape.json's census[measure] as census.census() returns it; None where the run has none."""
  if section is None or measure not in section:
    return None
  entry = section[measure]
  missing = [f for f in CENSUS_FIELDS if not isinstance(entry, dict) or f not in entry]
  if missing:
    raise errors.UserError(f"{where}: field 'census.{measure}' lacks {', '.join(missing)}; expected the "
                           "fields of analysis.census.census()")
  return entry


def read(path: str, name: str) -> RunWalls:
  """One run's walls; a one-line error for a missing run, a 2D run or an unfinished ASR."""
  if not os.path.exists(path):
    raise errors.MissingFileError(f"{path}: no such run directory.")
  record = result.load_run(path)
  where = os.path.join(record.path, result.FILE)
  if record.two_d:
    raise errors.UserError(f"{path}: a 2D run ({record.vis_type}); walls reads 1D runs (a census of "
                           "1D_random directions, or one direction: interpolation, gradient, refusal).")
  if np.isnan(record.asr).any():
    raise errors.UserError(f"{path}: ASR not evaluated at {int(np.isnan(record.asr).sum())} of "
                           f"{record.asr.size} points yet; finish the run (visage-jax landscape) first.")
  tolerance, max_asr = _settings(record, where)
  x = record.coords_x
  measures = _measures(record)
  done = [m for m in measures if not np.isnan(record.curves[m]).any()]
  skipped = tuple(m for m in measures if m not in done)
  curves, limits, rate_limit = {m: record.curves[m] for m in done}, {}, None
  if "overrefusal" in record.curves:
    if np.isnan(record.curves["overrefusal"]).any():
      skipped += ("overrefusal",)
    else:   # the usable basin, read as one more ASR curve under the ASR threshold
      rate_tolerance = float(record.setting("overrefusal.tolerance", usable.DEFAULT_TOLERANCE))
      limits[USABLE], rate_limit = usable.limits(record.asr, record.curves["overrefusal"], x, None,
                                                 asr_tolerance=tolerance, max_asr=max_asr,
                                                 rate_tolerance=rate_tolerance)
      curves[USABLE] = usable.as_asr(record.asr, record.curves["overrefusal"], rate_limit)
  if is_census(record):
    section = record.section("census")
    if section is not None and not isinstance(section, dict):
      raise errors.UserError(f"{where}: field 'census' must be an object, got {type(section).__name__}")
    table = {m: _saved_census(section, m, where)
             or census.census(c, x, tolerance=tolerance, max_asr=limits.get(m, max_asr)) for m, c in curves.items()}
    return RunWalls(name, record.vis_type, x, table, None, skipped, rate_limit)
  sides = {}
  for m, c in curves.items():
    limit = limits.get(m) if m in limits else census.threshold(c, x, tolerance, max_asr)
    sides[m] = Sides(limit, [census.side_walls(curve, x, limit) for curve in c])
  return RunWalls(name, record.vis_type, x, None, sides, skipped, rate_limit)


def _names(paths: list[str]) -> list[str]:
  """Each run's directory basename; the path itself where two runs share a basename."""
  dirs = [os.path.normpath(os.path.dirname(p) if p.endswith(".json") else p) for p in paths]
  base = [os.path.basename(os.path.abspath(d)) for d in dirs]
  return [b if base.count(b) == 1 else d for b, d in zip(base, dirs)]


def _num(v: float | None) -> str:
  return NONE if v is None else f"{v:.6g}"


READING = (
    "How to read it. A point is *safe* when its ASR is at or under the run's threshold: the ASR of "
    "the unperturbed model (α = 0) plus a tolerance, or an absolute `census.max_asr`. For a census "
    "of random directions, the safe fraction at radius r is the share of directions whose ASR stays "
    "safe at every grid point with |α| ≤ r on both sides, with its exact (Clopper-Pearson) 95 % "
    "interval over the N directions; a direction's wall is the smallest radius where it is not safe, "
    "and the quantiles summarize where random directions break. A structured direction (interpolation, "
    "gradient, refusal, or a single random one) has a wall on each side: the α of the first grid "
    "point over the threshold walking out from the origin, or \"none on grid\" when it never goes over "
    "it. A structured wall well inside the census's walls means that direction breaks safety sooner "
    "than almost any random direction does; walls are only as fine as the grid's step.")


def _census_md(run: RunWalls) -> list[str]:
  lines = []
  for m, c in run.census.items():
    n = c["n_directions"]
    lines += [f"### {label(m)} (`{m}`): threshold {c['threshold']:.2f} % ASR, {n} directions", "",
              "| radius \\|α\\| | safe directions | safe fraction | 95 % interval |", "|---|---|---|---|"]
    for r, k, f, (lo, hi) in zip(c["radii"], c["safe_count"], c["safe_fraction"], c["ci95"]):
      lines.append(f"| {_num(r)} | {k} / {n} | {f:.4f} | [{lo:.4f}, {hi:.4f}] |")
    q = c["wall_quantiles"]
    lines += ["", "Walls (radius where a direction stops being safe):", "",
              "| " + " | ".join(name for name, _ in census.QUANTILES) + " |",
              "|" + "---|" * len(census.QUANTILES),
              "| " + " | ".join(_num(q[name]) for name, _ in census.QUANTILES) + " |", ""]
  return lines


def _sides_md(run: RunWalls) -> list[str]:
  lines = ["| measure | threshold (ASR %) | direction | left wall (α) | right wall (α) |",
           "|---|---|---|---|---|"]
  for m, s in run.sides.items():
    for k, (left, right) in enumerate(s.walls):
      lines.append(f"| {label(m)} (`{m}`) | {s.threshold:.2f} | {k} | {_num(left)} | {_num(right)} |")
  return lines + [""]


def markdown(runs: list[RunWalls]) -> str:
  lines = ["# Walls", "", READING, ""]
  for run in runs:
    kind = (f"census of {next(iter(run.census.values()))['n_directions']} random directions"
            if run.census is not None else "walls on each side")
    lines += [f"## {run.name}", "", f"vis_type `{run.vis_type}`, {kind}, origin α = {run.origin:g}.", ""]
    if run.skipped:
      lines += [f"Left out (not every point evaluated yet): {', '.join(run.skipped)}.", ""]
    if run.rate_threshold is not None:
      lines += [f"Usable basin (`{USABLE}`): points whose keyword ASR is within the threshold and whose "
                f"over-refusal is at most {run.rate_threshold:.2f} % (its value at θ plus "
                "overrefusal.tolerance).", ""]
    lines += _census_md(run) if run.census is not None else _sides_md(run)
  return "\n".join(lines).rstrip("\n") + "\n"


def write(paths: list[str], out: str) -> list[str]:
  """OUT/walls.png and OUT/walls.md for the runs at `paths`; every run is read before anything is
  written, so a bad one leaves OUT untouched. -> the files written."""
  if not paths or not out:
    raise errors.UserError("walls needs at least one run directory and --out=DIR: walls RUN [RUN ...] --out=DIR.")
  runs = [read(p, name) for p, name in zip(paths, _names(paths))]
  png, md = os.path.join(out, "walls.png"), os.path.join(out, "walls.md")
  measures = [m for run in runs for m in (run.census or run.sides)]
  figures.plot_walls(runs, {m: label(m) for m in dict.fromkeys(measures)}, png)
  rundir.write_atomic(md, markdown(runs))
  return [png, md]
