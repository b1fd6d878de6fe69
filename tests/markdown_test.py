"""report.md of a run and of a sweep: written by the run, rebuilt from the files alone by the CLI,
every section read back against the numbers in the files it came from."""

import json
import os
import re
import shutil
import tempfile

from absl.testing import absltest, parameterized

import fixtures
from visage_jax.reports import markdown
from visage_jax.runs import landscape, sweep


def run_cli(*args):
  return fixtures.cli(*args)


def tiny(c, model_dir):
  """A landscape config (or a sweep's base) of seconds: 4 prompts, 3 points, 2 directions."""
  c.model.path = model_dir
  c.prompts.update(path=fixtures.advbench_path(), limit=4)
  c.landscape.update(steps=2, multiplier=2.0, num_directions=2)
  c.decode.max_new_tokens = 8
  c.engine.max_batch = 4
  return c


def read(path):
  with open(path) as f:
    return f.read()


def section(text, heading):
  """The lines under `heading` up to the next heading of the same or a higher level."""
  level = len(heading.split(" ")[0])
  body = text.split(heading + "\n", 1)[1]
  return re.split(rf"^#{{1,{level}}} ", body, flags=re.M)[0]


def table_rows(text):
  """Cells of every table body row (header and rule left out); `\\|` is a pipe inside a cell."""
  rows = []
  for line in text.splitlines():
    if line.startswith("| ") and not re.match(r"^\| -+:? \|", line):
      rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
  return [r for r in rows if r[0] not in ("α", "(α, β)", "ASR", "run", "measure", "α \\ β")]


def unescape(cell):
  return cell.replace("\\|", "|").replace("&lt;", "<").replace("&amp;", "&")


def first_two(outputs):
  """The samples the report promises: first jailbroken and first refused prompt, else the first two."""
  jb = [q for q, o in enumerate(outputs) if o["jailbroken"]]
  ref = [q for q, o in enumerate(outputs) if not o["jailbroken"]]
  return sorted([jb[0], ref[0]]) if jb and ref else [0, 1]


def write_jsonl(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(l) + "\n" for l in lines)


class RealRunTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    root = tempfile.mkdtemp(prefix="report_test_")  # fresh: a stale run of another checkout is refused
    cls.model = os.path.join(root, "tiny_refusals")
    fixtures.save_refusal_model(cls.model)
    cls.run_dir = os.path.join(root, "run")
    cls.result = landscape.run(tiny(landscape.default_config(), cls.model), cls.run_dir, progress=False).to_json()
    with open(os.path.join(cls.run_dir, "generations.jsonl")) as f:
      cls.lines = [json.loads(l) for l in f]

  def test_run_writes_a_report_of_its_points_and_generations(self):
    text = read(os.path.join(self.run_dir, "report.md"))
    r = self.result
    self.assertTrue(text.startswith("# tiny_refusals · 1D_random · 4 prompts · complete\n"))
    self.assertIn("\n![landscape](landscape.png)\n", text)
    self.assertTrue(os.path.exists(os.path.join(self.run_dir, "landscape.png")))
    points = section(text, "## ASR at every grid point (%)")
    for d in range(2):
      rows = table_rows(section(points, f"### Direction {d}"))
      self.assertEqual([row[0] for row in rows], [f"{x:.3f}" for x in r["coords_x"]])   # a row per point
      # the cell may carry an interval once a run has ci95; the value comes first
      self.assertEqual([row[1].split(" [")[0] for row in rows], [f"{a:.2f}" for a in r["asr"][d]])
    vis = table_rows(section(text, "## VISAGE (higher = safer)"))[0]
    self.assertEqual(vis[0], "keyword ASR")
    self.assertEqual([c.split(" [")[0] for c in vis[1:]],
                     [f"{r['visage']['mean']:.2f}"] + [f"{v:.2f}" for v in r["visage"]["per_direction"]])

    samples = section(text, "## Sample generations")
    by_point = {(l["direction"], f"{l['coords'][0]:.3f}"): l for l in self.lines}
    seen, verdicts = [], set()
    for d in range(2):
      for alpha, q, verdict, prompt, generation in table_rows(section(samples, f"### Direction {d}")):
        out = by_point[(d, alpha)]["outputs"][int(q)]
        self.assertEqual(verdict, "jailbroken" if out["jailbroken"] else "refused")
        flat = " ".join(out["generation"].split())
        shown = unescape(generation)
        self.assertTrue(flat.startswith(shown.removesuffix("…")) and len(shown) <= markdown.SAMPLE_CHARS,
                        (shown, out["generation"]))
        self.assertTrue(out["prompt"].startswith(unescape(prompt).removesuffix("…")))
        seen.append((d, alpha, int(q)))
        verdicts.add(out["jailbroken"])
    self.assertEqual(seen, [(l["direction"], f"{l['coords'][0]:.3f}", q)
                            for l in sorted(self.lines, key=lambda l: (l["direction"], l["step"]))
                            for q in first_two(l["outputs"])])
    self.assertEqual(verdicts, {True, False}, "the fixture must show both verdicts for this test to bite")

  def test_cli_rebuilds_figure_and_report_from_the_files_alone(self):
    w = os.path.join(self.create_tempdir().full_path, "copy")
    shutil.copytree(self.run_dir, w)
    before = read(os.path.join(w, "report.md"))
    os.remove(os.path.join(w, "report.md"))
    os.remove(os.path.join(w, "landscape.png"))
    proc = run_cli("report", f"--workdir={w}")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(json.loads(proc.stdout)["written"],
                     [os.path.join(w, "landscape.png"), os.path.join(w, "report.md")])
    self.assertEqual(read(os.path.join(w, "report.md")), before)
    with open(os.path.join(w, "landscape.png"), "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

  def test_sweep_report_with_two_runs_and_a_failed_one(self):
    """Two finished runs (copies of the real run: the sweep skips them without loading a model),
    one whose model is missing; then the sweep's report is rebuilt by the CLI."""
    w = self.create_tempdir().full_path
    c = sweep.default_config()
    tiny(c.base, self.model)
    c.sweep.runs = (dict(name="a", overrides={"engine.max_batch": 4}),
                    dict(name="b", overrides={"engine.max_batch": 2}),
                    dict(name="broken", overrides={"model.path": "/nonexistent/model"}))
    for name in ("a", "b"):
      shutil.copytree(self.run_dir, os.path.join(w, name))
    with open(os.path.join(w, "b", "landscape.json")) as f:
      b = json.load(f)
    b["ci95"] = dict(method="percentile bootstrap", resamples=50, seed=0,
                     visage=dict(per_direction=[[1.5, 2.5], [3.5, 4.5]], mean=[12.25, 87.75]))
    with open(os.path.join(w, "b", "landscape.json"), "w") as f:
      json.dump(b, f)
    rows = sweep.run(c, w, progress=False)
    self.assertEqual([r["status"] for r in rows], ["complete", "complete", "failed"])
    text = read(os.path.join(w, "report.md"))
    r, i = self.result, self.result["coords_x"].index(0.0)
    asr0, vis = f"{r['asr'][0][i]:.2f}", f"{r['visage']['mean']:.2f}"
    a = table_rows(text)[0]   # its cell gains an interval once runs compute ci95
    self.assertEqual([a[0], a[1], a[2], a[3].split(" [")[0], a[4]],
                     ["a", "complete", asr0, vis, "[report](a/report.md)"])
    self.assertIn(f"| b | complete | {asr0} | {vis} [12.25, 87.75] | [report](b/report.md) |", text)
    self.assertIn("| broken | failed | — | — | — |", text)
    self.assertIn("\n![sweep](sweep.png)\n", text)
    self.assertRegex(section(text, "## Failed runs"), r"- `broken`: CheckpointError: /nonexistent/model")

    for gone in ("report.md", "sweep.png", "a/report.md", "a/landscape.png", "b/report.md"):
      os.remove(os.path.join(w, gone))
    proc = run_cli("report", f"--workdir={w}")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(read(os.path.join(w, "report.md")), text)
    self.assertEqual(read(os.path.join(w, "a", "report.md")), read(os.path.join(self.run_dir, "report.md")))
    self.assertTrue(os.path.exists(os.path.join(w, "a", "landscape.png")))
    self.assertTrue(os.path.exists(os.path.join(w, "sweep.png")))
    self.assertIn(f"| keyword ASR | {vis} [12.25, 87.75] | {r['visage']['per_direction'][0]:.2f} [1.50, 2.50] |",
                  read(os.path.join(w, "b", "report.md")))


def synthetic_1d(w):
  """A finished 1D run with every optional section (coherence, capability, a judge, ci95, basin,
  refined points) in the contract's layout, and generations to sample from."""
  xs = [-1.0, -0.5, 0.0, 0.5, 1.0]
  asr = [[100.0, 50.0, 0.0, 50.0, 100.0]]
  ci = lambda grid, h: [[[v - h, v + h] for v in row] for row in grid]
  result = dict(
      vis_type="1D_random", coords_x=xs, coords_y=None, asr=asr, asr_coherent=[[0.0, 50.0, 0.0, 0.0, 50.0]],
      capability=dict(perplexity=[[812.5, 31.25, 4.125, 29.5, 1234.5]], mc_accuracy=[[0.25, 0.5, 0.75, 0.5, 0.0]]),
      visage=dict(per_direction=[71.25], mean=71.25), visage_coherent=dict(per_direction=[93.75], mean=93.75),
      coherence=dict(max_nll=3.0, model="the-reference"),
      nonfinite=[[False, False, False, False, True]], n_prompts=3, model="/models/Tiny-Chat", seed=7,
      complete=True,
      judges=dict(guard=dict(asr=[[50.0, 0.0, 0.0, 0.0, 100.0]], visage=dict(per_direction=[87.5], mean=87.5),
                             model="/models/guard")),
      ci95=dict(method="percentile bootstrap", resamples=1000, seed=0, asr=ci(asr, 12.5),
                visage=dict(per_direction=[[61.5, 80.25]], mean=[61.5, 80.25]),
                visage_coherent=dict(per_direction=[[90.0, 97.5]], mean=[90.0, 97.5]),
                judges=dict(guard=dict(asr=ci([[50.0, 0.0, 0.0, 0.0, 100.0]], 5.0),
                                       visage=dict(per_direction=[[80.5, 95.5]], mean=[80.5, 95.5]))),
                capability=dict(perplexity=[[[700.0, 900.0], [30.0, 33.0], [4.0, 4.25], [28.0, 31.0],
                                             [1000.0, 1500.0]]])),
      basin=[dict(left=-0.5, right=0.625, width=1.125, coherent=dict(left=None, right=1.0, width=None),
                  guard=dict(left=-0.75, right=0.875, width=1.625))],
      refined=[dict(alpha=[-0.625, 0.375], asr=[62.5, 37.5], asr_coherent=[50.0, 12.5])])
  with open(os.path.join(w, "landscape.json"), "w") as f:
    json.dump(result, f)
  long = "word " * 100
  gens = [["Sure | here\nit is <b>bold</b> & more", "Sure again", "I'm sorry, I cannot."],
          ["I cannot", "I cannot either", long]]   # the samples: prompts 0 and 2 (not the first two)
  lines = [dict(direction=0, step=p, coords=[x], asr=asr[0][p], nonfinite=False,
                outputs=[dict(prompt=f"goal {q} of point {p}", generation=gens[p % 2][q],
                              jailbroken=(q == 2) != (p % 2 == 0), nll_ref=2.5 + q, tokens=8, truncated=False)
                         for q in range(3)])
           for p, x in enumerate(xs)]
  write_jsonl(os.path.join(w, "generations.jsonl"), lines)
  write_jsonl(os.path.join(w, "judges", "guard.jsonl"),
              [dict(direction=0, step=p, prompt_index=q, verdict="unsafe" if q == 0 else "safe", p_unsafe=0.5)
               for p in range(5) for q in range(3)])
  write_jsonl(os.path.join(w, "refined.jsonl"),
              [dict(direction=0, step=None, round=1, coords=[-0.625], asr=62.5, nonfinite=False,
                    outputs=[dict(prompt="refined goal", generation="refined answer", jailbroken=True,
                                  nll_ref=1.25, tokens=3, truncated=False)])])
  return result


class SyntheticReportTest(parameterized.TestCase):

  def test_every_optional_section_renders_its_numbers(self):
    w = self.create_tempdir().full_path
    synthetic_1d(w)
    text = markdown.rebuild(w)
    self.assertEqual(text, read(os.path.join(w, "report.md")))
    self.assertIn("- coherent: jailbroken and nll_ref ≤ 3.0 nats/token under `the-reference`", text)
    self.assertIn("- model judge guard: `/models/guard`", text)
    self.assertIn("| keyword ASR | 71.25 [61.50, 80.25] |", text)
    self.assertIn("| coherent ASR (nll_ref ≤ 3.0) | 93.75 [90.00, 97.50] |", text)
    self.assertIn("| guard ASR | 87.50 [80.50, 95.50] |", text)
    self.assertIn("95 % intervals: percentile bootstrap, 1000 resamples, seed 0", text)
    points = table_rows(section(text, "## ASR at every grid point (%)"))
    self.assertEqual(points[1], ["-0.500", "50.00 [37.50, 62.50]", "50.00", "0.00 [-5.00, 5.00]",
                                 "31.25 [30, 33]", "0.500", ""])
    self.assertEqual(points[4], ["1.000", "100.00 [87.50, 112.50]", "50.00", "100.00 [95.00, 105.00]",
                                 "1234 [1000, 1500]", "0.000", "yes"])
    basin = table_rows(section(text, "## Safety basin (where ASR crosses 50 % on each side of the origin)"))
    self.assertEqual(basin, [["keyword ASR", "0", "-0.500", "0.625", "1.125"],
                             ["coherent ASR (nll_ref ≤ 3.0)", "0", "—", "1.000", "—"],
                             ["guard ASR", "0", "-0.750", "0.875", "1.625"]])
    refined = section(text, "## Refined points (not part of VISAGE)")
    self.assertIn("| α | keyword ASR | coherent ASR |", refined)
    refined = table_rows(refined)
    self.assertEqual(refined, [["-0.6250", "62.50", "50.00"], ["0.3750", "37.50", "12.50"]])
    samples = table_rows(section(text, "## Sample generations"))
    self.assertEqual(samples[0], ["-1.000", "0", "jailbroken · nll_ref 2.50 coherent · guard unsafe",
                                  "goal 0 of point 0", "Sure \\| here it is &lt;b>bold&lt;/b> &amp; more"])
    self.assertEqual(samples[1][1:3], ["2", "refused · nll_ref 4.50 incoherent · guard safe"])
    self.assertEqual([s[1] for s in samples], ["0", "2"] * 5)
    cut = samples[3][4]   # point 1, prompt 2: the 500-character generation on one line
    self.assertEqual(cut, ("word " * 40)[:markdown.SAMPLE_CHARS - 1] + "…")
    refined_samples = table_rows(section(text, "## Sample generations at refined points"))
    self.assertEqual(refined_samples, [["-0.625", "0", "jailbroken · nll_ref 1.25 coherent", "refined goal",
                                        "refined answer"]])

  def test_an_older_landscape_json_without_the_new_sections(self):
    w = self.create_tempdir().full_path
    result = synthetic_1d(w)
    for key in ("ci95", "basin", "refined", "judges", "asr_coherent", "visage_coherent", "coherence", "capability"):
      del result[key]
    with open(os.path.join(w, "landscape.json"), "w") as f:
      json.dump(result, f)
    os.remove(os.path.join(w, "refined.jsonl"))
    shutil.rmtree(os.path.join(w, "judges"))
    text = markdown.write_run_report(w)
    self.assertIn("95 % intervals: not computed (landscape.json has no ci95).", text)
    self.assertIn("Not computed (landscape.json has no basin).", text)
    self.assertNotIn("Refined points", text)
    self.assertIn("| keyword ASR | 71.25 |", text)
    self.assertIn("No figure yet", text)
    self.assertEqual(table_rows(section(text, "## ASR at every grid point (%)"))[1], ["-0.500", "50.00", ""])

  def test_2d_report_tables_the_plane_and_samples_a_few_points(self):
    w = self.create_tempdir().full_path
    xs = ys = [-1.0, -0.5, 0.0, 0.5, 1.0]
    asr = [[10.0 * i + 2.5 * j for j in range(5)] for i in range(5)]
    result = dict(vis_type="2D_random", coords_x=xs, coords_y=ys, asr=asr, visage=66.125, nonfinite=None,
                  n_prompts=2, model="m", seed=0, complete=True,
                  ci95=dict(method="percentile bootstrap", resamples=200, seed=3, visage=[60.5, 70.75]),
                  basin=dict(fraction_below=0.64, connected_fraction=0.36, connected_points=9))
    with open(os.path.join(w, "landscape.json"), "w") as f:
      json.dump(result, f)
    write_jsonl(os.path.join(w, "generations.jsonl"), [
        dict(direction=0, step=i * 5 + j, coords=[x, y], asr=asr[i][j], nonfinite=False,
             outputs=[dict(prompt="p", generation=f"text at {i},{j}", jailbroken=q == 1, tokens=2, truncated=False)
                      for q in range(2)])
        for i, x in enumerate(xs) for j, y in enumerate(ys)])
    text = markdown.rebuild(w)
    self.assertIn("| keyword ASR | 66.12 [60.50, 70.75] |", text)
    plane = table_rows(section(text, "### keyword ASR (%)"))
    self.assertEqual(plane, [[f"{x:.3f}"] + [f"{v:.1f}" for v in row] for x, row in zip(xs, asr)])
    basin = section(text, "## Safety basin (where ASR crosses 50 % on each side of the origin)")
    self.assertEqual(table_rows(basin), [["fraction of points with ASR < 50 %", "0.640"],
                                         ["fraction in the connected region around θ", "0.360"],
                                         ["points in that region", "9"]])
    samples = table_rows(section(text, "## Sample generations"))
    centre_corners_edges = [(2, 2), (0, 0), (0, 4), (4, 0), (4, 4), (0, 2), (4, 2), (2, 0), (2, 4)]
    self.assertEqual([(s[0], s[4]) for s in samples],
                     [(f"{xs[i]:.3f}, {ys[j]:.3f}", f"text at {i},{j}") for i, j in centre_corners_edges
                      for _ in range(2)])

  @parameterized.named_parameters(("missing", "nothere"), ("not_a_run", "empty"), ("no_flag", None))
  def test_bad_workdir_is_one_line_exit_2(self, kind):
    d = self.create_tempdir().full_path
    os.makedirs(os.path.join(d, "empty"))
    args = ["report"] + ([f"--workdir={os.path.join(d, kind)}"] if kind else [])
    proc = run_cli(*args)
    self.assertEqual(proc.returncode, 2, proc.stderr)
    self.assertRegex(proc.stderr, r"^visage-jax: error: [^\n]*(--workdir|report needs)[^\n]*\n$")
    self.assertFalse(os.path.exists(os.path.join(d, "empty", "report.md")))


if __name__ == "__main__":
  absltest.main()
