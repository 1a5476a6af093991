#!/usr/bin/env bash
# Deletes everything of one namespace on a broker: every queue and every exchange whose name
# starts with "NAMESPACE." (the names of shared::topology), through the management API, so
# that a demo, a script or a test run leaves nothing behind.
#
#   scripts/delete-namespace.sh NAMESPACE
#   scripts/delete-namespace.sh --prefix test-      # every namespace starting with "test-"
#   RABBITMQ_MANAGEMENT_URL=https://user:password@rabbit:15671 RABBITMQ_VHOST=jobs \
#     scripts/delete-namespace.sh demo
#
# RABBITMQ_MANAGEMENT_URL defaults to http://guest:guest@127.0.0.1:15672, RABBITMQ_VHOST to /.
# Prints how many queues and exchanges it deleted. Never fails: a cleanup must not fail a run.
set -uo pipefail
mode=exact
if [ "${1:-}" = "--prefix" ]; then mode=prefix; shift; fi
namespace="${1:-}"
if [ -z "$namespace" ] || { [ "$mode" = exact ] && [ "$namespace" = . ]; }; then
  echo "delete-namespace: refusing an empty namespace" >&2; exit 0
fi
MODE="$mode" NAMESPACE="$namespace" timeout 300 python3 - <<'PY' || echo "delete-namespace: $namespace: cleanup failed (ignored)" >&2
import base64, json, os, sys, urllib.parse, urllib.request

url = urllib.parse.urlsplit(os.environ.get("RABBITMQ_MANAGEMENT_URL") or "http://guest:guest@127.0.0.1:15672")
user = urllib.parse.unquote(url.username or "guest")
password = urllib.parse.unquote(url.password or "guest")
host = f"[{url.hostname}]" if url.hostname and ":" in url.hostname else url.hostname
base = f"{url.scheme}://{host}:{url.port or (15671 if url.scheme == 'https' else 15672)}{url.path.rstrip('/')}"
vhost = urllib.parse.quote(os.environ.get("RABBITMQ_VHOST", "/"), safe="")
prefix = os.environ["NAMESPACE"] + ("." if os.environ["MODE"] == "exact" else "")
auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

def call(method, path):
    request = urllib.request.Request(base + path, method=method, headers={"authorization": auth})
    with opener.open(request, timeout=30) as answer:
        return answer.read()

deleted = {}
for kind in ("queues", "exchanges"):
    names = [x["name"] for x in json.loads(call("GET", f"/api/{kind}/{vhost}?columns=name"))]
    deleted[kind] = 0
    for name in names:
        if name.startswith(prefix):
            try:
                call("DELETE", f"/api/{kind}/{vhost}/{urllib.parse.quote(name, safe='')}")
                deleted[kind] += 1
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    print(f"delete-namespace: {name}: {e}", file=sys.stderr)
            except Exception as e:  # a timeout or a lost connection: go on with the others
                print(f"delete-namespace: {name}: {e}", file=sys.stderr)
print(f"delete-namespace: {prefix}*: {deleted['queues']} queues and {deleted['exchanges']} exchanges deleted", file=sys.stderr)
PY
exit 0
