#!/usr/bin/env bash
# Benchmark of `producer serve`: HTTP requests per second for single posts (POST /jobs) and
# batch posts of BATCH jobs (POST /jobs/batch), each answered only after the broker's confirm,
# with a consumer draining the queue. Uses wrk (Debian package `wrk`) on loopback.
#   scripts/bench-ingest.sh            # 10 s per case, 32 connections
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${DURATION:-10s}" connections="${CONNECTIONS:-32}" batch="${BATCH:-100}"
command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
AMQP_URL="${AMQP_URL:-$(scripts/rabbitmq-local.sh)}"
export AMQP_URL JOBS_NAMESPACE="bench-ingest-$$"
cargo build --release --quiet -p producer -p consumer
work=$(mktemp -d)
( CONSUMER_HTTP_ADDR=127.0.0.1:0 exec ./target/release/consumer 2>"$work/consumer.log" ) &
consumer=$!
( exec ./target/release/producer serve --listen 127.0.0.1:18080 2>"$work/serve.log" ) &
server=$!
cleanup() {
  kill -TERM "$server" "$consumer" 2>/dev/null || true
  wait "$server" "$consumer" 2>/dev/null || true
  for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep "^$JOBS_NAMESPACE\\." || true); do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/18080) 2>/dev/null && break; sleep 0.1; done

job='{"kind": "text.analyze", "payload": {"text": "the quick brown fox jumps over the lazy dog"}}'
printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [=[%s]=]\n' "$job" >"$work/single.lua"
batch_body="[$(for i in $(seq 1 "$batch"); do if [ "$i" -gt 1 ]; then printf ','; fi; printf '%s' "$job"; done)]"
printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [=[%s]=]\n' "$batch_body" >"$work/batch.lua"

run() { # name, path, script, jobs per request
  local out rps
  out=$(wrk -t2 -c"$connections" -d"$duration" -s "$3" "http://127.0.0.1:18080$2")
  rps=$(awk '/Requests\/sec/ { print $2 }' <<<"$out")
  non2xx=$(awk '/Non-2xx/ { print $NF }' <<<"$out"); non2xx=${non2xx:-0}
  printf '%-8s %10s req/s %12.0f jobs/s   non-2xx %s   %s\n' "$1" "$rps" "$(echo "$rps * $4" | bc)" "$non2xx" \
    "$(awk '/Latency/ { print "latency avg " $2 ", max " $4 }' <<<"$out")"
}
echo "bench-ingest: $connections connections, $duration per case, confirmed publishes, 1 consumer"
run single /jobs "$work/single.lua" 1
run batch /jobs/batch "$work/batch.lua" "$batch"
