#!/usr/bin/env bash
# Peak memory and wall time of a census of N random directions on the demo model (BENCHMARKS.md,
# issue 22): configs/directions.py:census with N directions on 3 points, 4 prompts, 8 tokens.
#   bash tools/census_memory.sh [OUT_DIR]      # N = 4, 16, 64; needs /usr/bin/time
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/census_memory}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
for N in 4 16 64; do
  rm -rf "$OUT/n$N"
  /usr/bin/time -f "N=$N maxrss_kb=%M wall_s=%e" "$PY" -m visage_jax.cli landscape \
    --config=configs/directions.py:census --workdir="$OUT/n$N" --noprogress \
    --config.landscape.num_directions=$N --config.landscape.steps=2 --config.prompts.limit=4 \
    --config.decode.max_new_tokens=8 --config.coherence.enabled=False > "$OUT/n$N.log" 2>&1
  tail -1 "$OUT/n$N.log"
  grep -o '"decode_seconds": [0-9.]*' "$OUT/n$N/landscape.json"
done
