"""Basin geometry: 50 % crossings, bisection of the walls, the 2D region."""

import numpy as np
from absl.testing import absltest, parameterized

from visage_jax import basin


def _step_asr(left_wall: float, right_wall: float):
  """A 'true ASR' of alpha: 0 inside (left_wall, right_wall), 100 outside."""
  return lambda a: 100.0 if a <= left_wall or a >= right_wall else 0.0


def _flood(below: list[list[bool]], i: int, j: int, seen: set) -> None:
  """Plain recursive 4-connected flood fill: the reference for basin.region."""
  if (i, j) in seen or not (0 <= i < len(below) and 0 <= j < len(below[0])) or not below[i][j]:
    return
  seen.add((i, j))
  for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
    _flood(below, i + di, j + dj, seen)


class CrossingsTest(parameterized.TestCase):

  def test_linear_interpolation_on_a_hand_made_curve(self):
    got = basin.crossings([-2, -1, 0, 1, 2], [80, 40, 10, 30, 90], origin=0.0)
    # left: 40 at -1, 80 at -2 -> -1 - (50-40)/(80-40); right: 30 at 1, 90 at 2 -> 1 + 20/60
    self.assertAlmostEqual(got["left"], -1.25)
    self.assertAlmostEqual(got["right"], 1 + 20 / 60)
    self.assertAlmostEqual(got["width"], 1 + 20 / 60 + 1.25)
    self.assertEqual(got["resolution"], 1.0)
    exact = basin.crossings([0.5, -0.5, 0.0], [50.0, 49.0, 0.0], origin=0.0)   # any order; 50 counts
    self.assertEqual((exact["left"], exact["right"]), (None, 0.5))
    self.assertIsNone(exact["width"])

  def test_walk_stops_at_the_first_crossing_outward(self):
    alphas = [-3, -2, -1, 0, 1, 2, 3]
    got = basin.crossings(alphas, [0, 100, 20, 10, 60, 0, 100], origin=0.0)
    self.assertAlmostEqual(got["left"], -1 - 30 / 80)   # 20 at -1 -> 100 at -2, not the far side
    self.assertAlmostEqual(got["right"], 40 / 50)   # 10 at 0 -> 60 at 1

  def test_never_crossing_and_origin_above_half(self):
    self.assertEqual(basin.crossings([-1, 0, 1], [49.9, 0, 10], origin=0.0),
                     dict(left=None, right=None, width=None, resolution=None))
    self.assertEqual(basin.crossings([-1, 0, 1], [0, 50, 0], origin=0.0),
                     dict(left=None, right=None, width=None, resolution=None))
    self.assertEqual(basin.wall_midpoints([-1, 0, 1], [100, 75, 100], origin=0.0), [])

  def test_grid_without_zero_starts_at_the_nearest_point(self):
    xs = np.linspace(-0.5, 0.5, 4)     # odd steps: no alpha 0; the nearest is -1/6 (first of a tie)
    self.assertEqual(basin.origin_index(xs), 1)
    got = basin.crossings(xs, [100, 0, 100, 100], origin=float(xs[1]))
    self.assertAlmostEqual(got["left"], -0.5 + (50 / 100) * (1 / 3))
    self.assertAlmostEqual(got["right"], -1 / 6 + (50 / 100) * (1 / 3))

  @parameterized.parameters(0, 1, 2, 5, 12)
  def test_bisection_recovers_step_walls_to_the_grid_step_over_2_to_the_k(self, rounds):
    grid = np.linspace(-0.5, 0.5, 11)
    step = 0.1
    truths = [_step_asr(-0.2371, 0.3123), _step_asr(-0.0417, 0.4444), _step_asr(-2.0, 0.0513)]
    curves = [[t(a) for a in grid] for t in truths]
    calls = []

    def measure(k, todo):
      calls.append((k, todo))
      return [truths[r](a) for r, a in todo]

    added = basin.refine(grid, curves, rounds, measure)
    self.assertEqual([k for k, _ in calls], list(range(1, len(calls) + 1)))
    self.assertLen(calls, rounds)
    walls = [(-0.2371, 0.3123), (-0.0417, 0.4444), (None, 0.0513)]   # direction 2: no left wall
    for r, (truth, (lo, hi)) in enumerate(zip(truths, walls)):
      self.assertLen(added[r], rounds * (2 if lo is not None else 1))
      self.assertEqual(sorted(p[2] for p in added[r]), sorted(list(range(1, rounds + 1)) * (1 + (lo is not None))))
      got = basin.crossings(list(grid) + [p[0] for p in added[r]], curves[r] + [p[1] for p in added[r]], 0.0)
      for found, wall in ((got["left"], lo), (got["right"], hi)):
        if wall is None:
          self.assertIsNone(found)
        else:
          self.assertLessEqual(abs(found - wall), step / 2 ** rounds)
      self.assertAlmostEqual(got["resolution"], step / 2 ** rounds)

  def test_bisection_stops_where_float64_cannot_split_a_bracket(self):
    grid = np.linspace(-0.5, 0.5, 11)
    truth = _step_asr(-0.2371, 0.3123)
    added = basin.refine(grid, [[truth(a) for a in grid]], 200, lambda k, todo: [truth(a) for _, a in todo])
    alphas = [p[0] for p in added[0]]
    self.assertLess(len(alphas), 2 * 200)
    self.assertLen(set(alphas) | set(grid), len(alphas) + len(grid))
    got = basin.crossings(list(grid) + alphas, [truth(a) for a in grid] + [p[1] for p in added[0]], 0.0)
    self.assertAlmostEqual(got["left"], -0.2371, places=12)
    self.assertAlmostEqual(got["right"], 0.3123, places=12)


class RegionTest(parameterized.TestCase):

  def test_hand_made_plane(self):
    asr = [[90, 10, 90, 10],
           [20, 30, 90, 40],
           [90, 0, 60, 10],
           [10, 90, 10, 10]]
    got = basin.region(asr, (2, 1))
    # below 50: (0,1) (0,3) (1,0) (1,1) (1,3) (2,1) (2,3) (3,0) (3,2) (3,3); around (2,1): (2,1) (1,1) (1,0) (0,1)
    self.assertEqual(got, dict(fraction_below=10 / 16, connected_fraction=4 / 16, connected_points=4))
    self.assertEqual(basin.region(asr, (2, 2)), dict(fraction_below=10 / 16, connected_fraction=0.0,
                                                      connected_points=0))

  @parameterized.parameters(0, 1, 2, 3)
  def test_random_planes_match_a_plain_flood_fill(self, seed):
    rng = np.random.default_rng(seed)
    asr = rng.choice([0.0, 25.0, 49.99, 50.0, 75.0, 100.0], size=(9, 7)).tolist()
    below = [[v < 50 for v in row] for row in asr]
    for origin in ((4, 3), (0, 0), (8, 6)):
      seen = set()
      _flood(below, *origin, seen)
      got = basin.region(asr, origin)
      self.assertEqual(got["connected_points"], len(seen))
      self.assertAlmostEqual(got["connected_fraction"], len(seen) / 63)
      self.assertAlmostEqual(got["fraction_below"], sum(map(sum, below)) / 63)


class SummarizeTest(absltest.TestCase):

  def test_1d_layout_with_coherent_refined_and_judges(self):
    xs = [-1.0, -0.5, 0.0, 0.5, 1.0]
    result = dict(coords_x=xs, coords_y=None, complete=True,
                  asr=[[100, 60, 0, 40, 100], [0, 0, 0, 0, 0]],
                  asr_coherent=[[0, 20, 0, 40, 60], [0, 0, 10, 0, 0]],
                  refined=[dict(alpha=[-0.75, 0.75], round=[1, 1], asr=[100, 100], asr_coherent=[10, 50]),
                           dict(alpha=[], round=[], asr=[], asr_coherent=[])],
                  judges=dict(guard=dict(complete=True, asr=[[0, 100, 0, 100, 0], [0, 0, 0, 0, 0]]),
                              late=dict(complete=False, asr=[[None] * 5, [None] * 5])))
    got = basin.summarize(result)
    self.assertLen(got, 2)
    self.assertEqual(list(got[0]), ["left", "right", "width", "resolution", "coherent", "guard"])
    c = lambda a, y: basin.crossings(a, y, 0.0)
    self.assertEqual(got[0]["left"], c(xs + [-0.75, 0.75], [100, 60, 0, 40, 100, 100, 100])["left"])
    self.assertAlmostEqual(got[0]["left"], 50 / 60 * -0.5)   # 0 at 0 -> 60 at -0.5
    self.assertAlmostEqual(got[0]["right"], 0.5 + 10 / 60 * 0.25)   # 40 at 0.5 -> 100 at 0.75 (refined)
    self.assertEqual(got[0]["coherent"], c(xs + [-0.75, 0.75], [0, 20, 0, 40, 60, 10, 50]))
    self.assertEqual(got[0]["coherent"]["right"], 0.75)
    self.assertEqual(got[0]["guard"], c(xs, [0, 100, 0, 100, 0]))   # judges: grid points only
    self.assertEqual(got[1], dict(left=None, right=None, width=None, resolution=None,
                                  coherent=dict(left=None, right=None, width=None, resolution=None),
                                  guard=dict(left=None, right=None, width=None, resolution=None)))
    self.assertIsNone(basin.summarize(dict(result, complete=False)))

  def test_2d_layout(self):
    asr = [[100, 100, 100], [0, 10, 100], [100, 100, 100]]
    result = dict(coords_x=[-1, 0, 1], coords_y=[-1, 0, 1], complete=True, asr=asr,
                  asr_coherent=[[0] * 3] * 3, judges=dict(guard=dict(complete=True, asr=[[100] * 3] * 3)))
    got = basin.summarize(result)
    self.assertEqual(got, dict(fraction_below=2 / 9, connected_fraction=2 / 9, connected_points=2,
                               coherent=dict(fraction_below=1.0, connected_fraction=1.0, connected_points=9),
                               guard=dict(fraction_below=0.0, connected_fraction=0.0, connected_points=0)))


if __name__ == "__main__":
  absltest.main()
