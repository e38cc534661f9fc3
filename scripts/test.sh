#!/usr/bin/env bash
# One command: install, then run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The UI test drives Debian's Chromium (Playwright uses it; it downloads no browser of its own).
# The GeoPackage test validates with Debian's GDAL 3.6 validate_gpkg.py (python3-gdal), the reader LTR users have,
# and reads the file with GDAL's ogrinfo (gdal-bin): feature counts, spatial index, a window read.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ -f /usr/share/doc/python3-gdal/examples/validate_gpkg.py ] || missing+=(python3-gdal)
command -v ogrinfo >/dev/null 2>&1 || missing+=(gdal-bin)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} for the UI and GeoPackage tests..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
    || echo "${missing[*]} could not be installed: the tests needing them will be skipped"
fi
# The scaled-out test starts its own PostgreSQL and Redis on loopback: install them when missing.
bash scripts/install_services.sh
# Lint, format and the code location as `dg` loads it, before the tests.
echo "ruff check, ruff format --check, dg check defs..."
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
VIRTUAL_ENV="$PWD/.venv" .venv/bin/dg check defs >/dev/null
exec .venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
