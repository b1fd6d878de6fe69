#!/usr/bin/env bash
# The GPU benchmark (configs/bench_gpu.py) on a node with no network, from a copy of this
# repository with wheels/ inside (`make wheels` on a machine with network first; README, Benchmark).
#
#   launch/device_bench.sh [OUT_DIR]      # default runs/device_bench; one H100: under 8 minutes
#   CONFIG=configs/bench_gpu.py:tiny launch/device_bench.sh /tmp/out   # the same on CPU, seconds
#
# Installs wheels/*.whl with no index and no dependencies into a temporary folder put on
# PYTHONPATH (the node's own packages are not touched), runs the repository's copy of visage_jax
# (no install) and writes OUT_DIR/bench_gpu.json, OUT_DIR/summary.txt (one screen) and
# OUT_DIR/bench.log (progress). Expects a Python with JAX (CUDA), flax, optax, orbax-checkpoint,
# transformers, torch and absl-py; wheels/ adds what such a node lacks (ml_collections, gguf).
#
# Settings (environment): PYTHON (default python3); CONFIG (default configs/bench_gpu.py);
# XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9, as launch/gpu_node.sh). Arguments after OUT_DIR
# are passed on to visage-jax (e.g. --config.bench.budget_seconds=600).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-$REPO/runs/device_bench}
shift || true
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/bench_gpu.py}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

shopt -s nullglob
wheels=("$REPO"/wheels/*.whl)
if (( ${#wheels[@]} == 0 )); then
  echo "device_bench.sh: no wheels in $REPO/wheels; run 'make wheels' where there is network, then copy the repository" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
DEPS=$(mktemp -d)
trap 'rm -rf "$DEPS"' EXIT
start=$(date +%s)
PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
  --target "$DEPS" "${wheels[@]}"
export PYTHONPATH="$REPO:$DEPS${PYTHONPATH:+:$PYTHONPATH}"

cd "$REPO"
status=0
"$PYTHON" -m visage_jax.cli bench "--config=$CONFIG" "--out=$OUT_DIR/bench_gpu.json" "$@" \
  > "$OUT_DIR/summary.txt" 2> >(tee "$OUT_DIR/bench.log" >&2) || status=$?
echo "device_bench.sh: $(( $(date +%s) - start )) s wall, install and loading included (exit $status)" >> "$OUT_DIR/summary.txt"
cat "$OUT_DIR/summary.txt"
exit "$status"
