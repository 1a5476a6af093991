#!/usr/bin/env bash
# Fuzzes the running HTTP ingest API (`producer serve`) with schemathesis against its own
# OpenAPI document (/openapi.json), on the broker in AMQP_URL, for a bounded number of cases:
# no 5xx other than the documented 503, no request without an answer, the server still up at
# the end, and every message that reached the jobs exchange a valid job. Uses the Python venv
# of scripts/python-client.sh (target/py-venv) and the producer in BIN_DIR (default target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${AMQP_URL:?set AMQP_URL}"
venv=target/py-venv
[ -x "$venv/bin/python" ] || { python3 -m venv "$venv"; "$venv/bin/pip" install --quiet './clients/python'; }
"$venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis>=4,<5'
examples="${FUZZ_EXAMPLES:-60}"
namespace="fuzz-$(date +%s%N)"
token="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
port=$((20000 + RANDOM % 20000))
log=target/tmp/api-fuzz-serve.log
mkdir -p target/tmp
JOBS_NAMESPACE="$namespace" PRODUCER_TOKENS="$token" PRODUCER_LISTEN="127.0.0.1:$port" \
  PRODUCER_ACCEPT_KINDS="text.analyze,fuzz.kind" "${BIN_DIR:-target/release}/producer" serve >"$log" 2>&1 &
serve=$!
cleanup() {
  kill "$serve" 2>/dev/null || true
  scripts/delete-namespace.sh "$namespace"
}
trap cleanup EXIT
for _ in $(seq 100); do
  curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
# Everything published to the jobs exchange is captured, to be checked afterwards.
"$venv/bin/python" - "$namespace" <<'PY'
import asyncio, os, sys
import aio_pika
async def main(ns):
    conn = await aio_pika.connect(os.environ["AMQP_URL"])
    ch = await conn.channel()
    q = await ch.declare_queue(f"{ns}.fuzz.capture", durable=True, arguments={"x-queue-type": "classic"})
    await q.bind(f"{ns}.jobs", routing_key="#")
    await conn.close()
asyncio.run(main(sys.argv[1]))
PY
status=0
"$venv/bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" \
  -H "Authorization: Bearer $token" --max-examples "$examples" --request-timeout 20 \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  || status=$?
kill -0 "$serve" || { echo "api-fuzz: producer serve died"; tail -20 "$log"; exit 1; }
"$venv/bin/python" - "$namespace" <<'PY'
import asyncio, json, os, sys
import aio_pika
from queue_worker import Job
from queue_worker.topology import check_kind
async def main(ns):
    conn = await aio_pika.connect(os.environ["AMQP_URL"])
    ch = await conn.channel()
    q = await ch.get_queue(f"{ns}.fuzz.capture")
    n = bad = 0
    while (m := await q.get(fail=False, no_ack=True)) is not None:
        n += 1
        try:
            job = Job.from_json(m.body)
            check_kind(job.kind)
            assert str(job.id) == m.message_id, "message_id is not the job id"
        except Exception as e:  # noqa: BLE001
            bad += 1
            print(f"api-fuzz: invalid job reached the broker: {e}: {m.body[:200]!r}")
    await conn.close()
    print(f"api-fuzz: {n} jobs reached the jobs exchange, {bad} invalid")
    sys.exit(1 if bad else 0)
asyncio.run(main(sys.argv[1]))
PY
exit "$status"
