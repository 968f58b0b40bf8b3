#!/usr/bin/env bash
# Profiles each process of a running `mdbridge bench` scenario with `perf record`
# (sampling, 999 Hz, 8 s, after 5 s of warm-up) and prints each one's top symbols.
#
#   scripts/profile-roles.sh                         # ingest, flat out
#   scripts/profile-roles.sh --scenario fanout       # any `mdbridge bench` arguments
#
# Needs `perf` (Debian: apt-get install linux-perf) and root or perf_event_paranoid <= 1.
# Reports land in OUT (default target/profile/<role>.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/profile}
mkdir -p "$OUT"
cargo build --release --quiet
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--scenario ingest)
target/release/mdbridge bench "${args[@]}" --secs 16 --warmup 1 >"$OUT/bench.txt" 2>&1 &
bench=$!
sleep 5
pids=()
for child in $(cat /proc/$bench/task/*/children 2>/dev/null); do
  name=$(tr '\0' ' ' </proc/"$child"/cmdline | awk '{print ($2=="" ? $1 : $2)}')
  case $name in simulate|publisher|executor) ;; *) name=redis-server ;; esac
  perf record -F 999 -o "$OUT/$name.data" -p "$child" -- sleep 8 >/dev/null 2>&1 &
  pids+=($!)
done
wait "${pids[@]}" || true
wait "$bench" || true
for data in "$OUT"/*.data; do
  role=$(basename "$data" .data)
  perf report -i "$data" --no-children --sort symbol --stdio --percent-limit 1.5 2>/dev/null \
    | grep -E '^ +[0-9]' | sed -E 's/ +-? +-? *$//' >"$OUT/$role.txt" || true
  echo "== $role"; head -15 "$OUT/$role.txt"
done
cat "$OUT/bench.txt"
