#!/usr/bin/env bash
# Time a node's restart: from the start of `ringkv serve` on existing data to the first answered
# GET, and to the "anti-entropy trees built" log line (docs/BENCHMARKS.md, "Restart").
#
#   restart-time.sh fill    RINGKV BENCH DATA KEYS   one-shard node on DATA, KEYS keys of 100 B
#                                                    preloaded by the load generator, SIGTERM
#   restart-time.sh measure RINGKV DATA              start on DATA, time it, SIGTERM
#
# The node listens on 127.0.0.1:7979, one shard, buffered durability, one-node buckets (n = 1,
# `ycsb` last-write-wins, as the generator expects). DATA must be on a real filesystem (the
# engine uses O_DIRECT, which tmpfs refuses). Logs go next to DATA.
set -euo pipefail

ADDR=127.0.0.1:7979

config() {
  cat > "$1" <<'TOML'
[buckets.default]
n = 1
r = 1
w = 1
dw = 0
mode = "siblings"

[buckets.ycsb]
mode = "lww"
TOML
}

# Starts a node in the background; its process id is left in `pid`.
serve() {
  local bin=$1 data=$2 log=$3
  config "$data.toml"
  "$bin" serve --config "$data.toml" --data-dir "$data" --listen "$ADDR" --shards 1 \
    --durability buffered 2> "$log" &
  pid=$!
}

case "${1:-}" in
  fill)
    bin=$2 bench=$3 data=$4 keys=$5
    serve "$bin" "$data" "$data.fill.log"
    until "$bin" ping --server "$ADDR" >/dev/null 2>&1; do sleep 0.1; done
    "$bench" run --target "ringkv://$ADDR" --keys "$keys" --value-size 100 --read-share 0 \
      -d 1s --warmup 0s -c 16 -p 32 --quiet
    kill -TERM "$pid"; wait "$pid"
    du -sh "$data"
    ;;
  measure)
    bin=$2 data=$3 log="$3.restart.log"
    start=$(date +%s.%N)
    serve "$bin" "$data" "$log"
    until "$bin" get --server "$ADDR" --bucket ycsb --timeout-ms 500 k000000000000000 \
        >/dev/null 2>&1; do
      sleep 0.02
    done
    served=$(date +%s.%N)
    until grep -q "anti-entropy trees built" "$log"; do sleep 0.05; done
    built=$(date +%s.%N)
    kill -TERM "$pid"; wait "$pid"
    awk -v s="$start" -v a="$served" -v b="$built" \
      'BEGIN { printf "first GET answered after %.2f s; trees built after %.2f s\n", a - s, b - s }'
    grep -E "engine recovered|anti-entropy trees built" "$log" | sed 's/dir=[^ ]* //'
    ;;
  *)
    sed -n '2,10p' "$0" >&2
    exit 2
    ;;
esac
