"""Meshes (8,1), (4,2), (2,4) over 8 virtual CPU devices (each engine mode) give the one-device
tokens, ASR and directions."""

import json
import os
import subprocess
import sys

from absl.testing import absltest

import fixtures
from visage_jax import sharding


class MultiDeviceTest(absltest.TestCase):

  def test_meshes_match_one_device(self):
    root = self.create_tempdir().full_path
    model_dir = os.path.join(root, "model")
    fixtures.save_refusal_model(model_dir)
    script = os.path.join(os.path.dirname(__file__), "multidevice_main.py")
    env = fixtures.subprocess_env()
    proc = subprocess.run([sys.executable, script, model_dir, fixtures.advbench_path(), root],
                          capture_output=True, text=True, env=env, timeout=900)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    with open(os.path.join(root, "summary.json")) as f:
      summary = json.load(f)
    one = summary.pop("1x1-continuous")
    self.assertEqual(one["mesh"], [1, 1])
    for name, got in summary.items():
      self.assertEqual(got["mesh"], [int(n) for n in name.split("-")[0].split("x")])
      self.assertEqual(got["direction_bytes"], one["direction_bytes"], f"{name}: directions differ")
      self.assertEqual(got["generations"], one["generations"], f"{name}: tokens differ")
      self.assertEqual(got["asr"], one["asr"], name)
      self.assertEqual(got["visage"], one["visage"], name)


class MeshTest(absltest.TestCase):

  def test_mesh_errors(self):
    with self.assertRaisesRegex(ValueError, r"mesh.shape \(4, 4\) needs 16 devices"):
      sharding.make_mesh((4, 4))
    with self.assertRaisesRegex(ValueError, "two positive ints"):
      sharding.make_mesh((0, 1))
    with self.assertRaisesRegex(ValueError, "two positive ints"):
      sharding.make_mesh((-1, -1))
    import jax
    n = len(jax.devices())
    with self.assertRaisesRegex(ValueError, rf"{n} devices do not split into groups of {n + 1}"):
      sharding.make_mesh((-1, n + 1))

  def test_minus_one_takes_all_remaining_devices(self):
    import jax
    n = len(jax.devices())
    self.assertEqual(sharding.make_mesh((-1, 1)).devices.shape, (n, 1))
    self.assertEqual(sharding.make_mesh((1, -1)).devices.shape, (1, n))

  def test_rules_fall_back_to_replicated_when_not_divisible(self):
    import jax
    import numpy as np
    mesh = sharding.make_mesh((1, 1))
    spec = sharding._fit(jax.sharding.PartitionSpec(None, "model"), (3, 5), mesh)
    self.assertEqual(tuple(spec), (None, "model"))  # 1 divides everything
    fake = type("M", (), {"shape": {"data": 2, "model": 2}})()
    self.assertEqual(tuple(sharding._fit(jax.sharding.PartitionSpec(None, "model"), (4, 5), fake)), (None, None))
    self.assertEqual(tuple(sharding._fit(jax.sharding.PartitionSpec("model", None), (7, 4, 6), fake)),
                     (None, "model", None))
    del np


if __name__ == "__main__":
  absltest.main()
