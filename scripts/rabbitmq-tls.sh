#!/usr/bin/env bash
# Starts a RabbitMQ node with a TLS listener on this host from Debian's package, next to the one
# of scripts/rabbitmq-local.sh (modelled on scripts/rabbitmq-node.sh): node tls@localhost, TLS
# (amqps) on port 5691, plaintext AMQP on 5692, no plugins. Makes its certificates with openssl
# first, into TLS_CERT_DIR (default /var/lib/rabbitmq-nodes/tls/certs; test-only keys, readable
# by everyone):
#   ca.pem, ca.key            the CA that signs the two below
#   server.pem, server.key    the node's certificate: SAN DNS:localhost, IP:127.0.0.1
#   client.pem, client.key    a client certificate (key: PKCS#8 PEM, "BEGIN PRIVATE KEY")
#   wrong-ca.pem, wrong-ca.key  an unrelated CA, for tests that must fail verification
# The listener asks for a client certificate and verifies it against ca.pem (verify_peer) but
# does not require one (fail_if_no_peer_cert = false): clients with and without a certificate
# connect, and log in with PLAIN (guest/guest) either way. TLS 1.2 and 1.3.
#
#   eval "$(scripts/rabbitmq-tls.sh)"   # exports TLS_AMQP_URL, TLS_PLAIN_PORT_URL (amqps aimed
#                                       # at the plaintext port, which must fail), TLS_CERT_DIR
#                                       # and TLS_RABBITMQ_NODE
#   scripts/rabbitmq-tls.sh stop
#
# Idempotent: does nothing if the node already runs; keeps the certificates while they are
# complete, verify and stay valid for another day (otherwise makes new ones, stopping the node
# first). Needs root (or sudo), like the Debian wrapper, which runs nodes as the `rabbitmq` user.
set -euo pipefail

name=tls
node="$name@localhost"
tls_port=5691
plain_port=5692
base="/var/lib/rabbitmq-nodes/$name"
cert_dir="${TLS_CERT_DIR:-$base/certs}"

log() { echo "rabbitmq-tls: $*" >&2; }
die() { log "$*"; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The OS pid of the node's VM (pid file, else the node itself), only if that process is a beam
# whose RABBITMQ_NODENAME is this node: a stale pid file never gets another process killed.
os_pid() {
  local pid
  pid=$(as_root cat "$base/pid" 2>/dev/null || true)
  if ! is_node_pid "$pid"; then
    pid=$(as_root timeout 15 rabbitmqctl -q -n "$node" eval 'os:getpid().' 2>/dev/null | tr -dc '0-9' || true)
    is_node_pid "$pid" || return 1
  fi
  echo "$pid"
}
is_node_pid() {
  [[ "$1" =~ ^[0-9]+$ ]] || return 1
  [[ "$(as_root readlink "/proc/$1/exe" 2>/dev/null || true)" == */beam.smp ]] || return 1
  as_root cat "/proc/$1/environ" 2>/dev/null | tr '\0' '\n' | grep -qx "RABBITMQ_NODENAME=$node"
}
wait_gone() { # pid seconds
  for _ in $(seq 1 $(($2 * 10))); do [ -d "/proc/$1" ] || return 0; sleep 0.1; done
  [ ! -d "/proc/$1" ]
}

stop_node() {
  local pid
  if ! pid=$(os_pid); then
    log "$node is not running"
    return 0
  fi
  log "stopping $node (pid $pid)"
  as_root timeout 60 rabbitmqctl -q -n "$node" stop >/dev/null 2>&1 || true
  if ! wait_gone "$pid" 30; then
    log "$node (pid $pid) still runs: SIGTERM"
    as_root kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" 15; then
      log "$node (pid $pid) still runs: SIGKILL"
      as_root kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid" 10 || die "$node (pid $pid) does not die"
    fi
  fi
  as_root rm -f "$base/pid"
}

# A TLS handshake with the listener that verifies its certificate against ca.pem.
tls_handshake_ok() {
  timeout 10 openssl s_client -connect "127.0.0.1:$tls_port" -servername localhost \
    -verify_hostname localhost -CAfile "$cert_dir/ca.pem" -verify_return_error -brief \
    </dev/null >/dev/null 2>&1
}

certs_ok() {
  local f
  for f in ca.pem ca.key server.pem server.key client.pem client.key wrong-ca.pem; do
    [ -s "$cert_dir/$f" ] || return 1
  done
  openssl verify -CAfile "$cert_dir/ca.pem" "$cert_dir/server.pem" "$cert_dir/client.pem" >/dev/null 2>&1 || return 1
  for f in ca.pem server.pem client.pem wrong-ca.pem; do
    openssl x509 -checkend 86400 -noout -in "$cert_dir/$f" >/dev/null 2>&1 || return 1
  done
}

# RSA 2048 keys in PKCS#8 PEM ("BEGIN PRIVATE KEY", openssl 3's default), X.509 v3 certificates
# with the extensions that strict verifiers (rustls/webpki) insist on: basicConstraints and
# keyUsage on the CAs, SANs and extendedKeyUsage on the leaves.
tmp=""
trap '[ -z "$tmp" ] || rm -rf "$tmp"' EXIT
new_key() { openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null; }
new_ca() { # name subject
  new_key "$tmp/$1.key"
  printf '%s\n' "[v3]" "basicConstraints=critical,CA:TRUE" "keyUsage=critical,keyCertSign,cRLSign" \
    "subjectKeyIdentifier=hash" >"$tmp/$1.cnf"
  openssl req -x509 -new -key "$tmp/$1.key" -out "$tmp/$1.pem" -days 3650 -sha256 -subj "$2" \
    -config "$tmp/$1.cnf" -extensions v3 2>/dev/null
}
new_leaf() { # name subject extensions...
  local name="$1" subject="$2"; shift 2
  new_key "$tmp/$name.key"
  openssl req -new -key "$tmp/$name.key" -out "$tmp/$name.csr" -subj "$subject" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "subjectKeyIdentifier=hash" \
    "authorityKeyIdentifier=keyid" "$@" >"$tmp/$name.ext"
  openssl x509 -req -in "$tmp/$name.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
    -set_serial "0x$(openssl rand -hex 15)" -days 825 -sha256 -extfile "$tmp/$name.ext" \
    -out "$tmp/$name.pem" 2>/dev/null
}
make_certs() {
  tmp=$(mktemp -d)
  new_ca ca "/CN=rabbitmq-tls test CA"
  new_ca wrong-ca "/CN=rabbitmq-tls unrelated CA"
  new_leaf server "/CN=localhost" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1"
  new_leaf client "/CN=rabbitmq-tls test client" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=clientAuth"
  openssl verify -CAfile "$tmp/ca.pem" "$tmp/server.pem" "$tmp/client.pem" >/dev/null \
    || die "the new certificates do not verify"
  as_root mkdir -p "$cert_dir"
  local f
  for f in ca.pem ca.key server.pem server.key client.pem client.key wrong-ca.pem wrong-ca.key; do
    as_root install -m 0644 "$tmp/$f" "$cert_dir/$f"
  done
  as_root chmod 0755 "$cert_dir"
  rm -rf "$tmp"; tmp=""
}

start_node() {
  as_root mkdir -p "$base/mnesia" "$base/log"
  echo "[]." | as_root tee "$base/plugins" >/dev/null
  as_root tee "$base/rabbitmq.conf" >/dev/null <<EOF
loopback_users.guest = false
listeners.tcp.default = $plain_port
listeners.ssl.default = $tls_port
ssl_options.cacertfile = $cert_dir/ca.pem
ssl_options.certfile = $cert_dir/server.pem
ssl_options.keyfile = $cert_dir/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
EOF
  as_root chown rabbitmq:rabbitmq "$base" "$base/mnesia" "$base/log" "$base/plugins" "$base/rabbitmq.conf"
  as_root chown -R rabbitmq:rabbitmq "$base/mnesia" "$base/log"
  # Open files: as scripts/rabbitmq-local.sh explains.
  if [ ! -f /etc/security/limits.d/rabbitmq.conf ]; then
    local n; n=$(ulimit -Hn); if [ "$n" = unlimited ] || [ "$n" -gt 65536 ]; then n=65536; fi
    printf 'rabbitmq soft nofile %s\nrabbitmq hard nofile %s\n' "$n" "$n" \
      | as_root tee /etc/security/limits.d/rabbitmq.conf >/dev/null
  fi
  as_root rm -f "$base/pid" # left behind by a VM that was killed
  as_root env RABBITMQ_NODENAME="$node" RABBITMQ_NODE_PORT="$plain_port" \
    RABBITMQ_DIST_PORT="$((plain_port + 20000))" RABBITMQ_MNESIA_BASE="$base/mnesia" \
    RABBITMQ_LOG_BASE="$base/log" RABBITMQ_ENABLED_PLUGINS_FILE="$base/plugins" \
    RABBITMQ_CONFIG_FILE="$base/rabbitmq" RABBITMQ_PID_FILE="$base/pid" \
    rabbitmq-server -detached </dev/null >&2
  # await_startup fails at once until the node has registered, so ask until it answers.
  local started=false end=$((SECONDS + 180))
  while [ "$SECONDS" -lt "$end" ]; do
    if as_root rabbitmqctl -q -n "$node" await_startup --timeout 60 >/dev/null 2>&1; then started=true; break; fi
    sleep 1
  done
  if [ "$started" != true ]; then
    log "$node did not start; its logs:"
    as_root sh -c "tail -n 50 $base/log/*.log" >&2 || true
    exit 1
  fi
}

cmd_start() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "installing rabbitmq-server from Debian"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
  fi
  command -v openssl >/dev/null 2>&1 || die "openssl is needed"
  if ! certs_ok; then
    if os_pid >/dev/null; then log "certificates missing or stale: restarting $node"; stop_node; fi
    log "making certificates in $cert_dir"
    make_certs
  fi
  if os_pid >/dev/null && port_open "$plain_port" && port_open "$tls_port" \
    && grep -qx "ssl_options.cacertfile = $cert_dir/ca.pem" "$base/rabbitmq.conf" 2>/dev/null; then
    log "$node already running"
  else
    if os_pid >/dev/null; then stop_node; fi
    log "starting $node: TLS on $tls_port, plaintext on $plain_port"
    start_node
  fi
  for _ in $(seq 1 100); do port_open "$tls_port" && port_open "$plain_port" && break; sleep 0.1; done
  port_open "$tls_port" || die "port $tls_port is not accepting connections"
  port_open "$plain_port" || die "port $plain_port is not accepting connections"
  tls_handshake_ok || die "no verified TLS handshake on port $tls_port (see $base/log)"
  log "ready"
  echo "export TLS_AMQP_URL=amqps://guest:guest@localhost:$tls_port/%2f"
  echo "export TLS_PLAIN_PORT_URL=amqps://guest:guest@localhost:$plain_port/%2f"
  echo "export TLS_CERT_DIR=$cert_dir"
  echo "export TLS_RABBITMQ_NODE=$node"
}

case "${1:-start}" in
  start) cmd_start ;;
  stop) stop_node; log "stopped" ;;
  *) die "usage: $0 [start|stop]" ;;
esac
