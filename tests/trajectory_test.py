"""The trajectory plane from the Gram matrix against numpy's PCA of the flattened params; the
`visage-jax trajectory` run against ordinary landscape runs of its plane and of its checkpoints."""

import json
import os

import jax
import numpy as np
from absl.testing import absltest

import fixtures
from visage_jax import errors, model, result
from visage_jax.checkpoints import loader
from visage_jax.directions import trajectory, vectors
from visage_jax.runs import finetune, landscape
from visage_jax.runs import trajectory as trajectory_run


class TrajectoryPlaneTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.cfg = model.ModelConfig.tiny(num_layers=2)
    base = model.init(jax.random.key(0), self.cfg)
    # a curved path with two comparable components: theta_i = base + t a + sin(pi t) b + noise
    a, b = model.init(jax.random.key(1), self.cfg), model.init(jax.random.key(2), self.cfg)
    self.checkpoints = []
    for i, t in enumerate(np.linspace(0, 1, 6)):
      noise = model.init(jax.random.key(10 + i), self.cfg)
      self.checkpoints.append(jax.tree.map(lambda p, x, y, z: p + t * x + np.sin(np.pi * t) * y + 0.01 * z,
                                           base, a, b, noise))
    self.final = self.checkpoints[-1]

  def _leaf_deltas(self):
    finals = jax.tree.leaves(self.final)
    per = [jax.tree.leaves(c) for c in self.checkpoints]
    for j, f in enumerate(finals):
      yield [p[j] - f for p in per]

  def test_matches_numpy_pca(self):
    k = trajectory.gram(self._leaf_deltas())
    got = trajectory.plane(k)
    flat = np.stack([np.concatenate([np.ravel(x) for x in jax.tree.leaves(c)]).astype(np.float64)
                     for c in self.checkpoints])
    delta = flat - flat[-1]
    centered = delta - delta.mean(0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    # the Gram entries are float32 sums of P products: relative error ~ eps32 * sqrt(P) ~ 1e-5
    np.testing.assert_allclose(got["explained_variance"], (s ** 2 / (s ** 2).sum())[:2], rtol=1e-5, atol=1e-6)
    self.assertGreater(got["explained_variance"][1], 0.05)   # both axes carry the path
    comps = [np.concatenate([np.ravel(x) for x in trajectory.component(got["coefficients"][c], self._leaf_deltas)])
             for c in range(2)]
    for c in range(2):
      sign = np.sign(np.dot(comps[c], vt[c]))
      np.testing.assert_allclose(comps[c], sign * vt[c], rtol=1e-5, atol=1e-5 * np.abs(vt[c]).max())
      np.testing.assert_allclose(got["coords"][:, c], delta @ comps[c], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.dot(comps[0], comps[1]), 0.0, atol=1e-5)
    proj = np.outer(got["coords"][:, 0], comps[0]) + np.outer(got["coords"][:, 1], comps[1])
    norms = np.linalg.norm(delta, axis=1)
    want = np.where(norms > 0, np.linalg.norm(delta - proj, axis=1) / np.where(norms > 0, norms, 1), 0)
    # sqrt(K_ii - x^2 - y^2) / sqrt(K_ii): a Gram error of ~1e-7 K_ii moves a residual ratio r by
    # ~1e-7 / (2 r), 1e-5 at r = 0.005
    np.testing.assert_allclose(got["residual_ratio"], want, rtol=0, atol=1e-7 / (2 * want[want > 0].min()))
    self.assertTrue((got["coords"][0] <= 0).all())     # the start at the lower left
    np.testing.assert_allclose(got["coords"][-1], 0.0, atol=1e-6)   # theta_final at the origin

  def test_needs_three_checkpoints(self):
    with self.assertRaisesRegex(ValueError, "at least 3"):
      trajectory.plane(np.eye(2))


def _lines(path, name="generations.jsonl"):
  with open(os.path.join(path, name)) as f:
    return [json.loads(l) for l in f]


class TrajectoryRunTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    root = absltest.get_default_test_tmpdir()
    cls.base = os.path.join(root, "traj_base")
    fixtures.save_refusal_model(cls.base)
    cfg, base = loader.load_params(cls.base)
    tok = loader.load_tokenizer(cls.base)
    a, b = model.init(jax.random.key(1), cfg), model.init(jax.random.key(2), cfg)
    cls.paths, cls.flat = [], []
    for i, t in enumerate(np.linspace(0, 1, 4)):
      params = jax.tree.map(lambda p, x, y: p + 0.3 * t * x + 0.3 * np.sin(np.pi * t) * y, base, a, b)
      cls.paths.append(os.path.join(root, f"traj_ckpt{i}"))
      loader.save_converted(cls.paths[-1], cfg, params, tok)
      cls.flat.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(loader.load_params(cls.paths[-1])[1])])
                      .astype(np.float64))
    cls.config = cls._config()
    cls.run_dir = os.path.join(root, "traj_run")
    cls.record = trajectory_run.run(cls.config, cls.run_dir, checkpoints=tuple(cls.paths), progress=False)

  @staticmethod
  def _config(base=None):
    c = base or trajectory_run.default_config()
    c.prompts.update(path=fixtures.advbench_path(), limit=3)
    c.landscape.steps = 2
    c.decode.max_new_tokens = 6
    c.engine.update(mode="materialized", max_batch=4)
    c.coherence.enabled = True
    c.overrefusal.update(prompts_path="xstest", limit=2)   # the checkpoints decode the safe prompts too
    return c

  def test_section_and_coordinates_against_numpy(self):
    t = result.load_run(self.run_dir).trajectory
    self.assertEqual(t.steps.tolist(), [0, 1, 2, 3])
    self.assertEqual(t.labels, tuple(self.paths))
    self.assertEqual(set(t.checkpoint), {"asr", "asr_coherent", "overrefusal"})
    for name in t.checkpoint:
      self.assertFalse(np.isnan(t.checkpoint[name]).any())
      self.assertFalse(np.isnan(t.plane[name]).any())
    # the imported directions D_k = scale_k d_k: alpha_i = <delta_i, D_k> / scale_k^2, all inside the grid
    cfg = loader.load_config(self.paths[-1])
    dirs = vectors.load_safetensors(os.path.join(self.run_dir, trajectory_run.PLANE_FILE), cfg, 2)
    delta = np.stack(self.flat) - self.flat[-1]
    for k, d in enumerate(dirs):
      flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(d)]).astype(np.float64)
      np.testing.assert_allclose(np.linalg.norm(flat), t.scale[k], rtol=1e-5)
      np.testing.assert_allclose(t.coords[:, k], delta @ flat / t.scale[k] ** 2, rtol=1e-4, atol=1e-6)
    self.assertLessEqual(np.abs(t.coords).max(), 1 / 1.25 + 1e-9)
    np.testing.assert_allclose(np.abs(t.coords).max(axis=0), 1 / 1.25, rtol=1e-6)
    np.testing.assert_allclose(t.coords[-1], 0.0, atol=1e-6)
    self.assertTrue(os.path.exists(os.path.join(self.run_dir, "trajectory.png")))
    # the plane is the run's directions: not copied again into directions.safetensors (a 7B plane is 56 GB)
    self.assertFalse(os.path.exists(os.path.join(self.run_dir, "directions.safetensors")))
    self.assertIn("## Trajectory", open(os.path.join(self.run_dir, "report.md")).read())

  def test_plane_landscape_equals_a_run_with_the_directions_imported(self):
    c = landscape.default_config()
    c = self._config(c)
    c.model.path = self.paths[-1]
    c.landscape.update(vis_type="2D_random", steps=2, multiplier=2.0,
                       directions_path=os.path.join(self.run_dir, trajectory_run.PLANE_FILE))
    work = self.create_tempdir().full_path
    got = landscape.run(c, work, progress=False)
    np.testing.assert_array_equal(got.asr, self.record.asr)
    np.testing.assert_array_equal(got.curves["asr_coherent"], self.record.curves["asr_coherent"])
    np.testing.assert_array_equal(got.curves["overrefusal"], self.record.curves["overrefusal"])
    self.assertEqual(_lines(work), _lines(self.run_dir))
    self.assertEqual(_lines(work, "overrefusal.jsonl"), _lines(self.run_dir, "overrefusal.jsonl"))

  def test_checkpoint_value_equals_a_run_of_that_checkpoint(self):
    c = self._config(landscape.default_config())
    c.model.path = self.paths[1]
    c.coherence.model_path = self.paths[-1]   # the trajectory judges coherence under theta_final
    c.landscape.update(vis_type="1D_random", steps=2, multiplier=2.0)
    work = self.create_tempdir().full_path
    got = landscape.run(c, work, progress=False)
    origin = _lines(work)[1]
    self.assertEqual(origin["coords"], [0.0])
    mine = _lines(self.run_dir, trajectory_run.POINTS_FILE)[1]
    self.assertEqual((mine["checkpoint"], mine["step"], mine["label"]), (1, 1, self.paths[1]))
    # the coherence reference scores other batches of rows there: its float32 sums round differently
    strip = lambda outputs: [{k: v for k, v in o.items() if k != "nll_ref"} for o in outputs]
    self.assertEqual(strip(mine["outputs"]), strip(origin["outputs"]))
    np.testing.assert_allclose([o["nll_ref"] for o in mine["outputs"]], [o["nll_ref"] for o in origin["outputs"]],
                               rtol=1e-5)
    t = self.record.trajectory
    self.assertEqual(t.checkpoint["asr"][1], got.asr[0, 1])
    self.assertEqual(t.checkpoint["asr_coherent"][1], got.curves["asr_coherent"][0, 1])
    # over-refusal at the checkpoint: its safe prompts' generations and rate as the run's origin
    safe = _lines(work, "overrefusal.jsonl")[1]
    self.assertEqual(mine["overrefusal_outputs"], safe["outputs"])
    self.assertEqual(mine["overrefusal"], safe["overrefusal"])
    self.assertEqual(t.checkpoint["overrefusal"][1], got.curves["overrefusal"][0, 1])

  def test_resumed_run_decodes_nothing_again(self):
    with open(os.path.join(self.run_dir, "landscape.json")) as f:
      before = json.load(f)
    again = trajectory_run.run(self.config, self.run_dir, checkpoints=tuple(self.paths), progress=False)
    self.assertEqual(again.section("trajectory"), before["trajectory"])
    self.assertLen(_lines(self.run_dir, trajectory_run.POINTS_FILE), 4)

  def test_bilinear_matches_scipy(self):
    from scipy.interpolate import RegularGridInterpolator
    xs, ys = np.linspace(-1, 1, 5), np.linspace(-1, 1, 3)
    z = np.random.default_rng(0).uniform(0, 100, (5, 3))
    pts = np.random.default_rng(1).uniform(-1, 1, (20, 2))
    np.testing.assert_allclose(trajectory_run.bilinear(xs, ys, z, pts), RegularGridInterpolator((xs, ys), z)(pts),
                               rtol=1e-12)

  def test_gap_is_a_paired_bootstrap_over_prompts(self):
    # plain Python: each prompt's plane value from its four corners, the difference, resampled
    rng = np.random.default_rng(3)
    xs, ys = np.linspace(-1, 1, 3), np.linspace(-1, 1, 5)
    grid, own = rng.integers(0, 2, (3, 5, 7)).astype(float), rng.integers(0, 2, (4, 7)).astype(float)
    coords = rng.uniform(-1, 1, (4, 2))
    got = trajectory_run.gaps(xs, ys, grid, own, coords, resamples=200, seed=5)
    draws = np.random.default_rng([5, 0]).integers(0, 7, size=(200, 7))   # uncertainty's prompt stream
    for k, (x, y) in enumerate(coords):
      i, j = min(int((x + 1) // 1), 1), min(int((y + 1) // 0.5), 3)
      tx, ty = (x - xs[i]) / 1.0, (y - ys[j]) / 0.5
      plane = [(1 - tx) * (1 - ty) * grid[i, j, q] + tx * (1 - ty) * grid[i + 1, j, q]
               + (1 - tx) * ty * grid[i, j + 1, q] + tx * ty * grid[i + 1, j + 1, q] for q in range(7)]
      diff = [100 * (own[k, q] - plane[q]) for q in range(7)]
      self.assertAlmostEqual(got["difference"][k], sum(diff) / 7, places=9)
      means = [sum(diff[q] for q in d) / 7 for d in draws]
      np.testing.assert_allclose(got["difference_ci95"][k], np.percentile(means, [2.5, 97.5]), atol=1e-9)
      own_means = [100 * sum(own[k, q] for q in d) / 7 for d in draws]
      np.testing.assert_allclose(got["checkpoint_ci95"][k], np.percentile(own_means, [2.5, 97.5]), atol=1e-9)

  def test_run_records_the_gap_of_every_curve(self):
    t = self.record.trajectory
    self.assertEqual(set(t.gap), {"asr", "asr_coherent", "overrefusal"})
    for name, g in t.gap.items():
      np.testing.assert_allclose(g.difference, t.checkpoint[name] - t.plane[name], atol=1e-9)
      self.assertTrue((g.difference_ci95[:, 0] <= g.difference + 1e-9).all())
      self.assertTrue((g.difference <= g.difference_ci95[:, 1] + 1e-9).all())
      self.assertTrue((g.checkpoint_ci95[:, 0] <= t.checkpoint[name] + 1e-9).all())
      self.assertTrue((t.checkpoint[name] <= g.checkpoint_ci95[:, 1] + 1e-9).all())

  def test_bad_input_is_one_line_and_writes_nothing(self):
    other = os.path.join(self.create_tempdir().full_path, "other")
    fixtures.save_tiny_hf(other, tokenizer=fixtures.toy_tokenizer("bpe", refusals=True), hidden_size=32)
    cases = [(self.paths[:2], "at least 3 checkpoints"),
             ([self.paths[0], other, self.paths[-1]], "other shapes than the last checkpoint"),
             ([self.paths[0], "/nonexistent/ckpt", self.paths[-1]], "/nonexistent/ckpt: no such file")]
    for paths, message in cases:
      work = os.path.join(self.create_tempdir().full_path, "run")
      proc = fixtures.cli("trajectory", "--config=configs/trajectory.py:tiny", f"--workdir={work}",
                          "--checkpoints=" + ",".join(paths), "--noprogress")
      self.assertEqual(proc.returncode, 2, proc.stderr)
      self.assertLen(proc.stderr.strip().splitlines(), 1, proc.stderr)
      self.assertIn(message, proc.stderr)
      self.assertFalse(os.path.exists(work))


class FinetuneTrajectoryTest(absltest.TestCase):

  def test_from_a_lora_finetune(self):
    root = self.create_tempdir().full_path
    model_dir = os.path.join(root, "model")
    fixtures.save_refusal_model(model_dir)
    data = fixtures.write_text(root, "train.jsonl", "".join(
        json.dumps(dict(prompt=f"Question {i}: how do plants grow?", response=f"Sure, here is how {i}."))
        + "\n" for i in range(4)))
    c = finetune.default_config()
    c.model.path, c.data.path = model_dir, data
    c.train.update(steps=3, batch_size=2, lr=3e-2, warmup_steps=0, checkpoint_every=3, max_length=64,
                   trajectory_every=1)
    c.lora.update(rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    ft = os.path.join(root, "ft")
    finetune.run(c, ft, progress=False)
    run_dir = os.path.join(root, "traj")
    t = trajectory_run.run(TrajectoryRunTest._config(), run_dir, finetune_dir=ft, progress=False).trajectory
    self.assertEqual(t.steps.tolist(), [0, 1, 2, 3])
    self.assertEqual(t.labels[0], finetune.trajectory_path(ft, 0))
    self.assertEqual(t.labels[-1], os.path.join(ft, "model"))
    np.testing.assert_allclose(t.coords[-1], 0.0, atol=1e-6)
    self.assertTrue((t.coords[0] <= 0).all())
    self.assertFalse(np.isnan(t.checkpoint["asr"]).any())
    # step 0's adapter has B = 0: theta_0 is the base model, so its distance to theta_final is the whole update
    _, base = loader.load_params(model_dir)
    _, final = loader.load_params(os.path.join(ft, "model"))
    dist = np.sqrt(sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
                       for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(final))))
    np.testing.assert_allclose(np.hypot(*(t.coords[0] * t.scale)) / np.sqrt(1 - t.residual_ratio[0] ** 2), dist,
                               rtol=1e-3)
    # trajectory.steps picks saved steps; the fine-tuned model stays the last
    c = TrajectoryRunTest._config()
    c.trajectory.steps = (0, 2)
    picked = trajectory_run.run(c, os.path.join(root, "picked"), finetune_dir=ft, progress=False).trajectory
    self.assertEqual(picked.steps.tolist(), [0, 2, 3])
    self.assertEqual(picked.labels, (t.labels[0], t.labels[2], t.labels[3]))
    c.trajectory.steps = (0, 5)
    with self.assertRaisesRegex(errors.UserError, r"trajectory.steps: .* no checkpoint of step\(s\) 5 "):
      trajectory_run.run(c, os.path.join(root, "bad"), finetune_dir=ft, progress=False)
    self.assertFalse(os.path.exists(os.path.join(root, "bad")))


if __name__ == "__main__":
  absltest.main()
