#!/usr/bin/env bash
# OpenAPI validation at the ingress (docs/api-validation.md#benchmark): the ingress's CPU per
# request for a typical 1 kB JSON POST, without and with validation, in one run and one
# ingress process. Three hosts route to the same backend through one HTTPRoute each:
#   plain.bench.local  no validation
#   api.bench.local    `validation: {request: enforce}` (parameters + body schema)
#   audit.bench.local  the same, and `response: audit` (the JSON response checked too)
# Real etcd (the document is stored with `api put`, the routes with `policy apply`), HTTPS to
# the ingress, mTLS to the backend's sidecar, nginx as the backend (a JSON answer). Load on
# core 0 (oha, 64 connections, keep-alive); the ingress, the sidecar, nginx and etcd on core 1.
# Measured in BENCH_ROUNDS rounds (plain, enforce, audit each), alternating so that a load
# change on the machine hits all three; the ratios are per round, their median is reported.
#
#   bash bench/validation.sh   # BENCH_SECONDS (10), BENCH_ROUNDS (3), BENCH_PORT_BASE (28800), BENCH_SKIP_BUILD
#
# BENCH_CALLGRIND=1 counts instructions instead (repeatable on a busy machine, where CPU time
# is not): the ingress runs under valgrind's callgrind, and each measurement is BENCH_REQUESTS
# (2000) sequential POSTs of the order from one curl on one keep-alive connection, between
# `callgrind_control --zero` and `--dump`: the ingress's instructions per request, all its
# threads. Its background work (the 5 s refresh of the routes and documents, the etcd watch)
# is measured idle first and subtracted, pro rata of each measurement's duration.
# BENCH_CALLGRIND_KEEP=DIR keeps each route's profile there (DIR/plain.out, ...), for
# callgrind_annotate.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SECS="${BENCH_SECONDS:-10}"
ROUNDS="${BENCH_ROUNDS:-3}"
BASE="${BENCH_PORT_BASE:-28800}"
bench_init validation
CALLGRIND="${BENCH_CALLGRIND:-0}"
REQUESTS="${BENCH_REQUESTS:-2000}"
if [[ "$CALLGRIND" == 1 ]]; then need valgrind callgrind_control; else need oha; fi
need nginx openssl etcd jq curl taskset
build_release

BACKEND=$BASE; B_IN=$((BASE + 1)); B_OUT=$((BASE + 2)); B_ADM=$((BASE + 3))
G_IN=$((BASE + 4)); G_OUT=$((BASE + 5)); G_ADM=$((BASE + 6)); G_TLS=$((BASE + 7))
ETCD=$((BASE + 8)); ETCD_PEER=$((BASE + 9)); ETCD_METRICS=$((BASE + 10))
ENDPOINT="http://127.0.0.1:$ETCD"
mkdir -p "$D/nginx/tmp" "$D/certs"

# --- etcd, the backend, certificates --------------------------------------------------------
start_etcd

{ nginx_conf_head backend; cat <<'CONF'
  server { listen 127.0.0.1:BACKEND_PORT; keepalive_requests 1000000;
           location / { default_type application/json; return 200 '{"id":42,"status":"open","total":129.5}'; } }
}
CONF
} | sed "s/BACKEND_PORT/$BACKEND/" >"$D/nginx/backend.conf"
taskset -c 1 nginx -c "$D/nginx/backend.conf" -p "$D/nginx" -g 'daemon off;' & PIDS+=($!)

"$AGENT" cert init --trust-domain bench.local --dir "$D/certs" >/dev/null
"$AGENT" cert issue --service gateway,orders --dir "$D/certs" >/dev/null
HOSTS="plain.bench.local api.bench.local audit.bench.local"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=api.bench.local" \
    -addext "subjectAltName=DNS:plain.bench.local,DNS:api.bench.local,DNS:audit.bench.local" \
    -keyout "$D/web-key.pem" -out "$D/web.pem" 2>/dev/null

# --- the document, the routes, a 1 kB order ---------------------------------------------------
cat >"$D/orders.yaml" <<'DOC'
openapi: 3.1.0
info: {title: Orders, version: "1"}
paths:
  /orders:
    post:
      parameters:
        - {name: dry_run, in: query, schema: {type: boolean}}
        - {name: x-request-id, in: header, schema: {type: string, format: uuid}}
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: "#/components/schemas/NewOrder"}
      responses:
        "200":
          description: created
          content:
            application/json:
              schema:
                type: object
                required: [id, status]
                properties:
                  id: {type: integer, format: int64}
                  status: {type: string, enum: [open, closed]}
                  total: {type: number, minimum: 0}
components:
  schemas:
    NewOrder:
      type: object
      required: [customer, currency, lines]
      properties:
        customer: {type: string, format: email}
        currency: {type: string, enum: [EUR, USD, GBP]}
        placed: {type: string, format: date-time}
        note: {type: [string, "null"], maxLength: 200}
        shipping:
          type: object
          required: [street, city, country]
          properties:
            street: {type: string}
            city: {type: string}
            postcode: {type: string, pattern: "^[0-9A-Z -]{3,10}$"}
            country: {type: string, minLength: 2, maxLength: 2}
        lines:
          type: array
          minItems: 1
          maxItems: 100
          items:
            type: object
            required: [sku, qty, price]
            properties:
              sku: {type: string, pattern: "^[A-Z]{3}-[0-9]{4}$"}
              qty: {type: integer, minimum: 1, maximum: 1000}
              price: {type: number, exclusiveMinimum: 0}
              gift: {type: boolean}
DOC
python3 - "$D/order.json" <<'PY'
import json, sys
lines = [{"sku": f"ABC-{i:04d}", "qty": i + 1, "price": 9.99 + i, "gift": i % 2 == 0} for i in range(12)]
order = {"customer": "ada.lovelace@example.com", "currency": "EUR", "placed": "2026-12-03T20:00:00Z",
         "note": "leave at the door, ring twice", "shipping": {"street": "12 Analytical Engine Road",
         "city": "London", "postcode": "NW1 6XE", "country": "GB"}, "lines": lines}
text = json.dumps(order)
open(sys.argv[1], "w").write(text)
PY
BODY_BYTES=$(wc -c <"$D/order.json")

route() { # NAME HOST [VALIDATION]
    printf 'apiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {name: %s}\nspec:\n  hosts: [%s]\n  gateways: [gateway]\n  rules:\n  - name: %s\n    backends: [{service: orders}]\n' "$1" "$2" "$1"
    [[ -n "${3:-}" ]] && printf '    validation: %s\n' "$3"
    echo "---"
}
{
    route plain plain.bench.local
    route enforce api.bench.local "{spec: {service: orders, version: v1}}"
    route audit audit.bench.local "{spec: {service: orders, version: v1}, response: audit}"
} >"$D/routes.yaml"
"$AGENT" api put "$D/orders.yaml" --service orders --version v1 --etcd-endpoints "$ENDPOINT" >/dev/null
"$AGENT" policy apply -f "$D/routes.yaml" --etcd-endpoints "$ENDPOINT" --author bench >/dev/null

# --- the mesh: the backend's sidecar and the ingress, both in etcd mode ------------------------
sidecar_config() { # SERVICE IN OUT ADMIN [INGRESS-TLS-PORT]
    etcd_sidecar_config "$1" "$2" "$3" "$4" "$BACKEND" http1
    if [[ -n "${5:-}" ]]; then
        printf 'ingress:\n  listen: 127.0.0.1:%s\n  certificates: [{hosts: [%s], cert: %s, key: %s}]\n' \
            "$5" "$(echo "$HOSTS" | tr ' ' ',')" "$D/web.pem" "$D/web-key.pem"
    fi
}
sidecar_config orders "$B_IN" "$B_OUT" "$B_ADM" >"$D/b.yaml"
sidecar_config gateway "$G_IN" "$G_OUT" "$G_ADM" "$G_TLS" >"$D/g.yaml"
RUST_LOG=warn taskset -c 1 "$AGENT" run --config "$D/b.yaml" 2>"$D/b.log" & MB=$!; PIDS+=("$MB")
UNDER=()
[[ "$CALLGRIND" == 1 ]] && UNDER=(valgrind --tool=callgrind --callgrind-out-file="$D/cg.out")
RUST_LOG=warn taskset -c 1 "${UNDER[@]}" "${AGENT_UNDER_TEST:-$AGENT}" run --mode ingress --config "$D/g.yaml" 2>"$D/g.log" & MG=$!; PIDS+=("$MG")

post() { # HOST [BODY-FILE] -> status code
    curl -s -o "$D/last.out" -w '%{http_code}' -k --resolve "$1:$G_TLS:127.0.0.1" \
        -H 'content-type: application/json' --data-binary "@${2:-$D/order.json}" "https://$1:$G_TLS/orders"
}
for _ in $(seq $(( CALLGRIND == 1 ? 1200 : 200 ))); do
    [[ "$(post api.bench.local)" == 200 && "$(post plain.bench.local)" == 200 ]] && break
    sleep 0.1
done
[[ "$(post api.bench.local)" == 200 ]] || die "the validated route does not answer 200 (see $D/g.log): $(cat "$D/last.out")"
sed 's/"qty": 1,/"qty": 0,/' "$D/order.json" >"$D/bad.json"
[[ "$(post api.bench.local "$D/bad.json")" == 400 ]] || die "an invalid order is not refused: $(cat "$D/last.out")"
[[ "$(post plain.bench.local "$D/bad.json")" == 200 ]] || die "the plain route refused an order"

# --- measurements -----------------------------------------------------------------------------
if [[ "$CALLGRIND" == 1 ]]; then
    # The instructions of the last dump (callgrind_control -d), all threads.
    dumped() {
        local f
        f=$(ls -t "$D"/cg.out.* | head -1)
        awk '$1 == "summary:" || $1 == "totals:" { print $2; exit }' "$f"
    }
    for _ in $(seq "$REQUESTS"); do printf 'url = "https://%%HOST%%:%s/orders"\noutput = /dev/null\n' "$G_TLS"; done >"$D/urls.tmpl"
    callgrind_control -z "$MG" >/dev/null 2>&1
    sleep 10
    callgrind_control -d "$MG" >/dev/null 2>&1
    IDLE=$(awk -v ir="$(dumped)" 'BEGIN { printf "%.0f", ir / 10 }')
    # ir NAME HOST: the ingress's instructions per request, background subtracted.
    ir() {
        sed "s/%HOST%/$2/" "$D/urls.tmpl" >"$D/urls"
        callgrind_control -z "$MG" >/dev/null 2>&1
        local t0 t1 codes
        t0=$(date +%s.%N)
        codes=$(curl -s -k --resolve "$2:$G_TLS:127.0.0.1" -H 'content-type: application/json' \
            --data-binary "@$D/order.json" -w '%{http_code}\n' -K "$D/urls" | sort | uniq -c | tr -s ' ')
        t1=$(date +%s.%N)
        callgrind_control -d "$MG" >/dev/null 2>&1
        [[ -n "${BENCH_CALLGRIND_KEEP:-}" ]] && cp "$(ls -t "$D"/cg.out.* | head -1)" "$BENCH_CALLGRIND_KEEP/$1.out"
        [[ "$codes" == " $REQUESTS 200" ]] || die "$1: not every answer was 200: $codes"
        awk -v ir="$(dumped)" -v idle="$IDLE" -v t="$(echo "$t1 - $t0" | bc)" -v n="$REQUESTS" \
            'BEGIN { printf "%.0f\n", (ir - idle * t) / n }'
    }
    declare -A IR
    echo "Validation benchmark under callgrind: $REQUESTS sequential POSTs of a $(wc -c <"$D/order.json")-byte JSON order per measurement; background $IDLE instructions/s subtracted; $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "| route | round | ingress instructions/request | vs plain |"
    echo "|---|---:|---:|---:|"
    for round in $(seq "$ROUNDS"); do
        IR[plain]=$(ir plain plain.bench.local)
        IR[enforce]=$(ir enforce api.bench.local)
        IR[audit]=$(ir audit audit.bench.local)
        for kind in plain enforce audit; do
            awk -v k="$kind" -v rd="$round" -v c="${IR[$kind]}" -v p="${IR[plain]}" \
                'BEGIN { printf "| %s | %s | %d | %+.1f %% |\n", k, rd, c, (c / p - 1) * 100 }'
        done
    done
    exit 0
fi
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
# measure NAME HOST: req/s; sets CPU_G (ingress µs/req) and CPU_M (ingress + sidecar).
measure() {
    local name="$1" host="$2" g0 b0 g1 b1 rps
    g0=$(ticks "$MG") b0=$(ticks "$MB")
    taskset -c 0 oha -z "${SECS}s" -c 64 --insecure -w --no-tui --output-format json \
        -m POST -D "$D/order.json" -H 'content-type: application/json' \
        --connect-to "$host:$G_TLS:127.0.0.1:$G_TLS" "https://$host:$G_TLS/orders" \
        >"$D/$name.json" 2>/dev/null || die "oha failed ($name)"
    g1=$(ticks "$MG") b1=$(ticks "$MB")
    rps=$(jq -r '.summary.requestsPerSec' "$D/$name.json")
    local ok
    ok=$(jq -r '.statusCodeDistribution["200"] // 0' "$D/$name.json")
    local total
    total=$(jq -r '[.statusCodeDistribution[]] | add' "$D/$name.json")
    [[ "$ok" == "$total" ]] || die "$name: not every answer was 200: $(jq -c .statusCodeDistribution "$D/$name.json")"
    read -r CPU_G CPU_M < <(awk -v g=$((g1 - g0)) -v b=$((b1 - b0)) -v hz="$(getconf CLK_TCK)" -v r="$rps" -v s="$SECS" \
        'BEGIN { n = r * s; printf "%.1f %.1f\n", g * 1e6 / hz / n, (g + b) * 1e6 / hz / n }')
    printf '%.0f' "$rps"
}
declare -A RPS CPU CPUM
for round in $(seq "$ROUNDS"); do
    for kind in plain enforce audit; do
        host=plain.bench.local
        [[ $kind == enforce ]] && host=api.bench.local
        [[ $kind == audit ]] && host=audit.bench.local
        measure "$kind-$round" "$host" >"$D/rps"
        RPS[$kind-$round]=$(cat "$D/rps") CPU[$kind-$round]=$CPU_G CPUM[$kind-$round]=$CPU_M
    done
done
mismatches=$(curl -s "http://127.0.0.1:$G_ADM/metrics" | awk '$1 ~ /^trellis_validation_response_mismatches_total/ { s += $2 } END { print s + 0 }')
failures=$(curl -s "http://127.0.0.1:$G_ADM/metrics" | awk '$1 ~ /^trellis_validation_request_failures_total/ { s += $2 } END { print s + 0 }')

echo "Validation benchmark: POST of a ${BODY_BYTES}-byte JSON order, ${SECS}s per measurement, load on core 0, servers on core 1; $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "| route | round | req/s | ingress CPU µs/req | ingress + sidecar CPU µs/req | ingress CPU vs plain |"
echo "|---|---:|---:|---:|---:|---:|"
for round in $(seq "$ROUNDS"); do
    for kind in plain enforce audit; do
        key=$kind-$round
        awk -v k="$kind" -v rd="$round" -v r="${RPS[$key]}" -v c="${CPU[$key]}" -v m="${CPUM[$key]}" -v p="${CPU[plain-$round]}" \
            'BEGIN { printf "| %s | %s | %s | %s | %s | %+.1f %% |\n", k, rd, r, c, m, (c / p - 1) * 100 }'
        awk -v c="${CPU[$key]}" -v p="${CPU[plain-$round]}" 'BEGIN { printf "%.1f\n", (c / p - 1) * 100 }' >>"$D/ratio-$kind"
    done
done
median() { sort -n "$1" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo
echo "median ingress CPU overhead vs plain over $ROUNDS rounds: enforce $(median "$D/ratio-enforce") %, enforce + audit $(median "$D/ratio-audit") %"
echo
echo "request failures counted: $failures (the two sanity checks: 1 expected); response mismatches: $mismatches (0 expected)"
