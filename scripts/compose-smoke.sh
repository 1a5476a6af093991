#!/usr/bin/env bash
# Compose smoke test: the real stack with the monitoring profile, three consumer replicas
# (each healthy on /readyz), a warm-up burst that Prometheus must count on every replica, then
# a producer burst with one replica stopped mid-run, and nothing lost. Bounded in time; prints
# per-replica counts.
#
#   scripts/compose-smoke.sh            # uses local images (scripts/local-images.sh)
#   LOCAL_IMAGES=0 scripts/compose-smoke.sh   # uses public images, for machines with a registry
#
# Settings: BURST (jobs, default 20000), WARMUP (jobs counted through Prometheus first, default
# 3000), SMOKE_TIMEOUT (seconds per wait, default 300), RABBITMQ_UI_PORT (host port of the
# management API, default 15680), PROMETHEUS_PORT (default 9690).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${LOCAL_IMAGES:-1}" = 1 ]; then
  eval "$(scripts/local-images.sh)"
fi
export BURST="${BURST:-20000}"
export RABBITMQ_UI_PORT="${RABBITMQ_UI_PORT:-15680}"
export PROMETHEUS_PORT="${PROMETHEUS_PORT:-9690}"
warmup="${WARMUP:-3000}"
# One job at a time per replica: the run lasts long enough to stop a replica mid-run, and the
# work is spread over all replicas.
export CONSUMER_CONCURRENCY="${CONSUMER_CONCURRENCY:-1}" CONSUMER_PREFETCH="${CONSUMER_PREFETCH:-1}"
timeout_s="${SMOKE_TIMEOUT:-300}"
project="qwsmoke$$"
replicas=3

compose() { docker-compose -p "$project" "$@"; }
log() { echo "compose-smoke: $*" >&2; }
fail() { log "FAILED: $*"; compose ps >&2 || true; compose logs --no-color --tail=30 >&2 || true; exit 1; }
cleanup() { compose down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'log "FAILED: command at line $LINENO exited with $?"' ERR

# Waits until "$@" succeeds, polling every 0.5 s, for at most $timeout_s seconds.
wait_for() {
  local what="$1"; shift
  local deadline=$((SECONDS + timeout_s))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${timeout_s}s waiting for $what"
    sleep 0.5
  done
}
# Ready messages in a queue, straight from the queue processes (the management API's
# statistics lag by seconds). Empty when the broker cannot say.
queue_depth() {
  { compose exec -T rabbitmq rabbitmqctl -q list_queues name messages 2>/dev/null || true; } \
    | awk -v q="$1" '$1 == q { print $2 }'
}
results_at_least() { local n; n=$(queue_depth jobs.results); [ "${n:-0}" -ge "$1" ]; }
replica_ids() { compose ps -q consumer; }

started=$SECONDS
# Every replica's healthcheck (GET /readyz) says it is connected and consuming.
consuming() {
  local id
  for id in $(replica_ids); do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ] || return 1
  done
}
prometheus() {
  curl -fsS "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/$1" 2>/dev/null
}
# Prometheus sees every replica's target up.
targets_up() {
  prometheus targets | python3 -c '
import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
up = [t for t in targets if t["labels"].get("job") == "consumer" and t["health"] == "up"]
sys.exit(0 if len(up) == int(sys.argv[1]) else 1)' "$replicas"
}
# The replicas' processed counters, summed by Prometheus, equal $1.
processed_sum_is() {
  local got
  got=$(prometheus 'query?query=sum(consumer_jobs_processed_total)' | python3 -c '
import json, sys
result = json.load(sys.stdin)["data"]["result"]
print(int(float(result[0]["value"][1])) if result else 0)') || return 1
  [ "$got" = "$1" ]
}

log "up: broker, $replicas consumers and Prometheus (project $project)"
compose --profile monitoring up -d --build --scale consumer=$replicas rabbitmq consumer prometheus \
  >/dev/null 2>&1 || fail "docker-compose up"
build_done=$SECONDS
wait_for "every replica to be healthy (/readyz)" consuming

# Monitoring: a warm-up burst, then Prometheus must see every replica up and count every job.
log "warm-up: $warmup jobs; Prometheus must see $replicas replicas and count every job"
compose run --rm --no-deps -T producer producer --count "$warmup" >/dev/null 2>&1 || fail "warm-up burst"
wait_for "$warmup warm-up results" results_at_least "$warmup"
wait_for "Prometheus to report $replicas consumer targets up" targets_up
wait_for "Prometheus to count $warmup processed jobs" processed_sum_is "$warmup"
log "Prometheus: $replicas targets up, sum(consumer_jobs_processed_total) = $warmup"
log "up: producer, a burst of $BURST jobs"
compose up -d --no-deps producer >/dev/null 2>&1 || fail "docker-compose up producer"

# Stop one replica mid-run, gracefully, as `docker-compose stop` would.
wait_for "the first results" results_at_least 1
victim=$(replica_ids | sed -n 1p)  # not head: it would cut the pipe under pipefail
so_far=$(queue_depth jobs.results)
[ "${so_far:-0}" -lt $((BURST + warmup)) ] || fail "the run ended before a replica could be stopped: not mid-run"
log "stopping replica ${victim:0:12} mid-run (results so far: $so_far of $((BURST + warmup)))"
docker stop -t 40 "$victim" >/dev/null

producer=$(compose ps -q producer)
code=$(timeout "$timeout_s" docker wait "$producer") || fail "the producer did not finish"
[ "$code" = 0 ] || fail "the producer exited with $code"
wait_for "$((BURST + warmup)) results" results_at_least $((BURST + warmup))

# Every job has a result: read them all back through the management API.
log "checking results"
curl -fsS -u guest:guest -H 'content-type: application/json' \
  -d "{\"count\": $(((BURST + warmup) * 2)), \"ackmode\": \"ack_requeue_false\", \"encoding\": \"auto\"}" \
  "http://127.0.0.1:$RABBITMQ_UI_PORT/api/queues/%2F/jobs.results/get" >"/tmp/$project-results.json" \
  || fail "cannot read the results queue through the management API"
python3 - $((BURST + warmup)) "/tmp/$project-results.json" <<'PY' || fail "results check"
import json, sys
burst, path = int(sys.argv[1]), sys.argv[2]
messages = json.load(open(path))
results = [json.loads(m["payload"]) for m in messages]
ids = {r["job_id"] for r in results}
bad = [r for r in results if r["status"] != "ok"]
print(f"compose-smoke: results {len(results)}, distinct jobs {len(ids)}, "
      f"duplicates {len(results) - len(ids)}, not ok {len(bad)}", file=sys.stderr)
sys.exit(0 if len(ids) == burst and not bad else 1)
PY
rm -f "/tmp/$project-results.json"
[ "$(queue_depth jobs.work)" = 0 ] || fail "jobs left in jobs.work"
[ "$(queue_depth jobs.kind.text.analyze)" = 0 ] || fail "jobs left in jobs.kind.text.analyze"
[ "$(queue_depth jobs.dead)" = 0 ] || fail "dead letters in jobs.dead"

# Per-replica counts, from each replica's closing log line.
compose stop -t 40 consumer >/dev/null 2>&1
total=0
for id in $(docker ps -aq --filter "label=com.docker.compose.project=$project" \
                          --filter "label=com.docker.compose.service=consumer"); do
  name=$(docker inspect -f '{{.Name}}' "$id")
  done_n=$(docker logs "$id" 2>&1 | python3 -c '
import json, sys
n = None
for line in sys.stdin:
    try:
        event = json.loads(line)
    except ValueError:
        continue
    if event.get("fields", {}).get("message") == "consumer stopped":
        n = event["fields"]["completed"]
print(n if n is not None else -1)')
  log "replica ${name#/}: completed $done_n"
  [ "$done_n" -gt 0 ] || fail "replica ${name#/} processed nothing"
  total=$((total + done_n))
done
log "replicas completed $total jobs in all ($warmup + $BURST sent; more means redelivered duplicates)"
[ "$total" -ge $((BURST + warmup)) ] || fail "replicas completed fewer jobs than were sent"
log "passed in $((SECONDS - started))s (up and build: $((build_done - started))s)"
