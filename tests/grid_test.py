"""Grid coordinates against the reference's formulas."""

import numpy as np
from absl.testing import absltest, parameterized

from visage_jax.directions import grid


class GridTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("1D_random", "1D_random", 4, 2.0, 0),
      ("1D_interpolation", "1D_interpolation", 4, 1.0, 2),
      ("2D_interpolation-random", "2D_interpolation-random", 2, 1.0, 1),
  )
  def test_grid_coords_formulas(self, vis_type, steps, m, k):
    xs, ys = grid.grid_coords(vis_type, steps, m, k)
    rand = [-m / 2 + i * m / steps for i in range(steps + 1)]
    interp = [-k / steps + i / steps for i in range(steps + 2 * k + 1)]
    np.testing.assert_allclose(xs, rand if vis_type == "1D_random" else interp, atol=1e-12)
    if vis_type.startswith("2D"):
      np.testing.assert_allclose(ys, rand, atol=1e-12)
      pts = grid.grid_points(xs, ys)
      np.testing.assert_allclose(pts[1 * len(ys) + 2], [xs[1], ys[2]])


if __name__ == "__main__":
  absltest.main()
