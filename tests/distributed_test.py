"""Two processes on localhost (4 virtual CPU devices each, one 4 x 2 mesh of 8) give the
one-process landscape, resume alike, and only process 0 writes; config checks, cluster detection."""

import json
import os
import subprocess
import sys
from unittest import mock

from absl.testing import absltest, parameterized

import distributed_main
import fixtures
from visage_jax import distributed, landscape, pipeline

TIMEOUT = 300  # seconds for both processes: a hung collective fails the test instead of CI


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
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port, two, one = fixtures.free_port(), os.path.join(root, "two"), os.path.join(root, "one")
    procs = [subprocess.Popen([sys.executable, script, model_dir, prompts, two,
                               os.path.join(root, f"report_{i}.json"), str(i), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    try:  # the one-process reference (this process, one device) runs meanwhile
      ref = landscape.run(distributed_main.tiny_config(model_dir, prompts, mesh=(-1, 1)), one, progress=False)
    finally:
      outs = fixtures.wait_all(procs, TIMEOUT)
    for p, out in zip(procs, outs):
      self.assertEqual(p.returncode, 0, out[-4000:])
    reports = []
    for i in range(2):
      with open(os.path.join(root, f"report_{i}.json")) as f:
        reports.append(json.load(f))

    for i, r in enumerate(reports):
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

    self.assertEqual(reports[1]["writes"], [], "process 1 wrote into the workdir")
    written = {w[1].removesuffix(".tmp") for w in reports[0]["writes"]}
    self.assertContainsSubset(pipeline.RUN_FILES, written)
    self.assertCountEqual(os.listdir(two), pipeline.RUN_FILES)


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
