#!/usr/bin/env bash
# Compose smoke test, in two parts.
#  1. The real stack with the monitoring profile, three consumer replicas (each healthy on
#     /readyz), a warm-up burst that Prometheus must count on every replica and that the
#     dashboard service (producer serve) must see through the management API and every
#     replica's /metrics, then a producer burst with one replica stopped mid-run, and nothing
#     lost. (Grafana is not started: no image here.)
#  2. The cluster profile: three clustered brokers, three consumer replicas and a producer
#     given the three URLs; a rate-limited burst with the broker leading jobs.work stopped
#     mid-burst (the producer and consumers fail over), then started again; nothing lost.
# Bounded in time; prints per-replica counts.
#
#   scripts/compose-smoke.sh            # both parts; uses local images (scripts/local-images.sh)
#   SMOKE_CLUSTER=0 scripts/compose-smoke.sh      # part 1 only
#   SMOKE_CLUSTER=only scripts/compose-smoke.sh   # part 2 only (builds the app image)
#   LOCAL_IMAGES=0 scripts/compose-smoke.sh   # uses public images, for machines with a registry
#
# Settings: BURST (jobs, default 20000), WARMUP (jobs counted through Prometheus first, default
# 3000), SMOKE_TIMEOUT (seconds per wait, default 300), RABBITMQ_UI_PORT (host port of the
# management API, default 15680), PROMETHEUS_PORT (default 9690); for part 2, SMOKE_CLUSTER
# (1, 0 or only; default 1), CLUSTER_BURST (jobs, default 5000) and CLUSTER_RATE (jobs/s the
# producer sends at, default 250, so that the burst lasts long enough to lose a broker in it).
set -Eeuo pipefail
cd "$(dirname "$0")/.."

if [ "${LOCAL_IMAGES:-1}" = 1 ]; then
  out="$(scripts/local-images.sh)"; eval "$out"
fi
export BURST="${BURST:-20000}"
export RABBITMQ_UI_PORT="${RABBITMQ_UI_PORT:-15680}"
export PROMETHEUS_PORT="${PROMETHEUS_PORT:-9690}"
export SERVE_PORT="${SERVE_PORT:-8690}"
export SERVE_TOKEN="smoke-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
warmup="${WARMUP:-3000}"
# One job at a time per replica: the run lasts long enough to stop a replica mid-run, and the
# work is spread over all replicas.
export CONSUMER_CONCURRENCY="${CONSUMER_CONCURRENCY:-1}" CONSUMER_PREFETCH="${CONSUMER_PREFETCH:-1}"
timeout_s="${SMOKE_TIMEOUT:-300}"
project="qwsmoke$$"
replicas=3
cluster_part="${SMOKE_CLUSTER:-1}"
case "$cluster_part" in
  0 | 1 | only) ;;
  *) echo "compose-smoke: SMOKE_CLUSTER must be 0, 1 or only, not '$cluster_part'" >&2; exit 2 ;;
esac
cluster_burst="${CLUSTER_BURST:-5000}"
cluster_rate="${CLUSTER_RATE:-250}"

# Part 2 sets these: the compose profile, the consumer service, and the broker node the CLI
# checks run on (one that is up).
profile_args=""
consumer_service=consumer
broker=rabbitmq

# shellcheck disable=SC2086 # $profile_args: zero or two words
compose() { docker-compose -p "$project" $profile_args "$@"; }
log() { echo "compose-smoke: $*" >&2; }
fail() { log "FAILED: $*"; compose ps >&2 || true; compose logs --no-color --tail=30 >&2 || true; exit 1; }
cleanup() {
  docker-compose -p "$project" --profile monitoring --profile cluster down -v --remove-orphans \
    >/dev/null 2>&1 || true
}
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
# Ready messages in a queue, asked of the broker node $broker. Empty when the broker cannot
# say. A quorum queue's figure is the one its leader published at its last tick (every 5 s): it
# lags by up to 5 s, and reads 0 for a few seconds after a new leader is elected.
queue_depth() {
  { compose exec -T "$broker" rabbitmqctl -q list_queues name messages 2>/dev/null || true; } \
    | awk -v q="$1" '$1 == q { print $2 }'
}
results_at_least() { local n; n=$(queue_depth jobs.results); [ "${n:-0}" -ge "$1" ]; }
# The queue reads 0, within two of its leader's ticks (its figure lags, see queue_depth).
queue_empty() {
  local deadline=$((SECONDS + 12))
  until [ "$(queue_depth "$1")" = 0 ]; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
}
replica_ids() { compose ps -q "$consumer_service"; }

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

# The dashboard (producer serve) reads the management API, and the /metrics of every replica
# through the one name `consumer`, and counts the processed jobs they report as $warmup.
dashboard_sees_all() {
  curl -fsS -H "Authorization: Bearer $SERVE_TOKEN" "http://127.0.0.1:$SERVE_PORT/dashboard/data" 2>/dev/null \
    | python3 -c '
import json, sys
d = json.load(sys.stdin)["sources"]
m = d["metrics"]
up = [t for t in m["targets"] if t["ok"]]
ok = d["management"]["ok"] and len(up) == int(sys.argv[1]) and sum(t["processed"] for t in up) >= int(sys.argv[2])
sys.exit(0 if ok else 1)' "$replicas" "$warmup"
}

# Every one of $1 jobs has an ok result (read back through the management API, so the first
# broker must be up), and nothing is left in the work queues or dead letters.
check_results() {
  local sent=$1 out="/tmp/$project-results.json"
  log "checking results"
  curl -fsS -u guest:guest -H 'content-type: application/json' \
    -d "{\"count\": $((sent * 2)), \"ackmode\": \"ack_requeue_false\", \"encoding\": \"auto\"}" \
    "http://127.0.0.1:$RABBITMQ_UI_PORT/api/queues/%2F/jobs.results/get" >"$out" \
    || fail "cannot read the results queue through the management API"
  python3 - "$sent" "$out" <<'PY' || fail "results check"
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
  rm -f "$out"
  queue_empty jobs.work || fail "jobs left in jobs.work"
  queue_empty jobs.kind.text.analyze || fail "jobs left in jobs.kind.text.analyze"
  queue_empty jobs.dead || fail "dead letters in jobs.dead"
}

# Per-replica counts, from each replica's closing log line (summed over its runs, should it
# have been restarted); $1 jobs were sent ($2 says how).
replica_counts() {
  local sent=$1 how=$2 total=0 id name counts done_n reconnects
  compose stop -t 40 "$consumer_service" >/dev/null 2>&1
  for id in $(docker ps -aq --filter "label=com.docker.compose.project=$project" \
                            --filter "label=com.docker.compose.service=$consumer_service"); do
    name=$(docker inspect -f '{{.Name}}' "$id")
    counts=$(docker logs "$id" 2>&1 | python3 -c '
import json, sys
done, reconnects, runs = 0, 0, 0
for line in sys.stdin:
    try:
        event = json.loads(line)
    except ValueError:
        continue
    fields = event.get("fields", {}) if isinstance(event, dict) else {}
    if fields.get("message") == "consumer stopped":
        done += fields["completed"]
        reconnects += fields.get("reconnects", 0)
        runs += 1
print(done if runs else -1, reconnects)')
    read -r done_n reconnects <<<"$counts"
    log "replica ${name#/}: completed $done_n, reconnects $reconnects"
    [ "$done_n" -gt 0 ] || fail "replica ${name#/} processed nothing"
    total=$((total + done_n))
  done
  log "replicas completed $total jobs in all ($how sent; more means redelivered duplicates)"
  [ "$total" -ge "$sent" ] || fail "replicas completed fewer jobs than were sent"
}

# Part 1: one broker, the monitoring profile, a replica stopped mid-run.
single_broker_part() {
  local t0=$SECONDS build_done victim so_far producer code
  log "up: broker, $replicas consumers and Prometheus (project $project)"
  compose --profile monitoring up -d --build --scale consumer=$replicas rabbitmq consumer prometheus dashboard \
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
  wait_for "the dashboard to read the management API and all $replicas replicas' /metrics" dashboard_sees_all
  log "dashboard: management API ok, $replicas of $replicas replicas' metrics read through one service name"
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

  check_results $((BURST + warmup))
  replica_counts $((BURST + warmup)) "$warmup + $BURST"
  log "part 1 (one broker) passed in $((SECONDS - t0))s (up and build: $((build_done - t0))s)"
}

# Part 2 helpers. Nodes are rabbit@<service>.
nodes=(rabbitmq rabbitmq-2 rabbitmq-3)
service_healthy() {
  local id
  id=$(compose ps -q "$1") && [ -n "$id" ] \
    && [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ]
}
# The cluster's running nodes, as $broker sees them, comma-separated.
running_nodes() {
  compose exec -T "$broker" rabbitmqctl -q cluster_status --formatter json 2>/dev/null \
    | python3 -c 'import json, sys; print(",".join(sorted(json.load(sys.stdin)["running_nodes"])))'
}
# Every quorum queue of the namespace (jobs.*), jobs.work among them, has a member on each of
# the 3 nodes, all of them online.
quorum_queues_whole() {
  compose exec -T "$broker" rabbitmqctl -q list_queues name type members online \
      --formatter json 2>/dev/null | python3 -c '
import json, sys
want = {"rabbit@" + node for node in sys.argv[1:]}
rows = [q for q in json.load(sys.stdin)
        if q["type"] == "quorum" and q["name"].startswith("jobs.")]
sys.exit(0 if any(q["name"] == "jobs.work" for q in rows) and all(
    set(q["members"]) == want and set(q["online"]) == want for q in rows) else 1)' "${nodes[@]}"
}
# The service of the node leading quorum queue $1 (its node is rabbit@<service>).
leader_of() {
  compose exec -T "$broker" rabbitmqctl -q list_queues name leader --formatter json 2>/dev/null \
    | python3 -c '
import json, sys
leaders = [q["leader"] for q in json.load(sys.stdin) if q["name"] == sys.argv[1]]
print(leaders[0].partition("@")[2] if leaders else "")' "$1"
}

# Part 2: the cluster profile; the broker leading jobs.work is stopped mid-burst.
cluster_part() {
  local t0=$SECONDS up_done build_args="" victim so_far producer code node
  profile_args="--profile cluster"
  consumer_service=consumer-cluster
  broker=rabbitmq
  # What compose's consumer-cluster and producer-cluster default to; given here as CI would.
  export COMPOSE_AMQP_URL="amqp://guest:guest@rabbitmq:5672/%2f,amqp://guest:guest@rabbitmq-2:5672/%2f,amqp://guest:guest@rabbitmq-3:5672/%2f"
  # Part 1 built the app image; alone, this part builds it.
  if [ "$cluster_part" = only ]; then build_args="--build"; fi
  log "cluster: 3 brokers, $replicas consumers given the 3 URLs (project $project)"
  # consumer-cluster starts once the 3 brokers are healthy: rabbitmq-2 and rabbitmq-3 are when
  # they have joined rabbitmq.
  compose up -d $build_args --scale consumer-cluster=$replicas consumer-cluster \
    >/dev/null 2>&1 || fail "docker-compose up (cluster profile)"
  up_done=$SECONDS
  log "cluster: running nodes $(running_nodes) (brokers up and clustered in $((up_done - t0))s)"
  wait_for "every replica to be healthy (/readyz)" consuming
  wait_for "the quorum queues to have a member on each node" quorum_queues_whole
  victim=$(leader_of jobs.work)
  case " ${nodes[*]} " in *" $victim "*) ;; *) fail "jobs.work led by an unknown node: '$victim'" ;; esac

  log "cluster: a burst of $cluster_burst jobs at $cluster_rate jobs/s"
  producer=$(compose run -d -T --no-deps producer-cluster \
               producer --count "$cluster_burst" --rate "$cluster_rate" 2>/dev/null | tail -n 1) \
    || fail "docker-compose run producer-cluster"
  [ -n "$producer" ] || fail "docker-compose run producer-cluster printed no container name"

  # Stop the broker leading jobs.work mid-burst: its connections close, the quorum queues it
  # leads elect a leader on another node.
  wait_for "the first results" results_at_least 1
  so_far=$(queue_depth jobs.results)
  [ "$(docker inspect -f '{{.State.Running}}' "$producer")" = true ] \
    || fail "the producer finished before a broker could be stopped: not mid-burst (raise CLUSTER_BURST or lower CLUSTER_RATE)"
  log "stopping broker $victim (leads jobs.work) mid-burst (results so far: ${so_far:-0} of $cluster_burst)"
  # The CLI checks go to a node that stays up.
  for node in "${nodes[@]}"; do
    if [ "$node" != "$victim" ]; then broker=$node; break; fi
  done
  compose stop -t 60 "$victim" >/dev/null 2>&1 || fail "docker-compose stop $victim"

  code=$(timeout "$timeout_s" docker wait "$producer") || fail "the producer did not finish"
  log "producer: $(docker logs "$producer" 2>&1 | awk '/^sent / { s = $0 } END { print s ? s : "no summary" }')"
  [ "$code" = 0 ] || fail "the producer exited with $code"
  docker rm "$producer" >/dev/null
  wait_for "$cluster_burst results" results_at_least "$cluster_burst"

  # Start it again: it rejoins, its queue members catch up; then the checks of part 1.
  log "starting broker $victim again"
  compose start "$victim" >/dev/null 2>&1 || fail "docker-compose start $victim"
  wait_for "broker $victim to be healthy again" service_healthy "$victim"
  broker=rabbitmq
  wait_for "every quorum queue member to be online again" quorum_queues_whole
  log "cluster: running nodes $(running_nodes), every jobs.* quorum queue has its 3 members online"

  check_results "$cluster_burst"
  replica_counts "$cluster_burst" "$cluster_burst"
  log "part 2 (cluster) passed in $((SECONDS - t0))s (brokers up and clustered: $((up_done - t0))s)"
}

started=$SECONDS
if [ "$cluster_part" != only ]; then
  single_broker_part
fi
if [ "$cluster_part" != 0 ]; then
  # A blank first broker: the one of part 1 holds queues with a single member.
  cleanup
  cluster_part
fi
log "passed in $((SECONDS - started))s"
