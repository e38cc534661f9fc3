#!/usr/bin/env bash
# The scaled-out stack on this machine's loopback: PostgreSQL + Redis + SeaweedFS (the S3 object store: the
# data dir and the compute logs) + N Celery workers, each in a private folder + dagster-daemon + the UI
# (127.0.0.1:3100), files under .stack/. Idempotent.
#   scripts/stack.sh start [--workers N] [--data-dir local]   # installs postgresql/redis-server with apt-get when missing
#   scripts/stack.sh status | stop
#   scripts/stack.sh run                   # the whole pipeline, its runs executed by the workers
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:-}
case "$action" in
  start)
    bash scripts/setup.sh
    bash scripts/install_services.sh
    ;;
  stop|status) ;;
  run)
    shift
    env_file="${MAPILLARY_STACK_DIR:-.stack}/env.sh"
    [ -f "$env_file" ] || { echo "error: $env_file not found: run scripts/stack.sh start first" >&2; exit 1; }
    # shellcheck disable=SC1090
    source "$env_file"
    exec .venv/bin/python -m mapillary_assets.scaleout run "$@"
    ;;
  *) echo "usage: scripts/stack.sh start [--workers N] | stop | status | run" >&2; exit 2 ;;
esac
exec .venv/bin/python -m mapillary_assets.scaleout.stack "$@"
