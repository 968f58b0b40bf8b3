#!/usr/bin/env bash
# Runs mdbridge's whole test suite. Integration tests start their own redis-server on free
# ports (the one on 6379, if any, is never touched); this script installs redis-server from
# Debian's packages when it is missing, with the other tools the tests use (below).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests need, as (binary, Debian package): redis-server for the Redis tests,
# promtool (package prometheus) for the alert rules, systemd-analyze for the units, and
# chromium for the status page. Missing ones are installed with apt-get, in one go.
need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/bin/$1" ]; }
have redis-server || need+=(redis-server)
have promtool || need+=(prometheus)
have systemd-analyze || need+=(systemd)
have chromium || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing with apt-get: ${need[*]}" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Unit, integration and benchmark targets (benchmarks run once each, as smoke tests).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --all-targets "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
