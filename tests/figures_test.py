"""Figures from runs' records (landscape.json contents): valid PNGs, partial runs, clear errors on malformed results."""

import copy
import os

import matplotlib

matplotlib.use("Agg")

import numpy as np
from absl.testing import absltest, parameterized
from matplotlib import colors
from matplotlib import image as mpl_image
from matplotlib import pyplot as plt

from visage_jax.analysis import visage
from visage_jax.reports import figures
from visage_jax.result import Result

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _result_1d(num_directions=3, n=9):
  x = np.linspace(-1, 1, n)
  curves = [np.clip(100 * np.abs(x) ** (1 + k), 0, 100).round(2).tolist() for k in range(num_directions)]
  nonfinite = [[False] * n for _ in range(num_directions)]
  nonfinite[-1][-1] = True
  return {"vis_type": "1D_random", "coords_x": x.tolist(), "coords_y": None, "asr": curves,
          "visage": visage.visage_directions(curves), "nonfinite": nonfinite,
          "model": "/ckpt/meta-llama/Llama-2-7b-chat-hf/", "n_prompts": 80, "complete": True,
          "seed": 0}


def _result_2d(vis_type="2D_random", nx=5, ny=4):
  x, y = np.linspace(-1, 1, nx), np.linspace(-0.5, 0.5, ny)
  gx, gy = np.meshgrid(x, y, indexing="ij")
  asr = np.clip(100 * (gx ** 2 + 4 * gy ** 2), 0, 100).round(2)
  nonfinite = np.zeros_like(asr, dtype=bool)
  nonfinite[0, 0] = True
  return {"vis_type": vis_type, "coords_x": x.tolist(), "coords_y": y.tolist(), "asr": asr.tolist(),
          "visage": visage.visage_2d(asr), "nonfinite": nonfinite.tolist(), "model": "tiny", "n_prompts": 4}


def _red_pixels(img):
  return int(((img[..., 0] > 0.9) & (img[..., 1] < 0.15) & (img[..., 2] < 0.15)).sum())


class PlotLandscapeTest(parameterized.TestCase):

  def _render(self, result, name="out.png"):
    path = os.path.join(self.create_tempdir().full_path, name)
    figures.plot_landscape(Result.from_json(result), path)
    with open(path, "rb") as f:
      self.assertEqual(f.read(8), PNG_SIGNATURE)
    self.assertEqual(os.listdir(os.path.dirname(path)), [name])   # no temp file left behind
    img = mpl_image.imread(path)
    self.assertEqual(img.ndim, 3)
    self.assertGreater(img.std(), 0.05)   # not a blank canvas
    self.assertEqual(plt.get_fignums(), [])   # nothing leaked into pyplot
    return img

  def test_1d_judge_curve_dashed_beside_the_keyword_curve_in_its_colour(self):
    from matplotlib.figure import Figure
    result = _result_1d(num_directions=1)
    judged = [[v / 2 for v in result["asr"][0]]]
    result["judges"] = {"llamaguard": {"asr": judged, "visage": None}}
    self._render(result)
    fig = Figure()
    figures._plot_1d(fig, Result.from_json(result))
    lines = {l.get_label(): l for l in fig.axes[0].get_lines()}
    judge, keywords = lines["llamaguard ASR"], lines["direction 0"]
    self.assertEqual(judge.get_linestyle(), "--")
    self.assertEqual(judge.get_color(), keywords.get_color())
    np.testing.assert_array_equal(judge.get_ydata(), judged[0])
    with self.assertRaisesRegex(ValueError, "judges.llamaguard.asr"):
      Result.from_json(dict(result, judges={"llamaguard": {"asr": [[1.0, 2.0]]}}))

  def test_asr_interval_band_in_the_curve_colour_and_visage_interval_in_the_title(self):
    from matplotlib import colors as mcolors
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    result = _result_1d(num_directions=2)
    band = [[[max(v - 10, 0.0), min(v + 10, 100.0)] for v in curve] for curve in result["asr"]]
    band[1][4] = None   # a point not evaluated yet: a gap in the band
    result["ci95"] = {"asr": band, "visage": {"per_direction": [[1.0, 2.0]] * 2, "mean": [38.14, 60.21]}}
    self._render(result)
    fig = Figure()
    figures._plot_1d(fig, Result.from_json(result))
    ax = fig.axes[0]
    self.assertIn(f"VISAGE {result['visage']['mean']:.1f} [38.1, 60.2]", ax.get_title())
    fills = [c for c in ax.collections if isinstance(c, PolyCollection)]
    self.assertLen(fills, 2)
    lines = {l.get_label(): l for l in ax.get_lines()}
    for k, fill in enumerate(fills):
      np.testing.assert_allclose(fill.get_facecolor()[0][:3], mcolors.to_rgb(lines[f"direction {k}"].get_color()))
      self.assertLess(fill.get_facecolor()[0][3], 0.3)
      ys = np.concatenate([path.vertices[:, 1] for path in fill.get_paths()])
      self.assertAlmostEqual(ys.max(), max(hi for pair in band[k] if pair for hi in pair[1:]))
    self.assertLen(fills[1].get_paths(), 2)   # split at the missing point
    old = _result_1d(num_directions=2)        # written before ci95: no band, no interval
    fig = Figure()
    figures._plot_1d(fig, Result.from_json(old))
    self.assertFalse([c for c in fig.axes[0].collections if isinstance(c, PolyCollection)])
    self.assertNotIn("[", fig.axes[0].get_title())
    two_d = dict(_result_2d(), ci95={"asr": [[[0.0, 1.0]] * 4] * 5, "visage": [40.0, 50.0]})
    self._render(two_d)
    with self.assertRaisesRegex(ValueError, "ci95.asr"):
      Result.from_json(dict(result, ci95={"asr": [[[1.0, 2.0]]]}))
    with self.assertRaisesRegex(ValueError, "ci95.visage"):
      Result.from_json(dict(result, ci95={"visage": {"mean": [1.0]}}))

  def test_refined_points_are_diamonds_in_their_direction_colour(self):
    from matplotlib.figure import Figure
    result = _result_1d(num_directions=2)
    result["refined"] = [dict(alpha=[-0.3, 0.6], round=[1, 1], asr=[40.0, 70.0]),
                         dict(alpha=[], round=[], asr=[])]
    self._render(result)
    fig = Figure()
    figures._plot_1d(fig, Result.from_json(result))
    ax = fig.axes[0]
    refined = [c for c in ax.collections if c.get_label().startswith("refined points")]
    self.assertLen(refined, 1)   # direction 1 has none
    np.testing.assert_array_equal(refined[0].get_offsets(), [[-0.3, 40.0], [0.6, 70.0]])
    keyword = next(l for l in ax.get_lines() if l.get_label() == "direction 0")
    np.testing.assert_allclose(refined[0].get_edgecolor()[0], colors.to_rgba(keyword.get_color()))
    with self.assertRaisesRegex(ValueError, r"refined\[0\].asr"):
      Result.from_json(dict(result, refined=[dict(alpha=[0.1, 0.2], asr=[1.0])]))

  def test_coherent_asr_and_capability_beside_the_keyword_curve(self):
    from matplotlib.figure import Figure
    result = _result_1d(num_directions=1)
    coherent = [[v / 3 for v in result["asr"][0]]]
    ppl = [[float(np.exp(4 * abs(x))) for x in result["coords_x"]]]
    result.update(asr_coherent=coherent, visage_coherent=visage.visage_directions(coherent),
                  coherence={"max_nll": 3.0}, capability={"perplexity": ppl, "mc_accuracy": [[0.5] * 9]})
    self._render(result)
    fig = Figure()
    figures._plot_1d(fig, Result.from_json(result))
    lines = {l.get_label(): l for ax in fig.axes for l in ax.get_lines()}
    np.testing.assert_array_equal(lines["coherent ASR (nll_ref ≤ 3.0)"].get_ydata(), coherent[0])
    np.testing.assert_allclose(lines["perplexity of reference answers"].get_ydata(), ppl[0])
    np.testing.assert_allclose(lines["multiple-choice accuracy"].get_ydata(), [0.5] * 9)
    self.assertIn("on coherent ASR", fig.axes[0].get_title())
    two_d = _result_2d()
    two_d["capability"] = {"perplexity": (np.array(two_d["asr"]) + 1.0).tolist()}
    self._render(two_d)
    with self.assertRaisesRegex(ValueError, "capability.perplexity"):
      Result.from_json(dict(result, capability={"perplexity": [[1.0, 2.0]]}))

  def test_1d_three_directions_with_nonfinite(self):
    img = self._render(_result_1d())
    self.assertBetween(img.shape[1], 900, 2000)
    self.assertBetween(img.shape[0], 500, 1200)
    result = _result_1d()
    del result["nonfinite"]
    self.assertGreater(_red_pixels(img), _red_pixels(self._render(result)) + 20)

  @parameterized.named_parameters(("single", 1), ("two", 2))
  def test_1d_few_directions(self, num_directions):
    self._render(_result_1d(num_directions))

  def test_1d_interpolation(self):
    result = _result_1d(1)
    result.update(vis_type="1D_interpolation", coords_x=np.linspace(-0.5, 1.5, 9).tolist())
    self._render(result)

  def test_overrefusal_is_a_second_curve_on_the_asr_axis_and_a_2d_contour(self):
    from matplotlib.figure import Figure
    result = _result_1d(num_directions=1)
    rate = [[100.0 - v for v in result["asr"][0]]]
    section = dict(rate=rate, ci95=None, judge="prefix", n_prompts=16, prompts_path="xstest")
    result["overrefusal"] = section
    self._render(result)
    fig = Figure()
    figures._plot_1d(fig, Result.from_json(result))
    lines = {l.get_label(): l for l in fig.axes[0].get_lines()}
    over = lines["over-refusal (16 safe prompts, prefix judge)"]
    self.assertEqual(over.get_linestyle(), "-.")
    self.assertEqual(over.get_color(), lines["direction 0"].get_color())
    np.testing.assert_array_equal(over.get_ydata(), rate[0])
    self.assertEqual(fig.axes[0].get_ylabel(), "ASR / over-refusal (%)")
    plane = _result_2d()
    plane["overrefusal"] = dict(section, rate=(100.0 - np.asarray(plane["asr"])).tolist())
    self._render(plane)
    fig = Figure()
    figures._plot_2d(fig, Result.from_json(plane))
    self.assertIn("over-refusal (16 safe prompts, prefix judge)", fig.axes[0].get_legend_handles_labels()[1])

  @parameterized.parameters("2D_random", "2D_interpolation", "2D_interpolation-random")
  def test_2d(self, vis_type):
    img = self._render(_result_2d(vis_type))
    self.assertGreater(img.shape[1], img.shape[0])   # two panels side by side
    self.assertGreater(_red_pixels(img), 20)

  def test_partial_1d_with_none_entries(self):
    result = _result_1d()
    for curve in result["asr"]:
      curve[-3:] = [None] * 3
    result["asr"][0][2] = None
    result.update(visage=None, complete=False)
    self._render(result)
    self.assertIn("[partial]", figures._header(Result.from_json(result)))

  def test_partial_2d_with_none_entries(self):
    result = _result_2d()
    result["asr"][-1] = [None] * len(result["coords_y"])
    result["asr"][1][2] = None
    result["visage"] = None
    self._render(result)
    self.assertIn("[partial]", figures._header(Result.from_json(result)))

  def test_complete_false_is_partial_even_without_gaps(self):
    result = _result_1d()
    self.assertNotIn("partial", figures._header(Result.from_json(result)))
    result["complete"] = False
    self.assertIn("[partial]", figures._header(Result.from_json(result)))

  def test_overwrites_existing_file_and_creates_directory(self):
    path = os.path.join(self.create_tempdir().full_path, "plots", "landscape.png")
    figures.plot_landscape(Result.from_json(_result_1d()), path)
    figures.plot_landscape(Result.from_json(_result_2d()), path)
    self.assertEqual(os.listdir(os.path.dirname(path)), ["landscape.png"])
    self.assertGreater(mpl_image.imread(path).shape[1], 1500)   # the wider 2D figure replaced the 1D one


class PlotSweepTest(absltest.TestCase):

  def test_runs_on_one_axes(self):
    partial = _result_1d(2)
    for curve in partial["asr"]:
      curve[4:] = [None] * 5
    partial["complete"] = False
    with_zero = _result_2d(ny=5)        # coords_y = linspace(-0.5, 0.5, 5) holds beta = 0
    not_started = _result_1d(1)
    not_started["asr"] = [[None] * 9]
    results = {"a": _result_1d(), "b": partial, "c": with_zero, "d": _result_2d(ny=4), "e": not_started}
    path = os.path.join(self.create_tempdir().full_path, "sweep.png")
    self.assertEqual(figures.plot_sweep({k: Result.from_json(r) for k, r in results.items()}, path),
                     ["a", "b", "c"])
    with open(path, "rb") as f:
      self.assertEqual(f.read(8), PNG_SIGNATURE)
    self.assertEqual(os.listdir(os.path.dirname(path)), ["sweep.png"])
    self.assertEqual(plt.get_fignums(), [])
    with self.assertRaisesRegex(ValueError, "'asr'"):
      figures.plot_sweep({"bad": Result.from_json(dict(_result_1d(), asr=[]))}, path)


class MalformedResultTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("missing_asr", "1d", lambda r: r.pop("asr"), "'asr'"),
      ("missing_vis_type", "1d", lambda r: r.pop("vis_type"), "'vis_type'"),
      ("wrong_vis_type", "1d", lambda r: r.update(vis_type="3D_random"), "'vis_type'.*3D_random"),
      ("missing_coords_x", "1d", lambda r: r.pop("coords_x"), "'coords_x'"),
      ("empty_coords_x", "1d", lambda r: r.update(coords_x=[]), "'coords_x'"),
      ("asr_not_curves", "1d", lambda r: r.update(asr=[]), "'asr'"),
      ("asr_wrong_length", "1d", lambda r: r["asr"][1].pop(), "'asr'"),
      ("asr_text", "1d", lambda r: r["asr"][0].__setitem__(0, "high"), "'asr'"),
      ("nonfinite_wrong_shape", "1d", lambda r: r.update(nonfinite=[[False]]), "'nonfinite'"),
      ("missing_coords_y", "2d", lambda r: r.update(coords_y=None), "'coords_y'"),
      ("asr_transposed", "2d", lambda r: r.update(asr=np.array(r["asr"]).T.tolist()), r"'asr'.*\(4, 5\)"),
      ("one_d_asr_for_2d", "2d", lambda r: r.update(asr=r["asr"][0]), "'asr'"),
  )
  def test_raises_naming_the_field(self, kind, corrupt, message):
    result = copy.deepcopy(_result_1d() if kind == "1d" else _result_2d())
    corrupt(result)
    path = os.path.join(self.create_tempdir().full_path, "out.png")
    with self.assertRaisesRegex(ValueError, message):
      figures.plot_landscape(Result.from_json(result), path)
    self.assertFalse(os.path.exists(path))

  def test_not_a_dict(self):
    with self.assertRaisesRegex(ValueError, "expected a dict"):
      figures.plot_landscape(Result.from_json([1, 2]), os.path.join(self.create_tempdir().full_path, "out.png"))


if __name__ == "__main__":
  absltest.main()
