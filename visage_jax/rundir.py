"""Files of a run directory: atomic writes, append-only JSON lines, and the claim on a directory.

Every file a command writes whole goes through `atomic` (temp file in the same directory, fsync,
rename): a reader, a resumed run or a watcher never sees half a file, and a failure leaves the old
file (or none). Results that grow go to JSON-lines files appended and fsynced per batch; a line
torn by a kill is dropped on the next read. A directory belongs to one run: `claim` refuses a
different config unless told to discard it.
"""

import contextlib
import json
import os
import uuid
from typing import Callable, Iterator

from visage_jax import errors


@contextlib.contextmanager
def atomic(path: str) -> Iterator[str]:
  """Yields a temp path next to `path` to write to; on success fsyncs it and renames it to `path`,
  on failure removes it. Works for any writer that takes a path (safetensors, matplotlib, copy)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    yield tmp
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_atomic(path: str, text: str) -> None:
  """`text` as the whole of `path`, atomically."""
  with atomic(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def jsonable(obj):
  """ConfigDict.to_dict() output with tuples as lists, for JSON and comparisons."""
  if isinstance(obj, dict):
    return {k: jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  return obj


def read_jsonl(path: str, repair: bool = True) -> list[dict]:
  """Completed lines; a torn last line (killed mid-write) is dropped (from the file if `repair`)."""
  if not os.path.exists(path):
    return []
  lines, good_bytes = [], 0
  with open(path, "rb") as f:
    for raw in f:
      try:
        lines.append(json.loads(raw))
      except json.JSONDecodeError:
        break
      if not raw.endswith(b"\n"):
        lines.pop()
        break
      good_bytes += len(raw)
  if repair and good_bytes != os.path.getsize(path):
    with open(path, "r+b") as f:
      f.truncate(good_bytes)
  return lines


class JsonlAppender:
  """An open JSON-lines file: `append` writes whole lines, flushed and fsynced, so a kill loses
  at most the batch in flight. With `write=False` (a process that is not the writer) it is inert."""

  def __init__(self, path: str, write: bool = True):
    self.path, self.write = path, write
    self._file = None

  def __enter__(self):
    if self.write:
      self._file = open(self.path, "a")
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      self._file.close()
      self._file = None

  def append(self, lines: list[dict]) -> None:
    if self._file is None:
      return
    for line in lines:
      self._file.write(json.dumps(line) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())


def read_json(path: str):
  """A JSON file's content, or None when it is missing or unreadable (e.g. written by hand)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _differences(saved: dict, new: dict, sections) -> list[str]:
  return [f"{s}.{k}: {saved.get(s, {}).get(k)!r} -> {new.get(s, {}).get(k)!r}"
          for s in sections for k in sorted(set(saved.get(s, {})) | set(new.get(s, {})))
          if saved.get(s, {}).get(k) != new.get(s, {}).get(k)]


def claim(workdir: str, cfg_dict: dict, *, comparable: Callable[[dict], dict], overwrite: bool = False,
          write: bool = True, run_files: tuple[str, ...] = (), what: str = "a run",
          advice: str = "use another --workdir, or --overwrite to discard it.") -> None:
  """Makes `workdir` the directory of the run of `cfg_dict` (its run_config.json), or refuses.

  A saved config that differs under `comparable` is refused, naming the fields, unless
  `overwrite`, which removes `run_files`. `write=False` (processes other than the writer) only
  checks, so every process refuses alike.
  """
  path = os.path.join(workdir, "run_config.json")
  if os.path.exists(path):
    with open(path) as f:
      saved, new = comparable(json.load(f)), comparable(cfg_dict)
    if saved != new:
      if not overwrite:
        diffs = _differences(saved, new, sorted(set(saved) | set(new)))
        raise errors.UserError(f"{workdir} holds {what} with a different config "
                               f"({'; '.join(diffs[:5])}); {advice}")
      for name in run_files:
        p = os.path.join(workdir, name)
        if write and os.path.exists(p):
          os.remove(p)
  if write:
    os.makedirs(workdir, exist_ok=True)
    write_atomic(path, json.dumps(jsonable(cfg_dict), indent=2))
