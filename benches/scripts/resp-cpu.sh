#!/usr/bin/env bash
# Server CPU per request over RESP, measured by redis-benchmark (docs/BENCHMARKS.md, "Server CPU
# per request against Redis").
#
#   resp-cpu.sh DIR_A DIR_B ROUNDS TEST CONNS PIPELINE [DATA_ROOT]
#
# DIR_A and DIR_B each hold a release `ringkv` (pass the same one twice to compare one build with
# Redis only). Every round runs A and B, in turn first (A first in odd rounds, B in even ones:
# the second server of a round has read higher than the first on this machine, whichever build
# it was), then Redis 7 (no persistence): each server alone,
# pinned to CPU 0, with one shard and buffered writes that do not wait for a sync (`n = r = w =
# 1`, `dw = 0`); redis-benchmark pinned to CPU 1 runs `-t TEST -c CONNS -P PIPELINE -d 100
# -r 100000` for 50,000 requests of warm-up, then REQUESTS while `perf stat -e task-clock`
# counts the server; a GET run first fills the key space with 500,000 SETs. Prints ops/s and
# the server's CPU per request. Needs redis-server, redis-benchmark and perf. DATA_ROOT
# (default target/resp-cpu) must be on a real filesystem.
#
# REQUESTS in the environment changes the counted run's length (default 300,000). Overwriting
# SETs leave garbage that compaction collects from about a million of them on, so a run of a few
# million counts its share too.
#
# With DURABILITY=sync in the environment, ringkv runs `--durability sync` with `dw = 1` (a
# write is acknowledged once synced) and Redis with `--appendonly yes --appendfsync always`.
set -euo pipefail

a=$1
b=$2
rounds=$3
test=$4
conns=$5
pipeline=$6
root=${7:-target/resp-cpu}
requests=${REQUESTS:-300000}
durability=${DURABILITY:-buffered}
case $durability in
  buffered) dw=0 redis_persistence=(--appendonly no) ;;
  sync) dw=1 redis_persistence=(--appendonly yes --appendfsync always) ;;
  *)
    echo "DURABILITY is buffered or sync, not $durability" >&2
    exit 2
    ;;
esac

# shellcheck source=resp-common.sh
source "$(dirname "$0")/resp-common.sh"

# measure TAG PID PORT: warm-up, then the counted run; prints one line.
measure() {
  local tag=$1 pid=$2 port=$3
  if [ "$test" = get ]; then
    # A GET of an absent key is an index miss and nothing more: fill the key space first
    # (500,000 SETs over 100,000 keys leave about 0.7% of them absent).
    taskset -c 1 redis-benchmark -p "$port" -t set -n 500000 -c 50 -P 16 -d 100 -r 100000 \
      -q > /dev/null 2>&1
  fi
  taskset -c 1 redis-benchmark -p "$port" -t "$test" -n 50000 -c "$conns" -P "$pipeline" \
    -d 100 -r 100000 -q > /dev/null 2>&1
  perf stat -e task-clock -p "$pid" -x, -o "$root/stat.txt" &
  local stat=$!
  taskset -c 1 redis-benchmark -p "$port" -t "$test" -n "$requests" -c "$conns" \
    -P "$pipeline" -d 100 -r 100000 -q > "$root/bench.txt" 2>&1
  kill -INT "$stat"
  wait "$stat" || true
  local rate ms
  rate=$(tr '\r' '\n' < "$root/bench.txt" | grep -o '[0-9.]* requests per second' | tail -1 |
    cut -d' ' -f1)
  ms=$(grep task-clock "$root/stat.txt" | cut -d, -f1)
  awk -v t="$tag" -v r="$rate" -v m="$ms" -v n="$requests" -v x="$test" -v c="$conns" \
    -v p="$pipeline" 'BEGIN { printf "%-6s %s c=%s P=%s  %.0f ops/s  server CPU %.2f us/request\n",
      t, x, c, p, r, m * 1000 / n }'
}

ringkv() {
  local bin=$1 tag=$2 port
  port=$(resp_port)
  start_ringkv "$bin" "$root/$tag" "$port" "$durability" "$dw"
  measure "$tag" "$NODE_PID" "$port"
  kill "$NODE_PID"
  wait "$NODE_PID" 2> /dev/null || true
}

redis() {
  local port
  port=$(resp_port)
  rm -rf "$root/redis"
  mkdir -p "$root/redis"
  taskset -c 0 redis-server --port "$port" --save '' --dir "$root/redis" "${redis_persistence[@]}" \
    > "$root/redis.log" 2>&1 &
  local server=$!
  wait_ping "$port"
  measure redis "$server" "$port"
  kill "$server"
  wait "$server" 2> /dev/null || true
}

mkdir -p "$root"
for round in $(seq "$rounds"); do
  if ((round % 2)); then
    ringkv "$a" a
    ringkv "$b" b
  else
    ringkv "$b" b
    ringkv "$a" a
  fi
  redis
done
