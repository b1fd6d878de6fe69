"""The plane of a fine-tuning trajectory (Li et al. 2018, arXiv 1712.09913; `projection.py` of
tomgoldstein/loss-landscape): PCA of delta_i = theta_i - theta_final over the checkpoints.

Computed through the n x n Gram matrix K_ij = <delta_i, delta_j>, accumulated leaf by leaf, so no
process ever holds an n x P matrix. With J the centering projector, the centered Gram is
G = J K J = V diag(lambda) V^T; the unit components are d_k = sum_i c_ik delta_i with
c_k = J v_k / sqrt(lambda_k), and a checkpoint's coordinate is <delta_i, d_k> = (K v_k)_i /
sqrt(lambda_k) (v_k is orthogonal to the ones vector). d_1 and d_2 are orthonormal, so the part of
delta_i off the plane has squared norm K_ii - x_i^2 - y_i^2.
"""

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np


def gram(leaves: Iterable[list[jax.Array]]) -> np.ndarray:
  """K [n, n] in float64 from, per params leaf, the n checkpoints' deltas of that leaf (float32
  products summed on device per leaf, leaves summed on the host)."""
  total = None
  for deltas in leaves:
    x = jnp.stack([jnp.ravel(d).astype(jnp.float32) for d in deltas])
    k = np.asarray(jax.device_get(x @ x.T), np.float64)
    total = k if total is None else total + k
  if total is None:
    raise ValueError("no leaves")
  return total


def plane(k: np.ndarray, dims: int = 2) -> dict:
  """PCA with centering from the Gram matrix: coefficients [dims, n] of each component in the
  deltas, explained-variance ratios, coordinates [n, dims] and residual ratios [n] per checkpoint.
  Signs are fixed so the first checkpoint (the start) sits at a coordinate <= 0 on each axis: the
  path reads left to right and bottom to top, towards theta_final at the origin."""
  k = np.asarray(k, np.float64)
  n = k.shape[0]
  if n < 3:
    raise ValueError(f"a trajectory plane needs at least 3 checkpoints, got {n}")
  j = np.eye(n) - np.ones((n, n)) / n
  lam, v = np.linalg.eigh(j @ k @ j)
  order = np.argsort(lam)[::-1]
  lam, v = np.clip(lam[order], 0.0, None), v[:, order]
  if lam[dims - 1] <= 0:
    raise ValueError("the checkpoints span fewer than 2 dimensions")
  coeffs, coords = [], []
  for c in range(dims):
    x = k @ v[:, c] / np.sqrt(lam[c])
    sign = -1.0 if x[0] > 0 else 1.0
    coeffs.append(sign * (j @ v[:, c]) / np.sqrt(lam[c]))
    coords.append(sign * x)
  coords = np.stack(coords, axis=1)
  norms = np.sqrt(np.clip(np.diag(k), 0.0, None))
  off = np.sqrt(np.clip(np.diag(k) - np.sum(coords ** 2, axis=1), 0.0, None))
  residual = np.where(norms > 0, off / np.where(norms > 0, norms, 1.0), 0.0)
  return dict(coefficients=np.stack(coeffs), explained_variance=lam[:dims] / lam.sum(),
              coords=coords, residual_ratio=residual)


def component(coefficients: np.ndarray, leaf_deltas: Callable[[], Iterable[list[jax.Array]]]) -> list[jax.Array]:
  """The component sum_i c_i delta_i, leaf by leaf, for the leaves `leaf_deltas()` yields."""
  c = np.asarray(coefficients, np.float32)
  return [sum(float(w) * d.astype(jnp.float32) for w, d in zip(c, deltas)) for deltas in leaf_deltas()]
