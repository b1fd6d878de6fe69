"""The trajectory plane from the Gram matrix against numpy's PCA of the flattened params."""

import jax
import numpy as np
from absl.testing import absltest

from visage_jax import model
from visage_jax.directions import trajectory


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


if __name__ == "__main__":
  absltest.main()
