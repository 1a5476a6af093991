#!/usr/bin/env bash
# Reconnect soak: a consumer (a release build unless BUILD_PROFILE=dev) has its connection closed
# by the broker ROUNDS times (default 20), with a confirmed, waited-for burst of jobs between closes. After each round it
# prints the consumer's RSS and thread count; it fails if either grows (a leak of tasks,
# channels or memory across reconnects) or if any burst loses a job.
# Needs the local Debian broker (rabbitmqctl closes the connection at once).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${ROUNDS:-20}"
burst="${BURST:-2000}"
AMQP_URL="${AMQP_URL:-$(scripts/rabbitmq-local.sh)}"
export AMQP_URL
export JOBS_NAMESPACE="soak-$$-$RANDOM"
# The recent-results window is meant to fill up; keep it at one burst so that it is full
# after the first round and its growth is not mistaken for a leak.
export CONSUMER_RECENT_RESULTS="$burst" CONSUMER_HTTP_ADDR=127.0.0.1:0
log() { echo "reconnect-soak: $*" >&2; }
# BUILD_PROFILE=dev (CI) reuses the tests' debug build: a leak shows in either profile.
profile="${BUILD_PROFILE:-release}"
bin="./target/$([ "$profile" = dev ] && echo debug || echo "$profile")"
cargo build --profile "$profile" --locked --quiet -p producer -p consumer

( exec "$bin/consumer" 2>"target/soak-consumer.log" ) &
consumer=$!
cleanup() {
  kill -TERM "$consumer" 2>/dev/null || true
  wait "$consumer" 2>/dev/null || true
  # Every queue of the soak's namespace: work, results, dead letters and retry queues.
  for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep "^$JOBS_NAMESPACE\." || true); do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT

# The broker-side pid of the consumer's connection, empty while it has none.
connection() {
  rabbitmqctl -q list_connections pid client_properties 2>/dev/null \
    | awk -v name="consumer ns=$JOBS_NAMESPACE pid=$consumer\"" 'index($0, name) { print $1 }' \
    | sed -n 1p
}
wait_connection() {
  local previous="$1" current
  for _ in $(seq 1 200); do
    current=$(connection)
    if [ -n "$current" ] && [ "$current" != "$previous" ]; then echo "$current"; return; fi
    sleep 0.1
  done
  log "FAILED: the consumer did not (re)connect"; exit 1
}
status() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$consumer/status"; }

current=$(wait_connection "")
printf '%6s %10s %8s\n' round rss_kib threads
first_rss="" first_threads=""
for round in $(seq 1 "$rounds"); do
  "$bin/producer" --count "$burst" --size 512 --wait --wait-timeout 60 >/dev/null 2>"target/soak-producer.log" \
    || { log "FAILED: burst $round lost jobs:"; cat target/soak-producer.log >&2; exit 1; }
  rss=$(status VmRSS); threads=$(status Threads)
  printf '%6s %10s %8s\n' "$round" "$rss" "$threads"
  if [ "$round" = 3 ]; then first_rss=$rss; first_threads=$threads; fi   # after warm-up
  rabbitmqctl -q close_connection "$current" "reconnect soak round $round" >/dev/null
  current=$(wait_connection "$current")
done
"$bin/producer" --count "$burst" --wait >/dev/null 2>"target/soak-producer.log" \
  || { log "FAILED: the last burst lost jobs"; exit 1; }
rss=$(status VmRSS); threads=$(status Threads)
log "after $rounds reconnects: RSS ${first_rss} -> ${rss} KiB, threads ${first_threads} -> ${threads}"
# Flat means: no more than 25 % + 4 MiB above the warmed-up size, and no extra threads.
if [ "$rss" -gt $(( first_rss * 5 / 4 + 4096 )) ] || [ "$threads" -gt "$first_threads" ]; then
  log "FAILED: the consumer grows across reconnects"; exit 1
fi
log "passed"
