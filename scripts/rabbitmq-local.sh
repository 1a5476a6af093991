#!/usr/bin/env bash
# Starts a local RabbitMQ from Debian's package (installing it if missing), with the
# management plugin (HTTP API on 15672), and waits until it accepts AMQP connections on
# 127.0.0.1:5672. Idempotent: does nothing if one already runs.
# Needs root (or sudo) for apt-get. Prints the AMQP_URL to use on stdout.
set -euo pipefail

log() { echo "rabbitmq-local: $*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

amqp_port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  log "installing rabbitmq-server from Debian"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
fi

if as_root rabbitmqctl -q status >/dev/null 2>&1 && amqp_port_open; then
  log "already running"
else
  log "starting"
  as_root rabbitmq-server -detached
  # await_startup fails at once until the node has registered, so ask until it answers.
  started=false
  for _ in $(seq 1 90); do
    if as_root rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1; then started=true; break; fi
    sleep 2
  done
  if [ "$started" != true ]; then
    log "RabbitMQ did not start; its logs:"
    as_root sh -c 'tail -n 50 /var/log/rabbitmq/*.log' >&2 || true
    exit 1
  fi
fi

# The management API lets tests close connections (fault injection) and read queues.
as_root rabbitmq-plugins -q enable rabbitmq_management >/dev/null

for _ in $(seq 1 100); do
  amqp_port_open && break
  sleep 0.1
done
amqp_port_open || { log "port 5672 is not accepting connections"; exit 1; }
log "ready"
echo "amqp://guest:guest@127.0.0.1:5672/%2f"
