#!/usr/bin/env bash
# The Python client (clients/python): installs it with its test extras into a venv under target/,
# runs its pytest suite against the broker in AMQP_URL and the consumer in BIN_DIR, then measures
# its submit rate beside the Rust producer's on the same broker (20,000 small jobs each, no
# consumer). Needs the consumer and producer binaries in BIN_DIR (default target/release, which
# scripts/bench.sh builds).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${AMQP_URL:?set AMQP_URL}"
bin="$(realpath "${BIN_DIR:-target/release}")"
venv=target/py-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check './clients/python[test,fastapi]'
(
  cd clients/python
  CONSUMER_BIN="$bin/consumer" QW_REQUIRE_RABBITMQCTL=1 \
    "../../$venv/bin/python" -m pytest -q -p no:cacheprovider
)
echo "submit rate, 20,000 jobs, same broker, no consumer (fresh namespace each; producer from $bin):"
echo -n "  python submit_many: "
"$venv/bin/python" clients/python/bench_submit.py --count 20000 | tail -1
namespace="bench-rust-$(date +%s%N)"
echo -n "  rust producer:      "
JOBS_NAMESPACE="$namespace" "$bin/producer" --count 20000 --size 64 2>&1 >/dev/null | tail -1
scripts/delete-namespace.sh "$namespace"
