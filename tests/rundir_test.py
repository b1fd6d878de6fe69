"""Run-directory files: atomic writes, torn JSON lines repaired, the one-run claim."""

import json
import os
from unittest import mock

from absl.testing import absltest

from visage_jax import rundir


class AtomicTest(absltest.TestCase):

  def test_fsync_then_rename_and_no_temp_left(self):
    d = self.create_tempdir().full_path
    path = os.path.join(d, "sub", "a.json")
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    with mock.patch.object(os, "fsync", side_effect=lambda fd: calls.append("fsync") or real_fsync(fd)), \
         mock.patch.object(os, "replace", side_effect=lambda a, b: calls.append(("replace", b)) or real_replace(a, b)):
      rundir.write_atomic(path, "first")
    self.assertEqual(calls, ["fsync", ("replace", path)])
    with open(path) as f:
      self.assertEqual(f.read(), "first")
    self.assertEqual(os.listdir(os.path.dirname(path)), ["a.json"])

  def test_failure_keeps_the_old_file(self):
    d = self.create_tempdir().full_path
    path = os.path.join(d, "a.bin")
    rundir.write_atomic(path, "old")
    with self.assertRaises(RuntimeError):
      with rundir.atomic(path) as tmp:
        with open(tmp, "w") as f:
          f.write("half")
        raise RuntimeError("killed mid-write")
    with open(path) as f:
      self.assertEqual(f.read(), "old")
    self.assertEqual(os.listdir(d), ["a.bin"])


class JsonlTest(absltest.TestCase):

  def write(self, text):
    path = os.path.join(self.create_tempdir().full_path, "g.jsonl")
    with open(path, "w") as f:
      f.write(text)
    return path

  def test_torn_last_line_is_dropped_and_repaired(self):
    good = '{"a": 1}\n{"a": 2}\n'
    for torn in ('{"a": 3', '{"a": 3}'):  # cut inside the JSON; whole JSON but no newline yet
      path = self.write(good + torn)
      self.assertEqual(rundir.read_jsonl(path, repair=False), [{"a": 1}, {"a": 2}])
      self.assertEqual(os.path.getsize(path), len(good + torn))
      self.assertEqual(rundir.read_jsonl(path), [{"a": 1}, {"a": 2}])
      with open(path) as f:
        self.assertEqual(f.read(), good)
    self.assertEqual(rundir.read_jsonl(os.path.join(self.create_tempdir().full_path, "none")), [])

  def test_appender_writes_whole_lines_and_fsyncs(self):
    path = os.path.join(self.create_tempdir().full_path, "g.jsonl")
    with mock.patch.object(os, "fsync", wraps=os.fsync) as fsync:
      with rundir.JsonlAppender(path) as out:
        out.append([dict(a=1), dict(a=2)])
        out.append([dict(a=3)])
    self.assertEqual(fsync.call_count, 2)
    self.assertEqual(rundir.read_jsonl(path), [dict(a=1), dict(a=2), dict(a=3)])

  def test_appender_of_a_non_writer_writes_nothing(self):
    path = os.path.join(self.create_tempdir().full_path, "g.jsonl")
    with rundir.JsonlAppender(path, write=False) as out:
      out.append([dict(a=1)])
    self.assertFalse(os.path.exists(path))


class ClaimTest(absltest.TestCase):

  def claim(self, w, cfg, **kw):
    rundir.claim(w, cfg, comparable=lambda d: {k: v for k, v in rundir.jsonable(d).items() if k != "ignored"}, **kw)

  def test_same_run_resumes_other_run_is_refused(self):
    w = os.path.join(self.create_tempdir().full_path, "run")
    self.claim(w, dict(a=dict(x=1, y=(1, 2)), ignored=dict(z=0)), write=False)
    self.assertFalse(os.path.exists(w), "write=False only checks")
    self.claim(w, dict(a=dict(x=1, y=(1, 2)), ignored=dict(z=0)), run_files=("out.txt",))
    with open(os.path.join(w, "run_config.json")) as f:
      self.assertEqual(json.load(f), dict(a=dict(x=1, y=[1, 2]), ignored=dict(z=0)))
    with open(os.path.join(w, "out.txt"), "w") as f:
      f.write("results")
    self.claim(w, dict(a=dict(x=1, y=(1, 2)), ignored=dict(z=5)), run_files=("out.txt",))
    self.assertTrue(os.path.exists(os.path.join(w, "out.txt")), "an ignored field is the same run")
    with self.assertRaisesRegex(ValueError, r"holds a run with a different config \(a.x: 1 -> 2\); use"):
      self.claim(w, dict(a=dict(x=2, y=(1, 2))), run_files=("out.txt",))
    self.assertTrue(os.path.exists(os.path.join(w, "out.txt")))
    self.claim(w, dict(a=dict(x=2, y=(1, 2))), run_files=("out.txt",), overwrite=True)
    self.assertFalse(os.path.exists(os.path.join(w, "out.txt")))
    with open(os.path.join(w, "run_config.json")) as f:
      self.assertEqual(json.load(f)["a"]["x"], 2)


if __name__ == "__main__":
  absltest.main()
