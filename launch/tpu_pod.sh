#!/usr/bin/env bash
# A landscape, sweep, bench, fine-tune or experiments run on every worker of a Cloud TPU VM pod
# slice: one process per worker, all running the same command (SPMD); process 0 writes the results.
#
#   TPU_NAME=visage-v5p-32 ZONE=us-east5-a CONFIG=configs/llama2_7b_chat.py \
#     WORKDIR=/mnt/shared/runs/llama2_1d launch/tpu_pod.sh \
#     --config.model.path=/mnt/shared/models/Llama-2-7b-chat-hf
#   COMMAND=sweep CONFIG=configs/sweep_system_prompts.py ... launch/tpu_pod.sh
#   DRY_RUN=1 TPU_NAME=... launch/tpu_pod.sh ...   # print the commands, run nothing
#
# Expects, on every worker: this repository at $REPO (the same path everywhere) installed
# with `pip install -e . "jax[tpu]"` (into $VENV if set), the model at the path the config
# names, and $WORKDIR on storage every worker sees (NFS / Filestore / a GCS FUSE mount): all
# processes read the run directory, process 0 writes it. Nothing to say about processes:
# distributed.auto=detect finds the pod (TPU_WORKER_HOSTNAMES) and jax.distributed joins it.
# The mesh must span every chip of the slice: MESH=-1,1 (default) is data-parallel over all of
# them; MESH=-1,4 splits each model over 4 chips (see `visage-jax plan`).
#
# Settings (environment): TPU_NAME, ZONE, CONFIG, WORKDIR (required); PROJECT (default:
# gcloud's); COMMAND=landscape|sweep|bench|finetune|experiments (default landscape);
# REPO (default ~/visage_jax);
# VENV (a virtualenv on the workers, default none); MESH (default -1,1); DRY_RUN=1.
# Arguments are passed on to visage-jax (e.g. --config.<field>=<value>).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${TPU_NAME:?set TPU_NAME (the TPU VM slice)}" "${ZONE:?set ZONE}"
: "${CONFIG:?set CONFIG (configs/<name>.py[:arg])}" "${WORKDIR:?set WORKDIR (shared by all workers)}"
COMMAND=${COMMAND:-landscape}
REPO=${REPO:-'~/visage_jax'}
MESH=${MESH:--1,1}
case "$COMMAND" in
  landscape|bench|finetune|experiments) FIELD=config ;;
  sweep) FIELD=config.base ;;  # a sweep's landscapes live under base
  *) echo "COMMAND=$COMMAND: expected landscape, sweep, bench, finetune or experiments" >&2
     exit 2 ;;
esac

remote="cd $REPO"
[[ -n "${VENV:-}" ]] && remote+=" && source $VENV/bin/activate"
remote+=" && $(show visage-jax "$COMMAND" "--config=$CONFIG" "--workdir=$WORKDIR" \
  "--$FIELD.mesh.shape=$MESH" --noprogress "$@")"

project=()
[[ -n "${PROJECT:-}" ]] && project=("--project=$PROJECT")
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" "${project[@]}" --worker=all \
  "--command=$remote"
