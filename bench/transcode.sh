#!/usr/bin/env bash
# gRPC-JSON transcoding under load (docs/composition.md#transcoding-under-load): what the ingress
# spends per request on (b) a JSON POST transcoded to a gRPC call and (c) a GET with path
# variables and query parameters, against (a) the same method called in gRPC through the same
# ingress, rule and service. One run, one ingress process, one route:
#   (a) grpc  POST /test.Echo/Create, application/grpc, the 1 kB `Item` as protobuf (passes as is)
#   (b) post  POST /v1/shelves/s1/items, the same `Item` as JSON (-> Create, and back to JSON)
#   (c) get   GET /v1/shelves/s1/items/42?title=hello&tags=a&tags=b&draft=true (-> Say)
# Real etcd (the route stored with `policy apply`), the ingress's plain listener in HTTP/2
# (h2c, prior knowledge: TLS would cost the three the same), mTLS to the service's sidecar
# (app_protocol h2c), and a gRPC echo service answering each call with its message
# (proxy/examples/transcode_load.rs, which is also the load client: every request on
# BENCH_CONNS HTTP/2 connections opened once, every answer checked). Load on core 0; the
# ingress, the sidecar, the service and etcd on core 1.
#
# Each round measures, for grpc, post and get in turn (alternating, so that a load change on
# the shared machine hits all three):
#   - closed loop: BENCH_REQUESTS requests, BENCH_CONCURRENCY in flight -> req/s, and the
#     ingress's CPU per request (its threads' run time from /proc/PID/task/*/schedstat, in ns,
#     over exactly those requests; the sidecar's too);
#   - open loop: BENCH_RATE req/s for BENCH_SECONDS s -> p50/p99 latency from each request's
#     scheduled start (so a stall counts for every request it delays);
#   - the TCP connections the ingress held from the load client during the measurement
#     (`ss`, sampled every 0.2 s, distinct peers): BENCH_CONNS proves connection reuse.
# The ratios (b)/(a) and (c)/(a) are per round; their median is reported.
#
#   bash bench/transcode.sh   # BENCH_ROUNDS (2), BENCH_REQUESTS (20000), BENCH_CONCURRENCY (32),
#                             # BENCH_CONNS (4), BENCH_RATE (1000), BENCH_SECONDS (5),
#                             # BENCH_PORT_BASE (28900), BENCH_SKIP_BUILD
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROUNDS="${BENCH_ROUNDS:-2}"
REQUESTS="${BENCH_REQUESTS:-20000}"
CONC="${BENCH_CONCURRENCY:-32}"
CONNS="${BENCH_CONNS:-4}"
RATE="${BENCH_RATE:-1000}"
SECS="${BENCH_SECONDS:-5}"
BASE="${BENCH_PORT_BASE:-28900}"
bench_init transcode
need openssl etcd jq curl taskset ss
build_release
# The load client on its own: built in the same command as mesh-agent, the example's
# dev-dependency features (tokio's test-util among them) would be unified into mesh-agent's.
if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release --locked -p trellis-proxy --example transcode_load) >>"$D/build.log" 2>&1 ||
        { tail -20 "$D/build.log"; die "build of the load client failed"; }
fi
# Private copies: another build into the same target directory must not swap the binaries
# under a running measurement.
cp "$AGENT" "$D/mesh-agent" && AGENT="$D/mesh-agent"
cp "$TARGET/release/examples/transcode_load" "$D/transcode_load"
LOAD="$D/transcode_load"

SVC=$BASE; B_IN=$((BASE + 1)); B_OUT=$((BASE + 2)); B_ADM=$((BASE + 3))
G_IN=$((BASE + 4)); G_OUT=$((BASE + 5)); G_ADM=$((BASE + 6)); G_TLS=$((BASE + 7)); G_HTTP=$((BASE + 8))
ETCD=$((BASE + 9)); ETCD_PEER=$((BASE + 10)); ETCD_METRICS=$((BASE + 11))
ENDPOINT="http://127.0.0.1:$ETCD"
HOST=api.bench.local
mkdir -p "$D/certs"

# --- etcd, the service, certificates ------------------------------------------------------------
start_etcd
taskset -c 1 "$LOAD" echo "127.0.0.1:$SVC" 2>"$D/echo.log" & PIDS+=($!)

"$AGENT" cert init --trust-domain bench.local --dir "$D/certs" >/dev/null
"$AGENT" cert issue --service gateway,books --dir "$D/certs" >/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=$HOST" -addext "subjectAltName=DNS:$HOST" \
    -keyout "$D/web-key.pem" -out "$D/web.pem" 2>/dev/null

# --- the route: the test service of tests/proto, transcoded ------------------------------------
cat >"$D/route.yaml" <<ROUTE
apiVersion: trellis.dev/v1
kind: HTTPRoute
metadata: {name: books}
spec:
  hosts: [$HOST]
  gateways: [gateway]
  rules:
  - name: books
    backends: [{service: books}]
    grpc_transcode:
      descriptor_set: $(base64 -w0 "$ROOT/tests/proto/transcode.pb")
      service: test.Echo
ROUTE
"$AGENT" policy apply -f "$D/route.yaml" --etcd-endpoints "$ENDPOINT" --author bench >/dev/null

# --- the mesh: the service's sidecar and the ingress, both in etcd mode -------------------------
sidecar_config() { # SERVICE IN OUT ADMIN [INGRESS]
    etcd_sidecar_config "$1" "$2" "$3" "$4" "$SVC" h2c
    if [[ -n "${5:-}" ]]; then
        printf 'ingress:\n  listen: 127.0.0.1:%s\n  certificates: [{hosts: [%s], cert: %s, key: %s}]\n' \
            "$G_TLS" "$HOST" "$D/web.pem" "$D/web-key.pem"
        printf '  http: {listen: 127.0.0.1:%s, redirect_to_https: false}\n' "$G_HTTP"
    fi
}
sidecar_config books "$B_IN" "$B_OUT" "$B_ADM" >"$D/b.yaml"
sidecar_config gateway "$G_IN" "$G_OUT" "$G_ADM" ingress >"$D/g.yaml"
RUST_LOG=warn taskset -c 1 "$AGENT" run --config "$D/b.yaml" 2>"$D/b.log" & MB=$!; PIDS+=("$MB")
RUST_LOG=warn taskset -c 1 "$AGENT" run --mode ingress --config "$D/g.yaml" 2>"$D/g.log" & MG=$!; PIDS+=("$MG")

# The load client: KIND CONCURRENCY REQUESTS [RATE] -> its JSON line.
load() { taskset -c 0 "$LOAD" load "127.0.0.1:$G_HTTP" "$HOST" "$1" "$CONNS" "$2" "$3" "${4:-0}"; }
ready=0
for _ in $(seq 300); do
    if load grpc 1 1 >/dev/null 2>&1 && load post 1 1 >/dev/null 2>&1 && load get 1 1 >/dev/null 2>&1; then
        ready=1; break
    fi
    sleep 0.1
done
[[ $ready == 1 ]] || { load post 1 1 || true; die "the route does not answer (see $D/g.log)"; }
curl -sf -H "host: $HOST" "http://127.0.0.1:$G_HTTP/v1/shelves/s1/items/42?title=hello" |
    jq -e '.name == "shelves/s1" and .id == "42" and .title == "hello"' >/dev/null ||
    die "the GET is not transcoded as expected"
# Warm-up, not measured.
for kind in grpc post get; do load "$kind" "$CONC" 2000 >/dev/null; done

# The ingress's refusals so far (the readiness probes' 404s before the route arrived).
errors() { curl -s "http://127.0.0.1:$G_ADM/metrics" | awk '$1 ~ /^trellis_proxy_errors_total/ { s += $2 } END { print s + 0 }'; }
ERRORS0=$(errors)

# --- measurements -------------------------------------------------------------------------------
# Run time (ns) of all of PID's threads (%.0f: mawk's %d stops at 2^31).
runtime() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f\n", s }'; }
# Distinct load-client connections the ingress holds, sampled until $D/stop exists.
watch_conns() { # OUT
    : >"$1"
    while [[ ! -e "$D/stop" ]]; do
        ss -Htn state established "( sport = :$G_HTTP )" | awk '{ print $4 }' >>"$1"
        sleep 0.2
    done
}
# measure NAME KIND: closed loop; prints "rps ingress_us sidecar_us conns".
measure() {
    local g0 b0 g1 b1 out
    rm -f "$D/stop"; watch_conns "$D/conns-$1" & local w=$!
    g0=$(runtime "$MG") b0=$(runtime "$MB")
    out=$(load "$2" "$CONC" "$REQUESTS") || die "$1: the load client failed"
    g1=$(runtime "$MG") b1=$(runtime "$MB")
    touch "$D/stop"; wait "$w"
    local n rps
    n=$(jq -r .requests <<<"$out") rps=$(jq -r .rps <<<"$out")
    [[ "$n" == "$REQUESTS" ]] || die "$1: $n answers of $REQUESTS"
    awk -v g=$((g1 - g0)) -v b=$((b1 - b0)) -v n="$n" -v r="$rps" -v c="$(sort -u "$D/conns-$1" | wc -l)" \
        'BEGIN { printf "%.0f %.1f %.1f %d\n", r, g / n / 1000, b / n / 1000, c }'
}
declare -A RPS CPU CPUB CONN P50 P99
for round in $(seq "$ROUNDS"); do
    for kind in grpc post get; do
        measure "$kind-$round" "$kind" >"$D/m"
        read -r RPS[$kind-$round] CPU[$kind-$round] CPUB[$kind-$round] CONN[$kind-$round] <"$D/m"
    done
    for kind in grpc post get; do
        out=$(load "$kind" "$CONC" $((RATE * SECS)) "$RATE") || die "$kind: the fixed-rate run failed"
        P50[$kind-$round]=$(jq -r .p50_ms <<<"$out") P99[$kind-$round]=$(jq -r .p99_ms <<<"$out")
    done
done

echo "Transcoding under load: ${REQUESTS} requests per closed-loop measurement ($CONC in flight on $CONNS h2c connections), ${RATE} req/s for ${SECS}s for latency; load on core 0, servers on core 1; $(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| request | round | req/s | ingress CPU µs/req | service's sidecar CPU µs/req | ingress CPU vs grpc | p50 ms | p99 ms | connections |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for round in $(seq "$ROUNDS"); do
    for kind in grpc post get; do
        k=$kind-$round
        awk -v k="$kind" -v rd="$round" -v r="${RPS[$k]}" -v c="${CPU[$k]}" -v b="${CPUB[$k]}" -v a="${CPU[grpc-$round]}" \
            -v p50="${P50[$k]}" -v p99="${P99[$k]}" -v n="${CONN[$k]}" \
            'BEGIN { printf "| %s | %s | %s | %s | %s | %.2f | %.2f | %.2f | %s |\n", k, rd, r, c, b, c / a, p50, p99, n }'
        awk -v c="${CPU[$k]}" -v a="${CPU[grpc-$round]}" 'BEGIN { printf "%.3f\n", c / a }' >>"$D/ratio-$kind"
        awk -v c="${RPS[$k]}" -v a="${RPS[grpc-$round]}" 'BEGIN { printf "%.3f\n", c / a }' >>"$D/rps-$kind"
    done
done
median() { sort -n "$1" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo
echo "median over $ROUNDS rounds: ingress CPU per request post/grpc $(median "$D/ratio-post"), get/grpc $(median "$D/ratio-get"); req/s post/grpc $(median "$D/rps-post"), get/grpc $(median "$D/rps-get")"
echo "ingress refusals during the measurements (trellis_proxy_errors_total): $(( $(errors) - ERRORS0 )) (0 expected)"
