"""The landscape's grid: alpha (and beta) coordinates per vis_type, as the reference lays them out."""

import numpy as np

from visage_jax import errors

VIS_TYPES = ("1D_random", "1D_interpolation", "2D_random", "2D_interpolation", "2D_interpolation-random",
             "1D_gradient", "1D_refusal", "2D_gradient-random", "2D_refusal-random")


def _random_axis(steps: int, multiplier: float) -> np.ndarray:
  return np.linspace(-multiplier / 2, multiplier / 2, steps + 1)


def _interpolation_axis(steps: int, extra: int) -> np.ndarray:
  return np.linspace(-extra / steps, 1 + extra / steps, steps + 2 * extra + 1)


def grid_coords(vis_type: str, steps: int, multiplier: float = 1.0,
                extra_steps: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
  """The reference's `grid_coords`: x (and y) coordinates of the landscape."""
  if vis_type not in VIS_TYPES:
    raise errors.UserError(f"landscape.vis_type {vis_type!r} is not one of {', '.join(VIS_TYPES)}.")
  if int(steps) < 1:
    raise errors.UserError(f"landscape.steps must be >= 1, got {steps}.")
  if extra_steps < 0:
    raise errors.UserError(f"landscape.extra_steps must be >= 0, got {extra_steps}.")
  rand, interp = _random_axis(steps, multiplier), _interpolation_axis(steps, extra_steps)
  return {
      "1D_random": (rand, None),
      "1D_interpolation": (interp, None),
      "2D_random": (rand, rand),
      "2D_interpolation": (interp, interp),
      "2D_interpolation-random": (interp, rand),
      "1D_gradient": (rand, None),           # alpha as along a random direction (same norm rule)
      "1D_refusal": (rand, None),            # alpha = 1 is the directional ablation: multiplier >= 2
      "2D_gradient-random": (rand, rand),
      "2D_refusal-random": (rand, rand),
  }[vis_type]


def grid_points(xs: np.ndarray, ys: np.ndarray | None) -> np.ndarray:
  """Perturbation coefficients [P, C]; point i*len(ys)+j is (xs[i], ys[j])."""
  if ys is None:
    return xs[:, None].astype(np.float64)
  return np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1).reshape(-1, 2)
