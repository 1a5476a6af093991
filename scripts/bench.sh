#!/usr/bin/env bash
# The benchmark: a bare lapin loop against the real producer and consumer binaries, on the broker
# at AMQP_URL (a local Debian RabbitMQ, started by scripts/rabbitmq-local.sh, when unset). Writes
# the report to BENCHMARKS.md (or to BENCH_OUT); every flag goes to the bench, see --help.
# Usage: scripts/bench.sh [--repeats 3] [--jobs 20000] [--queue-types quorum,classic] ...
set -euo pipefail
cd "$(dirname "$0")/.."
AMQP_URL="${AMQP_URL:-$(scripts/rabbitmq-local.sh)}"
export AMQP_URL BENCH_OUT="${BENCH_OUT:-BENCHMARKS.md}"
# BUILD_PROFILE=dev (CI's smoke row) reuses the tests' debug build instead of a release build.
profile="${BUILD_PROFILE:-release}"
dir="target/$([ "$profile" = dev ] && echo debug || echo "$profile")"
cargo build --profile "$profile" --locked --quiet -p producer -p consumer -p bench
exec "$dir/bench" "$@"
