"""A saved landscape.json checked at the edge and turned into arrays for the figures (plotting.py):
each field that is wrong is named, so a hand-edited or truncated file fails in one line.
"""

import numpy as np

from visage_jax import errors

VIS_TYPES_1D = ("1D_random", "1D_interpolation")
VIS_TYPES_2D = ("2D_random", "2D_interpolation", "2D_interpolation-random")
CAPABILITY_LABELS = dict(perplexity="perplexity of reference answers", mc_accuracy="multiple-choice accuracy")


def floats(values, name: str, shape: tuple[int, ...]) -> np.ndarray:
  """None (point not evaluated yet) becomes NaN; anything else must be a number."""
  try:
    arr = np.array(values, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise errors.UserError(f"landscape result: field {name!r} must hold numbers or None, got {values!r}") from e
  if arr.shape != shape:
    raise errors.UserError(f"landscape result: field {name!r} has shape {arr.shape}, expected {shape} "
                     "from coords_x/coords_y")
  return arr


def mask(values, name: str, shape: tuple[int, ...]) -> np.ndarray:
  if values is None:
    return np.zeros(shape, dtype=bool)
  arr = floats(values, name, shape)
  return np.nan_to_num(arr, nan=0.0) != 0.0


def _parse_ci95(ci, one_d: bool, shape: tuple[int, ...]) -> dict:
  """The intervals a figure shows: 1D keyword ASR bands [D, P, 2] (NaN: not evaluated) and each
  VISAGE's (lo, hi); None where absent, as in runs written before landscape.json had ci95."""
  ci = ci if isinstance(ci, dict) else {}
  out = dict(asr_ci=None)
  if one_d and isinstance(ci.get("asr"), list):
    pairs = [[[None, None] if v is None else v for v in row] if isinstance(row, list) else row
             for row in ci["asr"]]
    out["asr_ci"] = floats(pairs, "ci95.asr", shape + (2,))
  for key in ("visage", "visage_coherent"):
    v = ci.get(key)
    v = v.get("mean") if isinstance(v, dict) else v
    out[f"{key}_ci"] = None if v is None else tuple(floats(v, f"ci95.{key}", (2,)))
  return out


def parse(result) -> dict:
  """Checks a landscape.json at the edge, naming the field that is wrong."""
  if not isinstance(result, dict):
    raise errors.UserError(f"landscape result: expected a dict, got {type(result).__name__}")
  for field in ("vis_type", "coords_x", "asr"):
    if field not in result:
      raise errors.UserError(f"landscape result: missing field {field!r}")
  vis_type = result["vis_type"]
  if vis_type not in VIS_TYPES_1D + VIS_TYPES_2D:
    raise errors.UserError(f"landscape result: field 'vis_type' is {vis_type!r}, expected one of "
                     f"{VIS_TYPES_1D + VIS_TYPES_2D}")
  x = np.array(result["coords_x"], dtype=np.float64)
  if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
    raise errors.UserError(f"landscape result: field 'coords_x' must be a non-empty list of finite numbers, "
                     f"got {result['coords_x']!r}")
  p = dict(vis_type=vis_type, x=x, y=None, model=str(result.get("model") or "unknown model"),
           n_prompts=result.get("n_prompts"), visage=result.get("visage"))
  if vis_type in VIS_TYPES_1D:
    if not isinstance(result["asr"], (list, tuple)) or not result["asr"]:
      raise errors.UserError(f"landscape result: field 'asr' must be a non-empty list of curves (one per "
                       f"direction) for {vis_type}, got {result['asr']!r}")
    shape = (len(result["asr"]), x.size)
  else:
    if result.get("coords_y") is None:
      raise errors.UserError(f"landscape result: missing field 'coords_y' for {vis_type}")
    p["y"] = np.array(result["coords_y"], dtype=np.float64)
    if p["y"].ndim != 1 or p["y"].size == 0 or not np.isfinite(p["y"]).all():
      raise errors.UserError(f"landscape result: field 'coords_y' must be a non-empty list of finite "
                       f"numbers, got {result['coords_y']!r}")
    shape = (x.size, p["y"].size)
  p["asr"] = floats(result["asr"], "asr", shape)
  p["nonfinite"] = mask(result.get("nonfinite"), "nonfinite", shape)
  p["partial"] = result.get("complete") is False or bool(np.isnan(p["asr"]).any())
  p["judges"], p["refined"] = {}, []
  if vis_type in VIS_TYPES_1D:
    for name, judge in (result.get("judges") or {}).items():
      if isinstance(judge, dict) and judge.get("asr") is not None:
        p["judges"][name] = floats(judge["asr"], f"judges.{name}.asr", shape)
    for k, e in enumerate(result.get("refined") or []):   # landscape.refine's bisection points
      alpha = floats(e.get("alpha"), f"refined[{k}].alpha", (len(e.get("alpha") or []),))
      p["refined"].append((alpha, floats(e.get("asr"), f"refined[{k}].asr", alpha.shape)))
  p["coherent"] = None
  if result.get("asr_coherent") is not None:
    p["coherent"] = floats(result["asr_coherent"], "asr_coherent", shape)
    p["max_nll"] = (result.get("coherence") or {}).get("max_nll")
    p["visage_coherent"] = result.get("visage_coherent")
  p["capability"] = {name: floats(v, f"capability.{name}", shape)
                     for name, v in (result.get("capability") or {}).items()
                     if name in CAPABILITY_LABELS and v is not None}
  p.update(_parse_ci95(result.get("ci95"), vis_type in VIS_TYPES_1D, shape))
  return p
