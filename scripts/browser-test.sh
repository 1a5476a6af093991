#!/usr/bin/env bash
# The dashboard in a real browser: headless Chromium (Debian's `chromium`) driven by
# playwright-core (npm, into target/browser), against the broker in AMQP_URL (management
# plugin on), a consumer and `producer serve` started here with a token. Checks (see
# scripts/browser-test.mjs): the page asks for the token and loads with no console error, the
# numbers move during a burst of 5,000 jobs, a failed job shows under recent failures, and a
# dead letter replayed from the page comes back as a result. Screenshots go to
# target/screenshots/; figures (load time, management API requests/s) to stdout.
# Binaries: BIN_DIR (default target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${AMQP_URL:?set AMQP_URL}"
bin="${BIN_DIR:-target/release}"
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v chromium >/dev/null; then
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
    || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
fi
mkdir -p target/browser target/screenshots target/tmp
if [ ! -f target/browser/node_modules/playwright-core/package.json ]; then
  (cd target/browser && npm install --no-audit --no-fund --silent 'playwright-core@1.65.1' >/dev/null)
fi
namespace="browser-$(date +%s%N)"
token="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
# Two free ports next to each other, clear of RabbitMQ's (25672 and up) and the ephemeral range.
free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 50); do
  port=$((20000 + RANDOM % 2000 * 2))
  metrics_port=$((port + 1))
  free "$port" && free "$metrics_port" && break
done
host="$(echo "$AMQP_URL" | sed -E 's#^amqps?://([^@/]*@)?([^:/]+).*#\2#')"
mgmt="http://$host:15672"
JOBS_NAMESPACE="$namespace" CONSUMER_HTTP_ADDR="127.0.0.1:$metrics_port" \
  "$bin/consumer" >target/tmp/browser-consumer.log 2>&1 &
consumer=$!
JOBS_NAMESPACE="$namespace" PRODUCER_TOKENS="$token" PRODUCER_LISTEN="127.0.0.1:$port" \
  PRODUCER_ACCEPT_KINDS="text.analyze" PRODUCER_MANAGEMENT_URL="$mgmt" \
  PRODUCER_CONSUMER_METRICS="http://127.0.0.1:$metrics_port/metrics" \
  "$bin/producer" serve >target/tmp/browser-serve.log 2>&1 &
serve=$!
cleanup() {
  kill "$serve" "$consumer" 2>/dev/null || true
  wait "$serve" "$consumer" 2>/dev/null || true
  scripts/delete-namespace.sh "$namespace"
}
trap cleanup EXIT
for _ in $(seq 150); do
  curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$port/readyz" >/dev/null
DASHBOARD_URL="http://127.0.0.1:$port" DASHBOARD_TOKEN="$token" NAMESPACE="$namespace" \
  MANAGEMENT_URL="$mgmt" \
  node scripts/browser-test.mjs
