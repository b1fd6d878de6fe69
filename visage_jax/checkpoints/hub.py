"""Hugging Face hub ids -> local snapshot directories, so any model path may be `org/name[@revision]`.

Only config, tokenizer and safetensors files are fetched, never pickles (*.bin, *.pth). The cache,
offline mode and token are huggingface_hub's own (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN).
A snapshot in the cache is used as it is; only a missing or incomplete one is downloaded, by one
process at a time (a file lock in the cache), so the processes of a pod download it once per cache.
"""

import contextlib
import functools
import glob
import json
import os
import re

import filelock

from visage_jax import errors

CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                "merges.txt", "chat_template.jinja", "chat_template.json", "additional_chat_templates/*")
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json")
# Mistral's repos also hold its native-format copy (consolidated.safetensors, 14 GB), Meta's an
# original/ folder; both duplicate the HF shards and are never read.
IGNORED_FILES = ("consolidated*", "original/*")

_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]*[A-Za-z0-9_])"
                 r"(?:@(?P<revision>[A-Za-z0-9_.][A-Za-z0-9_./-]*))?")


def looks_like_hub_id(s: str) -> bool:
  """`org/name` or `org/name@revision`; relative paths such as ./x, ../x, runs/m.gguf are not."""
  m = _ID.fullmatch(s)
  return bool(m) and ".." not in s and "--" not in m["repo"] and not m["repo"].endswith(".gguf")


def resolve(path: str, *, weights: bool = True) -> str:
  """A local path as given; a hub id -> its snapshot directory, downloaded if not cached. A local
  path that exists wins over a hub id. `weights=False` fetches config and tokenizer only (plan)."""
  if not path or os.path.exists(path) or not looks_like_hub_id(path):
    return path
  m = _ID.fullmatch(path)
  return _snapshot(path, m["repo"], m["revision"], weights)


@functools.cache
def _snapshot(path: str, repo: str, revision: str | None, weights: bool) -> str:
  """Once per id and process, so loading params then the tokenizer asks the hub once."""
  import huggingface_hub
  from huggingface_hub import constants
  from huggingface_hub import errors as hub_errors

  patterns = dict(revision=revision, allow_patterns=list(CONFIG_FILES + (WEIGHT_FILES if weights else ())),
                  ignore_patterns=list(IGNORED_FILES))
  try:
    with _cache_lock(repo):
      try:
        folder = huggingface_hub.snapshot_download(repo, local_files_only=True, **patterns)
        if _complete(folder, weights):
          return folder
      except hub_errors.LocalEntryNotFoundError:
        pass
      return huggingface_hub.snapshot_download(repo, **patterns)
  except Exception as e:  # every hub failure is the user's to fix: one line, no traceback
    offline = constants.HF_HUB_OFFLINE or isinstance(e.__cause__, hub_errors.OfflineModeIsEnabled)
    hub = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "the hub cannot be reached"
    if isinstance(e, hub_errors.IncompleteSnapshotError):
      why = f"the cached snapshot is incomplete and {hub}"
    elif isinstance(e, hub_errors.LocalEntryNotFoundError):
      why = f"not in the local Hugging Face cache and {hub}"
    elif isinstance(e, hub_errors.GatedRepoError):
      why = (f"a gated repository: accept its license on https://huggingface.co/{repo} and set HF_TOKEN "
             "(or run hf auth login)")
    elif isinstance(e, hub_errors.RepositoryNotFoundError):
      why = "no local path and no Hugging Face repository of that name (a private one needs HF_TOKEN)"
    elif isinstance(e, hub_errors.RevisionNotFoundError):
      why = f"the repository has no revision {revision!r}"
    else:
      lines = str(e).strip().splitlines()
      why = f"cannot be fetched from the Hugging Face hub ({type(e).__name__}: {lines[0] if lines else ''})"
    get = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    raise errors.UserError(f"model {path!r}: {why}; download it ({get}) or pass a local directory "
                           "with config.json and *.safetensors") from None


@contextlib.contextmanager
def _cache_lock(repo: str):
  """Holds an exclusive lock on the repo's lock file in the hub cache: the other processes of a
  host (or of every host sharing the cache) wait, then find the snapshot cached. A cache where
  no lock file can be made (read-only, shared) is read unlocked."""
  from huggingface_hub import constants

  path = os.path.join(constants.HF_HUB_CACHE, ".locks", f"visage_jax-{repo.replace('/', '--')}.lock")
  lock = filelock.FileLock(path)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock.acquire()
  except OSError:
    yield
    return
  try:
    yield
  finally:
    lock.release()


def _complete(folder: str, weights: bool) -> bool:
  """Whether a cached snapshot has config.json and, if weights are wanted, every shard: a
  snapshot that `plan` fetched without weights, or one huggingface_hub cannot check (cached
  before it recorded file listings), is otherwise returned as it is."""
  if not os.path.exists(os.path.join(folder, "config.json")):
    return False
  if not weights:
    return True
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      shards = set(json.load(f).get("weight_map", {}).values())
    return all(os.path.exists(os.path.join(folder, s)) for s in shards)
  return bool(glob.glob(os.path.join(folder, "*.safetensors")))
