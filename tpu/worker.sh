#!/usr/bin/env bash
# Runs ON each TPU VM worker (tpu.py calls it through `gcloud compute tpus tpu-vm ssh --worker=all`).
#
#   worker.sh run RUN WORKDIR -- COMMAND...   start COMMAND in the background, log to
#                                             ~/r1zero-logs/RUN/worker-N.log, copy that log to
#                                             WORKDIR/logs/ every LOG_SYNC_S seconds and at exit
#   worker.sh status RUN                      one line: "r1zero-status worker=N state=... [code=C]"
#   worker.sh stop RUN                        SIGTERM: the trainer checkpoints and exits 75
#   worker.sh logs RUN [LINES] [--follow]     tail this worker's log
set -euo pipefail

LOG_ROOT="${R1ZERO_LOG_ROOT:-$HOME/r1zero-logs}"
LOG_SYNC_S="${R1ZERO_LOG_SYNC_S:-60}"

worker_id() {
  # The TPU runtime numbers workers 0..hosts-1; process 0 (the JAX coordinator) is worker 0.
  curl -sf --max-time 2 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null || hostname
}

sync_log() {  # copy this worker's log to the run's GCS (or local) directory
  local log="$1" workdir="$2"
  case "$workdir" in
    gs://*) gcloud storage cp --quiet "$log" "$workdir/logs/" >/dev/null 2>&1 || true ;;
    *) mkdir -p "$workdir/logs" && cp "$log" "$workdir/logs/" ;;
  esac
}

cmd="${1:?usage: worker.sh run|status|stop|logs RUN ...}"
run="${2:?missing RUN name}"
dir="$LOG_ROOT/$run"
mkdir -p "$dir"
w="$(worker_id)"
log="$dir/worker-$w.log"

case "$cmd" in
  run)
    workdir="${3:?missing WORKDIR}"
    [ "${4:-}" = "--" ] || { echo "usage: worker.sh run RUN WORKDIR -- COMMAND..." >&2; exit 2; }
    shift 4
    if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "worker $w: run $run is already running (pid $(cat "$dir/pid"))" >&2; exit 1
    fi
    rm -f "$dir/exit_code"
    (
      "$@" >>"$log" 2>&1 &
      child=$!
      echo "$child" >"$dir/pid"
      while kill -0 "$child" 2>/dev/null; do
        sleep "$LOG_SYNC_S" & wait $! || true
        sync_log "$log" "$workdir"
      done
      set +e; wait "$child"; code=$?; set -e
      echo "$code" >"$dir/exit_code"
      echo "[worker.sh] exit code $code at $(date -u +%FT%TZ)" >>"$log"
      sync_log "$log" "$workdir"
    ) </dev/null >/dev/null 2>&1 &
    disown
    echo "worker $w: started run $run, log $log"
    ;;
  status)
    if [ -f "$dir/exit_code" ]; then
      echo "r1zero-status worker=$w state=exited code=$(cat "$dir/exit_code")"
    elif [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "r1zero-status worker=$w state=running"
    elif [ -f "$dir/pid" ]; then
      echo "r1zero-status worker=$w state=lost"  # the VM restarted under the run
    else
      echo "r1zero-status worker=$w state=absent"
    fi
    [ -f "$log" ] && tail -n 3 "$log" | sed "s/^/  [worker $w] /" || true
    ;;
  stop)
    if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      kill -TERM "$(cat "$dir/pid")"
      echo "worker $w: sent SIGTERM to run $run"
    else
      echo "worker $w: run $run is not running"
    fi
    ;;
  logs)
    lines="${3:-100}"
    if [ "${4:-}" = "--follow" ]; then tail -n "$lines" -F "$log"; else tail -n "$lines" "$log"; fi
    ;;
  *)
    echo "unknown command $cmd; use run|status|stop|logs" >&2; exit 2 ;;
esac
