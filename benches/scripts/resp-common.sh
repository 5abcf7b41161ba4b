# Shared by the scripts that start RESP servers (resp-cpu.sh, tail-compare.sh); sourced, not run.

# wait_ping PORT: waits up to 10 s for a RESP server on PORT to answer PING.
wait_ping() {
  for _ in $(seq 100); do
    redis-cli -p "$1" ping > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server on port $1 did not answer" >&2
  return 1
}

# resp_port: a port for a server, below the kernel's ephemeral range (32768 and up by
# default), where a client's outgoing connections could hold it.
resp_port() {
  echo $((20000 + RANDOM % 12000))
}

# start_ringkv BIN_DIR DIR PORT DURABILITY DW: a one-shard node of BIN_DIR/ringkv pinned to
# CPU 0, `n = r = w = 1` and `dw = DW`, its data and log in DIR (emptied first), RESP on PORT
# and the binary protocol on PORT + 1. Sets NODE_PID and returns once the node answers PING.
start_ringkv() {
  local bins=$1 dir=$2 port=$3 durability=$4 dw=$5
  rm -rf "$dir"
  mkdir -p "$dir"
  printf '[buckets.default]\nn = 1\nr = 1\nw = 1\ndw = %s\n' "$dw" > "$dir/node.toml"
  taskset -c 0 "$bins/ringkv" serve --config "$dir/node.toml" --data-dir "$dir/data" \
    --listen "127.0.0.1:$((port + 1))" --resp-listen "127.0.0.1:$port" --shards 1 \
    --durability "$durability" > "$dir/node.log" 2>&1 &
  NODE_PID=$!
  wait_ping "$port"
}
