#!/usr/bin/env bash
# The scaled-out stack on this machine's loopback: PostgreSQL + Redis + N Celery workers + dagster-daemon +
# the UI (127.0.0.1:3100), files under .stack/. Idempotent.
#   scripts/stack.sh start [--workers N]   # installs postgresql/redis-server with apt-get when missing
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
    # shellcheck disable=SC1091
    source .stack/env.sh
    exec .venv/bin/python -m mapillary_assets.scaleout run "$@"
    ;;
  *) echo "usage: scripts/stack.sh start [--workers N] | stop | status | run" >&2; exit 2 ;;
esac
exec .venv/bin/python -m mapillary_assets.scaleout.stack "$@"
