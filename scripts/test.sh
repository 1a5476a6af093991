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
    remove_containers=1
  else
    echo "test.sh: AMQP_URL is not set and no Docker engine answers: installing and starting" \
         "Debian's rabbitmq-server on this host (scripts/rabbitmq-local.sh)" >&2
    AMQP_URL="$(scripts/rabbitmq-local.sh)"
    export AMQP_URL
  fi
fi
# Extra nodes this script starts (the isolated and TLS ones) are stopped when it ends; nodes
# started by the caller (CI starts them once for several runs) are left to the caller.
started_nodes=()
cleanup() {
  # Whatever a test failed to delete: report it and delete it (the Debian broker on this host).
  # Only for a broker on this host (the management API on 127.0.0.1:15672).
  case "${AMQP_URL:-}" in
    *@127.0.0.1:*|*@localhost:*|*://127.0.0.1:*|*://localhost:*)
      if [ "${KEEP_TEST_QUEUES:-0}" != 1 ]; then scripts/delete-namespace.sh --prefix test- || true; fi ;;
  esac
  for node in "${started_nodes[@]}"; do "$node" stop >&2 || true; done
  if [ "${remove_containers:-0}" = 1 ]; then
    docker ps -aq --filter label=queue-worker.tests=1 | xargs -r docker rm -f >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
# Tests that set a memory alarm need a broker node of their own (tests/tests/api/isolated.rs):
# with a broker in AMQP_URL, start one on this host; testcontainers starts its own.
# A script that fails to start its node fails the run (never an empty eval that passes).
if [ -n "${AMQP_URL:-}" ] && [ -z "${ISOLATED_AMQP_URL:-}" ]; then
  running=false; (exec 3<>/dev/tcp/127.0.0.1/5682) 2>/dev/null && running=true
  out="$(scripts/rabbitmq-node.sh)"; eval "$out"
  if [ "$running" = false ]; then started_nodes+=(scripts/rabbitmq-node.sh); fi
fi
# The TLS tests (tests/tests/api/tls.rs) need a node with a TLS listener and a CA made for it:
# with a broker in AMQP_URL, start one on this host (scripts/rabbitmq-tls.sh). The cluster
# tests need scripts/rabbitmq-cluster.sh's cluster in CLUSTER_AMQP_URL (CI runs them alone).
if [ -n "${AMQP_URL:-}" ] && [ -z "${TLS_AMQP_URL:-}" ]; then
  running=false; (exec 3<>/dev/tcp/127.0.0.1/5691) 2>/dev/null && running=true
  out="$(scripts/rabbitmq-tls.sh)"; eval "$out"
  if [ "$running" = false ]; then started_nodes+=(scripts/rabbitmq-tls.sh); fi
fi
# With a TLS node, the TLS tests must run: one that cannot fails instead of printing "skipped".
if [ -n "${TLS_AMQP_URL:-}" ]; then export REQUIRE_TLS=1; fi
cargo test --workspace --locked "$@"
