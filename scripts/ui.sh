#!/usr/bin/env bash
# The Dagster UI (webserver + daemon) on 127.0.0.1:3000 against the embedded emulator.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DAGSTER_HOME="$PWD"
exec .venv/bin/mapillary-assets ui "$@"
