# syntax=docker/dockerfile:1
#
# The Trellis sidecar image: the mesh-agent binary alone on distroless (glibc, no shell, no
# package manager), running as uid 1337 (the uid `mesh-agent iptables install` exempts).
#
# Build:  docker build -t trellis/mesh-agent:0.1.0 .
#         docker build --target init -t trellis/mesh-agent-init:0.1.0 .   # + iptables, for the init container
# Run:    docker run --rm -p 15006:15006 \
#           -v $PWD/sidecar.yaml:/etc/trellis/sidecar.yaml:ro -v $PWD/certs:/etc/trellis/certs:ro \
#           trellis/mesh-agent:0.1.0
#         (the config points at /etc/trellis/certs/...; the admin API stays on the container's
#         loopback: `docker exec <id> mesh-agent wait-ready` or the HEALTHCHECK below use it)
#
# No container engine on the development machines: `bash tests/packaging/check-image.sh` builds
# the binary the way the build stage does and checks what the runtime stage assumes.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
# protoc: etcd-client's build script compiles its .proto files.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler=3.21.* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# PGO_PROFILE: ship the profile-guided build (docs/performance.md, "Profile-guided build"). The
# profile comes from `bash bench/pgo.sh` on the same commit and the same Rust version, copied into
# the build context (target/ is not part of it), e.g.
#   cp target/pgo-gen/merged-*.profdata pgo.profdata
#   docker build --build-arg PGO_PROFILE=pgo.profdata -t trellis/mesh-agent:0.1.0 .
# Empty (the default): the plain release build. A profile that is missing fails the build.
ARG PGO_PROFILE=""
# --locked: exactly the committed Cargo.lock. The cache mounts keep the registry and the target
# directory between builds; the binary is copied out of the mount in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    if [ -n "$PGO_PROFILE" ]; then \
        test -f "/src/$PGO_PROFILE" || { echo "PGO_PROFILE: no file $PGO_PROFILE in the build context" >&2; exit 1; }; \
        export RUSTFLAGS="-Cprofile-use=/src/$PGO_PROFILE"; \
    fi \
    && cargo build --release --locked -p mesh-agent \
    && install -D -m 0755 target/release/mesh-agent /out/mesh-agent \
    && mkdir -p /out/etc/trellis/certs

# The init container for transparent interception (examples/kubernetes/deployment.yaml): the
# same binary plus iptables, run as root with NET_ADMIN before the sidecar starts.
FROM debian:bookworm-slim AS init
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables=1.8.* \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/mesh-agent /usr/local/bin/mesh-agent
ENTRYPOINT ["/usr/local/bin/mesh-agent"]
CMD ["iptables", "install"]

# The sidecar (the default target: last stage).
FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=build /out/mesh-agent /usr/local/bin/mesh-agent
# An empty /etc/trellis/certs owned by the sidecar's user: a named volume mounted there starts
# with this ownership, so setup jobs (`mesh-agent cert init|issue --dir /etc/trellis/certs`) can
# write to it as uid 1337. Bind mounts keep their own ownership.
COPY --from=build --chown=1337:1337 /out/etc/trellis /etc/trellis
USER 1337:1337
ENV TRELLIS_CONFIG=/etc/trellis/sidecar.yaml \
    TRELLIS_LOG_FORMAT=json
# 15006 inbound mTLS (published); 15001 outbound and 15000 admin listen on loopback by default.
EXPOSE 15006 15001 15000
# No shell in the image: the binary probes its own /ready (exit 0 ready, 1 not ready).
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/mesh-agent", "wait-ready", "--timeout", "2s"]
# SIGTERM drains (deregister, stop accepting inbound, finish in-flight within
# drain.grace_period) and exits 0: give `docker stop` a longer timeout than the grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/mesh-agent"]
CMD ["run"]
