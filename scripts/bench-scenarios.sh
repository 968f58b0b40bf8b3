#!/usr/bin/env bash
# Runs every `mdbridge bench` scenario on a release build and writes one JSON report per
# scenario (plus the text summary) to OUT (default target/bench-scenarios/).
# Each scenario starts its own private redis-server, simulator, publisher and executor on
# free 127.0.0.1 ports and stops them; nothing else is touched.
#
#   scripts/bench-scenarios.sh                 # all, 10 s each
#   SECS=5 scripts/bench-scenarios.sh latency fanout
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/bench-scenarios}
SECS=${SECS:-10}
mkdir -p "$OUT"
cargo build --release --quiet
BIN=target/release/mdbridge
scenarios=("$@")
[ ${#scenarios[@]} -eq 0 ] && scenarios=(simulate ingest idlehop latency latency5k fanout slow idle durable)
for s in "${scenarios[@]}"; do
  args=(--scenario "$s" --secs "$SECS")
  case $s in
    latency5k) args=(--scenario latency --rate 5000 --secs "$SECS") ;;
    idlehop) args=(--scenario latency --rate 100 --bots 1 --secs "$SECS") ;;
  esac
  echo "== $s ($(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$OUT/summary.txt"
  "$BIN" bench "${args[@]}" --json "$OUT/$s.json" | tee -a "$OUT/summary.txt"
done
