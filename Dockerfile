# syntax=docker/dockerfile:1
# Build: docker build -t trellis/mesh-agent .
# Run:   docker run --rm -v $PWD/certs:/etc/trellis/certs -v $PWD/sidecar.yaml:/etc/trellis/sidecar.yaml \
#          -p 15006:15006 trellis/mesh-agent

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p mesh-agent && strip target/release/mesh-agent

FROM debian:bookworm-slim
RUN useradd --system --uid 1337 --no-create-home trellis
COPY --from=build /src/target/release/mesh-agent /usr/local/bin/mesh-agent
USER 1337
ENV TRELLIS_CONFIG=/etc/trellis/sidecar.yaml
EXPOSE 15001 15006 15000
HEALTHCHECK --interval=5s --timeout=2s CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/15000 && printf 'GET /ready HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ' 200 ' <&3"]
ENTRYPOINT ["/usr/local/bin/mesh-agent"]
CMD ["run"]
