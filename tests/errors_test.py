"""Bad input through the CLI, as a user meets it: exit status 2, one line on stderr naming what
was wrong, no traceback, and no landscape files written. Bugs keep their traceback. The commands
run in this process (fixtures.cli); a real process shows exit status 2 with one line and nothing
else (test_unresolvable_hub_id), the traceback of --debug and of a bug (exit status 1)."""

import json
import os
import subprocess
import sys

from absl.testing import absltest

import fixtures
from visage_jax import errors
from visage_jax.checkpoints import loader
from visage_jax.directions import vectors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None):
  return fixtures.cli(*args, env=dict(env or {}, VISAGE_JAX_DEBUG=""))


def run_cli_process(*args, env=None):
  env_extra = env
  env = {k: v for k, v in os.environ.items() if k != "VISAGE_JAX_DEBUG"}
  env.update(JAX_PLATFORMS="cpu", **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "visage_jax.cli", *args], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=600)


class BadInputTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = absltest.get_default_test_tmpdir()
    cls.model = os.path.join(cls.root, "errors_model")
    fixtures.save_tiny_hf(cls.model, tokenizer=fixtures.toy_tokenizer())
    cls.other = os.path.join(cls.root, "errors_other_model")  # another architecture: wider
    fixtures.save_tiny_hf(cls.other, tokenizer=fixtures.toy_tokenizer(), hidden_size=32,
                          intermediate_size=64)
    cls.prompts = os.path.join(cls.root, "errors_prompts.jsonl")
    with open(cls.prompts, "w") as f:
      f.write("\n".join(json.dumps({"prompt": p}) for p in ("Say hi.", "Write a poem.")) + "\n")

  def landscape(self, *overrides, workdir=None, env=None, process=False):
    workdir = workdir or os.path.join(self.create_tempdir().full_path, "run")
    proc = (run_cli_process if process else run_cli)("landscape", "--config=configs/demo.py:tiny", f"--workdir={workdir}", "--noprogress",
                   f"--config.model.path={self.model}", "--config.model.lora_path=",
                   f"--config.prompts.path={self.prompts}", "--config.prompts.limit=2",
                   "--config.decode.max_new_tokens=2", *overrides, env=env)
    return proc, workdir

  def assertOneLineError(self, proc, *needles):
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    self.assertLen(lines, 1, proc.stderr[-2000:])
    self.assertTrue(lines[0].startswith("visage-jax: error: "), lines[0])
    self.assertNotIn("Traceback", proc.stderr)
    for n in needles:
      self.assertIn(n, lines[0])

  def assertNothingWritten(self, workdir):
    self.assertFalse(os.path.exists(os.path.join(workdir, "landscape.json")))
    self.assertFalse(os.path.exists(os.path.join(workdir, "run_config.json")))

  def test_missing_prompt_file(self):
    proc, w = self.landscape("--config.prompts.path=/no/such/prompts.csv")
    self.assertOneLineError(proc, "/no/such/prompts.csv", "no such file")
    self.assertNothingWritten(w)

  def test_malformed_prompt_files(self):
    d = self.create_tempdir().full_path
    bad_csv = os.path.join(d, "bad.csv")
    with open(bad_csv, "w") as f:
      f.write("question,answer\nhello,world\n")
    proc, w = self.landscape(f"--config.prompts.path={bad_csv}")
    self.assertOneLineError(proc, bad_csv, "'goal' column")
    self.assertNothingWritten(w)
    bad_jsonl = os.path.join(d, "bad.jsonl")
    with open(bad_jsonl, "w") as f:
      f.write('{"prompt": "ok"}\n{"prompt": \n')
    proc, w = self.landscape(f"--config.prompts.path={bad_jsonl}")
    self.assertOneLineError(proc, f"{bad_jsonl}:2", "not valid JSON")
    self.assertNothingWritten(w)

  def test_misspelled_and_unknown_config_fields(self):
    proc, w = self.landscape("--config.prompts.limt=3")
    self.assertOneLineError(proc, "config.prompts.limt", "not a field", '"limit"')
    self.assertNothingWritten(w)
    proc, w = self.landscape("--config.nosuchsection.x=1")
    self.assertOneLineError(proc, "nosuchsection")
    proc, w = self.landscape("--no_such_flag")
    self.assertOneLineError(proc, "no_such_flag")

  def test_bad_values(self):
    for flag, needle in (("--config.landscape.vis_type=3D_random", "landscape.vis_type"),
                         ("--config.landscape.steps=0", "landscape.steps"),
                         ("--config.decode.max_new_tokens=0", "decode.max_new_tokens"),
                         ("--config.prompts.limit=many", "prompts.limit"),
                         ("--config.engine.mode=turbo", "engine.mode"),
                         ("--config.prompts.template=chatml", "prompts.template")):
      proc, w = self.landscape(flag)
      self.assertOneLineError(proc, needle)
      self.assertNothingWritten(w)

  def test_bad_config_file_and_argument(self):
    w = os.path.join(self.create_tempdir().full_path, "run")
    proc = run_cli("landscape", "--config=configs/no_such_config.py", f"--workdir={w}")
    self.assertOneLineError(proc, "configs/no_such_config.py")
    proc = run_cli("landscape", "--config=configs/demo.py:bogus", f"--workdir={w}")
    self.assertOneLineError(proc, "bogus")
    self.assertNothingWritten(w)

  def test_missing_and_unsupported_checkpoints(self):
    proc, w = self.landscape("--config.model.path=/no/such/model")
    self.assertOneLineError(proc, "/no/such/model")
    self.assertNothingWritten(w)
    gpt2 = self.create_tempdir().full_path
    with open(os.path.join(gpt2, "config.json"), "w") as f:
      json.dump({"model_type": "gpt2", "n_layer": 2}, f)
    proc, w = self.landscape(f"--config.model.path={gpt2}")
    self.assertOneLineError(proc, "model_type 'gpt2' is not supported")
    self.assertNothingWritten(w)
    proc = run_cli("generate", f"--model={gpt2}", "--prompt=hi")
    self.assertOneLineError(proc, "gpt2")
    proc, w = self.landscape("--config.model.lora_path=/no/such/lora.safetensors")
    self.assertOneLineError(proc, "/no/such/lora.safetensors")
    self.assertNothingWritten(w)

  def test_unresolvable_hub_id(self):
    cache = self.create_tempdir().full_path
    proc, w = self.landscape("--config.model.path=nobody-here/no-such-model",   # HF_HUB_* are read on import
                             env=dict(HF_HUB_OFFLINE="1", HF_HUB_CACHE=cache), process=True)
    self.assertOneLineError(proc, "nobody-here/no-such-model")
    self.assertNothingWritten(w)

  def test_directions_file_of_another_model(self):
    cfg, params = loader.load_params(self.other)
    import jax
    d = vectors.random_direction(jax.random.key(0), params, cfg)
    path = os.path.join(self.create_tempdir().full_path, "other.safetensors")
    vectors.save_safetensors(path, [d], cfg)
    proc, w = self.landscape(f"--config.landscape.directions_path={path}")
    self.assertOneLineError(proc, path)
    self.assertNothingWritten(w)
    proc, w = self.landscape("--config.landscape.directions_path=/no/such/dirs.safetensors")
    self.assertOneLineError(proc, "/no/such/dirs.safetensors")
    self.assertNothingWritten(w)

  def test_workdir_holding_a_different_run_is_left_alone(self):
    proc, w = self.landscape("--config.landscape.steps=1")
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    with open(os.path.join(w, "landscape.json")) as f:
      before = f.read()
    proc, _ = self.landscape("--config.landscape.seed=1", workdir=w)
    self.assertOneLineError(proc, w, "different config", "landscape.seed: 0 -> 1", "--overwrite")
    with open(os.path.join(w, "landscape.json")) as f:
      self.assertEqual(f.read(), before)

  def test_debug_shows_the_traceback(self):
    proc = run_cli_process("generate", "--model=/no/such/model", "--prompt=hi", "--debug")
    self.assertEqual(proc.returncode, 1)
    self.assertIn("Traceback", proc.stderr)
    proc = run_cli_process("generate", "--model=/no/such/model", "--prompt=hi",
                           env=dict(VISAGE_JAX_DEBUG="1"))
    self.assertIn("Traceback", proc.stderr)

  def test_bugs_keep_their_traceback(self):
    # A non-user exception inside a command is a bug: traceback, exit status 1.
    code = ("import sys; from visage_jax import cli\n"
            "def boom(): raise RuntimeError('internal invariant broken')\n"
            "cli.COMMANDS['generate'] = boom\n"
            "cli.main(['visage-jax', 'generate'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    self.assertEqual(proc.returncode, 1)
    self.assertIn("Traceback", proc.stderr)
    self.assertIn("internal invariant broken", proc.stderr)

  def test_user_errors_are_value_errors(self):
    self.assertTrue(issubclass(errors.UserError, ValueError))
    self.assertTrue(issubclass(errors.MissingFileError, FileNotFoundError))
    self.assertTrue(issubclass(loader.CheckpointError, errors.UserError))


if __name__ == "__main__":
  absltest.main()
