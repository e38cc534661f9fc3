#!/usr/bin/env bash
# One command: install, then run the whole pipeline on the embedded emulator (Zurich), ending in a GeoPackage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DAGSTER_HOME="$PWD"
exec .venv/bin/mapillary-assets demo "$@"
