#!/usr/bin/env bash
# Launch seismo on every worker of a Cloud TPU VM slice (a template: read it, set the variables,
# run the steps one by one the first time). TPU_SETUP.md explains each step.
#
#   export TPU_NAME=seismo-v5e16 ZONE=us-west4-a PROJECT=my-project ACCELERATOR=v5litepod-16
#   export BUCKET=my-bucket CONFIG=configs/tiny.yaml RUN=tiny-v5e16
#   scripts/launch_tpu_pod.sh check      # here, no TPU: does CONFIG compile and fit on ACCELERATOR?
#   scripts/launch_tpu_pod.sh create     # the slice (SPOT=1 for spot capacity)
#   scripts/launch_tpu_pod.sh setup      # every worker: python3.11, this repo, seismo[tpu], gcsfuse mount
#   scripts/launch_tpu_pod.sh train      # every worker: seismo train, in the background
#   scripts/launch_tpu_pod.sh logs       # worker 0's log (metrics: $MOUNT/runs/$RUN/metrics.jsonl)
#   scripts/launch_tpu_pod.sh stop       # SIGTERM on every worker: save a checkpoint and exit
#   scripts/launch_tpu_pod.sh train      # again: resumes from the newest checkpoint
#   scripts/launch_tpu_pod.sh delete     # give the slice back
#
# Extra config overrides for the run: SETS="--set optimizer.lr=3e-3 --set mesh.fsdp=4".
# Untested on real hardware from this repository: every command is the documented gcloud/JAX
# usage; check the runtime version for your generation with `gcloud compute tpus versions list`.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR, e.g. v5litepod-16}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
CONFIG="${CONFIG:-configs/tiny.yaml}"
RUN="${RUN:-$(basename "$CONFIG" .yaml)}"
SETS="${SETS:-}"
BUCKET="${BUCKET:-}"                        # GCS bucket for runs (and data); mounted at $MOUNT
MOUNT="${MOUNT:-/mnt/gcs}"
REPO_URL="${REPO_URL:-}"                    # git URL of this repository; empty: copy this checkout
REF="${REF:-main}"
PYTHON="${PYTHON:-python3.11}"
REMOTE_DIR="${REMOTE_DIR:-seismo}"          # on each worker, relative to the home directory

# Runtime (OS image) per generation, from the Cloud TPU docs; override with RUNTIME=...
case "$ACCELERATOR" in
  v5litepod-*) RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}" ;;
  v5p-*)       RUNTIME="${RUNTIME:-v2-alpha-tpuv5}" ;;
  v6e-*)       RUNTIME="${RUNTIME:-v2-alpha-tpuv6e}" ;;
  v4-*)        RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}" ;;
  *)           RUNTIME="${RUNTIME:?set RUNTIME for $ACCELERATOR}" ;;
esac

RUN_DIR="${BUCKET:+$MOUNT/}runs/$RUN"       # on the bucket when there is one (survives the VMs)

tpu_ssh() {  # tpu_ssh WORKER COMMAND: run COMMAND on one worker or on all of them
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker="$1" --command="$2"
}

cmd="${1:-help}"
case "$cmd" in
  check)
    # Compile the real train step for the slice, here, without a TPU (needs libtpu locally:
    # pip install -e '.[tpu]'). Exit 1: it does not fit; do not create the slice yet.
    python scripts/tpu_aot_check.py "$CONFIG" --topology "$ACCELERATOR" $SETS
    ;;

  create)
    extra=()
    [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${extra[@]}"
    ;;

  setup)
    if [[ -z "$REPO_URL" ]]; then  # ship this checkout (tracked files) to every worker
      git archive --format=tar.gz -o /tmp/seismo-src.tar.gz HEAD
      gcloud compute tpus tpu-vm scp /tmp/seismo-src.tar.gz "$TPU_NAME":seismo-src.tar.gz \
        --zone="$ZONE" --project="$PROJECT" --worker=all
      fetch="mkdir -p $REMOTE_DIR && tar -xzf seismo-src.tar.gz -C $REMOTE_DIR"
    else
      fetch="rm -rf $REMOTE_DIR && git clone --depth 1 --branch $REF $REPO_URL $REMOTE_DIR"
    fi
    # Python 3.11 (the TPU VM images are Ubuntu 22.04 with 3.10), the package with jax[tpu]
    # pinned by requirements.lock, and the bucket mounted where every worker sees the same files.
    mount=""
    if [[ -n "$BUCKET" ]]; then
      mount="(command -v gcsfuse >/dev/null || { \
          curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; \
          echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list; \
          sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }) && \
        sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT && \
        (mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT)"
    fi
    tpu_ssh all "set -e; \
      command -v $PYTHON >/dev/null || { sudo add-apt-repository -y ppa:deadsnakes/ppa && \
        sudo apt-get update -q && sudo apt-get install -y -q $PYTHON ${PYTHON}-venv; }; \
      $fetch && cd $REMOTE_DIR && $PYTHON -m venv .venv && .venv/bin/pip install -q --upgrade pip && \
      .venv/bin/pip install -q -c requirements.lock -e '.[tpu]' && \
      .venv/bin/python -c 'import jax, libtpu, seismo; print(\"jax\", jax.__version__, \"ready\")' \
      ${mount:+&& $mount}"
    ;;

  train)
    [[ -n "$BUCKET" ]] || echo "warning: no BUCKET: the run directory is each worker's local disk; a multi-host" \
      "checkpoint then lies in pieces across the workers and is lost with the VMs (set BUCKET)" >&2
    # The same command on every worker. mesh.multihost=on: jax.distributed.initialize() finds
    # the slice's coordinator and worker id from the TPU VM metadata. SIGTERM (preemption, or
    # `stop` below) saves a checkpoint and exits 0; running `train` again resumes.
    tpu_ssh all "cd $REMOTE_DIR || exit 1; mkdir -p logs; \
      nohup .venv/bin/seismo train $CONFIG --run-dir $RUN_DIR --set mesh.multihost=on $SETS \
        > logs/$RUN.log 2>&1 < /dev/null & echo \$! > logs/$RUN.pid; echo worker \$(hostname): pid \$(cat logs/$RUN.pid)"
    ;;

  logs)
    tpu_ssh "${WORKER:-0}" "tail -n ${LINES:-40} $REMOTE_DIR/logs/$RUN.log"
    ;;

  stop)
    # SIGTERM to the process `train` started on each worker (by its pid file, nothing else).
    tpu_ssh all "kill -TERM \$(cat $REMOTE_DIR/logs/$RUN.pid) 2>/dev/null && echo sent SIGTERM on \$(hostname) || true"
    ;;

  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet
    ;;

  *)
    sed -n '2,20p' "$0"
    ;;
esac
