#!/usr/bin/env bash
# Runs the whole test suite against a real RabbitMQ:
# - the broker in AMQP_URL when it is set;
# - otherwise testcontainers, when a Docker engine answers;
# - otherwise a local Debian rabbitmq-server, installed and started by scripts/rabbitmq-local.sh.
# With a broker in AMQP_URL, the alarm tests also get a node of their own (scripts/rabbitmq-node.sh),
# and the TLS tests a TLS node (scripts/rabbitmq-tls.sh).
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${AMQP_URL:-}" ]; then
  if docker info >/dev/null 2>&1; then
    echo "test.sh: AMQP_URL is not set; the tests start RabbitMQ with testcontainers" \
         "(image: ${TEST_RABBITMQ_IMAGE:-the public rabbitmq image})" >&2
    # The tests keep their broker for the whole run; remove it afterwards.
    trap 'docker ps -aq --filter label=queue-worker.tests=1 | xargs -r docker rm -f >/dev/null' EXIT
  else
    AMQP_URL="$(scripts/rabbitmq-local.sh)"
    export AMQP_URL
  fi
fi
# Tests that set a memory alarm need a broker node of their own (tests/tests/api/isolated.rs):
# with a broker in AMQP_URL, start one on this host; testcontainers starts its own.
if [ -n "${AMQP_URL:-}" ] && [ -z "${ISOLATED_AMQP_URL:-}" ]; then
  eval "$(scripts/rabbitmq-node.sh)"
fi
# The TLS tests (tests/tests/api/tls.rs) need a node with a TLS listener and a CA made for it:
# with a broker in AMQP_URL, start one on this host (scripts/rabbitmq-tls.sh). The cluster
# tests need scripts/rabbitmq-cluster.sh's cluster in CLUSTER_AMQP_URL (CI runs them alone).
if [ -n "${AMQP_URL:-}" ] && [ -z "${TLS_AMQP_URL:-}" ]; then
  eval "$(scripts/rabbitmq-tls.sh)"
fi
cargo test --workspace --locked "$@"
