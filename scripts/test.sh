#!/usr/bin/env bash
# Runs mdbridge's whole test suite. Integration tests start their own redis-server on free
# ports (the one on 6379, if any, is never touched).
#
# redis-server is looked up exactly as the tests look it up (src/bus/redis_test_server.rs,
# tests/common/mod.rs): $REDIS_SERVER_BIN, else the PATH, else /usr/bin, /usr/local/bin.
# (Not an MDBRIDGE_ variable: those override config keys, and unknown ones are refused.)
# When none is found it is installed from Debian's packages with apt-get (as root, or with
# password-less sudo); without either, the script stops and says what to install. The binary found is exported as REDIS_SERVER_BIN so
# every test runs that one.
set -euo pipefail
cd "$(dirname "$0")/.."

find_redis_server() {
  local p
  p="${REDIS_SERVER_BIN:-}"
  if [ -n "$p" ]; then
    if [ -x "$p" ]; then echo "$p"; return 0; fi
    echo "test.sh: $p (from REDIS_SERVER_BIN) is not an executable file" >&2
    return 1
  fi
  if p=$(command -v redis-server 2>/dev/null); then echo "$p"; return 0; fi
  for p in /usr/bin/redis-server /usr/local/bin/redis-server; do
    if [ -x "$p" ]; then echo "$p"; return 0; fi
  done
  return 1
}

if ! redis=$(find_redis_server); then
  if [ -n "${REDIS_SERVER_BIN:-}" ]; then exit 1; fi
  echo "test.sh: redis-server not found (looked at \$REDIS_SERVER_BIN, PATH, /usr/bin, /usr/local/bin)" >&2
  if [ "$(id -u)" = 0 ]; then
    SUDO=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    cat >&2 <<'EOF'
test.sh: cannot install it: not root and no password-less sudo. Install it yourself, e.g.
    sudo apt-get install -y redis-server
or point the tests at a binary you have:
    REDIS_SERVER_BIN=/path/to/redis-server ./scripts/test.sh
EOF
    exit 1
  fi
  echo "test.sh: installing the Debian package redis-server: ${SUDO:+$SUDO }apt-get install -y redis-server" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >&2
  if ! redis=$(find_redis_server); then
    echo "test.sh: redis-server still not found after installing the package" >&2
    exit 1
  fi
fi
export REDIS_SERVER_BIN="$redis"
echo "test.sh: using $("$redis" --version | head -n 1) at $redis" >&2

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
