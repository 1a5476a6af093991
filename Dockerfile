# Multi-stage build of both binaries. Image names are build arguments so that machines
# without a registry can substitute locally built ones (scripts/local-images.sh).
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Dependencies first, against stub sources, so that a source change reuses this layer.
COPY Cargo.toml Cargo.lock ./
COPY shared/Cargo.toml shared/
COPY producer/Cargo.toml producer/
COPY consumer/Cargo.toml consumer/
COPY tests/Cargo.toml tests/
COPY bench/Cargo.toml bench/
COPY workspace-hack/ workspace-hack/
RUN for crate in shared producer consumer tests; do \
      mkdir -p $crate/src && echo '//! stub' > $crate/src/lib.rs; \
    done \
 && echo 'fn main() {}' > producer/src/main.rs && echo 'fn main() {}' > consumer/src/main.rs \
 && mkdir -p bench/src && echo 'fn main() {}' > bench/src/main.rs \
 && mkdir -p consumer/examples && echo 'fn main() {}' > consumer/examples/workflow.rs \
 && cargo build --release --locked -p producer -p consumer \
 && rm -rf shared producer consumer tests bench
COPY . .
# The image ships stripped binaries (about 12 MB each instead of about 75 MB with line
# tables); the unstripped ones, for symbolizing a crash report, stay in this build stage
# (`docker build --target build`, then /src/target/release/).
RUN touch shared/src/lib.rs producer/src/lib.rs consumer/src/lib.rs \
 && cargo build --release --locked -p producer -p consumer \
 && cp target/release/producer target/release/consumer /usr/local/bin/ \
 && strip /usr/local/bin/producer /usr/local/bin/consumer

FROM ${RUNTIME_IMAGE}
RUN useradd --system --no-create-home --shell /usr/sbin/nologin worker
COPY --from=build /usr/local/bin/producer /usr/local/bin/consumer /usr/local/bin/
USER worker
ENV LOG_FORMAT=json
CMD ["consumer"]
