"""One of several processes resolving the same hub id at once, with snapshot_download faked like
huggingface_hub's: from the cache (local_files_only) or a slow download that writes the snapshot
into HF_HUB_CACHE and appends this process's id to COUNTER.

  HF_HUB_CACHE=CACHE python tests/hub_main.py REPO COUNTER READY_DIR N

Waits until all N processes are ready (a file each in READY_DIR), so they resolve together;
prints the resolved directory.
"""

import os
import sys
import time

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_snapshot_download(repo, *, revision=None, local_files_only=False, counter="", **_):
  from huggingface_hub import constants
  from huggingface_hub import errors as hub_errors

  folder = os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"))
  snapshot = os.path.join(folder, "snapshots", COMMIT)
  if local_files_only:
    if not os.path.exists(os.path.join(folder, "refs", revision or "main")):
      raise hub_errors.LocalEntryNotFoundError(f"{repo} is not cached")
    return snapshot
  with open(counter, "a") as f:
    f.write(f"{os.getpid()}\n")
  os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
  with open(os.path.join(folder, "refs", "main"), "w") as f:   # the ref first, as huggingface_hub
    f.write(COMMIT)
  os.makedirs(snapshot, exist_ok=True)
  for name in ("config.json", "model.safetensors"):   # then the files, slowly
    time.sleep(0.3)
    with open(os.path.join(snapshot, name), "w") as f:
      f.write("{}")
  return snapshot


def main(repo, counter, ready_dir, n):
  import functools
  import huggingface_hub
  from visage_jax.checkpoints import hub

  huggingface_hub.snapshot_download = functools.partial(fake_snapshot_download, counter=counter)
  open(os.path.join(ready_dir, str(os.getpid())), "w").close()
  while len(os.listdir(ready_dir)) < int(n):
    time.sleep(0.01)
  print(hub.resolve(repo))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main(*sys.argv[1:5])
