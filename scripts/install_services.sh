#!/usr/bin/env bash
# Installs Debian's postgresql and redis-server when missing (the scaled-out stack and its test need them).
# Their packaged services are not used: the stack starts its own, on loopback, with its own data dirs.
set -euo pipefail
missing=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]}..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
    || echo "could not install ${missing[*]}: the scaled-out test will be skipped"
else
  echo "${missing[*]} missing and not installable here (needs root + apt-get): the scaled-out test will be skipped"
fi
