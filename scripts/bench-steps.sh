#!/usr/bin/env bash
# Where the broker's work per job goes: a raw lapin loop on a topology changed one difference at
# a time from the raw loop's towards ours (bench/src/bin/steps.rs), on the broker at AMQP_URL (a
# local Debian RabbitMQ when unset: its Erlang VM's CPU is read from /proc). Writes the table to
# BENCHMARKS-broker.md (or STEPS_OUT); every flag goes to the tool (--jobs, --repeats, --variants).
set -euo pipefail
cd "$(dirname "$0")/.."
AMQP_URL="${AMQP_URL:-$(scripts/rabbitmq-local.sh)}"
export AMQP_URL
cargo build --release --locked --quiet -p bench --bin steps
exec target/release/steps --out "${STEPS_OUT:-BENCHMARKS-broker.md}" "$@"
