#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on this host from Debian's package, modelled on
# scripts/rabbitmq-node.sh: nodes q1@localhost, q2@localhost, q3@localhost on AMQP ports 5701,
# 5702, 5703 (distribution port = AMQP port + 20000, management on 15701-15703), each with its
# own data, logs, config and pid file under /var/lib/rabbitmq-nodes/<name>. q2 and q3 join q1.
# The failover tests lose a node (SIGKILL), bring it back and ask which node leads a queue.
#
#   eval "$(scripts/rabbitmq-cluster.sh)"    # start; exports CLUSTER_AMQP_URL and CLUSTER_NODES
#   scripts/rabbitmq-cluster.sh stop         # stops the three nodes
#   scripts/rabbitmq-cluster.sh stop q2      # stops q2 only (rabbitmqctl stop), data kept
#   scripts/rabbitmq-cluster.sh kill q2      # SIGKILL of q2@localhost's OS process
#   scripts/rabbitmq-cluster.sh restart q2   # starts q2 again after kill or stop (same data)
#                                            # and waits until it is back in the cluster
#   scripts/rabbitmq-cluster.sh leader QUEUE [VHOST]   # prints the node leading a quorum queue
#
# `start` does nothing if the three nodes run and form one cluster; otherwise it stops whatever
# is left of them and starts the three from fresh data directories, so that a stale cluster
# never comes back. NODE may be given as q2 or q2@localhost. CLUSTER_MANAGEMENT=0 leaves the
# management plugin off. Needs root (or sudo), like the Debian wrapper, which runs nodes as the
# `rabbitmq` user. Logs go to stderr; only the exports (start) and the leader (leader) go to
# stdout.
#
# Quorum queues: declared without `x-quorum-initial-group-size`, one gets min(3, number of
# cluster nodes) members, so here one on each of q1, q2, q3 (also when declared while a node is
# down: that member starts with its node). The default 3 is the `rabbit.quorum_cluster_size`
# app setting (advanced.config on 3.10-4.0; `quorum_queue.initial_cluster_size` in rabbitmq.conf
# from 4.1). The `target-group-size` policy exists from 3.13 only (3.10 rejects it).
set -euo pipefail

names=(q1 q2 q3)
root_dir=/var/lib/rabbitmq-nodes
management="${CLUSTER_MANAGEMENT:-1}"

log() { echo "rabbitmq-cluster: $*" >&2; }
die() { log "$*"; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
# Every CLI call is bounded: some commands (list_queues, join_cluster) default to no timeout.
ctl() { as_root timeout 120 rabbitmqctl "$@"; }

# q2 | q2@localhost -> q2; anything else is refused.
short_name() {
  local n="${1%@localhost}"
  case "$n" in q1 | q2 | q3) echo "$n" ;; *) die "unknown node '$1' (q1, q2 or q3)" ;; esac
}
port_of() { echo $((5700 + ${1#q})); }
node_of() { echo "$1@localhost"; }
base_of() { echo "$root_dir/$1"; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The node answers the CLI and its AMQP port accepts connections.
node_up() {
  ctl -q -n "$(node_of "$1")" status >/dev/null 2>&1 && port_open "$(port_of "$1")"
}

# Nodes that the given node sees running in its cluster, one per line (empty if it is down).
running_nodes() {
  ctl -q -n "$(node_of "$1")" cluster_status --formatter json 2>/dev/null \
    | jq -r '.running_nodes[]' 2>/dev/null || true
}

# The OS pid of a node's Erlang VM: from its pid file, else from the node itself. Only printed
# if that process is a beam whose RABBITMQ_NODENAME is this node, so that a stale pid file never
# makes us kill some other process that got the same pid.
os_pid() {
  local name="$1" node pid
  node=$(node_of "$name")
  pid=$(as_root cat "$(base_of "$name")/pid" 2>/dev/null || true)
  if ! is_node_pid "$pid" "$node"; then
    pid=$(as_root timeout 15 rabbitmqctl -q -n "$node" eval 'os:getpid().' 2>/dev/null | tr -dc '0-9' || true)
    is_node_pid "$pid" "$node" || return 1
  fi
  echo "$pid"
}
is_node_pid() {
  local pid="$1" node="$2"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ "$(as_root readlink "/proc/$pid/exe" 2>/dev/null || true)" == */beam.smp ]] || return 1
  as_root cat "/proc/$pid/environ" 2>/dev/null | tr '\0' '\n' | grep -qx "RABBITMQ_NODENAME=$node"
}
wait_gone() { # pid seconds
  for _ in $(seq 1 $(($2 * 10))); do [ -d "/proc/$1" ] || return 0; sleep 0.1; done
  [ ! -d "/proc/$1" ]
}
# epmd forgets a node when its VM's connection to epmd closes; wait for that, so that a new VM
# of the same name can register.
wait_unregistered() {
  for _ in $(seq 1 100); do
    registered "$1" || return 0
    sleep 0.1
  done
  return 1
}

raise_open_files() { # as scripts/rabbitmq-local.sh explains
  if [ ! -f /etc/security/limits.d/rabbitmq.conf ]; then
    local n; n=$(ulimit -Hn); if [ "$n" = unlimited ] || [ "$n" -gt 65536 ]; then n=65536; fi
    printf 'rabbitmq soft nofile %s\nrabbitmq hard nofile %s\n' "$n" "$n" \
      | as_root tee /etc/security/limits.d/rabbitmq.conf >/dev/null
  fi
}

# Fresh data directory, config, plugins file.
prepare() {
  local name="$1" base port
  base=$(base_of "$name"); port=$(port_of "$name")
  as_root rm -rf "$base"
  as_root mkdir -p "$base/mnesia" "$base/log"
  {
    echo 'loopback_users.guest = false'
    echo 'cluster_name = q-cluster' # else each node reports its own name as the cluster's
    echo "listeners.tcp.default = $port"
    if [ "$management" = 1 ]; then echo "management.tcp.port = $((port + 10000))"; fi
  } | as_root tee "$base/rabbitmq.conf" >/dev/null
  if [ "$management" = 1 ]; then echo "[rabbitmq_management]."; else echo "[]."; fi \
    | as_root tee "$base/plugins" >/dev/null
  as_root chown -R rabbitmq:rabbitmq "$base"
}

# Starts a node's VM (detached) with its environment; its data directory is left as it is.
launch() {
  local name="$1" base port
  base=$(base_of "$name"); port=$(port_of "$name")
  [ -f "$base/rabbitmq.conf" ] || die "$base/rabbitmq.conf is missing: run '$0 start' first"
  as_root rm -f "$base/pid" # a SIGKILLed node leaves it behind
  as_root env RABBITMQ_NODENAME="$(node_of "$name")" RABBITMQ_NODE_PORT="$port" \
    RABBITMQ_DIST_PORT="$((port + 20000))" RABBITMQ_MNESIA_BASE="$base/mnesia" \
    RABBITMQ_LOG_BASE="$base/log" RABBITMQ_ENABLED_PLUGINS_FILE="$base/plugins" \
    RABBITMQ_CONFIG_FILE="$base/rabbitmq" RABBITMQ_PID_FILE="$base/pid" \
    rabbitmq-server -detached </dev/null >&2
}

# Waits until the node has booted and its AMQP port is open (await_startup fails at once until
# the node has registered, so ask until it answers). At most about `deadline` seconds.
await_node() {
  local name="$1" deadline="${2:-180}" node port end
  node=$(node_of "$name"); port=$(port_of "$name"); end=$((SECONDS + deadline))
  while [ "$SECONDS" -lt "$end" ]; do
    if ctl -q -n "$node" await_startup --timeout 30 >/dev/null 2>&1 && port_open "$port"; then
      return 0
    fi
    sleep 1
  done
  log "$node did not start within ${deadline}s; its log:"
  as_root sh -c "tail -n 40 $(base_of "$name")/log/*.log" >&2 || true
  return 1
}

registered() { epmd -names 2>/dev/null | grep -q "^name $1 at port"; }

await_port() {
  for _ in $(seq 1 100); do port_open "$(port_of "$1")" && return 0; sleep 0.1; done
  die "port $(port_of "$1") of $(node_of "$1") is not accepting connections"
}

# Waits until q1 (or the node itself, if q1 is down) lists the node among its running nodes.
await_in_cluster() {
  local name="$1" deadline="${2:-60}" node asker end
  node=$(node_of "$name"); end=$((SECONDS + deadline))
  asker=q1; registered q1 || asker="$name"
  while [ "$SECONDS" -lt "$end" ]; do
    if running_nodes "$asker" | grep -qx "$node"; then return 0; fi
    sleep 1
  done
  log "$node is not running in the cluster after ${deadline}s (cluster_status of $(node_of "$asker"):)"
  ctl -n "$(node_of "$asker")" cluster_status >&2 || true
  return 1
}

# Stops one node: rabbitmqctl stop (bounded), then SIGTERM / SIGKILL of its own OS pid.
stop_node() {
  local name="$1" quiet="${2:-}" node pid
  node=$(node_of "$name")
  pid=$(os_pid "$name" || true)
  if [ -z "$pid" ]; then
    [ -n "$quiet" ] || log "$node is not running"
    return 0
  fi
  log "stopping $node (pid $pid)"
  as_root timeout 60 rabbitmqctl -q -n "$node" stop >/dev/null 2>&1 || true
  if ! wait_gone "$pid" 30; then
    log "$node (pid $pid) still runs: SIGTERM"
    as_root kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" 15; then
      log "$node (pid $pid) still runs: SIGKILL"
      as_root kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid" 10 || die "$node (pid $pid) does not die"
    fi
  fi
  wait_unregistered "$name" || log "epmd still lists $name"
  as_root rm -f "$(base_of "$name")/pid"
}

stop_all() {
  local name pids=()
  for name in "${names[@]}"; do stop_node "$name" "${1:-}" & pids+=($!); done
  local rc=0 p
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  return "$rc"
}

clustered() {
  local name want
  for name in "${names[@]}"; do node_up "$name" || return 1; done
  want=$(printf '%s@localhost\n' "${names[@]}")
  [ "$(running_nodes q1 | sort)" = "$want" ]
}

print_exports() {
  local urls=() nodes=() name
  for name in "${names[@]}"; do
    urls+=("amqp://guest:guest@127.0.0.1:$(port_of "$name")/%2f")
    nodes+=("$(node_of "$name")")
  done
  (IFS=,; echo "export CLUSTER_AMQP_URL=${urls[*]}"; echo "export CLUSTER_NODES=${nodes[*]}")
}

cmd_start() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "installing rabbitmq-server from Debian"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
  fi
  command -v jq >/dev/null 2>&1 || die "jq is needed (apt-get install jq)"
  if clustered; then
    log "q1, q2, q3 already running as one cluster"
  else
    local started=$SECONDS name
    stop_all quiet
    raise_open_files
    for name in "${names[@]}"; do prepare "$name"; done
    log "starting q1, q2, q3 on ports $(port_of q1)-$(port_of q3)"
    for name in "${names[@]}"; do launch "$name"; done
    for name in "${names[@]}"; do await_node "$name"; done
    for name in "${names[@]:1}"; do
      log "$(node_of "$name") joins q1@localhost"
      ctl -q -n "$(node_of "$name")" stop_app >/dev/null
      ctl -q -n "$(node_of "$name")" join_cluster q1@localhost >/dev/null
      ctl -q -n "$(node_of "$name")" start_app >/dev/null
    done
    # start_app returns once the app runs; check q1's view of the cluster and the AMQP ports.
    for name in "${names[@]:1}"; do await_in_cluster "$name"; done
    for name in "${names[@]}"; do await_port "$name"; done
    log "cluster up in $((SECONDS - started))s"
  fi
  log "ready"
  print_exports
}

cmd_kill() {
  local name node pid
  name=$(short_name "$1"); node=$(node_of "$name")
  pid=$(os_pid "$name") || die "$node is not running"
  as_root kill -KILL "$pid"
  wait_gone "$pid" 10 || die "$node (pid $pid) survived SIGKILL"
  log "killed $node (pid $pid)"
}

cmd_restart() {
  local name node pid started=$SECONDS
  name=$(short_name "$1"); node=$(node_of "$name")
  if pid=$(os_pid "$name"); then
    log "$node already runs (pid $pid)"
  else
    # Whatever a SIGKILL left behind: a name still known to epmd would make the new VM fail
    # to register (launch removes the stale pid file).
    wait_unregistered "$name" || die "epmd still lists $name but no VM of $node runs"
    log "starting $node again"
    launch "$name"
  fi
  await_node "$name" 180
  await_in_cluster "$name" 120
  log "$node back in the cluster after $((SECONDS - started))s"
}

cmd_leader() {
  local queue="$1" vhost="${2:-/}" name json found
  for name in "${names[@]}"; do
    registered "$name" || continue # a node that is down is skipped at once
    json=$(ctl -q -n "$(node_of "$name")" list_queues -p "$vhost" name type leader \
      --formatter json 2>/dev/null) || continue
    found=$(jq -r --arg q "$queue" '.[] | select(.name == $q) | "\(.type) \(.leader)"' <<<"$json")
    if [ -z "$found" ]; then
      # list_queues leaves out a quorum queue whose members are all down; quorum_status still
      # knows it (and says "not_found" if there is no such queue).
      local status
      status=$(as_root timeout 120 rabbitmq-queues -q -n "$(node_of "$name")" quorum_status "$queue" -p "$vhost" \
        --formatter json 2>&1) || die "queue '$queue' in vhost '$vhost': $(tr -s '\n' ' ' <<<"$status")"
      die "queue '$queue' has no leader now; its members: $(jq -c 'map({(.["Node Name"]): .["Raft State"]}) | add' <<<"$status" 2>/dev/null || echo "$status")"
    fi
    [ "${found%% *}" = quorum ] || die "queue '$queue' is not a quorum queue ($found)"
    echo "${found#* }"
    return 0
  done
  die "no running node answers"
}

case "${1:-start}" in
  start) cmd_start ;;
  stop)
    if [ $# -gt 2 ]; then die "usage: $0 stop [NODE]"; fi
    if [ $# -eq 2 ]; then stop_node "$(short_name "$2")"; else stop_all; fi
    log "stopped" ;;
  kill) [ $# -eq 2 ] || die "usage: $0 kill NODE"; cmd_kill "$2" ;;
  restart) [ $# -eq 2 ] || die "usage: $0 restart NODE"; cmd_restart "$2" ;;
  leader)
    if [ $# -lt 2 ] || [ $# -gt 3 ]; then die "usage: $0 leader QUEUE [VHOST]"; fi
    cmd_leader "$2" "${3:-/}" ;;
  *) die "usage: $0 [start|stop [NODE]|kill NODE|restart NODE|leader QUEUE [VHOST]]" ;;
esac
