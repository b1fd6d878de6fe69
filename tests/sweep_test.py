"""Sweeps: run names, resume after an interruption without recomputing, failures recorded, summaries."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
from absl.testing import absltest

import fixtures
from visage_jax.runs import config_checks, landscape, sweep
from visage_jax import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_sweep(model_dir, prompts_path, grid):
  c = sweep.default_config()
  c.base.model.path = model_dir
  c.base.prompts.update(path=prompts_path, limit=3)
  c.base.landscape.update(steps=2, multiplier=2.0, num_directions=1)
  c.base.decode.max_new_tokens = 6
  c.base.engine.max_batch = 4
  c.sweep.grid = grid
  return c


def read_csv(workdir):
  with open(os.path.join(workdir, "sweep.csv"), newline="") as f:
    return list(csv.DictReader(f))


def read_result(run_dir):
  with open(os.path.join(run_dir, "landscape.json")) as f:
    return json.load(f)


class ExpandTest(absltest.TestCase):

  def test_grid_product_names_in_order(self):
    c = sweep.default_config()
    c.sweep.grid = (("model.path", ("/models/Llama-2-7b-chat-hf", "/models/vicuna-7b-v1.5")),
                    ("prompts.system_prompt", ("default", "aoa")))
    self.assertEqual([n for n, _ in sweep.expand(c)],
                     ["path=Llama-2-7b-chat-hf,system_prompt=default", "path=Llama-2-7b-chat-hf,system_prompt=aoa",
                      "path=vicuna-7b-v1.5,system_prompt=default", "path=vicuna-7b-v1.5,system_prompt=aoa"])
    self.assertEqual(sweep.expand(c)[1][1], {"model.path": "/models/Llama-2-7b-chat-hf",
                                             "prompts.system_prompt": "aoa"})

  def test_explicit_runs_cross_the_grid(self):
    c = sweep.default_config()
    c.sweep.runs = (dict(name="aligned", overrides={"model.lora_path": "/a.safetensors"}),
                    dict(overrides={"model.path": "/ft/harmful_10/model"}))
    c.sweep.grid = (("landscape.seed", (0, 1)),)
    runs = sweep.expand(c)
    self.assertEqual([n for n, _ in runs], ["aligned,seed=0", "aligned,seed=1", "path=model,seed=0",
                                            "path=model,seed=1"])
    self.assertEqual(runs[3][1], {"model.path": "/ft/harmful_10/model", "landscape.seed": 1})
    self.assertEqual(sweep.run_config(c.base, runs[3][1]).landscape.seed, 1)
    self.assertEqual(c.base.landscape.seed, 0)   # base untouched

  def test_names_are_filesystem_safe_and_unique(self):
    c = sweep.default_config()
    long_a, long_b = "You are a helpful assistant. " * 3, "You are a helpful assistant! " * 3
    c.sweep.grid = (("prompts.system_prompt", (long_a, long_b, "a/b", "a b")), ("mesh.shape", ((2, 4),)))
    names = [n for n, _ in sweep.expand(c)]
    self.assertLen(set(names), 4)
    for n in names:
      self.assertRegex(n, r"^[A-Za-z0-9._=,+-]+$")
      self.assertLess(len(n), 80)
    self.assertTrue(names[0].endswith(",shape=2x4"))
    self.assertEqual(names[2], "system_prompt=b,shape=2x4")
    self.assertEqual(sweep.expand(tiny_sweep("", "", ()))[0][0], "base")

  def test_bad_sweeps_are_refused_before_any_run(self):
    c = sweep.default_config()
    c.sweep.grid = (("prompts.system_promt", ("none",)),)
    with self.assertRaisesRegex(ValueError, r"sweep.grid\[0\]: 'prompts.system_promt' is not a field"):
      sweep.expand(c)
    c.sweep.grid = (("landscape", ("x",)),)
    with self.assertRaisesRegex(ValueError, "is a section; name one of its fields"):
      sweep.expand(c)
    c.sweep.grid = ()
    c.sweep.runs = (dict(name="../up", overrides={}),)
    with self.assertRaisesRegex(ValueError, r"sweep.runs\[0\].name '../up' is a directory name"):
      sweep.expand(c)
    with self.assertRaisesRegex(ValueError, "cannot set landscape.steps = 'many'"):
      sweep.run_config(c.base, {"landscape.steps": "many"})

  def test_shipped_config(self):
    spec = importlib.util.spec_from_file_location("s", os.path.join(ROOT, "configs", "sweep_system_prompts.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for arg in (None, "tiny"):
      c = mod.get_config(arg)
      runs = sweep.expand(c)
      self.assertEqual([n for n, _ in runs], ["system_prompt=default", "system_prompt=none",
                                              "system_prompt=aoa", "system_prompt=llama2"])
      for _, over in runs:
        config_checks.validate(sweep.run_config(c.base, over))
      self.assertTrue(os.path.exists(c.base.model.lora_path))
    self.assertIs(c.distributed, c.base.distributed)   # --config.distributed.* reaches the runs


class SweepRunTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = os.path.join(absltest.get_default_test_tmpdir(), "tiny_bpe")
    fixtures.save_tiny_hf(cls.model, "llama", tokenizer=fixtures.toy_tokenizer("bpe", refusals=True),
                          seed=5, boost_refusals=True)
    cls.prompts = fixtures.advbench_path()

  def check_summary_matches_runs(self, workdir, names):
    rows = read_csv(workdir)
    self.assertEqual([r["run"] for r in rows], names)
    with open(os.path.join(workdir, "sweep.md")) as f:
      md = f.read()
    for row in rows:
      self.assertEqual(row["status"], "complete")
      self.assertEqual(row["workdir"], os.path.join(workdir, row["run"]))
      result = read_result(row["workdir"])
      i = result["coords_x"].index(0.0)
      self.assertEqual(float(row["asr_at_0"]), result["asr"][0][i])
      self.assertAlmostEqual(float(row["visage"]), np.mean(result["visage"]["per_direction"]))
      self.assertEqual([float(row["visage_ci95_lo"]), float(row["visage_ci95_hi"])],
                       result["ci95"]["visage"]["mean"])
      self.assertIn(f"| {row['run']} | complete | {result['asr'][0][i]:.2f} | "
                    f"{result['visage']['mean']:.2f} |", md)
    return rows

  def test_interrupted_sweep_resumes_without_recomputing(self):
    w = self.create_tempdir().full_path
    c = tiny_sweep(self.model, self.prompts, (("landscape.seed", (0, 1, 2)),))
    names = ["seed=0", "seed=1", "seed=2"]
    real, calls = landscape.run, []

    def dies_in_the_second_run(cfg, workdir, **kw):
      calls.append(os.path.basename(workdir))
      if len(calls) == 2:
        raise KeyboardInterrupt
      return real(cfg, workdir, **kw)

    with mock.patch.object(landscape, "run", dies_in_the_second_run):
      with self.assertRaises(KeyboardInterrupt):
        sweep.run(c, w, progress=False)
    self.assertEqual([(r["run"], r["status"]) for r in read_csv(w)],
                     [("seed=0", "complete"), ("seed=1", "interrupted"), ("seed=2", "pending")])
    first = [os.path.join(w, "seed=0", f) for f in ("generations.jsonl", "landscape.json", "landscape.png")]
    stamps = [os.stat(p).st_mtime_ns for p in first]

    calls.clear()
    spy = lambda cfg, workdir, **kw: calls.append(os.path.basename(workdir)) or real(cfg, workdir, **kw)
    with mock.patch.object(landscape, "run", spy):
      rows = sweep.run(c, w, progress=False)
    self.assertEqual(calls, ["seed=1", "seed=2"])              # the finished run is not run again
    self.assertEqual([os.stat(p).st_mtime_ns for p in first], stamps)
    self.assertEqual([r["status"] for r in rows], ["complete"] * 3)
    csv_rows = self.check_summary_matches_runs(w, names)
    self.assertEqual({r["landscape.seed"] for r in csv_rows}, {"0", "1", "2"})
    self.assertLen({r["asr_at_0"] for r in csv_rows}, 1)       # alpha = 0 is the model itself
    self.assertTrue(os.path.exists(os.path.join(w, "sweep.png")))

  def test_failed_run_is_recorded_and_the_sweep_goes_on(self):
    w = self.create_tempdir().full_path
    missing = os.path.join(w, "nomodel")
    c = tiny_sweep(self.model, self.prompts, (("model.path", (missing, self.model)),))
    rows = sweep.run(c, w, progress=False)
    self.assertEqual([(r["run"], r["status"]) for r in rows], [("path=nomodel", "failed"),
                                                               ("path=tiny_bpe", "complete")])
    csv_rows = read_csv(w)
    self.assertIn(f"{missing}: no such file or directory", csv_rows[0]["error"])
    self.assertEqual((csv_rows[0]["asr_at_0"], csv_rows[0]["visage"]), ("", ""))
    self.assertEqual(csv_rows[1]["error"], "")
    self.assertEqual(csv_rows[1]["model.path"], self.model)
    result = read_result(os.path.join(w, "path=tiny_bpe"))
    self.assertEqual(float(csv_rows[1]["visage"]), result["visage"]["mean"])
    with open(os.path.join(w, "sweep.md")) as f:
      md = f.read()
    self.assertIn("| path=nomodel | failed | – | – |", md)
    self.assertIn(f"- `path=nomodel`: CheckpointError: {missing}: no such file or directory", md)


class SweepCommandTest(absltest.TestCase):

  def test_shipped_config_on_a_tiny_model_exit_status_and_table(self):
    d = self.create_tempdir().full_path
    model_dir = os.path.join(d, "tiny")
    fixtures.save_tiny_hf(model_dir, "llama", tokenizer=fixtures.toy_tokenizer("bpe", refusals=True), seed=5)
    w = os.path.join(d, "sweep")
    grid = repr((("model.path", (model_dir, "/nonexistent/model")),))
    proc = fixtures.cli("sweep", "--config=configs/sweep_system_prompts.py:tiny",
                        f"--config.base.model.path={model_dir}", "--config.base.model.lora_path=",
                        f"--config.sweep.grid={grid}", f"--workdir={w}", "--noprogress")
    self.assertEqual(proc.returncode, 1, proc.stderr[-3000:])
    self.assertIn("1 of 2 runs failed (path=model)", proc.stderr)
    self.assertIn("| path=tiny | complete |", proc.stdout)
    with open(os.path.join(w, "sweep.md")) as f:
      self.assertEqual(proc.stdout, f.read())
    self.assertEqual(read_result(os.path.join(w, "path=tiny"))["n_prompts"], 4)   # :tiny reached base


class TwoProcessSweepTest(absltest.TestCase):

  def test_processes_stay_in_step_and_only_process_0_writes_the_summary(self):
    """Two processes (2 CPU devices each, one mesh of 4) via the CLI; one run fails on both."""
    d = self.create_tempdir().full_path
    model_dir = os.path.join(d, "tiny")
    fixtures.save_refusal_model(model_dir)
    w = os.path.join(d, "sweep")
    port = fixtures.free_port()
    grid = repr((("model.path", ("/nonexistent/model", model_dir)), ("landscape.seed", (0,))))
    env = fixtures.subprocess_env(devices=2, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "visage_jax.cli", "sweep", "--config=configs/sweep_system_prompts.py:tiny",
         "--config.base.model.lora_path=", f"--config.sweep.grid={grid}", "--config.base.mesh.shape=-1,1",
         "--config.base.engine.mode=fused",   # fewest collectives: gloo gives a late peer only 30 s
         f"--config.distributed.coordinator_address=localhost:{port}", "--config.distributed.num_processes=2",
         f"--config.distributed.process_id={i}", f"--workdir={w}", "--noprogress"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = fixtures.wait_all(procs, 420)
    for p, out in zip(procs, outs):
      self.assertEqual(p.returncode, 1, out[-3000:])   # exit 1: one run failed, on both
      self.assertIn("| path=tiny,seed=0 | complete |", out)
    self.assertCountEqual(os.listdir(w), ["sweep.csv", "sweep.md", "sweep.png", "report.md", "path=model,seed=0",
                                          "path=tiny,seed=0"])
    rows = read_csv(w)
    self.assertEqual([r["status"] for r in rows], ["failed", "complete"])
    with open(os.path.join(w, "path=model,seed=0", "error.txt")) as f:
      self.assertIn("/nonexistent/model", f.read())   # the failed run wrote nothing but why
    self.assertFalse(os.path.exists(os.path.join(w, "path=tiny,seed=0", "error.txt")))
    result = read_result(os.path.join(w, "path=tiny,seed=0"))
    self.assertEqual(result["mesh"]["processes"], 2)
    self.assertEqual(float(rows[1]["visage"]), result["visage"]["mean"])


if __name__ == "__main__":
  absltest.main()


class SummaryIntervalTest(absltest.TestCase):

  def test_rows_carry_the_visage_interval(self):
    """Finished runs (files written here: no model is loaded), with landscape.json["ci95"] (1D: the
    mean's interval, 2D: the plane's) and without (a run from before intervals): empty cells."""
    w = self.create_tempdir().full_path
    c = tiny_sweep("/no/model", "", (("landscape.vis_type", ("1D_random", "2D_random")),
                                      ("landscape.seed", (0, 1))))
    xs = [-1.0, 0.0, 1.0]
    for name, over in sweep.expand(c):
      two_d, with_ci = over["landscape.vis_type"] == "2D_random", over["landscape.seed"] == 0
      result = dict(vis_type=over["landscape.vis_type"], coords_x=xs, coords_y=xs if two_d else None,
                    asr=[[50.0, 25.0, 75.0]] * (3 if two_d else 1), n_prompts=4, complete=True,
                    visage=50.0 if two_d else dict(per_direction=[50.0], mean=50.0))
      if with_ci:
        interval = [40.5, 60.25] if two_d else [41.0, 59.75]
        result["ci95"] = dict(visage=interval if two_d else dict(per_direction=[[1.0, 2.0]], mean=interval))
      os.makedirs(os.path.join(w, name))
      for file, obj in (("landscape.json", result), ("run_config.json", sweep.run_config(c.base, over).to_dict())):
        with open(os.path.join(w, name, file), "w") as f:
          json.dump(rundir.jsonable(obj), f)
    rows = sweep.run(c, w, progress=False)
    self.assertEqual([r["status"] for r in rows], ["complete"] * 4)
    got = [(r["run"], r["visage_ci95_lo"], r["visage_ci95_hi"]) for r in read_csv(w)]
    self.assertEqual(got, [("vis_type=1D_random,seed=0", "41.0", "59.75"), ("vis_type=1D_random,seed=1", "", ""),
                           ("vis_type=2D_random,seed=0", "40.5", "60.25"), ("vis_type=2D_random,seed=1", "", "")])
    with open(os.path.join(w, "sweep.md")) as f:
      md = f.read()
    self.assertIn("| vis_type=1D_random,seed=0 | complete | 25.00 | 50.00 | [41.00, 59.75] |", md)
    self.assertIn("| vis_type=2D_random,seed=1 | complete | 25.00 | 50.00 | – |", md)
