#!/usr/bin/env bash
# HTTPRoute cost on the two-hop path (client -> sidecar A -> mTLS -> sidecar B -> nginx) at a
# fixed rate: p50/p99 without routes, and with a 100-rule HTTPRoute on the called host (25 exact,
# 25 prefix, 25 regex, 24 prefix + header rules, then a catch-all that the benchmark's requests
# take, so every request is checked against the whole table), in one run; the delta is against
# no routes.
#
#   bash bench/routing.sh      # BENCH_SECONDS (10), BENCH_RATE (1000), BENCH_PORT_BASE (28400)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SECS="${BENCH_SECONDS:-10}"
RATE="${BENCH_RATE:-1000}"
BASE="${BENCH_PORT_BASE:-28400}"
bench_init routing
need oha nginx jq curl
build_release

B=$BASE; BACKEND=$((B)); B_IN=$((B + 1)); B_OUT=$((B + 2)); B_ADM=$((B + 3))
A_IN=$((B + 4)); A_OUT=$((B + 5)); A_ADM=$((B + 6))
"$AGENT" cert init --trust-domain bench.local --dir "$D/certs" >/dev/null
for s in client backend; do "$AGENT" cert issue --service "$s" --dir "$D/certs" >/dev/null; done

start_backend "$BACKEND"

services() { printf 'services:\n  backend:\n    endpoints:\n      - address: 127.0.0.1:%s\n' "$B_IN"; }
services >"$D/mesh-none.yaml"
{
    services
    printf 'http_routes:\n  bench:\n    hosts: [backend]\n    rules:\n'
    for i in $(seq 0 24); do
        printf '      - {matches: [{path: {exact: /exact/%s/item}}], backends: [{service: backend}]}\n' "$i"
        printf '      - {matches: [{path: {prefix: /prefix/%s}}], backends: [{service: backend}]}\n' "$i"
        printf "      - {matches: [{path: {regex: '/re/%s/[0-9]+/[a-z]+'}}], backends: [{service: backend}]}\n" "$i"
        [[ $i -lt 24 ]] && printf '      - {matches: [{path: {prefix: /hdr}, headers: [{name: x-tenant, exact: t%s}]}], backends: [{service: backend}]}\n' "$i"
    done
    printf '      - {name: catch-all, backends: [{service: backend}]}\n'
} >"$D/mesh-routes.yaml"

sidecar_config() { # SERVICE IN OUT ADMIN MESH-FILE
    cat <<CONF
service: $1
trust_domain: bench.local
identity: {cert: $D/certs/$1.pem, key: $D/certs/$1-key.pem, bundle: $D/certs/ca.pem}
inbound: {listen: 127.0.0.1:$2, mode: permissive, app: 127.0.0.1:$BACKEND, app_protocol: http1}
outbound: {listen: 127.0.0.1:$3}
admin: {listen: 127.0.0.1:$4}
store: {file: $5}
CONF
}

declare -A P50 P99 ROUTE
run_mode() { # NAME MESH-FILE
    local name="$1" mesh="$2"
    sidecar_config backend "$B_IN" "$B_OUT" "$B_ADM" "$D/mesh-none.yaml" >"$D/b.yaml"
    sidecar_config client "$A_IN" "$A_OUT" "$A_ADM" "$mesh" >"$D/a.yaml"
    RUST_LOG=warn taskset -c 1 "$AGENT" run --config "$D/b.yaml" 2>"$D/b-$name.log" & local pb=$!
    RUST_LOG=warn taskset -c 1 "$AGENT" run --config "$D/a.yaml" 2>"$D/a-$name.log" & local pa=$!
    wait_http "mesh ($name)" -H 'Host: backend' "http://127.0.0.1:$A_OUT/"
    local p50 p99
    read -r p50 p99 < <(fixed_rate "$name" -H 'Host: backend' "http://127.0.0.1:$A_OUT/")
    P50[$name]=$p50
    P99[$name]=$p99
    # The route label most requests got: proof that the table was in force.
    ROUTE[$name]=$(curl -s "http://127.0.0.1:$A_ADM/metrics" |
        awk -F'route="' '/^trellis_requests_total\{direction="outbound"/ {
            split($2, a, "\""); c = $0; sub(/.* /, "", c); n = c + 0; if (n > best) { best = n; r = a[1] } } END { print r }')
    kill -TERM "$pa" "$pb"; wait "$pa" "$pb" 2>/dev/null || true
}

run_mode none "$D/mesh-none.yaml"
run_mode routes "$D/mesh-routes.yaml"

echo "Two-hop path at $RATE req/s for ${SECS}s each (oha, open loop, latency-corrected); $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "| table | route label | p50 ms | p99 ms | p99 delta vs none |"
echo "|---|---|---:|---:|---:|"
for m in none routes; do
    label=$(case $m in none) echo "no HTTPRoute";; routes) echo "100-rule HTTPRoute, last rule taken";; esac)
    delta=$(awk -v a="${P99[$m]}" -v b="${P99[none]}" 'BEGIN { printf "%+.3f ms", a - b }')
    printf '| %s | %s | %.3f | %.3f | %s |\n' "$label" "${ROUTE[$m]}" "${P50[$m]}" "${P99[$m]}" "$delta"
done
