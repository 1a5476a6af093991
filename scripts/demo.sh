#!/usr/bin/env bash
# Quick start without Docker: a local RabbitMQ, N consumers and a producer burst, then the
# producer's summary. Usage: scripts/demo.sh [JOBS] [CONSUMERS]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${1:-10000}"
consumers="${2:-2}"
namespace="${JOBS_NAMESPACE:-demo}"

AMQP_URL="${AMQP_URL:-$(scripts/rabbitmq-local.sh)}"
export AMQP_URL JOBS_NAMESPACE="$namespace"
cargo build --release --quiet -p producer -p consumer

pids=()
stop_consumers() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_consumers EXIT

for i in $(seq 1 "$consumers"); do
  # Each consumer serves /metrics, /healthz and /readyz on its own port: 9401, 9402, ...
  ( CONSUMER_HTTP_ADDR="127.0.0.1:$((9400 + i))" exec ./target/release/consumer 2>"target/demo-consumer-$i.log" ) &
  pids+=("$!")
done

# Wait (30 s at most) until every consumer says it consumes: the producer's burst then meets
# queues already declared, and its jobs start at once.
if command -v curl >/dev/null; then
  for i in $(seq 1 "$consumers"); do
    for _ in $(seq 1 60); do
      curl -fsS -o /dev/null "http://127.0.0.1:$((9400 + i))/readyz" 2>/dev/null && break
      sleep 0.5
    done
  done
fi

echo "demo: $consumers consumers, $jobs jobs, namespace '$namespace' (consumer logs: target/demo-consumer-*.log)" >&2
./target/release/producer --count "$jobs" --wait >"target/demo-results.jsonl"
echo "demo: $(wc -l <target/demo-results.jsonl) results in target/demo-results.jsonl" >&2
