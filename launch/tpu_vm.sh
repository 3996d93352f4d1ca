#!/usr/bin/env bash
# Cloud TPU VM lifecycle for videoldm_jax: create, install on every worker, run a stage on every worker,
# stream logs, delete. Multi-slice runs go through queued resources (--num_slices > 1).
#
#   launch/tpu_vm.sh create  --name=vldm --zone=us-east5-a --type=v5p-128 [--num_slices=2] [--spot]
#   launch/tpu_vm.sh install --name=vldm --zone=us-east5-a [--repo=https://github.com/you/videoldm_jax --ref=main]
#   launch/tpu_vm.sh run     --name=vldm --zone=us-east5-a \
#       --config=configs/webvid.py:stage=base,variant=sd15 --workdir=gs://bucket/runs/t2v_base [-- --config.x=y ...]
#   launch/tpu_vm.sh logs    --name=vldm --zone=us-east5-a
#   launch/tpu_vm.sh delete  --name=vldm --zone=us-east5-a
#
# `install` copies this checkout to every worker (or clones --repo at --ref there) and pip-installs it with the
# TPU extra. Every command accepts --dry-run, which prints the gcloud commands instead of running them.
# Workdirs and data may be gs:// paths (orbax and tfds read and write GCS directly).
#
# Preemption: on SIGTERM (also during start-up) training saves a checkpoint at the next step, or has nothing new
# to save before its first one, and exits with status 42 (`run` passes --preemption_exit_code=42); `run` reruns it
# on every worker while the VMs last, resuming from the newest checkpoint in --workdir that restores. A preempted
# spot / queued resource loses its VMs: `delete`, then `create`, `install` and the same `run` again continue the
# run from --workdir (keep the workdir on gs://).
set -euo pipefail

usage() { sed -n '2,20p' "$0"; exit "${1:-2}"; }

ACTION="${1:-}"; [ -n "$ACTION" ] || usage; shift
NAME=""; ZONE=""; TYPE=""; VERSION=""; NUM_SLICES=1; SPOT=""; DRY_RUN=0
REPO=""; REF="main"; CONFIG=""; WORKDIR=""; PROJECT=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --num_slices=*) NUM_SLICES="${1#*=}" ;;
    --spot) SPOT="--spot" ;;
    --repo=*) REPO="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
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
PROJECT_FLAG=(); [ -n "$PROJECT" ] && PROJECT_FLAG=(--project="$PROJECT")

# Multi-slice (and spot) capacity comes from queued resources; single slices can use tpu-vm create directly.
ssh_all() {
  if [ "$NUM_SLICES" -gt 1 ]; then
    for ((s = 0; s < NUM_SLICES; s++)); do
      run gcloud compute tpus tpu-vm ssh "${NAME}-${s}" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
          --command="$1"
    done
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command="$1"
  fi
}

# Copies a local file to the home directory of every worker of every slice.
scp_all() {
  local targets=("$NAME"); local s
  if [ "$NUM_SLICES" -gt 1 ]; then targets=(); for ((s = 0; s < NUM_SLICES; s++)); do targets+=("${NAME}-${s}"); done; fi
  for t in "${targets[@]}"; do
    run gcloud compute tpus tpu-vm scp "$1" "${t}:~/" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all
  done
}

# TPU VM software image per generation (cloud.google.com/tpu/docs/runtimes); --version overrides.
runtime_for() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

case "$ACTION" in
  create)
    need NAME ZONE TYPE
    [ -n "$VERSION" ] || VERSION="$(runtime_for "$TYPE")"
    if [ "$NUM_SLICES" -gt 1 ] || [ -n "$SPOT" ]; then
      run gcloud compute tpus queued-resources create "$NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
          --accelerator-type="$TYPE" --runtime-version="$VERSION" --node-count="$NUM_SLICES" \
          --node-prefix="$NAME" ${SPOT}
      echo "# wait until ACTIVE: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE"
    else
      run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
          --accelerator-type="$TYPE" --version="$VERSION"
    fi
    ;;
  install)
    need NAME ZONE
    pip_install="cd ~/videoldm_jax && python3 -m venv ~/venv && ~/venv/bin/pip install -q -e '.[tpu]'"
    if [ -n "$REPO" ]; then
      ssh_all "set -e; rm -rf ~/videoldm_jax; git clone --depth 1 --branch $REF $REPO ~/videoldm_jax && $pip_install"
    else
      # This checkout as it is (uncommitted edits included), without VCS data, caches or virtual environments.
      archive="${TMPDIR:-/tmp}/videoldm_jax.tgz"
      run tar -czf "$archive" -C "$(dirname "$0")/.." --exclude=.git --exclude='*venv*' --exclude=__pycache__ .
      scp_all "$archive"
      ssh_all "set -e; rm -rf ~/videoldm_jax; mkdir -p ~/videoldm_jax && tar -xzf ~/videoldm_jax.tgz -C ~/videoldm_jax \
&& $pip_install"
    fi
    ;;
  run)
    need NAME ZONE CONFIG WORKDIR
    # Every worker runs the same command; jax.distributed.initialize() finds its peers on a TPU VM.
    # Output goes to a log file per worker so a dropped ssh session does not kill the run. A preemption stop
    # (status 42) is rerun at once; any other exit status ends the loop.
    extra=""; [ "${#EXTRA[@]}" -gt 0 ] && extra="$(printf '%q ' "${EXTRA[@]}")"
    train="\$HOME/venv/bin/python -m videoldm_jax.train --config=$CONFIG --workdir=$WORKDIR \
--preemption_exit_code=42 $extra"
    ssh_all "cd ~/videoldm_jax && nohup bash -c 'until $train; [ \$? -ne 42 ]; do echo restarting after a preemption \
stop; done' > ~/videoldm_train.log 2>&1 &"
    ;;
  logs)
    need NAME ZONE
    # Process 0 writes the metrics; worker 0's log is the one to follow.
    target="$NAME"; [ "$NUM_SLICES" -gt 1 ] && target="${NAME}-0"
    run gcloud compute tpus tpu-vm ssh "$target" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=0 \
        --command="tail -n 200 -f ~/videoldm_train.log"
    ;;
  delete)
    need NAME ZONE
    if [ "$NUM_SLICES" -gt 1 ] || [ -n "$SPOT" ]; then
      run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --quiet
    fi
    ;;
  *) usage ;;
esac
