"""Cosines between directions saved by different runs: is the gradient direction the alignment
direction, the refusal direction, a harmful fine-tune's delta? (Chen et al. arXiv 2505.17646 find
adversarial fine-tuning directions nearly aligned with the worst case.)

A source is a run workdir (its directions.safetensors) or a directions.safetensors file. The cosine
is global over every HF tensor the directions share: sum_t <a_t, b_t> / (|a| |b|), the tensors read
one at a time as float32 and their products summed in float64.
"""

import os

import numpy as np

from visage_jax import errors
from visage_jax.checkpoints import safetensors_file

FILE = "directions.safetensors"


def resolve(source: str) -> str:
  """The directions file of a run workdir, or the file itself."""
  path = os.path.join(source, FILE) if os.path.isdir(source) else source
  if not os.path.exists(path):
    what = "run workdir without directions.safetensors (landscape.save_directions was off?)" if os.path.isdir(
        source) else "no such file"
    raise errors.MissingFileError(f"{source}: {what}; expected a run workdir or a {FILE} file.")
  return path


def directions_in(path: str) -> dict[str, dict[str, tuple]]:
  """{direction index: {HF tensor name: (dtype, shape, offset)}} of a directions file."""
  out: dict[str, dict[str, tuple]] = {}
  for key, entry in safetensors_file.read_header(path).items():
    index, _, name = key.partition("/")
    if not index.isdigit() or not name:
      raise errors.UserError(f"{path}: tensor {key!r} is not named '<direction index>/<HF tensor name>'.")
    out.setdefault(index, {})[name] = entry
  if not out:
    raise errors.UserError(f"{path}: holds no directions.")
  return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _read(path: str, name: str, entry: tuple) -> np.ndarray:
  fd = os.open(path, os.O_RDONLY)
  try:
    return safetensors_file.read_block(fd, entry, (), f"{path}: {name}").astype(np.float32).reshape(-1)
  finally:
    os.close(fd)


def cosine_matrix(sources: list[str]) -> tuple[list[str], np.ndarray]:
  """(labels 'SOURCE#i', the K x K cosine matrix) of every direction of every source."""
  columns = []   # (label, path, tensors)
  for source in sources:
    path = resolve(source)
    for index, tensors in directions_in(path).items():
      columns.append((f"{source}#{index}", path, tensors))
  names = set(columns[0][2])
  for label, path, tensors in columns[1:]:
    if set(tensors) != names:
      missing = sorted(names ^ set(tensors))[:3]
      raise errors.UserError(f"{path}: direction {label} has other tensors than {columns[0][0]} "
                             f"(e.g. {missing}): directions of different models cannot be compared.")
  gram = np.zeros((len(columns), len(columns)), np.float64)
  for name in sorted(names):
    shapes = {tuple(t[name][1]) for _, _, t in columns}
    if len(shapes) > 1:
      raise errors.UserError(f"tensor {name!r} has shapes {sorted(shapes)} across the directions: "
                             "directions of different models cannot be compared.")
    x = np.stack([_read(path, name, tensors[name]) for _, path, tensors in columns])   # [K, n] float32
    gram += x.astype(np.float64) @ x.astype(np.float64).T
  norms = np.sqrt(np.diag(gram))
  with np.errstate(invalid="ignore", divide="ignore"):
    cos = gram / np.outer(norms, norms)
  return [c[0] for c in columns], np.where(np.outer(norms, norms) > 0, cos, np.nan)


def table(labels: list[str], cos: np.ndarray) -> str:
  """The matrix as aligned text, rows and columns numbered, the labels listed below."""
  head = "      " + " ".join(f"{j:>7d}" for j in range(len(labels)))
  rows = [f"{i:>5d} " + " ".join("    nan" if np.isnan(v) else f"{v:+7.4f}" for v in row)
          for i, row in enumerate(cos)]
  keys = [f"  {i}: {label}" for i, label in enumerate(labels)]
  return "\n".join([head, *rows, "", *keys]) + "\n"
