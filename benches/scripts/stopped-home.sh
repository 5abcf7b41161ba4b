#!/usr/bin/env bash
# Session writes while one node of a local cluster is stopped (SIGSTOP) and then resumed: the
# load generator's errors and tail on four nodes (N = 3, W = 2), the second node stopped for
# STOP_S seconds from AT_S seconds after the generator starts (docs/BENCHMARKS.md, "A stopped
# home and session writes").
#
#   stopped-home.sh DIR OUT [AT_S STOP_S [WORKLOAD]]
#
# DIR holds a release `ringkv-bench` and `ringkv`. Writes OUT.txt (the report), OUT.json and
# OUT.stop (when the node was stopped and resumed). Defaults: AT_S 14 (past the preload and the
# 2 s warm-up, inside the 24 s measured phase), STOP_S 5, WORKLOAD `session` (last-write-wins
# puts; `cart` reads and writes back with contexts in a siblings bucket). A request sent to the
# stopped node itself can only time out (the generator's `--timeout 3s`); with `session` the
# others should not.
set -euo pipefail

dir=$1
out=$2
at=${3:-14}
stop_for=${4:-5}
workload=${5:-session}

"$dir/ringkv-bench" --spawn-local 4 -w "$workload" -d 24s --timeout 3s --quiet \
  --json "$out.json" > "$out.txt" 2>&1 &
bench=$!
sleep "$at"
# The nodes are the generator's children, started in order.
victim=$(pgrep -P "$bench" | sort -n | sed -n 2p)
if [ -z "$victim" ]; then
  echo "no second node found under the generator (pid $bench)" >&2
  wait "$bench" || true
  exit 1
fi
echo "stopped $victim at $(date +%T.%N)" > "$out.stop"
kill -STOP "$victim"
sleep "$stop_for"
kill -CONT "$victim"
echo "resumed $victim at $(date +%T.%N)" >> "$out.stop"
wait "$bench"
grep -E 'ops in|^errors|^all ' "$out.txt"
