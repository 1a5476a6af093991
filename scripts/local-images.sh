#!/usr/bin/env bash
# Makes Docker usable on a machine with no image registry (and possibly no running engine):
#   1. starts dockerd (Debian's docker.io) when no engine answers;
#   2. builds, without any registry:
#        local/debian:bookworm       a minimal Debian base, by debootstrap + docker import
#        local/debian:trixie         the same for trixie
#        local/rabbitmq:3-management Debian's rabbitmq-server (3.10), management + prometheus plugins
#        local/rabbitmq:4-management trixie's rabbitmq-server (4.0), the same plugins, every
#                                    deprecated feature denied
#        local/rust:host             the host's Rust toolchain on that base
#        local/prometheus:2          Debian's prometheus, for compose's monitoring profile
# Idempotent: an image that exists is kept (FORCE=1 rebuilds). Needs root.
# Prints the variables that point compose, the Dockerfile and the tests at these images;
# use it as:  eval "$(scripts/local-images.sh)"
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=local/debian:bookworm
TRIXIE_IMAGE=local/debian:trixie
RABBITMQ_IMAGE=local/rabbitmq:3-management
RABBITMQ4_IMAGE=local/rabbitmq:4-management
RUST_IMAGE=local/rust:host
PROMETHEUS_IMAGE=local/prometheus:2
log() { echo "local-images: $*" >&2; }
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}
have_image() { [ "${FORCE:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
# build_image IMAGE BASE CONTEXT [docker build args...]: builds CONTEXT on BASE unless IMAGE exists.
build_image() {
  local image=$1 base=$2 context=$3 t0=$SECONDS
  shift 3
  have_image "$image" && return 0
  log "building $image"
  docker build --quiet --network host --build-arg BASE_IMAGE="$base" "$@" \
    -t "$image" "$context" >/dev/null
  log "built $image in $((SECONDS - t0)) s"
}

# 1. The engine.
if ! command -v dockerd >/dev/null 2>&1; then
  log "installing docker.io"
  apt_install docker.io iptables
fi
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (log: /var/log/dockerd.log)"
  nohup dockerd --storage-driver overlay2 --exec-opt native.cgroupdriver=cgroupfs \
    >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { log "dockerd did not start:"; tail -n 30 /var/log/dockerd.log >&2; exit 1; }
fi

# 2a. Debian bases from the same mirror apt uses here.
debian_base() {  # SUITE IMAGE
  local suite=$1 image=$2 mirror root t0=$SECONDS
  have_image "$image" && return 0
  command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
  mirror=$(grep -rhoE '(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
           | awk '{print $2}' | head -n 1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  log "debootstrap $suite from $mirror"
  root=$(mktemp -d)
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import - "$image" >/dev/null
  rm -rf "$root"
  log "built $image in $((SECONDS - t0)) s"
}
debian_base bookworm "$BASE_IMAGE"
debian_base trixie "$TRIXIE_IMAGE"

# 2b. RabbitMQ: 3.10 from bookworm; 4.0 from trixie, with every deprecated feature denied
# (see docker/rabbitmq/Dockerfile).
build_image "$RABBITMQ_IMAGE" "$BASE_IMAGE" docker/rabbitmq
build_image "$RABBITMQ4_IMAGE" "$TRIXIE_IMAGE" docker/rabbitmq --build-arg DENY_DEPRECATED=1

# 2b'. Prometheus, for the monitoring profile.
build_image "$PROMETHEUS_IMAGE" "$BASE_IMAGE" docker/prometheus

# 2c. Rust builder from the host toolchain (docs left out).
if ! have_image "$RUST_IMAGE"; then
  t0=$SECONDS
  sysroot=$(rustc --print sysroot)
  stage=$(mktemp -d)
  log "building $RUST_IMAGE from $sysroot"
  mkdir "$stage/toolchain"
  cp -a "$sysroot"/bin "$sysroot"/lib "$stage/toolchain"/
  if [ -d "$sysroot/libexec" ]; then cp -a "$sysroot/libexec" "$stage/toolchain"/; fi
  rm -rf "$stage/toolchain/lib/rustlib/src" "$stage/toolchain/lib/rustlib/rustc-src"
  cp /etc/ssl/certs/ca-certificates.crt "$stage/ca-certificates.crt"
  cp docker/rust/Dockerfile "$stage/Dockerfile"
  docker build --quiet --network host --build-arg BASE_IMAGE="$BASE_IMAGE" \
    -t "$RUST_IMAGE" "$stage" >/dev/null
  rm -rf "$stage"
  log "built $RUST_IMAGE in $((SECONDS - t0)) s"
fi

log "ready: $BASE_IMAGE $TRIXIE_IMAGE $RABBITMQ_IMAGE $RABBITMQ4_IMAGE $PROMETHEUS_IMAGE $RUST_IMAGE"
cat <<VARS
export RABBITMQ_IMAGE=$RABBITMQ_IMAGE
export RABBITMQ4_IMAGE=$RABBITMQ4_IMAGE
export TEST_RABBITMQ_IMAGE=$RABBITMQ_IMAGE
export RUST_IMAGE=$RUST_IMAGE
export PROMETHEUS_IMAGE=$PROMETHEUS_IMAGE
export RUNTIME_IMAGE=$BASE_IMAGE
export BUILD_NETWORK=host
VARS
