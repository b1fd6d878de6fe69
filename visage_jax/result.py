"""The record of a landscape run, RUN/landscape.json: the only module that reads or writes that file.

`Result.from_json` checks at the edge every field a reader uses and names the one that is wrong,
in one line; reports, figures, `compare`, sweeps, experiments and the judge read the typed fields.
`to_json` gives back the mapping the record was made from, key order included, with `schema`
(SCHEMA) as its first key: fields this version does not type (timings, mode, mesh, the config,
sections added later) survive a rewrite. A file without `schema` (written before it) is schema 1.

Curves are named as generations.jsonl's point lines name them: "asr" (keyword judge),
"asr_coherent", "perplexity" and "mc_accuracy" (the capability section), "overrefusal" (its
section's rate, % of safe prompts refused), any other per-point
measure a scorer wrote at the top level, and "judge:NAME" for each model judge's ASR. Each is an
array shaped as in the file, [direction, point] in 1D and [x, y] in 2D, NaN where the file has null.

  run = visage_jax.load_run("runs/demo")
  run.curves["asr"], run.visage, run.ci95["asr"], next(run.generations())
"""

import copy
import dataclasses
import json
import os
from typing import Iterator

import numpy as np

from visage_jax import errors, rundir
from visage_jax.analysis import basin as basin_lib
from visage_jax.analysis import census as census_lib
from visage_jax.analysis import usable as usable_lib
from visage_jax.analysis import visage as visage_lib
from visage_jax.directions import grid

SCHEMA = 1
FILE = "landscape.json"
VIS_TYPES_1D = tuple(v for v in grid.VIS_TYPES if v.startswith("1D"))
VIS_TYPES_2D = tuple(v for v in grid.VIS_TYPES if v.startswith("2D"))
SECTIONS = ("capability",)          # sections that hold curves only (scoring.Scorer.section)
SUMMARY_FIELDS = ("ci95", "basin")  # what a complete run of this version has; older ones lack some
JUDGE = "judge:"                    # curve name prefix of a model judge's ASR
# the file's names of a curve's VISAGE and of its basin entry (a judge's: its section, its name)
VISAGE_FIELDS = {"asr": "visage", "asr_coherent": "visage_coherent"}
BASIN_KEYS = {"asr": "", "asr_coherent": "coherent"}
CROSSING = ("left", "right", "width", "resolution")
REGION = ("fraction_below", "connected_fraction", "connected_points")


@dataclasses.dataclass(frozen=True, eq=False)
class Visage:
  """The VISAGE of one ASR curve (None until every point is in) and its 95% intervals."""
  mean: float | None                      # 1D: the mean over directions; 2D: the plane's
  per_direction: np.ndarray | None        # [D] (1D)
  ci95: tuple[float, float] | None        # of `mean`
  per_direction_ci95: np.ndarray | None   # [D, 2] (1D); NaN where none


@dataclasses.dataclass(frozen=True)
class Judge:
  """A model judge's settings and state (its ASR is the curve "judge:NAME")."""
  model: str | None
  max_new_tokens: int | None
  dtype: str | None
  placement: str | None   # where a landscape run judged: inline, or after decoding, and why
  complete: bool
  n_judged: int | None
  format: str = "llamaguard"   # llamaguard | wildguard (written only when not llamaguard)


@dataclasses.dataclass(frozen=True, eq=False)
class Refined:
  """One direction's points added between grid points by landscape.refine (never in VISAGE)."""
  alpha: np.ndarray                 # [K]
  round: np.ndarray | None          # [K]
  curves: dict[str, np.ndarray]     # name -> [K]
  nonfinite: np.ndarray | None      # [K] bool


@dataclasses.dataclass(frozen=True)
class Overrefusal:
  """The over-refusal section's settings and usable basin (its rate is the curve "overrefusal")."""
  judge: str | None
  n_prompts: int | None
  prompts_path: str | None
  usable_basin: dict | None   # usable.usable_basin() once complete


@dataclasses.dataclass(frozen=True)
class Bootstrap:
  """How the run's 95% intervals were drawn (ci95's header)."""
  method: str | None
  resamples: int | None
  seed: int | None
  degenerate: dict | None


@dataclasses.dataclass(frozen=True, eq=False)
class Trajectory:
  """A fine-tuning trajectory drawn on the run's plane (runs/trajectory.py): landscape.json["trajectory"]."""
  steps: np.ndarray                  # [n] training step of each checkpoint, in order (the last is theta_final)
  labels: tuple[str, ...]            # [n] what each checkpoint was read from
  coords: np.ndarray                 # [n, 2] (alpha, beta) on the grid's axes
  scale: np.ndarray                  # [2] parameter-space length of one grid unit along d1, d2
  explained_variance: np.ndarray     # [2] of the PCA components d1, d2
  residual_ratio: np.ndarray         # [n] |delta_i off the plane| / |delta_i|
  checkpoint: dict[str, np.ndarray]  # curve name -> [n] measured at theta_i itself (NaN: not yet)
  plane: dict[str, np.ndarray]       # curve name -> [n] the grid's surface at (alpha_i, beta_i), bilinear
  gap: dict[str, "Gap"] = dataclasses.field(default_factory=dict)   # curve name -> checkpoint vs plane


@dataclasses.dataclass(frozen=True)
class Gap:
  """checkpoint - plane of one curve, paired over prompts (runs/trajectory.gaps), with intervals."""
  difference: np.ndarray        # [n] percentage points
  difference_ci95: np.ndarray   # [n, 2] bootstrap over prompts
  checkpoint_ci95: np.ndarray   # [n, 2] the checkpoint's own value's interval


@dataclasses.dataclass(frozen=True, eq=False)
class Result:
  """A landscape run's results; see the module docstring for names and shapes."""
  vis_type: str
  coords_x: np.ndarray                # [X]
  coords_y: np.ndarray | None         # [Y] (2D)
  curves: dict[str, np.ndarray]       # name -> [D, P] or [X, Y]
  ci95: dict[str, np.ndarray]         # curve name -> [..., 2], NaN where none; curves with intervals
  visages: dict[str, Visage]          # ASR curve name -> its VISAGE
  nonfinite: np.ndarray               # bool, shaped like asr: inf/NaN logits at that point
  complete: bool
  n_prompts: int | None
  model: str | None
  seed: int | None
  max_nll: float | None               # coherence: the thresholds of asr_coherent
  max_repetition: float | None        # (None: a run from before repetition was measured)
  coherence_model: str | None
  judges: dict[str, Judge]
  refined: tuple[Refined, ...]        # per direction (1D, landscape.refine)
  basin: dict[str, list[dict] | dict] | None  # curve -> per direction {CROSSING} (1D) or {REGION} (2D)
  bootstrap: Bootstrap | None         # None: the run has no ci95
  judge_disagreements: tuple[dict, ...]
  config: dict                        # the resolved config the run saved ({} if none)
  trajectory: Trajectory | None = None   # a trajectory run's checkpoints on its plane
  overrefusal: Overrefusal | None = None   # runs with overrefusal.prompts_path
  path: str | None = None             # the run directory, when read from or written to one
  _json: dict = dataclasses.field(default_factory=dict, repr=False)

  # ---------------------------------------------------------------- what a notebook reads

  @property
  def two_d(self) -> bool:
    return self.coords_y is not None

  @property
  def asr(self) -> np.ndarray:
    return self.curves["asr"]

  @property
  def visage(self) -> float | None:
    """The keyword ASR's VISAGE: the mean over directions (1D), the plane's (2D)."""
    return self.visages["asr"].mean

  @property
  def visage_per_direction(self) -> np.ndarray | None:
    return self.visages["asr"].per_direction

  @property
  def visage_ci95(self) -> tuple[float, float] | None:
    return self.visages["asr"].ci95

  @property
  def n_dirs(self) -> int:
    """Directions of generations.jsonl's lines (one plane in 2D)."""
    return 1 if self.two_d else self.asr.shape[0]

  @property
  def n_points(self) -> int:
    """Grid points per direction, as generations.jsonl's `step` counts them (x-major in 2D)."""
    return self.coords_x.size * (self.coords_y.size if self.two_d else 1)

  @property
  def summarized(self) -> bool:
    """Whether the file has every summary field of this version (SUMMARY_FIELDS)."""
    return all(f in self._json for f in SUMMARY_FIELDS)

  @property
  def asr_at_zero(self) -> float | None:
    """ASR of the unperturbed model: alpha = 0 (and beta = 0), direction 0 in 1D (every direction
    shares that point); None off the grid or not evaluated yet."""
    i = visage_lib.zero_index(self.coords_x)
    j = 0 if not self.two_d else visage_lib.zero_index(self.coords_y)
    if i is None or j is None:
      return None
    return _number(self.asr[i, j] if self.two_d else self.asr[0, i])

  def setting(self, dotted: str, default=None):
    """The saved config's field, e.g. setting("landscape.refine"); `default` where it has none."""
    node = self.config
    for part in dotted.split("."):
      if not isinstance(node, dict) or part not in node:
        return default
      node = node[part]
    return node

  def to_grid(self, per_point: np.ndarray) -> np.ndarray:
    """[n_dirs, n_points, ...] (generations.jsonl's direction and step) -> the file's shape."""
    if not self.two_d:
      return per_point
    return per_point[0].reshape(self.coords_x.size, self.coords_y.size, *per_point.shape[2:])

  def generations(self, file: str = "generations.jsonl") -> Iterator[dict]:
    """Every generation of generations.jsonl (or of `file` in its layout: overrefusal.jsonl) in
    file order, one dict each: its point's direction, step and coords, its prompt_index, then its
    record (prompt, generation, jailbroken, ...)."""
    if self.path is None:
      raise errors.UserError(f"this result was not read from a run directory: no {file} to read.")
    for line in rundir.read_jsonl(os.path.join(self.path, file), repair=False):
      for q, rec in enumerate(line["outputs"]):
        yield dict(direction=line["direction"], step=line["step"], coords=line["coords"], prompt_index=q, **rec)

  def section(self, name: str):
    """A top-level field as the file holds it (a copy; None where absent), for code that passes
    it on unchanged (the CLI's JSON line, the experiments' result files)."""
    return copy.deepcopy(self._json.get(name))

  def headline(self) -> dict:
    """The CLI's one JSON line about a run: grid, ASR, VISAGE, state and speed, as in the file."""
    keys = ("vis_type", "coords_x", "coords_y", "asr", "visage", "n_prompts", "complete",
            "decode_seconds", "tokens_per_second")
    return {k: self.section(k) for k in keys}

  # ---------------------------------------------------------------- JSON

  def to_json(self) -> dict:
    """The mapping this record was made from (a copy), `schema` first."""
    return {"schema": SCHEMA, **{k: copy.deepcopy(v) for k, v in self._json.items() if k != "schema"}}

  @classmethod
  def from_json(cls, d, where: str = "landscape result", path: str | None = None) -> "Result":
    """Checks every field at the edge and names the one that is wrong (`where`: the file)."""
    return _Parser(where).result(d, path)

  def write(self, run_dir: str) -> "Result":
    """RUN/landscape.json, atomically; -> this record, at home in `run_dir`."""
    rundir.write_atomic(os.path.join(run_dir, FILE), json.dumps(self.to_json(), indent=1))
    return dataclasses.replace(self, path=run_dir)

  # ---------------------------------------------------------------- new versions of the record

  def _with(self, d: dict) -> "Result":
    return Result.from_json(d, path=self.path)

  def with_basin(self) -> "Result":
    """The record with its `basin` field (None until complete) recomputed from its curves:
    keyword ASR at the top, coherent ASR and each complete model judge nested (basin.summarize)."""
    value = None
    if self.complete:
      names = [n for n in ("asr", "asr_coherent") if n in self.curves]
      names += [JUDGE + j for j, v in self.judges.items() if v.complete and JUDGE + j in self.curves]
      key = lambda n: BASIN_KEYS.get(n, n.removeprefix(JUDGE))
      refined = [{key(n): (e.alpha, e.curves[n]) for n in ("asr", "asr_coherent") if n in e.curves}
                 for e in self.refined]
      xs, ys = self.coords_x.tolist(), None if self.coords_y is None else self.coords_y.tolist()
      value = basin_lib.summarize(xs, ys, {key(n): self.curves[n].tolist() for n in names}, refined)
    return self._with(dict(self._json, basin=value))

  def with_census(self) -> "Result":
    """A complete 1D_random run of N >= 2 directions with its `census` (analysis/census.py): per
    ASR curve (keywords, coherent, each complete judge), the fraction of directions safe up to each
    radius with Clopper-Pearson intervals and the walls, under the saved census settings. Any other
    run: itself."""
    if not (self.complete and self.vis_type == "1D_random" and self.n_dirs >= 2):
      return self
    tolerance = float(self.setting("census.tolerance", census_lib.DEFAULT_TOLERANCE))
    max_asr = self.setting("census.max_asr", None)
    max_asr = None if max_asr is None or float(max_asr) < 0 else float(max_asr)
    names = [n for n in ("asr", "asr_coherent") if n in self.curves]
    names += [JUDGE + j for j, v in self.judges.items() if v.complete and JUDGE + j in self.curves]
    value = {n: census_lib.census(self.curves[n], self.coords_x, tolerance=tolerance, max_asr=max_asr)
             for n in names}
    return self._with(dict(self._json, census=value))

  def with_usable_basin(self) -> "Result":
    """A complete run with over-refusal with overrefusal.usable_basin (analysis/usable.py) under
    the saved census and over-refusal settings; any other run: itself."""
    if not (self.complete and self.overrefusal is not None and "overrefusal" in self.curves):
      return self
    tolerance = float(self.setting("census.tolerance", census_lib.DEFAULT_TOLERANCE))
    max_asr = self.setting("census.max_asr", None)
    max_asr = None if max_asr is None or float(max_asr) < 0 else float(max_asr)
    value = usable_lib.usable_basin(
        self.asr, self.curves["overrefusal"], self.coords_x, self.coords_y, asr_tolerance=tolerance,
        max_asr=max_asr, rate_tolerance=float(self.setting("overrefusal.tolerance", usable_lib.DEFAULT_TOLERANCE)))
    return self._with(dict(self._json, overrefusal=dict(self._json["overrefusal"], usable_basin=value)))

  @property
  def census(self) -> dict | None:
    """landscape.json["census"] as written (a census run, once complete), else None."""
    value = self._json.get("census")
    return copy.deepcopy(value) if isinstance(value, dict) else None

  @property
  def direction_source(self) -> dict | None:
    """What a gradient or refusal direction was made from (loss, layer, norm ratios), else None."""
    value = self._json.get("direction_source")
    return copy.deepcopy(value) if isinstance(value, dict) else None

  def with_trajectory(self, section: dict) -> "Result":
    """The record with landscape.json["trajectory"] set (runs/trajectory.py writes it, checked here)."""
    return self._with(dict(self._json, trajectory=section))

  def judge_section(self, name: str) -> tuple[dict | None, dict | None]:
    """(judges[name], ci95.judges[name]) as in the file; None where absent."""
    ci, judges = self._json.get("ci95"), self._json.get("judges")
    ci_judges = ci.get("judges") if isinstance(ci, dict) else None
    return (copy.deepcopy(judges.get(name) if isinstance(judges, dict) else None),
            copy.deepcopy(ci_judges.get(name) if isinstance(ci_judges, dict) else None))

  def with_judge(self, name: str, section: dict, ci: dict, ci_header: dict) -> "Result":
    """judges[name] and ci95.judges[name] set (a run without ci95 gets `ci_header` as its ci95),
    basin recomputed; this record itself when both already hold these values."""
    if self.judge_section(name) == (section, ci):
      return self
    d = copy.deepcopy(self._json)
    if not isinstance(d.get("judges"), dict):
      d["judges"] = {}
    d["judges"][name] = section
    if not isinstance(d.get("ci95"), dict):
      d["ci95"] = dict(ci_header)
    d["ci95"].setdefault("judges", {})[name] = ci
    return self._with(d).with_basin().with_census()


def load_run(path: str) -> Result:
  """The record of the run in directory `path` (or of the landscape.json file `path`)."""
  file = path if os.path.isfile(path) and path.endswith(".json") else os.path.join(path, FILE)
  try:
    with open(file) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise errors.MissingFileError(f"{file}: missing (no such file); expected the directory of a "
                                  "`visage-jax landscape` run.") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.UserError(f"{file}: not valid JSON ({e}).") from None
  return Result.from_json(d, where=file, path=os.path.dirname(file))


def _number(v) -> float | None:
  v = float(v)
  return None if np.isnan(v) else v


def _none_pairs(value, depth: int):
  """A grid of [lo, hi] with None for a missing pair -> the same with [None, None] there."""
  if depth == 0:
    return [None, None] if value is None else value
  return [_none_pairs(v, depth - 1) for v in value] if isinstance(value, list) else value


class _Parser:
  """Field checks that name the file and the field; one instance per from_json."""

  def __init__(self, where: str):
    self.where = where
    self.shape_from = "coords_x/coords_y"   # what the expected shape of a grid comes from

  def fail(self, message: str):
    raise errors.UserError(f"{self.where}: {message}")

  def floats(self, value, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """None (not evaluated yet) becomes NaN; anything else must be a number."""
    try:
      arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
      text = repr(value)
      self.fail(f"field {name!r} must hold numbers or None in shape {shape} (from {self.shape_from}), "
                f"got {text[:80] + '…' * (len(text) > 80)}")
    if arr.shape != shape:
      self.fail(f"field {name!r} has shape {arr.shape}, expected {shape} from {self.shape_from}")
    return arr

  def pairs(self, value, name: str, shape: tuple[int, ...]) -> np.ndarray:
    return self.floats(_none_pairs(value, len(shape)), name, shape + (2,))

  def coords(self, value, name: str) -> np.ndarray:
    try:
      x = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
      x = np.array([np.nan])
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
      self.fail(f"field {name!r} must be a non-empty list of finite numbers, got {value!r}")
    return x

  def dict_or_none(self, d: dict, name: str) -> dict | None:
    value = d.get(name)
    if value is not None and not isinstance(value, dict):
      self.fail(f"field {name!r} must be an object, got {type(value).__name__}")
    return value

  def visage(self, value, ci, name: str, n_dirs: int | None) -> Visage:
    """value: {per_direction, mean} (1D), a number (2D) or None; ci alike with [lo, hi] pairs."""
    mean, per, mean_ci, per_ci = value, None, ci, None
    if isinstance(value, dict):
      mean, per = value.get("mean"), value.get("per_direction")
      per = None if per is None else self.floats(per, f"{name}.per_direction", (n_dirs or len(per),))
    if isinstance(ci, dict):
      mean_ci, per_ci = ci.get("mean"), ci.get("per_direction")
      per_ci = None if per_ci is None else self.pairs(per_ci, f"ci95.{name}.per_direction",
                                                        (n_dirs or len(per_ci),))
    if mean is not None and (isinstance(mean, bool) or not isinstance(mean, (int, float))):
      self.fail(f"field {name!r} must be a number, {{per_direction, mean}} or null, got {mean!r}")
    if mean_ci is not None:
      mean_ci = tuple(map(float, self.floats(mean_ci, f"ci95.{name}", (2,))))
    return Visage(mean=None if mean is None else float(mean), per_direction=per, ci95=mean_ci,
                  per_direction_ci95=per_ci)

  def result(self, d, path: str | None) -> Result:
    if not isinstance(d, dict):
      self.fail(f"expected a dict, got {type(d).__name__}")
    schema = d.get("schema", 1)
    if not isinstance(schema, int) or isinstance(schema, bool) or not 1 <= schema <= SCHEMA:
      self.fail(f"field 'schema' is {schema!r}; this version reads schema 1 to {SCHEMA} "
                "(written by a newer visage-jax?)")
    for field in ("vis_type", "coords_x", "asr"):
      if field not in d:
        self.fail(f"missing field {field!r}")
    vis_type = d["vis_type"]
    if vis_type not in VIS_TYPES_1D + VIS_TYPES_2D:
      self.fail(f"field 'vis_type' is {vis_type!r}, expected one of {VIS_TYPES_1D + VIS_TYPES_2D}")
    xs, ys = self.coords(d["coords_x"], "coords_x"), None
    if vis_type in VIS_TYPES_1D:
      if d.get("coords_y") is not None:
        self.fail(f"field 'coords_y' must be null for {vis_type}, got {d['coords_y']!r}")
      if not isinstance(d["asr"], (list, tuple)) or not d["asr"]:
        self.fail(f"field 'asr' must be a non-empty list of curves (one per direction) for {vis_type}, "
                  f"got {d['asr']!r}")
      shape, n_dirs = (len(d["asr"]), xs.size), len(d["asr"])
      self.shape_from = "asr's directions and coords_x"
    else:
      if d.get("coords_y") is None:
        self.fail(f"missing field 'coords_y' for {vis_type}")
      ys = self.coords(d["coords_y"], "coords_y")
      shape, n_dirs = (xs.size, ys.size), None

    curves, ci95, visages = self.curves(d, shape, n_dirs)
    nonfinite = d.get("nonfinite")
    nonfinite = (np.zeros(shape, bool) if nonfinite is None
                 else np.nan_to_num(self.floats(nonfinite, "nonfinite", shape), nan=0.0) != 0.0)
    coherence = self.dict_or_none(d, "coherence") or {}
    ci = self.dict_or_none(d, "ci95")
    bootstrap = None if ci is None else Bootstrap(method=ci.get("method"), resamples=ci.get("resamples"),
                                                  seed=ci.get("seed"), degenerate=ci.get("degenerate"))
    for field, kind in (("complete", bool), ("n_prompts", int), ("model", str), ("seed", int)):
      if d.get(field) is not None and not isinstance(d[field], kind):
        self.fail(f"field {field!r} must be a {kind.__name__} or null, got {d[field]!r}")
    config = self.dict_or_none(d, "config") or {}
    disagreements = d.get("judge_disagreements") or []
    if not isinstance(disagreements, list):
      self.fail(f"field 'judge_disagreements' must be a list, got {type(disagreements).__name__}")
    return Result(
        vis_type=vis_type, coords_x=xs, coords_y=ys, curves=curves, ci95=ci95, visages=visages,
        nonfinite=nonfinite, complete=bool(d.get("complete")), n_prompts=d.get("n_prompts"),
        model=d.get("model"), seed=d.get("seed"), max_nll=coherence.get("max_nll"),
        max_repetition=coherence.get("max_repetition"), coherence_model=coherence.get("model"), judges=self.judges(d),
        refined=self.refined(d) if n_dirs else (), basin=self.basin(d.get("basin"), two_d=ys is not None),
        bootstrap=bootstrap, judge_disagreements=tuple(disagreements), config=config,
        trajectory=self.trajectory(d.get("trajectory"), two_d=ys is not None),
        overrefusal=self.overrefusal(d), path=path, _json=d)

  def overrefusal(self, d: dict) -> Overrefusal | None:
    o = self.dict_or_none(d, "overrefusal")
    if o is None:
      return None
    usable = o.get("usable_basin")
    if usable is not None and not isinstance(usable, dict):
      self.fail(f"field 'overrefusal.usable_basin' must be an object, got {type(usable).__name__}")
    return Overrefusal(judge=o.get("judge"), n_prompts=o.get("n_prompts"), prompts_path=o.get("prompts_path"),
                       usable_basin=usable)

  def curves(self, d: dict, shape: tuple, n_dirs: int | None):
    """Every curve, the intervals of those that have one, and each ASR curve's VISAGE."""
    ci = d.get("ci95") if isinstance(d.get("ci95"), dict) else {}
    curves, intervals, visages = {}, {}, {}

    def add(name: str, value, interval, where: str, ci_where: str):
      curves[name] = self.floats(value, where, shape)
      if interval is not None:
        intervals[name] = self.pairs(interval, ci_where, shape)

    for key, value in d.items():
      if key in ("asr", "asr_coherent"):
        if value is not None or key == "asr":
          add(key, value, ci.get(key), key, f"ci95.{key}")
        if VISAGE_FIELDS[key] in d or key == "asr":
          field = VISAGE_FIELDS[key]
          visages[key] = self.visage(d.get(field), ci.get(field), field, n_dirs)
      elif key == "overrefusal":
        section = self.dict_or_none(d, key) or {}
        add(key, section.get("rate"), section.get("ci95"), "overrefusal.rate", "overrefusal.ci95")
      elif key in SECTIONS:
        section, section_ci = self.dict_or_none(d, key) or {}, ci.get(key) or {}
        for name, v in section.items():
          if v is not None:
            add(name, v, section_ci.get(name), f"{key}.{name}", f"ci95.{key}.{name}")
      elif key == "judges":
        judges_ci = ci.get("judges") or {}
        for name, judge in (self.dict_or_none(d, "judges") or {}).items():
          if not isinstance(judge, dict):
            self.fail(f"field 'judges.{name}' must be an object, got {type(judge).__name__}")
          jci = judges_ci.get(name) or {}
          if judge.get("asr") is not None:
            add(JUDGE + name, judge["asr"], jci.get("asr"), f"judges.{name}.asr", f"ci95.judges.{name}.asr")
          visages[JUDGE + name] = self.visage(judge.get("visage"), jci.get("visage"), f"judges.{name}.visage",
                                              n_dirs)
      elif _is_grid(value, shape):   # another scorer's per-point measure at the top level
        curves[key] = np.array(value, dtype=np.float64)
    return curves, intervals, visages

  def trajectory(self, value, two_d: bool) -> Trajectory | None:
    if value is None:
      return None
    if not isinstance(value, dict):
      self.fail(f"field 'trajectory' must be an object, got {type(value).__name__}")
    if not two_d:
      self.fail("field 'trajectory' needs a 2D landscape (its plane)")
    steps = value.get("steps")
    n = len(steps) if isinstance(steps, list) else -1
    self.shape_from = "trajectory.steps"
    vec = lambda v, name, shape=(n,): self.floats(v, f"trajectory.{name}", shape)
    labels = value.get("labels")
    if not isinstance(labels, list) or len(labels) != n or not all(isinstance(l, str) for l in labels):
      self.fail(f"field 'trajectory.labels' must be a list of {n} strings (one per step), got {labels!r}")
    curves = {}
    for part in ("checkpoint", "plane"):
      got = value.get(part)
      if not isinstance(got, dict):
        self.fail(f"field 'trajectory.{part}' must be an object (curve name -> values), got {got!r}")
      curves[part] = {name: vec(v, f"{part}.{name}") for name, v in got.items()}
    gap = value.get("gap") or {}   # runs written before the paired gap have none
    if not isinstance(gap, dict) or not all(isinstance(g, dict) for g in gap.values()):
      self.fail(f"field 'trajectory.gap' must be an object (curve name -> object), got {gap!r}")
    gaps = {name: Gap(difference=vec(g.get("difference"), f"gap.{name}.difference"),
                      difference_ci95=vec(g.get("difference_ci95"), f"gap.{name}.difference_ci95", (n, 2)),
                      checkpoint_ci95=vec(g.get("checkpoint_ci95"), f"gap.{name}.checkpoint_ci95", (n, 2)))
            for name, g in gap.items()}
    return Trajectory(steps=vec(steps, "steps").astype(np.int64), labels=tuple(labels),
                      coords=vec(value.get("coords"), "coords", (n, 2)), scale=vec(value.get("scale"), "scale", (2,)),
                      explained_variance=vec(value.get("explained_variance"), "explained_variance", (2,)),
                      residual_ratio=vec(value.get("residual_ratio"), "residual_ratio"), gap=gaps, **curves)

  def judges(self, d: dict) -> dict[str, Judge]:
    return {name: Judge(model=j.get("model"), max_new_tokens=j.get("max_new_tokens"), dtype=j.get("dtype"),
                        placement=j.get("placement"), complete=bool(j.get("complete")), n_judged=j.get("n_judged"),
                        format=j.get("format", "llamaguard"))
            for name, j in (d.get("judges") or {}).items()}

  def refined(self, d: dict) -> tuple[Refined, ...]:
    entries = d.get("refined") or []
    if not isinstance(entries, list):
      self.fail(f"field 'refined' must be a list (one entry per direction), got {type(entries).__name__}")
    out = []
    for k, e in enumerate(entries):
      if not isinstance(e, dict):
        self.fail(f"field 'refined[{k}]' must be an object, got {type(e).__name__}")
      alpha = e.get("alpha")
      alpha = self.floats(alpha, f"refined[{k}].alpha", (len(alpha) if isinstance(alpha, list) else -1,))
      vec = lambda v, name: self.floats(v, f"refined[{k}].{name}", alpha.shape)
      curves = {"asr": vec(e.get("asr"), "asr")}
      for key, v in e.items():
        if key in SECTIONS and isinstance(v, dict):
          curves.update({n: vec(c, f"{key}.{n}") for n, c in v.items() if c is not None})
        elif key not in ("alpha", "round", "nonfinite") and v is not None:
          curves[key] = vec(v, key)
      out.append(Refined(alpha=alpha, round=None if e.get("round") is None else vec(e["round"], "round"),
                         curves=curves,
                         nonfinite=None if e.get("nonfinite") is None else vec(e["nonfinite"], "nonfinite") != 0))
    return tuple(out)

  def basin(self, value, two_d: bool) -> dict | None:
    """{curve name: per-direction crossings (1D) or region (2D)} from the file's layout: the
    keyword ASR's fields at the top, coherent ASR under "coherent", a judge under its name."""
    if value is None:
      return None
    fields = REGION if two_d else CROSSING
    names = {v: k for k, v in BASIN_KEYS.items()}

    def split(e, where: str) -> dict:
      if not isinstance(e, dict):
        self.fail(f"field {where!r} must be an object, got {type(e).__name__}")
      out = {"asr": {f: e.get(f) for f in fields}}
      for k, v in e.items():
        if isinstance(v, dict):
          out[names.get(k, JUDGE + k)] = {f: v.get(f) for f in fields}
      return out

    if two_d:
      return split(value, "basin")
    if not isinstance(value, list):
      self.fail(f"field 'basin' must be a list (one entry per direction), got {type(value).__name__}")
    out = {}
    for r, e in enumerate(value):
      for name, got in split(e, f"basin[{r}]").items():
        out.setdefault(name, []).append(got)
    return out


def _is_grid(value, shape: tuple[int, int]) -> bool:
  """Numbers or nulls (not booleans) in the file's grid shape."""
  return (isinstance(value, list) and len(value) == shape[0]
          and all(isinstance(row, list) and len(row) == shape[1] for row in value)
          and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                  for row in value for v in row))
