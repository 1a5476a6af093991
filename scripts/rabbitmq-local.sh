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

# RabbitMQ wants far more open files than the usual soft limit of 1024: with hundreds of queues
# (the test suite runs dozens of namespaces at once) a node at 1024 runs out of file handles and
# stops answering. Debian's wrapper starts the node through `su rabbitmq`, whose pam_limits sets
# the limits of /etc/security/limits.d, so that is where the limit goes (RabbitMQ's docs ask for
# 65536 at least).
raise_open_files() {
  local conf=/etc/security/limits.d/rabbitmq.conf
  if [ ! -f "$conf" ]; then
    # 65536, or the hard limit here if lower: pam_limits sets nothing when asked for more
    # than it may (a container without CAP_SYS_RESOURCE).
    local n; n=$(ulimit -Hn); if [ "$n" = unlimited ] || [ "$n" -gt 65536 ]; then n=65536; fi
    printf 'rabbitmq soft nofile %s\nrabbitmq hard nofile %s\n' "$n" "$n" | as_root tee "$conf" >/dev/null
  fi
}

if as_root rabbitmqctl -q status >/dev/null 2>&1 && amqp_port_open; then
  log "already running"
else
  log "starting"
  raise_open_files
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
