#!/usr/bin/env bash
# Runs mdbridge's whole test suite. Integration tests start their own redis-server on free
# ports (the one on 6379, if any, is never touched).
#
# What the tests run, and the Debian package that brings it:
#   redis-server     redis-server  every Redis test (private servers, TLS, ACL users)
#   promtool         prometheus    deploy/prometheus alert rules and their unit tests
#   systemd-analyze  systemd       deploy/systemd units
#   chromium         chromium      the admin status page, in a headless browser
# redis-server is looked up exactly as the tests look it up (src/bus/redis_test_server.rs,
# tests/common/mod.rs): $REDIS_SERVER_BIN, else the PATH, else /usr/bin, /usr/local/bin;
# the others in the PATH, /usr/bin, /usr/local/bin. (Not an MDBRIDGE_ variable: those
# override config keys, and unknown ones are refused.) Whatever is missing is installed in
# one apt-get call (as root, or with password-less sudo), and the script says so first;
# without either, it stops and says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

find_tool() {
  local name=$1 p
  if [ "$name" = redis-server ] && [ -n "${REDIS_SERVER_BIN:-}" ]; then
    if [ -x "$REDIS_SERVER_BIN" ]; then echo "$REDIS_SERVER_BIN"; return 0; fi
    echo "test.sh: $REDIS_SERVER_BIN (from REDIS_SERVER_BIN) is not an executable file" >&2
    return 2
  fi
  if p=$(command -v "$name" 2>/dev/null); then echo "$p"; return 0; fi
  for p in "/usr/bin/$name" "/usr/local/bin/$name"; do
    if [ -x "$p" ]; then echo "$p"; return 0; fi
  done
  return 1
}

tools=(redis-server promtool systemd-analyze chromium)
packages=(redis-server prometheus systemd chromium)
missing=()
for i in "${!tools[@]}"; do
  rc=0
  find_tool "${tools[$i]}" >/dev/null || rc=$?
  if [ "$rc" = 2 ]; then exit 1; fi
  if [ "$rc" != 0 ]; then missing+=("${packages[$i]}"); fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: not found: ${missing[*]} (Debian packages)" >&2
  if [ "$(id -u)" = 0 ]; then
    SUDO=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    cat >&2 <<EOF
test.sh: cannot install them: not root and no password-less sudo. Install them yourself:
    sudo apt-get install -y --no-install-recommends ${missing[*]}
(or point the tests at a redis-server you have: REDIS_SERVER_BIN=/path/to/redis-server)
EOF
    exit 1
  fi
  echo "test.sh: installing: ${SUDO:+$SUDO }apt-get install -y --no-install-recommends ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  for t in "${tools[@]}"; do
    if ! find_tool "$t" >/dev/null; then
      echo "test.sh: $t still not found after installing its package" >&2
      exit 1
    fi
  done
fi
redis=$(find_tool redis-server)
export REDIS_SERVER_BIN="$redis"
echo "test.sh: using $("$redis" --version | head -n 1) at $redis" >&2

# Unit, integration and benchmark targets (benchmarks run once each, as smoke tests).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# --no-fail-fast: one failing test binary does not hide the results of the others.
cargo test --all-targets --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
