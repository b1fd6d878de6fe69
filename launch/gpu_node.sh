#!/usr/bin/env bash
# A landscape, sweep, bench, fine-tune or experiments run on one machine with several GPUs.
#
#   CONFIG=configs/llama2_7b_chat.py WORKDIR=runs/llama2_1d launch/gpu_node.sh \
#     --config.model.path=/models/Llama-2-7b-chat-hf
#   PROCESSES=8 CONFIG=... WORKDIR=... launch/gpu_node.sh ...   # one process per GPU
#   DRY_RUN=1 CONFIG=... WORKDIR=... launch/gpu_node.sh ...     # print the commands, run nothing
#
# Expects: this repository at $REPO installed with `pip install -e . "jax[cuda12]"` (into $VENV
# if set) and the model at the path the config names. By default one process drives every GPU
# of the machine (nothing distributed): MESH=-1,1 (default) is data-parallel over all of them,
# MESH=1,8 splits each model over 8 GPUs (see `visage-jax plan`). PROCESSES=N starts N
# processes instead, process i on GPU i (CUDA_VISIBLE_DEVICES), joined through
# --config.distributed.{coordinator_address,num_processes,process_id} on 127.0.0.1:$PORT; the
# same explicit flags work across machines. Process 0 prints to the terminal and writes the
# results; process i > 0 logs to $LOG_DIR/process-i.log.
#
# Settings (environment): CONFIG, WORKDIR (required); COMMAND=landscape|sweep|bench|
# finetune|experiments; REPO (default:
# this repository); VENV; MESH (default -1,1); PROCESSES (default 1); NUM_GPUS (default: from
# nvidia-smi); PORT (default 12355); LOG_DIR (default $WORKDIR.logs);
# XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9: the share of each GPU that XLA takes, and that
# engine.choose_batch sizes the batch on; XLA's own default is 0.75); DRY_RUN=1.
# Arguments are passed on to visage-jax (e.g. --config.<field>=<value>).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${CONFIG:?set CONFIG (configs/<name>.py[:arg])}" "${WORKDIR:?set WORKDIR}"
COMMAND=${COMMAND:-landscape}
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
MESH=${MESH:--1,1}
PROCESSES=${PROCESSES:-1}
PORT=${PORT:-12355}
LOG_DIR=${LOG_DIR:-$WORKDIR.logs}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
case "$COMMAND" in
  landscape|bench|finetune|experiments) FIELD=config ;;
  sweep) FIELD=config.base ;;  # a sweep's landscapes live under base
  *) echo "COMMAND=$COMMAND: expected landscape, sweep, bench, finetune or experiments" >&2
     exit 2 ;;
esac

run cd "$REPO"
if [[ -n "${VENV:-}" ]]; then run source "$VENV/bin/activate"; fi
args=(visage-jax "$COMMAND" "--config=$CONFIG" "--workdir=$WORKDIR" "--$FIELD.mesh.shape=$MESH"
      --noprogress "$@")

if [[ "$PROCESSES" == 1 ]]; then
  run "${args[@]}"
  exit
fi
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  if [[ "${DRY_RUN:-0}" != 0 && "$NUM_GPUS" -eq 0 ]]; then NUM_GPUS=$PROCESSES; fi
fi
if (( PROCESSES > NUM_GPUS )); then
  echo "PROCESSES=$PROCESSES but this machine has $NUM_GPUS GPUs (NUM_GPUS)" >&2; exit 2
fi
run mkdir -p "$LOG_DIR"
pids=()
for ((i = PROCESSES - 1; i >= 0; i--)); do  # process 0 last, in the foreground
  cmd=(env "CUDA_VISIBLE_DEVICES=$i" "${args[@]}" "--config.distributed.coordinator_address=127.0.0.1:$PORT"
       "--config.distributed.num_processes=$PROCESSES" "--config.distributed.process_id=$i")
  if (( i > 0 )); then
    if [[ "${DRY_RUN:-0}" != 0 ]]; then
      echo "$(show "${cmd[@]}") > $LOG_DIR/process-$i.log 2>&1 &"
    else
      "${cmd[@]}" > "$LOG_DIR/process-$i.log" 2>&1 &
      pids+=($!)
    fi
  else
    status=0
    run "${cmd[@]}" || status=$?
  fi
done
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
