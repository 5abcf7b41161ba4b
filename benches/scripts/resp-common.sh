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
