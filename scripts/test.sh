#!/usr/bin/env bash
# Runs the whole test suite against a real RabbitMQ:
# - the broker in AMQP_URL when it is set;
# - otherwise testcontainers, when a Docker engine answers;
# - otherwise a local Debian rabbitmq-server, installed and started by scripts/rabbitmq-local.sh.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${AMQP_URL:-}" ] && ! docker info >/dev/null 2>&1; then
  AMQP_URL="$(scripts/rabbitmq-local.sh)"
  export AMQP_URL
fi
exec cargo test --workspace --locked "$@"
