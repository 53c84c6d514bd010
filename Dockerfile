# userpilot-heap-relay container image.
#
#   docker build -t userpilot-heap-relay --build-arg USERPILOT_HEAP_RELAY_COMMIT="$(git rev-parse --short HEAD)" .
#   docker run -e RELAY_USERPILOT__SECRETS=... -e RELAY_HEAP__APP_ID=... \
#       -p 8080:8080 -v relay-data:/var/lib/relay userpilot-heap-relay
#
# Configuration comes from environment variables only (RELAY_<SECTION>__<KEY>, every key listed
# in config/default.toml, whose defaults are built into the binary). docker-compose.yml and
# deploy/kubernetes/ show every variable.

ARG RUST_VERSION=1.95

# --- build -------------------------------------------------------------------------------------
# Bookworm, to match the glibc of the distroless cc-debian12 runtime below. The slim image has
# gcc and libc headers, which is all the C code (bundled SQLite, ring's few C and assembly files)
# needs.
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src

# Dependencies first, built against a stub crate: this layer is reused until Cargo.toml or
# Cargo.lock change, so editing the relay's code recompiles only the relay.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The commit the image is built from, for the metric relay_build_info{commit} (the build
# context has no .git):  docker build --build-arg USERPILOT_HEAP_RELAY_COMMIT="$(git rev-parse --short HEAD)" .
# Declared here, after the dependency layer, so a new commit does not rebuild the dependencies.
ARG USERPILOT_HEAP_RELAY_COMMIT=unknown

# The real sources. `touch` makes them newer than the stub's build, whatever timestamps the
# build context carried, so cargo cannot mistake the stub binary for an up-to-date one.
# config/, templates/ and assets/ are needed at compile time: the binary embeds
# config/default.toml, the console's templates and its stylesheet and script.
COPY src ./src
COPY config ./config
COPY templates ./templates
COPY assets ./assets
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && mkdir -p /out/var/lib/relay \
    && cp target/release/userpilot-heap-relay /out/userpilot-heap-relay

# --- runtime -----------------------------------------------------------------------------------
# Distroless: glibc, CA certificates (for Heap's HTTPS) and tzdata; no shell, no package manager.
# The :nonroot tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="userpilot-heap-relay" \
      org.opencontainers.image.description="Relays signed Userpilot webhooks to Heap, durably."

COPY --from=build /out/userpilot-heap-relay /usr/local/bin/userpilot-heap-relay
# The queue's folder, owned by the runtime user: a named volume mounted here starts as a copy
# of it, ownership included, so the relay can create its SQLite file. (Kubernetes volumes get
# their ownership from the pod's fsGroup instead: see deploy/kubernetes/deployment.yaml.)
COPY --from=build --chown=65532:65532 /out/var/lib/relay /var/lib/relay

# The SQLite queue lives on the volume; the default (data/relay.sqlite3) is relative to the
# working directory, which is not writable here.
ENV RELAY_QUEUE__PATH=/var/lib/relay/relay.sqlite3
VOLUME ["/var/lib/relay"]
WORKDIR /var/lib/relay
USER 65532:65532

# 8080: server.listen — the webhook, /healthz and /readyz.
# 9090: server.admin_listen — /metrics and /admin/*. Its default, 127.0.0.1:9090, is reachable
# only from inside the container, which is the safe default for a bare `docker run`. The
# compose file and the Kubernetes manifests set RELAY_SERVER__ADMIN_LISTEN=0.0.0.0:9090 so that
# Prometheus and operators can reach it over the private network; they never publish it.
EXPOSE 8080 9090

# No curl in this image: the relay checks itself (exit 0 only when /readyz answers 200).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/userpilot-heap-relay", "healthcheck"]

# SIGTERM starts a graceful drain of at most server.shutdown_grace_ms (default 10 s): give the
# container longer than that before SIGKILL (`docker stop -t 30`, compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/userpilot-heap-relay"]
CMD ["serve"]
