#!/usr/bin/env bash
# Instructions the release consumer executes to drain a backlog of JOBS text.analyze jobs, under
# valgrind's callgrind: a repeatable figure on a noisy machine (to ~0.5 %), for before/after
# comparisons of an optimization. valgrind hides SHA-NI, so sha256 weighs more here than live.
# Usage: scripts/callgrind-consumer.sh [JOBS] [CONSUMER_BINARY]   (needs valgrind, rabbitmqctl)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${1:-5000}"
AMQP_URL="${AMQP_URL:-$(scripts/rabbitmq-local.sh)}"
export AMQP_URL JOBS_NAMESPACE="callgrind-$$" JOBS_QUEUE_TYPE=classic CONSUMER_HTTP_ADDR=127.0.0.1:0
cargo build --release --locked --quiet -p producer -p consumer
consumer="${2:-target/release/consumer}"
out="target/callgrind.out.$$"
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

target/release/producer --count "$jobs" >/dev/null
( exec valgrind --tool=callgrind --callgrind-out-file="$out" "$consumer" >"$out.log" 2>&1 ) &
pid=$!
results() {
  rabbitmqctl list_queues name messages 2>/dev/null |
    awk -v q="$JOBS_NAMESPACE.jobs.results" '$1 == q { print $2 }'
}
for _ in $(seq 1 600); do
  [ "$(results)" = "$jobs" ] && break
  sleep 1
done
echo "results: $(results) of $jobs"
kill -TERM "$pid"
wait "$pid" || true
for q in $(rabbitmqctl list_queues name -q 2>/dev/null | grep "^$JOBS_NAMESPACE\."); do
  rabbitmqctl delete_queue "$q" >/dev/null 2>&1 || true
done
callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done { print; done = 1 }'
echo "profile: $out (callgrind_annotate --inclusive=yes $out)"
