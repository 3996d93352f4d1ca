#!/usr/bin/env bash
# videoldm_jax on GKE through XPK (pip install xpk): one cluster of TPU slices, then training jobs as workloads.
#
#   launch/xpk_example.sh cluster  --cluster=vldm --project=P --zone=us-east5-a --type=v5p-128 [--num_slices=2]
#   launch/xpk_example.sh plan     --type=v5p-128 [--num_slices=2] --config=configs/webvid.py:stage=base,variant=sd15
#   launch/xpk_example.sh train    --cluster=vldm --project=P --zone=us-east5-a --type=v5p-128 [--num_slices=2] \
#       [--max_restarts=20] --config=configs/webvid.py:stage=base,variant=sd15 --workdir=gs://bucket/runs/t2v_base \
#       [-- --config.x=y ...]
#   launch/xpk_example.sh list     --cluster=vldm --project=P --zone=us-east5-a
#   launch/xpk_example.sh delete   --cluster=vldm --project=P --zone=us-east5-a --workload=NAME
#
# `plan` runs here (no TPU): it compiles the train step for the slice and prints per-device HBM, FLOPs and MFU,
# so a run that would not fit is caught before the workload is queued. `train` builds an image from this checkout
# (xpk copies --script-dir onto --base-docker-image) and runs the same command on every host of every slice;
# jax.distributed.initialize() finds the peers (and the other slices over DCN) by itself.
# Preemption: on SIGTERM (node preemption or maintenance, also during start-up) training saves a checkpoint at the
# next step, or has nothing new to save before its first one, and exits with --preemption_exit_code, which `train`
# sets to 42: one of the codes xpk restarts a workload on (42 and 127-255) while --max_restarts allows (default
# 20). The restarted job reruns the same command, which resumes from the newest checkpoint in --workdir that
# restores. A run stopped for good is deleted (`delete`).
# Every command accepts --dry-run, which prints the commands instead of running them.
set -euo pipefail

usage() { sed -n '2,21p' "$0"; exit "${1:-2}"; }

ACTION="${1:-}"; [ -n "$ACTION" ] || usage; shift
CLUSTER=""; PROJECT=""; ZONE=""; TYPE=""; NUM_SLICES=1; CONFIG=""; WORKDIR=""; WORKLOAD=""; DRY_RUN=0
BASE_IMAGE="python:3.11"; MAX_RESTARTS=20; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cluster=*) CLUSTER="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --num_slices=*) NUM_SLICES="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --workload=*) WORKLOAD="${1#*=}" ;;
    --base_image=*) BASE_IMAGE="${1#*=}" ;;
    --max_restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done

need() { for v in "$@"; do [ -n "${!v}" ] || { echo "missing --${v,,}" >&2; exit 2; }; done; }
run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
cd "$(dirname "$0")/.."

case "$ACTION" in
  cluster)
    need CLUSTER PROJECT ZONE TYPE
    run xpk cluster create --cluster="$CLUSTER" --project="$PROJECT" --zone="$ZONE" \
        --tpu-type="$TYPE" --num-slices="$NUM_SLICES"
    ;;
  plan)
    need TYPE CONFIG
    run python -m videoldm_jax.plan --config="$CONFIG" --topology="$TYPE" --num_slices="$NUM_SLICES" \
        "${EXTRA[@]+"${EXTRA[@]}"}"
    ;;
  train)
    need CLUSTER PROJECT ZONE TYPE CONFIG WORKDIR
    name="${WORKLOAD:-vldm-$(date +%m%d-%H%M%S)}"
    extra="$(printf '%q ' "${EXTRA[@]+"${EXTRA[@]}"}")"
    # Installed at container start so the image is just the base image plus this checkout.
    # Exit status 42 after a preemption stop: xpk restarts the workload on it (up to --max-restarts times).
    command="pip install -q -e '.[tpu]' && python -m videoldm_jax.train --config=$CONFIG --workdir=$WORKDIR \
--preemption_exit_code=42 $extra"
    run xpk workload create --cluster="$CLUSTER" --project="$PROJECT" --zone="$ZONE" --workload="$name" \
        --tpu-type="$TYPE" --num-slices="$NUM_SLICES" --max-restarts="$MAX_RESTARTS" \
        --base-docker-image="$BASE_IMAGE" --script-dir=. --command="$command"
    ;;
  list)
    need CLUSTER PROJECT ZONE
    run xpk workload list --cluster="$CLUSTER" --project="$PROJECT" --zone="$ZONE"
    ;;
  delete)
    need CLUSTER PROJECT ZONE WORKLOAD
    run xpk workload delete --cluster="$CLUSTER" --project="$PROJECT" --zone="$ZONE" --workload="$WORKLOAD"
    ;;
  *) usage ;;
esac
