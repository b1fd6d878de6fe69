"""Blocks of safetensors tensors read with pread: the rows and columns one device holds, with no
file mapping and never more of the tensor in memory than the block and `_CHUNK` bytes of rows;
and files written one tensor at a time, so a writer never holds more than one tensor.

safetensors' own pread backend reads a whole tensor to slice it (an 8 MB slice of a 64 MB
tensor peaks at 71 MB, measured) and its mmap backend maps the pages it touches, so loads onto
a mesh read blocks here: a row block in one read, a column block (o_proj and down_proj split
their HF columns) through a buffer of whole rows of at most `_CHUNK` bytes.
"""

import json
import math
import os
import struct
from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np

from visage_jax import rundir
from visage_jax.errors import CheckpointError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
           "F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_CHUNK = 16 << 20  # bytes of whole rows read at a time for a column block


def read_header(path: str) -> dict[str, tuple]:
  """{tensor name: (dtype, shape, byte offset in the file)}, checked against the file's size; the
  dtype is its safetensors name when numpy has no such type (an error only if it is read)."""
  size = os.path.getsize(path)
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n)) if 8 + n <= size else None
  except (struct.error, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file ({e}).") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: not a readable safetensors file (no JSON header).")
  out = {}
  for name, e in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (start, end) = _DTYPES.get(e["dtype"]), tuple(e["shape"]), e["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {e!r}.") from None
    itemsize = (end - start) // max(1, math.prod(shape)) if dtype is None else np.dtype(dtype).itemsize
    if end - start != math.prod(shape) * itemsize or 8 + n + end > size:
      raise CheckpointError(f"{path}: tensor {name!r} ({e['dtype']} {list(shape)}) does not fit its "
                            f"bytes {start}..{end} of a {size}-byte file.")
    out[name] = (e["dtype"] if dtype is None else np.dtype(dtype), shape, 8 + n + start)
  return out


def _pread_into(fd: int, out: np.ndarray, offset: int, where: str) -> None:
  view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
  while done < len(view):
    got = os.preadv(fd, [view[done:]], offset + done)
    if got == 0:
      raise CheckpointError(f"{where}: the file ends at byte {offset + done}, inside the tensor.")
    done += got


def read_block(fd: int, entry, index: tuple, where: str) -> np.ndarray:
  """tensor[index] for `entry` of `read_header` and an index of unit-step slices; `where` names
  the file and tensor in errors."""
  dtype, shape, offset = entry
  if isinstance(dtype, str):
    raise CheckpointError(f"{where} has dtype {dtype}; readable: {', '.join(_DTYPES)}.")
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  spans = [range(n)[s] for n, s in zip(shape, index)]
  assert all(r.step == 1 for r in spans), index
  out = np.empty(tuple(len(r) for r in spans), dtype)
  if not shape or out.size == 0:
    _pread_into(fd, out, offset, where)
    return out
  row_bytes = dtype.itemsize * math.prod(shape[1:])
  first, stop = spans[0].start, spans[0].stop
  if all(len(r) == n for r, n in zip(spans[1:], shape[1:])):
    _pread_into(fd, out, offset + first * row_bytes, where)
    return out
  step = max(1, _CHUNK // max(row_bytes, 1))
  rows = np.empty((min(step, len(spans[0])),) + shape[1:], dtype)
  for a in range(first, stop, step):
    part = rows[:min(step, stop - a)]
    _pread_into(fd, part, offset + a * row_bytes, where)
    out[a - first:a - first + len(part)] = part[(slice(None),) + index[1:]]
  return out


def write_streamed(path: str, entries: Iterable[tuple[str, np.dtype, tuple, Callable]], *,
                   metadata: dict[str, str], write: bool = True) -> None:
  """A safetensors file of `entries` (key, dtype, shape, produce), in their order, written atomically.

  The header comes from the shapes, so each tensor is produced and written before the next: a
  host holds one tensor. Every process calls this and every `produce` (it may be a collective
  gather); only `write` ones write.
  """
  entries, offset = list(entries), 0
  header = {"__metadata__": dict(metadata)}
  for key, dtype, shape, _ in entries:
    size = np.dtype(dtype).itemsize * math.prod(shape)
    header[key] = dict(dtype=_NAMES[np.dtype(dtype)], shape=list(shape), data_offsets=[offset, offset + size])
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)   # the header is padded to 8 bytes, as safetensors pads it

  def each(f):
    for key, dtype, shape, produce in entries:
      t = np.ascontiguousarray(produce(), dtype)
      assert t.shape == tuple(shape), (key, t.shape, shape)
      if f is not None:
        f.write(t.reshape(-1).view(np.uint8).data)
      del t   # before the next is produced

  if not write:
    each(None)
    return
  with rundir.atomic(path) as tmp, open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    each(f)
