#!/usr/bin/env bash
# Run seismo on every worker of a Cloud TPU slice, or of several slices (multislice), from a
# reservation, queued capacity, spot or on-demand. TPU_SETUP.md section 4 walks through it.
#
#   export TPU_NAME=seismo ZONE=us-west4-a PROJECT=my-project ACCELERATOR=v5litepod-16
#   export BUCKET=my-bucket CONFIG=configs/tiny.yaml RUN=tiny-v5e16
#   scripts/launch_tpu_pod.sh check    # here, no TPU: `seismo compile` from this checkout's .venv
#   scripts/launch_tpu_pod.sh create   # ask for the slice(s): a queued resource (CAPACITY=...)
#   scripts/launch_tpu_pod.sh wait     # until the queued resource is ACTIVE (status: its state now)
#   scripts/launch_tpu_pod.sh setup    # every worker: python3.11, this repo, seismo[tpu,gcs]
#   scripts/launch_tpu_pod.sh train    # every worker: seismo train CONFIG, run dir gs://BUCKET/runs/RUN
#   scripts/launch_tpu_pod.sh sweep    # every worker: seismo sweep SWEEP, into gs://BUCKET/sweeps/RUN
#   scripts/launch_tpu_pod.sh logs     # the last LINES of every worker's log, each line named
#   scripts/launch_tpu_pod.sh collect  # every worker's whole log into logs/RUN/ here
#   scripts/launch_tpu_pod.sh stop     # SIGTERM on every worker: they agree on a step, save, exit 0
#   scripts/launch_tpu_pod.sh train    # again (or sweep): resumes from the newest checkpoint
#   scripts/launch_tpu_pod.sh delete   # give the slice(s) back
#
# Capacity: CAPACITY=reserved (your reservation; RESERVATION=NAME for a named one, through
# gcloud alpha), spot, best-effort or on-demand (default), always through a queued resource
# (QR_ID, default TPU_NAME-qr; VALID_FOR=6h: give up if not granted by then). QUEUED=0 creates
# one slice directly with `tpu-vm create` instead (on-demand or spot only). Multislice:
# NUM_SLICES=2 makes slices TPU_NAME-0, TPU_NAME-1 joined by DCN (data parallel across them).
# More config overrides: SETS="--set optimizer.lr=3e-3 --set mesh.fsdp=4". SWEEP=FILE for sweep.
# --dry-run (first argument) or DRY_RUN=1 prints the gcloud commands instead of running them.
# Exit status: 2 for a missing or wrong setting (one line on stderr), else gcloud's.
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
cmd="${1:-help}"

usage() { sed -n '2,27p' "$0"; }
die() { echo "launch_tpu_pod.sh $cmd: $*" >&2; exit 2; }

case "$cmd" in
  check|create|wait|status|setup|train|sweep|logs|collect|stop|delete) ;;
  help|-h|--help) usage; exit 0 ;;
  *) usage >&2; die "unknown command '$cmd'" ;;
esac

# what `check` needs: the config and the accelerator; everything else needs the slice too
ACCELERATOR="${ACCELERATOR:-}"
[[ -n "$ACCELERATOR" ]] || die "set ACCELERATOR, e.g. ACCELERATOR=v5litepod-16"
CONFIG="${CONFIG:-configs/tiny.yaml}"
RUN="${RUN:-$(basename "$CONFIG" .yaml)}"
SETS="${SETS:-}"
NUM_SLICES="${NUM_SLICES:-1}"
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES must be a whole number >= 1, got '$NUM_SLICES'"
VENV="${VENV:-.venv}"                       # this checkout's virtualenv (make install)

run() {  # run a command, or print it (shell-quoted) under --dry-run
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}

if [[ "$cmd" == check ]]; then
  # The train step compiled for the slice here, with no TPU (libtpu in the venv:
  # .venv/bin/pip install -c requirements.lock -e '.[tpu]'). Exit 1: it does not fit.
  [[ -x "$VENV/bin/seismo" || "$DRY_RUN" == 1 ]] || die "no $VENV/bin/seismo: run 'make install' (or set VENV=...)"
  slices=()
  [[ "$NUM_SLICES" -gt 1 ]] && slices=(--num-slices "$NUM_SLICES")
  # shellcheck disable=SC2086  # SETS is a list of words on purpose
  run "$VENV/bin/seismo" compile "$CONFIG" --topology "$ACCELERATOR" "${slices[@]}" $SETS
  exit
fi

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
[[ -n "$TPU_NAME" ]] || die "set TPU_NAME (the slice's name; multislice: the prefix of its slices)"
[[ -n "$ZONE" ]] || die "set ZONE, e.g. ZONE=us-west4-a"
PROJECT="${PROJECT:-$( [[ "$DRY_RUN" == 1 ]] && echo PROJECT || gcloud config get-value project 2>/dev/null)}"
[[ -n "$PROJECT" ]] || die "set PROJECT (or gcloud config set project ...)"
QUEUED="${QUEUED:-1}"
QR_ID="${QR_ID:-$TPU_NAME-qr}"
CAPACITY="${CAPACITY:-$([[ "${SPOT:-0}" == 1 ]] && echo spot || echo on-demand)}"
RESERVATION="${RESERVATION:-}"
VALID_FOR="${VALID_FOR:-}"                  # e.g. 6h: a queued request not granted by then expires
BUCKET="${BUCKET:-}"
RUN_DIR="${RUN_DIR:-${BUCKET:+gs://$BUCKET/runs/$RUN}}"     # on the bucket: shared, outlives the VMs
SWEEP="${SWEEP:-}"
SWEEP_DIR="${SWEEP_DIR:-${BUCKET:+gs://$BUCKET/sweeps/$RUN}}"
REPO_URL="${REPO_URL:-}"                    # git URL of this repository; empty: ship this checkout
REF="${REF:-main}"
PYTHON="${PYTHON:-python3.11}"
REMOTE_DIR="${REMOTE_DIR:-seismo}"          # on each worker, relative to the home directory
LINES="${LINES:-40}"

case "$CAPACITY" in
  on-demand|spot|reserved|best-effort) ;;
  *) die "CAPACITY must be on-demand, spot, reserved or best-effort, got '$CAPACITY'" ;;
esac
if [[ "$QUEUED" != 1 ]]; then
  [[ "$NUM_SLICES" == 1 ]] || die "multislice (NUM_SLICES=$NUM_SLICES) needs a queued resource: unset QUEUED"
  [[ "$CAPACITY" == on-demand || "$CAPACITY" == spot ]] || die "CAPACITY=$CAPACITY needs a queued resource: unset QUEUED"
fi
[[ -z "$RESERVATION" || "$CAPACITY" == reserved ]] || die "RESERVATION=$RESERVATION goes with CAPACITY=reserved"

# Runtime (OS image) per generation, from the Cloud TPU docs; override with RUNTIME=...
case "$ACCELERATOR" in
  v5litepod-*) RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}" ;;
  v5p-*)       RUNTIME="${RUNTIME:-v2-alpha-tpuv5}" ;;
  v6e-*)       RUNTIME="${RUNTIME:-v2-alpha-tpuv6e}" ;;
  v4-*)        RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}" ;;
  *)           RUNTIME="${RUNTIME:-}"; [[ -n "$RUNTIME" ]] || die "set RUNTIME for $ACCELERATOR" ;;
esac

where=(--zone="$ZONE" --project="$PROJECT")
on_all() {  # on_all COMMAND [gcloud flags]: COMMAND on every worker of every slice, at once
  local command="$1"; shift
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources ssh "$QR_ID" "${where[@]}" --node=all --worker=all \
      --command="$command" "$@"
  else
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$command" "$@"
  fi
}
copy_to_all() {  # copy_to_all LOCAL REMOTE: one file onto every worker
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources scp "$1" "$QR_ID:$2" "${where[@]}" --node=all --worker=all
  else
    run gcloud compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" "${where[@]}" --worker=all
  fi
}
need_bucket() {
  [[ -n "$1" ]] || die "set BUCKET (the run directory must be one place every worker writes: gs://BUCKET/...)"
}
# Start a seismo command on every worker in the background; its pid and log under logs/.
start_on_all() {
  on_all "cd $REMOTE_DIR || exit 1; mkdir -p logs; \
    nohup .venv/bin/seismo $1 > logs/$RUN.log 2>&1 < /dev/null & echo \$! > logs/$RUN.pid; \
    echo \$(hostname): started pid \$(cat logs/$RUN.pid)"
}

case "$cmd" in
  create)
    if [[ "$QUEUED" == 1 ]]; then
      alpha=()
      nodes=(--node-id="$TPU_NAME")
      [[ "$NUM_SLICES" -gt 1 ]] && nodes=(--node-count="$NUM_SLICES" --node-prefix="$TPU_NAME")
      capacity=()
      case "$CAPACITY" in
        spot) capacity=(--spot) ;;
        best-effort) capacity=(--best-effort) ;;
        reserved) capacity=(--reserved)
          # a named reservation is an alpha flag of gcloud (projects/P/reservations/NAME, or NAME)
          if [[ -n "$RESERVATION" ]]; then alpha=(alpha); capacity+=(--reservation="$RESERVATION"); fi ;;
      esac
      [[ -n "$VALID_FOR" ]] && capacity+=(--valid-until-duration="$VALID_FOR")
      run gcloud "${alpha[@]}" compute tpus queued-resources create "$QR_ID" "${where[@]}" \
        --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${nodes[@]}" "${capacity[@]}"
    else
      extra=()
      [[ "$CAPACITY" == spot ]] && extra=(--spot)
      run gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" \
        --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${extra[@]}"
    fi
    ;;

  status)
    if [[ "$QUEUED" == 1 ]]; then
      run gcloud compute tpus queued-resources describe "$QR_ID" "${where[@]}" --format='value(state.state)'
    else
      run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" --format='value(state)'
    fi
    ;;

  wait)
    [[ "$QUEUED" == 1 ]] || { echo "QUEUED=0: tpu-vm create returns when the slice is up"; exit 0; }
    describe=(gcloud compute tpus queued-resources describe "$QR_ID" "${where[@]}" --format='value(state.state)')
    if [[ "$DRY_RUN" == 1 ]]; then run "${describe[@]}"; exit 0; fi
    while true; do
      state="$("${describe[@]}")"
      echo "$(date -u +%H:%M:%S) $QR_ID: $state"
      case "$state" in
        ACTIVE) exit 0 ;;
        FAILED|SUSPENDED) exit 1 ;;
      esac
      sleep "${POLL_S:-60}"
    done
    ;;

  setup)
    if [[ -z "$REPO_URL" ]]; then  # ship this checkout (tracked files at HEAD) to every worker
      run git archive --format=tar.gz -o /tmp/seismo-src.tar.gz HEAD
      copy_to_all /tmp/seismo-src.tar.gz seismo-src.tar.gz
      fetch="mkdir -p $REMOTE_DIR && tar -xzf seismo-src.tar.gz -C $REMOTE_DIR"
    else
      fetch="rm -rf $REMOTE_DIR && git clone --depth 1 --branch $REF $REPO_URL $REMOTE_DIR"
    fi
    # Python 3.11 (the TPU VM images are Ubuntu 22.04 with 3.10), then seismo with jax[tpu]
    # and gcsfs (gs:// run directories), pinned by requirements.lock.
    on_all "set -e; \
      command -v $PYTHON >/dev/null || { sudo add-apt-repository -y ppa:deadsnakes/ppa && \
        sudo apt-get update -q && sudo apt-get install -y -q $PYTHON ${PYTHON}-venv; }; \
      $fetch && cd $REMOTE_DIR && $PYTHON -m venv .venv && .venv/bin/pip install -q --upgrade pip && \
      .venv/bin/pip install -q -c requirements.lock -e '.[tpu,gcs]' && \
      .venv/bin/python -c 'import jax, libtpu, gcsfs, seismo; print(\"jax\", jax.__version__, \"ready\")'"
    ;;

  train)
    need_bucket "$RUN_DIR"
    # The same command on every worker. mesh.multihost=on: jax.distributed.initialize() finds
    # the coordinator and the worker's id from the TPU VM metadata (on multislice, the slices'
    # too). A SIGTERM on any worker (preemption, maintenance, `stop`) stops all of them at one
    # agreed step with a checkpoint, exit 0; `train` again resumes.
    start_on_all "train $CONFIG --run-dir $RUN_DIR --set mesh.multihost=on $SETS"
    ;;

  sweep)
    need_bucket "$SWEEP_DIR"
    [[ -n "$SWEEP" ]] || die "set SWEEP to a sweep file, e.g. SWEEP=configs/studies/qk_layernorm.yaml"
    start_on_all "sweep $SWEEP --out $SWEEP_DIR --set mesh.multihost=on $SETS"
    ;;

  logs)
    on_all "tail -n $LINES $REMOTE_DIR/logs/$RUN.log 2>/dev/null | sed \"s/^/[\$(hostname)] /\""
    ;;

  collect)
    # gcloud writes what each worker printed into its own file under logs/RUN/
    run mkdir -p "logs/$RUN"
    on_all "cat $REMOTE_DIR/logs/$RUN.log" --output-directory="logs/$RUN"
    ;;

  stop)
    # SIGTERM to the process `train`/`sweep` started on each worker (its pid file, nothing else).
    on_all "kill -TERM \$(cat $REMOTE_DIR/logs/$RUN.pid) 2>/dev/null && echo sent SIGTERM on \$(hostname) || true"
    ;;

  delete)
    if [[ "$QUEUED" == 1 ]]; then  # --force: the slices go with the request
      run gcloud compute tpus queued-resources delete "$QR_ID" "${where[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
    fi
    ;;
esac
