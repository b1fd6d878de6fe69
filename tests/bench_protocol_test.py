"""configs/bench_gpu.py:tiny through launch/device_bench.sh, as on an offline GPU node: a copy of
the repository whose wheels/ (built here from the installed distributions, no network) is the only
source of ml_collections and gguf; every field of the JSON checked against its formula."""

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile

from absl.testing import absltest

from visage_jax import planner
from visage_jax.runs import bench_protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_LACKS = ("ml_collections", "gguf")  # what `make wheels` downloads
MODE_FIELDS = {"planned", "batch", "points", "compile_seconds", "decode_seconds", "seconds_per_point",
               "tokens_per_second", "step_seconds", "decode_steps", "bytes_per_step", "roofline_fraction",
               "fraction_of_step_floor", "bound", "first_point_seconds", "protocol_seconds",
               "speedup_vs_published", "speedup_vs_batched", "token_agreement_vs_reference_batched",
               "predicted"}
TOP_FIELDS = {"kind", "device", "platform", "versions", "model", "dtype", "params", "prompts", "prompt_tokens",
              "max_new_tokens", "grid_points", "measured_points", "budget_seconds", "wall_seconds",
              "load_seconds", "planned_mode", "mode_reason", "modes", "reference",
              "reference_published_seconds_per_point", "reference_batched_seconds_per_point",
              "reference_protocol_seconds", "plan"}


def wheel_of_installed(name: str, dest: str) -> str:
  """A py3-none-any wheel of an installed pure-Python distribution, from its files (RECORD
  rewritten with their hashes): what `make wheels` downloads, without a network."""
  dist = importlib.metadata.distribution(name)
  files = [f for f in dist.files if ".." not in f.parts and "__pycache__" not in f.parts
           and f.parts[-1] not in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")]
  info = next(f.parts[0] for f in files if f.parts[-1] == "METADATA")
  path = os.path.join(dest, f"{info[:-len('.dist-info')]}-py3-none-any.whl")
  record = []
  with zipfile.ZipFile(path, "w") as z:
    for f in files:
      data = f.read_binary()
      digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
      z.writestr(f.as_posix(), data)
      record.append(f"{f.as_posix()},sha256={digest},{len(data)}")
    z.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
  return path


class DeviceBenchTest(absltest.TestCase):

  def test_tiny_from_a_copy_with_local_wheels_only(self):
    tmp = self.create_tempdir().full_path
    repo = os.path.join(tmp, "repo")
    skip = lambda d, names: [n for n in names if n in ("__pycache__", ".pytest_cache") or n.endswith(".egg-info")
                             or (d == ROOT and n in (".git", ".venv", "runs", "wheels"))]
    shutil.copytree(ROOT, repo, ignore=skip)
    os.makedirs(os.path.join(repo, "wheels"))
    for name in NODE_LACKS:
      wheel_of_installed(name, os.path.join(repo, "wheels"))
    blocked = os.path.join(tmp, "not_on_the_node")  # shadows this machine's copies
    for name in NODE_LACKS:
      os.makedirs(os.path.join(blocked, name))
      with open(os.path.join(blocked, name, "__init__.py"), "w") as f:
        f.write(f"raise ImportError('{name} is not on the node: it must come from wheels/')\n")
    out = os.path.join(tmp, "out")
    env = dict(os.environ, PYTHON=sys.executable, CONFIG="configs/bench_gpu.py:tiny", JAX_PLATFORMS="cpu",
               PYTHONPATH=blocked, PIP_NO_INDEX="1")   # the suite's compilation cache (tests/conftest.py)
    proc = subprocess.run(["bash", os.path.join(repo, "launch", "device_bench.sh"), out], capture_output=True,
                          text=True, env=env, cwd=tmp, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(os.path.join(out, "bench_gpu.json")) as f:
      r = json.load(f)
    with open(os.path.join(out, "summary.txt")) as f:
      summary = f.read()
    self.assertIn("reference", open(os.path.join(out, "bench.log")).read())
    self.assertEqual(summary.split("\n")[:-2], bench_protocol.summary(r).split("\n"))
    self.assertIn("device_bench.sh: ", summary)
    self.check_report(r)

  def assertClose(self, got, want):
    self.assertLessEqual(abs(got - want), 1e-3 * abs(want), (got, want))

  def check_report(self, r):
    self.assertEqual(set(r), TOP_FIELDS)
    self.assertEqual((r["kind"], r["device"], r["platform"], r["model"], r["dtype"]),
                     ("protocol", "cpu", "cpu", "random:tiny", "float32"))
    self.assertEqual(r["versions"]["ml_collections"], importlib.metadata.version("ml_collections"))
    for name in bench_protocol.LIBRARIES:
      self.assertEqual(r["versions"][name], importlib.metadata.version(name), name)
    self.assertEqual((r["prompts"], r["max_new_tokens"], r["grid_points"]), (4, 6, 5))
    self.assertEqual(r["params"], planner.param_count(planner.model.ModelConfig.tiny()))
    # The llama2 template with its system prompt: a shared prefix, then each goal.
    self.assertGreater(r["prompt_tokens"]["shared_prefix"], 100)
    self.assertGreater(r["prompt_tokens"]["padded"], r["prompt_tokens"]["mean"])
    k = len(r["measured_points"])
    self.assertBetween(k, 3, 5)
    self.assertEqual(r["measured_points"][0], 0)
    self.assertEqual(set(r["modes"]), {r["planned_mode"], bench_protocol.OTHER_MODE[r["planned_mode"]]})
    ref = r["reference"]
    self.assertEqual(set(ref), {"device", "dtype", "points", "published", "batched", "wall_seconds"})
    self.assertEqual((ref["dtype"], ref["points"]), ("float32", [0]))
    pub, bat = ref["published"], ref["batched"]
    self.assertEqual((pub["batch_size"], pub["prompts_timed"], bat["batch_size"], bat["prompts_timed"]), (4, 2, 4, 4))
    self.assertAlmostEqual(pub["seconds_per_point"], pub["reload_seconds"] + 2 * pub["generate_seconds"], delta=3e-3)
    self.assertAlmostEqual(bat["seconds_per_point"], bat["reload_seconds"] + bat["generate_seconds"], delta=2e-3)
    self.assertEqual(r["reference_published_seconds_per_point"], pub["seconds_per_point"])
    self.assertEqual(r["reference_batched_seconds_per_point"], bat["seconds_per_point"])
    self.assertAlmostEqual(r["reference_protocol_seconds"]["batched"], 5 * bat["seconds_per_point"], delta=0.1)
    peak_bandwidth = planner.DEVICE_PEAKS["cpu"][1]
    for name, e in r["modes"].items():
      self.assertEqual(set(e), MODE_FIELDS, name)
      self.assertEqual(e["planned"], name == r["planned_mode"])
      self.assertEqual(e["points"], k)
      self.assertGreater(e["decode_seconds"], 0)
      self.assertGreater(e["compile_seconds"], 0)
      per = e["decode_seconds"] / k
      self.assertAlmostEqual(e["seconds_per_point"], per, delta=1e-3)
      self.assertAlmostEqual(k * 4 * 6 / e["tokens_per_second"], e["decode_seconds"], delta=1e-4)
      steps = k * 1 * 6 if name == "materialized" else -(-k * 4 // e["batch"]) * 6  # materialized: 4 prompts, batch 4
      self.assertEqual(e["decode_steps"], steps)
      self.assertAlmostEqual(e["step_seconds"] * steps, e["decode_seconds"], delta=1e-4)
      fraction = e["bytes_per_step"] / e["step_seconds"] / peak_bandwidth
      self.assertAlmostEqual(e["roofline_fraction"], fraction, delta=5e-5 + 1e-3 * fraction)
      self.assertAlmostEqual(pub["seconds_per_point"] / e["speedup_vs_published"], per, delta=1e-4 + 1e-3 * per)
      self.assertAlmostEqual(bat["seconds_per_point"] / e["speedup_vs_batched"], per, delta=1e-4 + 1e-3 * per)
      self.assertAlmostEqual(e["protocol_seconds"], e["compile_seconds"] + 5 * per, delta=0.1)
      self.assertEqual(e["token_agreement_vs_reference_batched"], 1.0)  # float32 both sides: the same model
      self.assertEqual(set(e["predicted"]), {"seconds_per_step", "bound", "seconds_per_point", "protocol_seconds"})
      self.assertClose(e["predicted"]["protocol_seconds"], 5 * e["predicted"]["seconds_per_point"])
      self.assertGreater(e["predicted"]["seconds_per_step"], 0)
    self.assertEqual(r["plan"]["accelerator"], None)  # no accelerator of planner.ACCELERATORS: a CPU
    self.assertIn("visage-jax plan --model=random:tiny", r["plan"]["command"])


class ReferenceFailureTest(absltest.TestCase):

  def test_a_failing_reference_is_recorded_not_raised(self):
    c = bench_protocol.default_config()
    c.model.path = "random:nope"
    logged = []
    ref, tokens = bench_protocol.reference_in_child(c, logged.append)
    self.assertIsNone(tokens)
    self.assertEqual(set(ref), {"error", "wall_seconds"})
    self.assertIn("no random preset 'nope'", ref["error"])
    self.assertIn("reference: failed", logged[-1])


class ConfigTest(absltest.TestCase):

  def test_gpu_config_is_the_paper_protocol_on_random_llama2_7b(self):
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "configs", "bench_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    self.assertEqual((c.model.path, c.model.dtype, c.prompts.limit, c.prompts.template, c.landscape.steps,
                      c.decode.max_new_tokens, c.engine.mode), ("random:llama2_7b", "bfloat16", 80, "llama2", 20, 512, "auto"))
    self.assertEqual((c.bench.kind, c.bench.budget_seconds, c.bench.reference_prompts, c.bench.reference_batch,
                      c.bench.min_points), ("protocol", 480, 8, 4, 3))
    with self.assertRaisesRegex(ValueError, "unknown config argument 'big'"):
      mod.get_config("big")


class BudgetTest(absltest.TestCase):

  def test_points_that_fit(self):
    self.assertEqual(bench_protocol.points_that_fit(100.0, 9.0, 21, 3), 11)
    self.assertEqual(bench_protocol.points_that_fit(1000.0, 9.0, 21, 3), 21)   # all of the grid
    self.assertEqual(bench_protocol.points_that_fit(-20.0, 9.0, 21, 3), 3)     # over budget: the minimum
    self.assertEqual(bench_protocol.points_that_fit(5.0, 0.0, 2, 3), 2)       # never past the grid


if __name__ == "__main__":
  absltest.main()
