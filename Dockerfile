# syntax=docker/dockerfile:1
#
# The `duet` binary in a small runtime image. One image runs every component:
#
#   docker run --rm duet:latest spec check
#   docker run --rm -e DUET_BROKERS=... -e DUET_REDIS=... duet:latest speed run
#
# The entrypoint is `duet`, so the container's command is the duet subcommand and its flags.
# See docker-compose.yml for a whole deployment and docs/operations.md for how to run it.

# --- build ---------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder

# rdkafka-sys compiles librdkafka from source (make and a C compiler, both in this image) and
# links the system zlib (zlib1g-dev, also in this image). Nothing else needs installing.
WORKDIR /src
COPY . .

# The cache mounts keep the crates.io registry and the target directory between builds
# (BuildKit); the binary is copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin duet \
    && install -m 0755 target/release/duet /usr/local/bin/duet

# --- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: TLS to S3 and other HTTPS endpoints (rustls with the system roots).
# curl: container health checks against /healthz.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

# An unprivileged user owning the working directory. /var/lib/duet/reports is where the
# compose `check` service writes consistency reports (a named volume mounted there inherits
# this ownership).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/duet --shell /usr/sbin/nologin duet \
    && mkdir -p /var/lib/duet/reports \
    && chown -R duet:duet /var/lib/duet

COPY --from=builder /usr/local/bin/duet /usr/local/bin/duet

USER duet
WORKDIR /var/lib/duet
ENV RUST_LOG=info

# 8080: `duet serve` (set DUET_LISTEN=0.0.0.0:8080; the built-in default is 127.0.0.1:8080).
# 9464: `duet speed run --admin` (set DUET_ADMIN=0.0.0.0:9464; no admin endpoint by default).
EXPOSE 8080 9464

ENTRYPOINT ["duet"]
CMD ["--help"]
