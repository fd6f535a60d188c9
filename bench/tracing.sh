#!/usr/bin/env bash
# Tracing overhead on the two-hop path (client -> sidecar A -> mTLS -> sidecar B -> nginx) at a
# fixed rate: p50/p99 with tracing off, and sampling 0 %, 1 % and 100 % exporting to an OTLP
# sink (a stand-in for Jaeger), all in one run; deltas are against tracing off.
#
#   bash bench/tracing.sh      # BENCH_SECONDS (10), BENCH_RATE (1000), BENCH_PORT_BASE (28300)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SECS="${BENCH_SECONDS:-10}"
RATE="${BENCH_RATE:-1000}"
BASE="${BENCH_PORT_BASE:-28300}"
bench_init tracing
need oha nginx jq curl
build_release
(cd "$ROOT" && cargo build --release --locked -p trellis-tests --example otlp_sink) >>"$D/build.log" 2>&1 ||
    { tail -20 "$D/build.log"; die "build failed"; }
"$ROOT/target/release/examples/otlp_sink" >"$D/sink.addr" &
PIDS+=($!)

B=$BASE; BACKEND=$((B)); B_IN=$((B + 1)); B_OUT=$((B + 2)); B_ADM=$((B + 3))
A_IN=$((B + 4)); A_OUT=$((B + 5)); A_ADM=$((B + 6))
"$AGENT" cert init --trust-domain bench.local --dir "$D/certs" >/dev/null
for s in client backend; do "$AGENT" cert issue --service "$s" --dir "$D/certs" >/dev/null; done

start_backend "$BACKEND"

for _ in $(seq 50); do [[ -s "$D/sink.addr" ]] && break; sleep 0.1; done
SINK="$(cat "$D/sink.addr")"
[[ -n "$SINK" ]] || die "the OTLP sink did not start"
printf 'services:\n  backend:\n    endpoints:\n      - address: 127.0.0.1:%s\n' "$B_IN" >"$D/mesh.yaml"

sidecar_config() { # SERVICE IN OUT ADMIN TRACING-BLOCK
    cat <<CONF
service: $1
trust_domain: bench.local
identity: {cert: $D/certs/$1.pem, key: $D/certs/$1-key.pem, bundle: $D/certs/ca.pem}
inbound: {listen: 127.0.0.1:$2, mode: permissive, app: 127.0.0.1:$BACKEND, app_protocol: http1}
outbound: {listen: 127.0.0.1:$3}
admin: {listen: 127.0.0.1:$4}
store: {file: $D/mesh.yaml}
tracing: $5
CONF
}

declare -A P50 P99 EXPORTED
run_mode() { # NAME TRACING-BLOCK
    local name="$1" block="$2"
    sidecar_config backend "$B_IN" "$B_OUT" "$B_ADM" "$block" >"$D/b.yaml"
    sidecar_config client "$A_IN" "$A_OUT" "$A_ADM" "$block" >"$D/a.yaml"
    RUST_LOG=warn taskset -c 1 "$AGENT" run --config "$D/b.yaml" 2>"$D/b-$name.log" & local pb=$!
    RUST_LOG=warn taskset -c 1 "$AGENT" run --config "$D/a.yaml" 2>"$D/a-$name.log" & local pa=$!
    wait_http "mesh ($name)" -H 'Host: backend' "http://127.0.0.1:$A_OUT/"
    local p50 p99
    read -r p50 p99 < <(fixed_rate "$name" -H 'Host: backend' "http://127.0.0.1:$A_OUT/")
    P50[$name]=$p50
    P99[$name]=$p99
    sleep 3 # one more export interval
    EXPORTED[$name]=$(curl -s "http://127.0.0.1:$A_ADM/metrics" "http://127.0.0.1:$B_ADM/metrics" |
        awk '/^trellis_trace_spans_exported_total/ { s += $2 } END { print s + 0 }')
    kill -TERM "$pa" "$pb"; wait "$pa" "$pb" 2>/dev/null || true
}

run_mode off "{enabled: false}"
run_mode s0 "{endpoint: '$SINK', sampling: 0.0}"
run_mode s1 "{endpoint: '$SINK', sampling: 0.01}"
run_mode s100 "{endpoint: '$SINK', sampling: 1.0}"

echo "Two-hop path at $RATE req/s for ${SECS}s each (oha, open loop, latency-corrected); $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "| tracing | p50 ms | p99 ms | p99 delta vs off | spans exported |"
echo "|---|---:|---:|---:|---:|"
for m in off s0 s1 s100; do
    label=$(case $m in off) echo off;; s0) echo "sampling 0 %";; s1) echo "sampling 1 %";; s100) echo "sampling 100 %";; esac)
    delta=$(awk -v a="${P99[$m]}" -v b="${P99[off]}" 'BEGIN { printf "%+.3f ms", a - b }')
    printf '| %s | %.3f | %.3f | %s | %s |\n' "$label" "${P50[$m]}" "${P99[$m]}" "$delta" "${EXPORTED[$m]}"
done
