#!/usr/bin/env bash
# The 1-hop path (and the 2-hop path's two sidecars) in instructions per request (valgrind's callgrind: repeatable on a busy
# machine, unlike CPU time): Trellis's inbound listener in permissive mode against the two bare
# hyper proxies of proxy/examples/hyper_floor.rs, all in front of the same nginx backend, each
# sent the same N sequential GETs on one keep-alive connection. User-space instructions only:
# the kernel's share (the same syscalls for all three, docs/performance.md) is not counted.
# docs/performance.md, "Instructions per request on the 1-hop path".
#
#   bash bench/hop_callgrind.sh   # BENCH_REQUESTS (2000), BENCH_PORT_BASE (28800),
#                                 # BENCH_SKIP_BUILD=1, BENCH_CALLGRIND_KEEP=DIR (keep the
#                                 # profiles for callgrind_annotate)
#
# Profiles with source lines: build with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
# (and CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 for a quick build).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
N="${BENCH_REQUESTS:-2000}"
BASE="${BENCH_PORT_BASE:-28800}"
KEEP="${BENCH_CALLGRIND_KEEP:-}"
bench_init hop-callgrind
need valgrind callgrind_control nginx python3 curl
build_release
FLOOR="$TARGET/release/examples/hyper_floor"
if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release --locked --example hyper_floor -p trellis-proxy) \
        >>"$D/build.log" 2>&1 || { tail -20 "$D/build.log"; die "build failed"; }
fi

BACKEND=$BASE; S_IN=$((BASE + 1)); S_OUT=$((BASE + 2)); S_ADM=$((BASE + 3)); P=$((BASE + 4))
start_backend "$BACKEND"
wait_http backend "http://127.0.0.1:$BACKEND/"
mkdir -p "$D/certs"
backend_sidecar_config
echo "services: {}" >"$D/mesh.yaml"

# COUNT GETs on one keep-alive connection to PORT.
load() { # PORT COUNT
    python3 - "$1" "$2" <<'PY'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for i in range(n):
    c.request("GET", "/bench", headers={"Host": "backend"})
    r = c.getresponse(); r.read()
    if r.status != 200:
        sys.exit(f"request {i}: {r.status}")
PY
}

# Instructions per request of `CMD...` listening on PORT, over N requests after a warm-up.
measure() { # NAME PORT CMD...
    local name="$1" port="$2"; shift 2
    valgrind --tool=callgrind --callgrind-out-file="$D/cg.$name.%p" "$@" 2>"$D/$name.log" &
    local pid=$!
    for _ in $(seq 600); do curl -sf -o /dev/null -m 2 -H 'Host: backend' "http://127.0.0.1:$port/warm" && break; sleep 0.2; done
    load "$port" 200
    # A sidecar trims its startup pages 2 s after turning ready (mesh-agent/src/trim.rs): a
    # one-time cost, kept out of the count.
    sleep 4
    callgrind_control -z "$pid" >/dev/null 2>&1
    load "$port" "$N"
    callgrind_control -d "$pid" >/dev/null 2>&1
    local ir out
    out=$(ls -t "$D"/cg."$name".*.* | head -1)
    ir=$(awk '/^(summary|totals):/ { if ($2 > t) t = $2 } END { print t + 0 }' "$out")
    [[ -n "$KEEP" ]] && mkdir -p "$KEEP" && cp "$out" "$KEEP/$name.out"
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    rm -f "$D"/cg."$name".*
    echo $((ir / N))
}

trellis=$(TRELLIS_WORKERS=1 RUST_LOG=warn measure trellis "$S_IN" "$AGENT" run --config "$D/sidecar.yaml")
paired=$(measure paired "$P" "$FLOOR" "127.0.0.1:$P" "127.0.0.1:$BACKEND" paired)
pooled=$(measure pooled "$P" "$FLOOR" "127.0.0.1:$P" "127.0.0.1:$BACKEND" pooled)

# The client side of the 2-hop path: sidecar A (HTTP/1.1 from the app, HTTP/2 over mTLS to B)
# under callgrind, sidecar B (the configuration above) running normally.
A_IN=$((BASE + 5)); A_OUT=$((BASE + 6)); A_ADM=$((BASE + 7))
"$AGENT" cert issue --service client --dir "$D/certs" >/dev/null
cat >"$D/mesh.yaml" <<CONF
services:
  backend:
    endpoints:
      - address: 127.0.0.1:$S_IN
CONF
cat >"$D/sidecar-a.yaml" <<CONF
service: client
trust_domain: bench.local
identity: {cert: $D/certs/client.pem, key: $D/certs/client-key.pem, bundle: $D/certs/ca.pem}
inbound: {listen: 127.0.0.1:$A_IN, app: 127.0.0.1:$BACKEND, app_protocol: http1}
outbound: {listen: 127.0.0.1:$A_OUT}
admin: {listen: 127.0.0.1:$A_ADM}
store: {file: $D/mesh.yaml}
tracing: {enabled: false}
CONF
TRELLIS_WORKERS=1 RUST_LOG=warn "$AGENT" run --config "$D/sidecar.yaml" >"$D/b.log" 2>&1 &
B_PID=$!
wait_http "sidecar B" "http://127.0.0.1:$S_ADM/ready"
outbound=$(TRELLIS_WORKERS=1 RUST_LOG=warn measure outbound "$A_OUT" "$AGENT" run --config "$D/sidecar-a.yaml")
kill -TERM "$B_PID"; wait "$B_PID" 2>/dev/null || true

# The server side of the 2-hop path: sidecar B (HTTP/2 over mTLS in, HTTP/1.1 to the app)
# under callgrind, sidecar A running normally, the same requests sent to A.
TRELLIS_WORKERS=1 RUST_LOG=warn "$AGENT" run --config "$D/sidecar-a.yaml" >"$D/a.log" 2>&1 &
A_PID=$!
wait_http "sidecar A" "http://127.0.0.1:$A_ADM/ready"
server=$(TRELLIS_WORKERS=1 RUST_LOG=warn measure server "$A_OUT" "$AGENT" run --config "$D/sidecar.yaml")
kill -TERM "$A_PID"; wait "$A_PID" 2>/dev/null || true

echo "1-hop path, user-space instructions per request (callgrind, $N sequential GETs on one keep-alive connection); $(date -u '+%Y-%m-%d %H:%M UTC'); Trellis $(git -C "$ROOT" rev-parse --short HEAD)"
echo "| proxy | instructions/request | vs paired floor |"
echo "|---|---:|---:|"
for row in "hyper floor, paired connections:$paired" "hyper floor, pooled client:$pooled" "Trellis inbound, permissive (one worker):$trellis"; do
    awk -v n="${row%%:*}" -v v="${row##*:}" -v b="$paired" 'BEGIN { printf "| %s | %d | %.2fx |\n", n, v, v / b }'
done
echo
echo "2-hop path, client side: Trellis outbound (sidecar A: HTTP/1.1 in, HTTP/2 + mTLS out to sidecar B), same requests: $outbound instructions/request"
echo "2-hop path, server side: Trellis inbound (sidecar B: HTTP/2 + mTLS in, HTTP/1.1 to the app), same requests: $server instructions/request"

