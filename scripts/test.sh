#!/usr/bin/env bash
# One command: install, then run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The UI test drives Debian's Chromium (Playwright uses it; it downloads no browser of its own).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the UI test..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed: the UI test will be skipped"
fi
# The scaled-out test starts its own PostgreSQL and Redis on loopback: install them when missing.
bash scripts/install_services.sh
exec .venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
