# Multi-stage build of both binaries. Image names are build arguments so that machines
# without a registry can substitute locally built images.
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p producer -p consumer \
 && cp target/release/producer target/release/consumer /usr/local/bin/

FROM ${RUNTIME_IMAGE}
RUN useradd --system --no-create-home --shell /usr/sbin/nologin worker
COPY --from=build /usr/local/bin/producer /usr/local/bin/consumer /usr/local/bin/
USER worker
ENV LOG_FORMAT=json
CMD ["consumer"]
