#!/usr/bin/env bash
# Open-loop tail latency of ringkv and Redis side by side, driven by our generator over RESP
# (docs/BENCHMARKS.md, "Tail latency against Redis").
#
#   tail-compare.sh BIN_DIR RATE ROUNDS [DURABILITY] [DATA_ROOT]
#
# BIN_DIR holds a release `ringkv` and `ringkv-bench`. Every round runs ringkv and Redis 7 in
# turn (ringkv first in odd rounds, Redis first in even ones), each server alone, pinned to
# CPU 0, with the generator pinned to CPU 1: YCSB A (50% GET, 50% SET, Zipfian over 10,000 keys
# of 100 B) in an open loop at RATE ops/s over 8 connections × 32 in flight, 2 s of warm-up and
# 15 s measured. DURABILITY is `buffered` (default: ringkv `dw = 0`, Redis without persistence)
# or `sync` (ringkv `dw = 1`, Redis `appendonly yes`, `appendfsync always`). ringkv runs one
# shard with `n = r = w = 1`. Prints each run's p50, p99 and p99.9 of all operations (µs, from
# each operation's intended start) and p99.9/p50. Needs redis-server and redis-cli. DATA_ROOT
# (default target/tail-compare) must be on a real filesystem.
set -euo pipefail

bins=$1
rate=$2
rounds=$3
durability=${4:-buffered}
root=${5:-target/tail-compare}

case $durability in
  buffered) dw=0 aof=(--appendonly no) ;;
  sync) dw=1 aof=(--appendonly yes --appendfsync always) ;;
  *) echo "DURABILITY is buffered or sync, not $durability" >&2; exit 2 ;;
esac

# shellcheck source=resp-common.sh
source "$(dirname "$0")/resp-common.sh"

# load TAG PORT: one measured run; prints one line.
load() {
  local tag=$1 port=$2
  taskset -c 1 "$bins/ringkv-bench" --target "redis://127.0.0.1:$port" -w a --keys 10000 \
    --value-size 100 -c 8 -p 32 --rate "$rate" --warmup 2s -d 15s --quiet > "$root/bench.txt" 2>&1
  awk -v t="$tag" '$1 == "all" { printf "%-7s p50 %6d  p99 %6d  p99.9 %6d  p99.9/p50 %5.1f\n",
    t, $4, $6, $7, $7 / $4 }' "$root/bench.txt"
  grep -E '^(INVALID|warning)' "$root/bench.txt" || true
}

ringkv() {
  local port
  port=$(resp_port)
  start_ringkv "$bins" "$root/ringkv" "$port" "$durability" "$dw"
  load ringkv "$port"
  kill "$NODE_PID"
  wait "$NODE_PID" 2> /dev/null || true
}

redis() {
  local port
  port=$(resp_port)
  local dir=$root/redis
  rm -rf "$dir"
  mkdir -p "$dir"
  (cd "$dir" && taskset -c 0 redis-server --port "$port" --save '' "${aof[@]}" \
    > redis.log 2>&1) &
  local pid=$!
  wait_ping "$port"
  load redis "$port"
  redis-cli -p "$port" shutdown nosave > /dev/null 2>&1 || true
  wait "$pid" 2> /dev/null || true
}

mkdir -p "$root"
echo "open loop at $rate ops/s, $durability"
for r in $(seq "$rounds"); do
  if [ $((r % 2)) -eq 1 ]; then ringkv; redis; else redis; ringkv; fi
done
