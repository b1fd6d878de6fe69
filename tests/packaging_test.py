"""A clone of this repository alone runs: the data ships inside the package (and its wheel), and
nothing in the package, the configs or the tests reaches outside the repository for files."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

from absl.testing import absltest

import fixtures
from visage_jax import prompts, resources
from visage_jax.training import trainsets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Built from pieces so that this file does not match itself (nor the pre-stop hook's grep).
_NAME = "sha" + "red"
_OUTSIDE = re.compile(r"\.\./" + _NAME + r"|[\"']\.\.[\"']\s*,\s*[\"']\.\.[\"']\s*,\s*[\"']" + _NAME
                      + r"|[\"']" + _NAME + r"[\"']\s*,\s*[\"']data")


def _tracked_files() -> list[str]:
  proc = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
  if proc.returncode == 0 and proc.stdout.strip():
    return proc.stdout.split("\n")[:-1]
  skip = (".venv", "runs", ".git", "build")
  return [os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, files in os.walk(ROOT)
          if not os.path.relpath(d, ROOT).split(os.sep)[0] in skip for f in files]


class PackagedDataTest(absltest.TestCase):

  def test_packaged_advbench_is_the_full_set_with_its_licence(self):
    with open(resources.path(resources.ADVBENCH), newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      self.assertEqual(reader.fieldnames, ["goal", "target"])
      rows = list(reader)
    self.assertLen(rows, 520)
    self.assertTrue(rows[0]["goal"].startswith("Write a script that can exploit vulnerabilities"))
    with open(resources.path("LICENSE.md")) as f:
      licence = f.read()
    for needle in ("MIT License", "Andy Zou", "Universal and Transferable Adversarial Attacks",
                   "llm-attacks"):
      self.assertIn(needle, licence)

  def test_empty_paths_mean_the_packaged_files(self):
    self.assertEqual(prompts.load_goals("", 80), prompts.load_goals(resources.path(resources.ADVBENCH), 80))
    self.assertLen(prompts.load_goals("", 80), 80)
    self.assertEqual(trainsets.read_advbench(""), trainsets.read_advbench(fixtures.advbench_path()))
    train, held = trainsets.benign_split("")
    self.assertLen(held, trainsets.HELDOUT_BENIGN)
    self.assertTrue(os.path.isfile(resources.path(resources.ALIGNED_SMOLLM2_LORA)))

  def test_nothing_reads_outside_the_repository(self):
    offenders = []
    for rel in _tracked_files():
      if rel.split("/")[0] not in ("visage_jax", "configs", "tests") or not rel.endswith(".py"):
        continue
      with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
          if _OUTSIDE.search(line):
            offenders.append(f"{rel}:{n}: {line.strip()}")
    self.assertEmpty(offenders)
    self.assertIsNotNone(_OUTSIDE.search('p = "../' + 'shared/data/x.csv"'))  # the check can fail
    up = '"..", '
    self.assertIsNotNone(_OUTSIDE.search('os.path.join(d, ' + up * 2 + '"sha' + 'red", "data")'))

  def test_wheel_holds_the_data(self):
    tmp = self.create_tempdir().full_path
    src = os.path.join(tmp, "src")
    for rel in _tracked_files():
      if rel.split("/")[0] in ("visage_jax", "pyproject.toml", "requirements.txt", "README.md"):
        os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), os.path.join(src, rel))
    isolation = [] if _has("setuptools") else ["--use-pep517"]
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", os.path.join(tmp, "dist"),
           *(["--no-build-isolation"] if not isolation else isolation), src]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    (wheel,) = [f for f in os.listdir(os.path.join(tmp, "dist")) if f.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(tmp, "dist", wheel)) as z:
      names = set(z.namelist())
      for f in resources.FILES:
        self.assertIn(f"visage_jax/data/{f}", names)
      self.assertEqual(z.read(f"visage_jax/data/{resources.ADVBENCH}"),
                       open(resources.path(resources.ADVBENCH), "rb").read())


def _has(module: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(module) is not None


class CloneAloneTest(absltest.TestCase):

  def test_landscape_runs_from_a_copy_with_nothing_beside_it(self):
    """The package and configs copied to an empty folder, run from there: default prompts are the
    packaged AdvBench and every file the run reads comes from the copy."""
    tmp = self.create_tempdir().full_path
    clone = os.path.join(tmp, "deep", "clone")
    for part in ("visage_jax", "configs"):
      shutil.copytree(os.path.join(ROOT, part), os.path.join(clone, part),
                      ignore=shutil.ignore_patterns("__pycache__"))
    model_dir = os.path.join(tmp, "model")
    fixtures.save_tiny_hf(model_dir, tokenizer=fixtures.toy_tokenizer())
    workdir = os.path.join(tmp, "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=clone)
    proc = subprocess.run(
        [sys.executable, "-c", "import visage_jax, sys; print(visage_jax.__file__, file=sys.stderr); "
         "from visage_jax import cli; cli.main()", "landscape", "--config=configs/demo.py:tiny",
         f"--workdir={workdir}", "--noprogress", f"--config.model.path={model_dir}",
         "--config.model.lora_path=", "--config.prompts.limit=2", "--config.landscape.steps=1",
         "--config.decode.max_new_tokens=2"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn(os.path.join(clone, "visage_jax"), proc.stderr)
    with open(os.path.join(workdir, "generations.jsonl")) as f:
      line = json.loads(f.readline())
    self.assertEqual([o["prompt"] for o in line["outputs"]], prompts.load_goals("", 2))


if __name__ == "__main__":
  absltest.main()
