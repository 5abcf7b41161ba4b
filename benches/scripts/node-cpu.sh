#!/usr/bin/env bash
# Node CPU per request, two builds side by side (docs/BENCHMARKS.md, "Node CPU per request").
#
#   node-cpu.sh DIR_A DIR_B [ROUNDS] [DATA_ROOT]
#
# DIR_A and DIR_B each hold a `ringkv` and a `ringkv-bench` binary. Every round runs A, then B:
# a one-shard node pinned to CPU 0 (buffered, one-node buckets, dw = 0) and the load generator
# pinned to CPU 1 (YCSB A, 8 connections x 4 in flight, 16 s), and `perf stat` counts the node's
# task-clock over 10 s of the measured phase. It prints the node's CPU per operation: pinning
# keeps the client off the node's core, which makes this far steadier than throughput alone on a
# two-core machine. DATA_ROOT (default target/node-cpu) must be on a real filesystem.
set -euo pipefail

a=$1
b=$2
rounds=${3:-3}
root=${4:-target/node-cpu}

run() {
  # Below the kernel's ephemeral range (32768 and up by default), where a client's
  # outgoing connections could hold the port.
  local bin=$1 tag=$2 port=$((20000 + RANDOM % 12000))
  local dir=$root/$tag
  rm -rf "$dir"
  mkdir -p "$dir"
  cat > "$dir/node.toml" <<'TOML'
[buckets.default]
n = 1
r = 1
w = 1
dw = 0

[buckets.ycsb]
mode = "lww"
TOML
  taskset -c 0 "$bin/ringkv" serve --config "$dir/node.toml" --data-dir "$dir/data" \
    --listen "127.0.0.1:$port" --durability buffered > "$dir/node.log" 2>&1 &
  local node=$!
  for _ in $(seq 100); do
    "$bin/ringkv" ping --server "127.0.0.1:$port" > /dev/null 2>&1 && break
    sleep 0.1
  done
  taskset -c 1 "$bin/ringkv-bench" --target "ringkv://127.0.0.1:$port" --duration 16s \
    > "$dir/bench.txt" 2>&1 &
  local bench=$!
  sleep 4
  perf stat -e task-clock -p "$node" -x, -o "$dir/stat.txt" -- sleep 10
  wait "$bench"
  kill "$node"
  wait "$node" 2> /dev/null || true
  local ops ms
  ops=$(sed -n 's/.*: \([0-9]*\) ops\/s.*/\1/p' "$dir/bench.txt")
  ms=$(cut -d, -f1 < <(grep task-clock "$dir/stat.txt"))
  awk -v t="$tag" -v o="$ops" -v m="$ms" \
    'BEGIN { printf "%s  %d ops/s  node CPU %.2f  %.2f us/op\n", t, o, m / 10000, m * 1000 / (o * 10) }'
}

for i in $(seq "$rounds"); do
  run "$a" "a"
  run "$b" "b"
done
