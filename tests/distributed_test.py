"""Two processes on localhost (4 virtual CPU devices each, one 4 x 2 mesh of 8) give the
one-process landscape, sweep, fine-tune, bench and experiment, resume alike (a fine-tune also with
one process), and only process 0 writes; config checks, cluster detection."""

import json
import os
import subprocess
import sys
from unittest import mock

import jax
from absl.testing import absltest, parameterized

import numpy as np
from safetensors.numpy import load_file

import distributed_main
import fixtures
import jobs_main
import memory_main
from visage_jax import distributed
from visage_jax.checkpoints import hf_tensors, loader
from visage_jax.experiments import findings
from visage_jax.runs import bench, finetune, landscape, pipeline, sweep
from visage_jax import rundir

TIMEOUT = 300  # seconds for both processes: a hung collective fails the test instead of CI


def _json(path):
  with open(path) as f:
    return json.load(f)


def _generations(workdir):
  with open(os.path.join(workdir, "generations.jsonl")) as f:
    lines = sorted((json.loads(l) for l in f), key=lambda l: (l["direction"], l["step"]))
  return [[(o["generation"], o["tokens"], o["jailbroken"]) for o in l["outputs"]] for l in lines]


class TwoProcessTest(absltest.TestCase):

  def test_two_processes_match_one_process_with_one_writer(self):
    root = self.create_tempdir().full_path
    model_dir, prompts = os.path.join(root, "model"), fixtures.advbench_path()
    fixtures.save_refusal_model(model_dir)
    script = os.path.join(os.path.dirname(__file__), "distributed_main.py")
    env = fixtures.subprocess_env()
    port, two, one = fixtures.free_port(), os.path.join(root, "two"), os.path.join(root, "one")
    procs = [subprocess.Popen([sys.executable, script, model_dir, prompts, two,
                               os.path.join(root, f"report_{i}.json"), str(i), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    try:  # the one-process reference (this process, one device) runs meanwhile
      ref = landscape.run(distributed_main.tiny_config(model_dir, prompts, mesh=(-1, 1)), one,
                          progress=False).to_json()
    finally:
      outs = fixtures.wait_all(procs, TIMEOUT)
    for p, out in zip(procs, outs):
      self.assertEqual(p.returncode, 0, out[-4000:])
    reports = []
    for i in range(2):
      with open(os.path.join(root, f"report_{i}.json")) as f:
        reports.append(json.load(f))

    for i, r in enumerate(reports):
      self.assertEqual(r["to_host"], dict(spans=[True, True], gathers=1, equal=dict(replicated=True, split=True)))
      self.assertTrue(r["joined"])
      self.assertEqual((r["process_index"], r["process_count"]), (i, 2))
      self.assertEqual((r["device_count"], r["local_device_count"]), (8, 4))
      self.assertEqual((r["mesh"]["shape"], r["mesh"]["processes"]), ([4, 2], 2))
      self.assertTrue(r["complete"])
      self.assertEqual(r["first"], dict(asr=r["asr"], visage=r["visage"]), "the resumed run differs")
      self.assertEqual(r["asr"], ref["asr"])
      self.assertEqual(r["visage"], ref["visage"])
    self.assertEqual(ref["mesh"]["processes"], 1)
    self.assertEqual(_generations(two), _generations(one), "tokens differ from the one-process run")
    verdicts = [v for point in _generations(one) for _, _, v in point]
    self.assertIn(True, verdicts)
    self.assertIn(False, verdicts, "the fixture must produce some refusals for this test to bite")
    with open(os.path.join(two, "landscape.json")) as f:
      saved = json.load(f)
    self.assertEqual((saved["asr"], saved["visage"], saved["complete"]), (ref["asr"], ref["visage"], True))

    for r in reports:  # 2 directions drawn once (the resumed run reads them back), each spanning both
      self.assertEqual(r["spans"], [True, True])
    with open(os.path.join(two, "directions.safetensors"), "rb") as f, \
         open(os.path.join(one, "directions.safetensors"), "rb") as g:
      self.assertEqual(f.read(), g.read(), "directions drawn over two processes differ from one device's")
    self.assertEqual(reports[1]["writes"], [], "process 1 wrote into the workdir")
    written = {w[1].removesuffix(".tmp") for w in reports[0]["writes"]}
    self.assertContainsSubset(pipeline.RUN_FILES, written)
    self.assertCountEqual(os.listdir(two), pipeline.RUN_FILES)


def _tokens(c) -> int:
  """Terms of one fine-tune step's float32 sums (loss, each gradient element): one per token."""
  return c.train.batch_size * c.train.grad_accum * c.train.max_length


def _atol(c, values) -> float:
  """How far processes that split a fine-tune's float32 sums (another order of the same terms) may
  move a trained value: n terms move a sum by up to n * eps32 of the values' scale (the largest of
  `values`: an adapter's A and B together, a merged weight alone)."""
  return _tokens(c) * np.finfo(np.float32).eps * max(float(np.abs(v).max()) for v in values)


def _run_two(script: str, args: list[str], root: str, reference, timeout: int):
  """Both processes of tests/SCRIPT (ARGS REPORT PROCESS_ID PORT) while `reference()` runs here;
  returns the two reports."""
  env = fixtures.subprocess_env()
  port = fixtures.free_port()
  procs = [subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), script), *args,
                             os.path.join(root, f"report_{i}.json"), str(i), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for i in range(2)]
  try:
    reference()
  finally:
    outs = fixtures.wait_all(procs, timeout)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  reports = []
  for i in range(2):
    with open(os.path.join(root, f"report_{i}.json")) as f:
      reports.append(json.load(f))
  return reports


def _sweep_table(workdir):
  with open(os.path.join(workdir, "sweep.csv")) as f:
    return [l.split(",")[:4] for l in f.read().splitlines()]   # run, status, asr_at_0, visage


_CLOCKS = ("machine", "load_seconds", "wall_seconds", "compile_seconds", "generated_tokens_per_second",
           "measured_wall_seconds", "reload_seconds", "wall_seconds_including_compile", "fraction_of_floor",
           "command_overhead_vs_engine")


def _untimed(report):
  """A bench report without its clocks and the machine: what two processes must reproduce."""
  if isinstance(report, dict):
    return {k: _untimed(v) for k, v in report.items() if k not in _CLOCKS and not k.startswith("speedup_")}
  return report


def _findings(result: dict) -> dict:
  """An experiment's numbers and verdicts, without its clocks and figure paths."""
  return {k: v for k, v in result.items() if k not in ("figures", "seconds_this_run", "job_seconds")}


class TwoProcessJobsTest(absltest.TestCase):

  def test_jobs_write_once_and_match_one_process(self):
    """A sweep, a fine-tune, a bench and an experiment (tests/jobs_main.py) in two processes."""
    root = self.create_tempdir().full_path
    model_dir, prompts = os.path.join(root, "model"), fixtures.advbench_path()
    fixtures.save_refusal_model(model_dir)
    data = fixtures.write_text(root, "train.jsonl", "".join(
        json.dumps(dict(prompt=f"Question {i}: how do plants grow?", response=f"With light and water, {i}."))
        + "\n" for i in range(8)))
    two, one = os.path.join(root, "two"), os.path.join(root, "one")
    ref = {}

    def reference():  # one process, one device, while the two run
      ref["rows"] = sweep.run(jobs_main.sweep_config(model_dir, prompts, (-1, 1)), os.path.join(one, "sweep"),
                              progress=False)
      ref["ft"] = finetune.run(jobs_main.finetune_config(model_dir, data, (1, 1)), os.path.join(one, "ft"),
                               progress=False)
      ref["bench"] = bench.run(jobs_main.bench_config(model_dir, prompts, (-1, 1)), os.path.join(one, "bench.json"),
                               log=lambda m: None)
      ref["exp"] = rundir.jsonable(findings.run(jobs_main.experiments_config(model_dir, (1, 1)),
                                               os.path.join(one, "exp"), os.path.join(one, "EXPERIMENTS.md")))

    reports = _run_two("jobs_main.py", [model_dir, prompts, data, two], root, reference, 2 * TIMEOUT)
    ft = jobs_main.finetune_config(model_dir, data, (1, 1))
    loss_rtol = _tokens(ft) * np.finfo(np.float32).eps   # a mean of one term per token, summed in another order
    for i, r in enumerate(reports):
      self.assertEqual((r["process_index"], r["process_count"], r["device_count"]), (i, 2, 8))
      self.assertEqual([(x["run"], x["status"], x["asr_at_0"], x["visage"]) for x in r["rows"]],
                       [(x["run"], x["status"], x["asr_at_0"], x["visage"]) for x in ref["rows"]])
      np.testing.assert_allclose(r["whole"]["losses"], ref["ft"]["losses"], rtol=loss_rtol)
      self.assertLen(r["whole"]["losses"], 3)
      self.assertEqual((r["part"]["step"], r["part"]["complete"]), (2, False))
      self.assertEqual(_untimed(r["bench"]), _untimed(ref["bench"]))
      self.assertEqual(r["experiments"].keys(), {"f3_system_prompts"})
      self.assertEqual(_findings(r["experiments"]["f3_system_prompts"]), _findings(ref["exp"]["f3_system_prompts"]))
    self.assertEqual(ref["bench"]["methods"]["default_real"]["generated_tokens"],
                     sum(n for point in _generations(os.path.join(one, "sweep", "seed=0")) for _, n, _ in point),
                     "the bench timed another landscape than the sweep's seed 0")
    self.assertEqual(rundir.read_json(os.path.join(two, "bench.json")), reports[0]["bench"])
    self.assertEqual(rundir.read_json(os.path.join(two, "exp", "f3_system_prompts.json")),
                     reports[0]["experiments"]["f3_system_prompts"])
    self.assertEqual(_sweep_table(os.path.join(two, "sweep")), _sweep_table(os.path.join(one, "sweep")))
    for run in ("seed=0", "seed=1"):
      self.assertEqual(_generations(os.path.join(two, "sweep", run)), _generations(os.path.join(one, "sweep", run)))
    self.assertNotEqual(_generations(os.path.join(one, "sweep", "seed=0")),
                        _generations(os.path.join(one, "sweep", "seed=1")), "two runs, two directions")

    # The fine-tune stopped by two processes at step 2 resumes here, with one process and device.
    resumed = finetune.run(ft, os.path.join(two, "ft_resume"), progress=False)
    np.testing.assert_allclose(resumed["losses"], ref["ft"]["losses"], rtol=loss_rtol)
    want = load_file(os.path.join(one, "ft", "lora.safetensors"))
    self.assertGreater(max(np.abs(v).max() for k, v in want.items() if "lora_B" in k), 1e-4, "B still zero")
    for run in ("ft", "ft_resume"):
      got = load_file(os.path.join(two, run, "lora.safetensors"))
      self.assertEqual(sorted(got), sorted(want))
      for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=_atol(ft, want.values()), rtol=0, err_msg=f"{run}: {k}")
    for run in ("ft", "ft_resume"):   # the trajectory: written once, the same tensors as one process's
      names = sorted(os.listdir(os.path.join(two, run, finetune.TRAJECTORY_DIR)))
      self.assertEqual(names, [f"step_{k:06d}.safetensors" for k in (0, 2, 3)])
      for name in names:
        got, want = (load_file(os.path.join(d, finetune.TRAJECTORY_DIR, name)) for d in (os.path.join(two, run),
                                                                                         os.path.join(one, "ft")))
        self.assertEqual(sorted(got), sorted(want))
        for k in want:
          np.testing.assert_allclose(got[k], want[k], atol=_atol(ft, want.values()), rtol=0, err_msg=f"{run}: {name} {k}")
    _, a = loader.load_params(os.path.join(two, "ft", "model"))
    _, b = loader.load_params(os.path.join(one, "ft", "model"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=_atol(ft, [np.asarray(y)]), rtol=0)
    self.assertTrue(os.path.exists(os.path.join(two, "ft", "hf", "model.safetensors")))
    self.assertEqual(*[{k: v for k, v in _json(os.path.join(d, "ft", "eval.json")).items() if k != "seconds"}
                       for d in (two, one)])

    written = [{w[1] for w in r["writes"]} for r in reports]
    self.assertEqual(written[0] & written[1], set(), "a file written by both processes")
    self.assertTrue(all("/array_metadatas/process_1" in w for w in written[1]),
                    f"process 1 wrote more than its orbax shard metadata: {sorted(written[1])[:5]}")
    files = {w.removesuffix(".tmp") for w in written[0]}
    self.assertContainsSubset({"sweep/sweep.csv", "sweep/sweep.md", "sweep/sweep.png", "sweep/seed=1/landscape.json",
                               "ft/run_config.json", "ft/train_log.jsonl", "ft/summary.json", "ft/loss.png",
                               "ft/lora.safetensors", "ft_resume/summary.json", "bench.json",
                               ".bench.json.bench/directions.safetensors", ".bench.json.bench/generations.jsonl",
                               "exp/jobs/aligned_1d_none/landscape.json", "exp/jobs/aligned_1d_none/job_seconds.json",
                               "exp/figures/f3_system_prompts.png", "exp/f3_system_prompts.json",
                               "exp_report/EXPERIMENTS.md",
                               "exp_report/docs/experiments/f3_system_prompts.png"}, files)
    self.assertFalse(os.path.exists(os.path.join(two, ".bench.json.bench")), "bench scratch left behind")


class TwoProcessMemoryTest(absltest.TestCase):

  def test_no_process_holds_the_model_or_a_whole_leaf(self):
    """Issue #16 at small scale: a 2D_interpolation-random landscape, a LoRA fine-tune and a
    conversion on a (1, 8) mesh over two processes (the model axis spans both;
    tests/memory_main.py). In each process the traced host memory (numpy buffers) of loading,
    drawing, differencing, saving and decoding, of training and exporting (model/, hf/, the
    evaluation), of converting, and of each whole run, stays under half the params tree; loading
    and converting read no whole leaf and stay under 3/4 of the largest (the process's half of it
    plus one layer's tensor). Gathering the tree (as the export did), or reading whole leaves as
    loading did before, exceeds these bounds. Every result equals the one-process run's; the
    converted copy, written by both processes, reads back as the loaded shards."""
    root = self.create_tempdir().full_path
    model_dir, target_dir, prompts = (os.path.join(root, "model"), os.path.join(root, "target"),
                                      fixtures.advbench_path())
    tok = fixtures.toy_tokenizer("bpe")
    size = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=8,
                num_key_value_heads=8)   # 68 MB of float32; gate, up and down 16.8 MB each
    fixtures.save_tiny_hf(model_dir, "llama", tokenizer=tok, seed=1, **size)
    fixtures.save_tiny_hf(target_dir, "llama", tokenizer=tok, seed=2, **size)
    two, one, ref = os.path.join(root, "two"), os.path.join(root, "one"), {}

    def reference():
      landscape.run(memory_main.memory_config(model_dir, target_dir, prompts, mesh=(1, 1)),
                    os.path.join(one, "landscape"), progress=False)
      ref["ft"] = finetune.run(memory_main.finetune_config(model_dir, prompts, mesh=(1, 1)),
                               os.path.join(one, "ft"), progress=False)

    reports = _run_two("memory_main.py", [model_dir, target_dir, prompts, two], root, reference, TIMEOUT)
    ft = memory_main.finetune_config(model_dir, prompts, mesh=(1, 1))
    for r in reports:
      print("memory:", json.dumps({k: v for k, v in r.items() if k != "finetune"}, sort_keys=True))
      print("memory (finetune):", json.dumps(r["finetune"]["stages"], sort_keys=True))
      stages, half_tree, leaf_bound = r["stages"], r["tree_bytes"] // 2, 3 * r["leaf_bytes"] // 4
      self.assertEqual((stages["complete"], r["spans"], stages["whole_reads"]), (True, True, 0))
      for stage in ("load", "random", "interpolation", "save", "decode", "run", "convert"):
        self.assertLess(stages[stage], half_tree, stage)
      self.assertTrue(r["converted_equal"], "the converted copy differs from the loaded model")
      self.assertLess(stages["load"], leaf_bound)
      self.assertLess(stages["convert"], leaf_bound)
      for stage in ("load", "train", "export", "model", "hf", "eval", "run"):
        self.assertLess(r["finetune"]["stages"][stage], half_tree, f"finetune {stage}")
      self.assertGreater(r["whole_tree"], half_tree, "the bound could not fail")
      self.assertGreater(r["whole_leaves"], leaf_bound, "the load bound could not fail")
      self.assertTrue(r["finetune"]["summary"]["complete"])
      np.testing.assert_allclose(r["finetune"]["summary"]["losses"], ref["ft"]["losses"],
                                 rtol=_tokens(ft) * np.finfo(np.float32).eps)   # a mean of one term per token
    self.assertEqual(_generations(os.path.join(two, "landscape")), _generations(os.path.join(one, "landscape")),
                     "tokens differ from the one-process run")
    with open(os.path.join(two, "landscape", "directions.safetensors"), "rb") as f, \
         open(os.path.join(one, "landscape", "directions.safetensors"), "rb") as g:
      self.assertEqual(f.read(), g.read(), "directions differ from the one-process run's")
    writers = os.listdir(os.path.join(root, "converted", "params", "layers.gate_proj"))
    self.assertContainsSubset({"ocdbt.process_0", "ocdbt.process_1"}, writers)
    self._check_finetune(os.path.join(two, "ft"), os.path.join(one, "ft"), ft)

  def _check_finetune(self, two: str, one: str, ft):
    """The adapter and the hf/ export equal the one-process run's, hf/ equals model/ bit for bit,
    and the evaluation decodes the same tokens."""
    want = load_file(os.path.join(one, "lora.safetensors"))
    self.assertGreater(max(np.abs(v).max() for k, v in want.items() if "lora_B" in k), 1e-4, "B still zero")
    got = load_file(os.path.join(two, "lora.safetensors"))
    self.assertEqual(sorted(got), sorted(want))
    for k in want:
      np.testing.assert_allclose(got[k], want[k], atol=_atol(ft, want.values()), rtol=0, err_msg=k)
    hf_two, hf_one = (load_file(os.path.join(d, "hf", "model.safetensors")) for d in (two, one))
    cfg, params = loader.load_params(os.path.join(two, "model"))
    converted = hf_tensors.to_hf_tensors(params, cfg)
    self.assertEqual(sorted(hf_two), sorted(converted))
    for k, v in converted.items():
      self.assertEqual((hf_two[k].dtype, hf_two[k].shape), (v.dtype, v.shape), k)
      np.testing.assert_array_equal(hf_two[k], v, err_msg=f"hf/ and model/ differ at {k}")
      np.testing.assert_allclose(hf_two[k], hf_one[k], atol=_atol(ft, [hf_one[k]]), rtol=0, err_msg=k)
    self.assertEqual(*[{k: v for k, v in _json(os.path.join(d, "eval.json")).items() if k != "seconds"}
                       for d in (two, one)])


class InitializeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("no_coordinator", dict(num_processes=2, process_id=1), "need distributed.coordinator_address"),
      ("no_port", dict(coordinator_address="localhost", num_processes=2), "expected host:port"),
      ("bad_id", dict(coordinator_address="localhost:1234", num_processes=2, process_id=2),
       "0 <= process_id < num_processes"),
      ("bad_auto", dict(auto="maybe"), "distributed.auto 'maybe'"),
  )
  def test_bad_settings_are_clear_errors(self, fields, message):
    c = landscape.default_config().distributed
    c.update(fields)
    with self.assertRaisesRegex(ValueError, message):
      distributed.initialize(c)

  def test_single_process_without_a_cluster(self):
    with mock.patch.dict(os.environ, {}, clear=True):
      self.assertFalse(distributed.initialize(landscape.default_config().distributed))
      self.assertFalse(distributed.initialize(None))
    self.assertTrue(distributed.is_writer())

  @parameterized.named_parameters(
      ("nothing", {}, ""),
      ("slurm_allocation_only", dict(SLURM_JOB_ID="7", SLURM_NTASKS="4"), ""),
      ("srun_one_task", dict(SLURM_JOB_ID="7", SLURM_STEP_NUM_TASKS="1"), ""),
      ("srun_tasks", dict(SLURM_JOB_ID="7", SLURM_STEP_NUM_TASKS="4"), "SLURM"),
      ("open_mpi", dict(OMPI_COMM_WORLD_SIZE="2"), "Open MPI"),
      ("tpu_pod", dict(TPU_WORKER_HOSTNAMES="t0,t1"), "Cloud TPU pod"),
      ("tpu_one_host", dict(TPU_WORKER_HOSTNAMES="t0"), ""),
      ("opt_in", {distributed.ENV_OPT_IN: "1"}, distributed.ENV_OPT_IN),
      ("coordinator_env", dict(JAX_COORDINATOR_ADDRESS="h:1"), "JAX_COORDINATOR_ADDRESS"),
  )
  def test_cluster_env(self, environ, expected):
    got = distributed.cluster_env(environ)
    if expected:
      self.assertStartsWith(got, expected)
    else:
      self.assertEqual(got, "")


if __name__ == "__main__":
  absltest.main()
