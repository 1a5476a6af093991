#!/usr/bin/env bash
# Starts an extra, isolated RabbitMQ node on this host from Debian's package, next to the one of
# scripts/rabbitmq-local.sh: its own node name, ports, data and logs, no plugins. Tests that set
# a memory alarm (which blocks every publisher on a node) run against it, so that the alarm
# never reaches tests running in parallel on the shared broker.
#
#   eval "$(scripts/rabbitmq-node.sh)"     # exports ISOLATED_AMQP_URL and ISOLATED_RABBITMQ_NODE
#   scripts/rabbitmq-node.sh stop          # stops it (its data stays, for the next start)
#
# Idempotent: does nothing if the node already runs. Needs root (or sudo), like the Debian
# wrapper, which runs nodes as the `rabbitmq` user. NODE_NAME and NODE_PORT override the
# defaults (isolated@localhost, 5682; the distribution port is NODE_PORT + 20000).
set -euo pipefail

name="${NODE_NAME:-isolated}"
port="${NODE_PORT:-5682}"
node="$name@localhost"
base="/var/lib/rabbitmq-nodes/$name"

log() { echo "rabbitmq-node: $*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

if [ "${1:-}" = stop ]; then
  if as_root rabbitmqctl -q -n "$node" status >/dev/null 2>&1; then
    log "stopping $node"
    as_root timeout 60 rabbitmqctl -q -n "$node" stop >/dev/null 2>&1 || true
  fi
  exit 0
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  log "installing rabbitmq-server from Debian"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
fi

if as_root rabbitmqctl -q -n "$node" status >/dev/null 2>&1 && port_open; then
  log "$node already running"
else
  log "starting $node on port $port"
  as_root mkdir -p "$base/mnesia" "$base/log"
  echo "[]." | as_root tee "$base/plugins" >/dev/null
  printf 'loopback_users.guest = false\nlisteners.tcp.default = %s\n' "$port" \
    | as_root tee "$base/rabbitmq.conf" >/dev/null
  as_root chown -R rabbitmq:rabbitmq "$base"
  # Open files: as scripts/rabbitmq-local.sh explains (it writes the limit when it starts the
  # main node; a node started alone writes it here).
  if [ ! -f /etc/security/limits.d/rabbitmq.conf ]; then
    n=$(ulimit -Hn); if [ "$n" = unlimited ] || [ "$n" -gt 65536 ]; then n=65536; fi
    printf 'rabbitmq soft nofile %s\nrabbitmq hard nofile %s\n' "$n" "$n" \
      | as_root tee /etc/security/limits.d/rabbitmq.conf >/dev/null
  fi
  as_root env RABBITMQ_NODENAME="$node" RABBITMQ_NODE_PORT="$port" \
    RABBITMQ_DIST_PORT="$((port + 20000))" RABBITMQ_MNESIA_BASE="$base/mnesia" \
    RABBITMQ_LOG_BASE="$base/log" RABBITMQ_ENABLED_PLUGINS_FILE="$base/plugins" \
    RABBITMQ_CONFIG_FILE="$base/rabbitmq" RABBITMQ_PID_FILE="$base/pid" \
    rabbitmq-server -detached
  started=false
  for _ in $(seq 1 90); do
    if as_root rabbitmqctl -q -n "$node" await_startup --timeout 60 >/dev/null 2>&1; then started=true; break; fi
    sleep 2
  done
  if [ "$started" != true ]; then
    log "$node did not start; its logs:"
    as_root sh -c "tail -n 50 $base/log/*.log" >&2 || true
    exit 1
  fi
fi
for _ in $(seq 1 100); do port_open && break; sleep 0.1; done
port_open || { log "port $port is not accepting connections"; exit 1; }
log "ready"
echo "export ISOLATED_AMQP_URL=amqp://guest:guest@127.0.0.1:$port/%2f"
echo "export ISOLATED_RABBITMQ_NODE=$node"
