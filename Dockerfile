# syntax=docker/dockerfile:1
# wsgate: build with the Rust toolchain, run from a slim Debian as a non-root
# user. Configuration is by WSGATE_* environment variables only (README,
# "Configuration"); nothing is baked in but the listen address.
#
#   docker build -t wsgate .
#   docker run --rm -p 8080:8080 -e WSGATE_REDIS_URL=redis://redis:6379 wsgate

# ---- build ------------------------------------------------------------------
# Same Debian release as the runtime stage, so the binary's glibc matches.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# --locked: exactly the versions of Cargo.lock, or fail. The cache mounts keep
# the crate registry and target/ between builds (BuildKit); the binary is
# copied out of the cached target/ so the next stage can COPY it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/wsgate /out/wsgate

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
# A fixed numeric UID/GID so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 wsgate \
    && useradd --system --uid 10001 --gid wsgate --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin wsgate
COPY --from=build /out/wsgate /usr/local/bin/wsgate
USER 10001:10001
# The default is 0.0.0.0:8080 already; stated so the image documents its port.
ENV WSGATE_LISTEN=0.0.0.0:8080
EXPOSE 8080
# SIGTERM drains: /readyz 503 at once, sockets closed with 1012 spread over
# WSGATE_DRAIN_WINDOW_MS, exit 0. Give the container at least the window plus
# WSGATE_SHUTDOWN_TIMEOUT_MS to stop (compose stop_grace_period, Kubernetes
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/wsgate"]
