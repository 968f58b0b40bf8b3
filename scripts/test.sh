#!/usr/bin/env bash
# Runs mdbridge's whole test suite. Integration tests start their own redis-server on free
# ports (the one on 6379, if any, is never touched); this script installs redis-server from
# Debian's packages when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
  echo "test.sh: redis-server not found; installing it with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

cargo test --all-targets "$@"
