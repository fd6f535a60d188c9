#!/usr/bin/env bash
# The ingress gateway against nginx, in one run:
#  1. max throughput over HTTPS (TLS terminated, HTTP/1.1 keep-alive, 64 connections):
#     direct plaintext backend (baseline), nginx as a TLS-terminating reverse proxy, Trellis
#     ingress (TLS -> policies -> HTTPRoute -> mTLS -> backend's sidecar -> backend);
#  2. p99 at a fixed rate (default 1,000 req/s) through the Trellis ingress without and with
#     RS256 JWT verification (an AuthenticationPolicy with an inline JWKS): the added p99.
# Load on core 0, proxies and the backend on core 1; nginx gets the same single worker.
#
#   bash bench/gateway.sh      # BENCH_SECONDS (10), BENCH_RATE (1000), BENCH_PORT_BASE (28500)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SECS="${BENCH_SECONDS:-10}"
RATE="${BENCH_RATE:-1000}"
BASE="${BENCH_PORT_BASE:-28500}"
bench_init gateway
need oha nginx openssl python3 jq curl
build_release

BACKEND=$BASE; NGINX_TLS=$((BASE + 1)); B_IN=$((BASE + 2)); B_OUT=$((BASE + 3)); B_ADM=$((BASE + 4))
G_IN=$((BASE + 5)); G_OUT=$((BASE + 6)); G_ADM=$((BASE + 7)); G_TLS=$((BASE + 8))
HOST=api.bench.local

# Mesh PKI, and a web certificate for the public host name (ECDSA P-256, as most edges).
"$AGENT" cert init --trust-domain bench.local --dir "$D/certs" >/dev/null
"$AGENT" cert issue --service gateway,backend --dir "$D/certs" >/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=$HOST" -addext "subjectAltName=DNS:$HOST" \
    -keyout "$D/web-key.pem" -out "$D/web.pem" 2>/dev/null

start_backend "$BACKEND"
cat >"$D/nginx/proxy.conf" <<CONF
worker_processes 1;
pid $D/nginx/proxy.pid;
error_log $D/nginx/proxy-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $D/nginx/tmp; proxy_temp_path $D/nginx/tmp;
  fastcgi_temp_path $D/nginx/tmp; uwsgi_temp_path $D/nginx/tmp; scgi_temp_path $D/nginx/tmp;
  upstream backend { server 127.0.0.1:$BACKEND; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX_TLS ssl; keepalive_requests 1000000;
    ssl_certificate $D/web.pem; ssl_certificate_key $D/web-key.pem;
    ssl_protocols TLSv1.3;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
taskset -c 1 nginx -c "$D/nginx/proxy.conf" -p "$D/nginx" -g 'daemon off;' &
PIDS+=($!)

# RS256: a 2048-bit key, its JWKS (n, e) and a token valid for an hour, signed by openssl.
openssl genrsa -out "$D/jwt-key.pem" 2048 2>/dev/null
MODULUS=$(openssl rsa -in "$D/jwt-key.pem" -noout -modulus | cut -d= -f2)
b64url() { python3 -c 'import base64,sys; sys.stdout.write(base64.urlsafe_b64encode(sys.stdin.buffer.read()).rstrip(b"=").decode())'; }
N=$(python3 -c "import sys; sys.stdout.buffer.write(bytes.fromhex('$MODULUS'))" | b64url)
JWKS="{\"keys\":[{\"kty\":\"RSA\",\"kid\":\"bench\",\"alg\":\"RS256\",\"n\":\"$N\",\"e\":\"AQAB\"}]}"
EXP=$(( $(date +%s) + 3600 ))
H=$(printf '{"alg":"RS256","typ":"JWT","kid":"bench"}' | b64url)
P=$(printf '{"iss":"https://idp.bench.local","sub":"bench","aud":"api","exp":%s}' "$EXP" | b64url)
S=$(printf '%s.%s' "$H" "$P" | openssl dgst -sha256 -sign "$D/jwt-key.pem" | b64url)
TOKEN="$H.$P.$S"

mesh_file() { # WITH-JWT (0|1)
    cat <<CONF
services:
  backend:
    endpoints: [{address: "127.0.0.1:$B_IN"}]
http_routes:
  edge:
    hosts: [$HOST]
    gateways: [gateway]
    rules: [{name: edge, backends: [{service: backend}]}]
CONF
    if [[ "$1" == 1 ]]; then
        cat <<CONF
authentication:
  edge-jwt:
    service: gateway
    jwt:
      idp: {issuer: "https://idp.bench.local", audiences: [api], jwks: {inline: '$JWKS'}}
CONF
    fi
}
sidecar_config() { # SERVICE IN OUT ADMIN [INGRESS]
    cat <<CONF
service: $1
trust_domain: bench.local
identity: {cert: $D/certs/$1.pem, key: $D/certs/$1-key.pem, bundle: $D/certs/ca.pem}
inbound: {listen: 127.0.0.1:$2, app: 127.0.0.1:$BACKEND, app_protocol: http1}
outbound: {listen: 127.0.0.1:$3}
admin: {listen: 127.0.0.1:$4}
store: {file: $D/mesh.yaml}
tracing: {enabled: false}
CONF
    if [[ -n "${5:-}" ]]; then
        printf 'ingress:\n  listen: 127.0.0.1:%s\n  certificates: [{hosts: [%s], cert: %s, key: %s}]\n' \
            "$5" "$HOST" "$D/web.pem" "$D/web-key.pem"
    fi
}

start_mesh() { # WITH-JWT
    mesh_file "$1" >"$D/mesh.yaml"
    sidecar_config backend "$B_IN" "$B_OUT" "$B_ADM" >"$D/b.yaml"
    sidecar_config gateway "$G_IN" "$G_OUT" "$G_ADM" "$G_TLS" >"$D/g.yaml"
    RUST_LOG=warn taskset -c 1 "$AGENT" run --config "$D/b.yaml" 2>"$D/b.log" & MB=$!
    RUST_LOG=warn taskset -c 1 "$AGENT" run --mode ingress --config "$D/g.yaml" 2>"$D/g.log" & MG=$!
    local auth=()
    [[ "$1" == 1 ]] && auth=(-H "authorization: Bearer $TOKEN")
    wait_http "ingress (jwt=$1)" -k "${auth[@]}" --resolve "$HOST:$G_TLS:127.0.0.1" "https://$HOST:$G_TLS/"
}
stop_mesh() { kill -TERM "$MB" "$MG"; wait "$MB" "$MG" 2>/dev/null || true; }

max_rps() { # NAME URL [oha args...]
    local name="$1" url="$2"; shift 2
    taskset -c 0 oha -z "${SECS}s" -c 64 --insecure -w --no-tui --output-format json "$@" "$url" \
        >"$D/$name.json" 2>/dev/null || die "oha failed ($name)"
    jq -r '.summary.requestsPerSec' "$D/$name.json"
}
codes() { jq -c '.statusCodeDistribution' "$D/$1.json"; }
# CPU ticks (user + system) of the Trellis ingress and sidecar processes.
mesh_ticks() { cat "/proc/$MG/stat" "/proc/$MB/stat" | awk '{ sub(/^.*\) /, ""); t += $12 + $13 } END { print t }'; }
# max_rps_cpu NAME URL [oha args...]: as max_rps, and sets CPU_US to the mesh's µs per request
max_rps_cpu() {
    local t0 t1 rps
    t0=$(mesh_ticks)
    rps=$(max_rps "$@")
    t1=$(mesh_ticks)
    CPU_US=$(awk -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v r="$rps" -v s="$SECS" 'BEGIN { printf "%.1f", t * 1e6 / hz / (r * s) }')
    echo "$rps"
}

wait_http backend "http://127.0.0.1:$BACKEND/"
direct=$(max_rps direct "http://127.0.0.1:$BACKEND/")
nginx_tls=$(max_rps nginx "https://$HOST:$NGINX_TLS/" --connect-to "$HOST:$NGINX_TLS:127.0.0.1:$NGINX_TLS")
start_mesh 0
max_rps_cpu trellis "https://$HOST:$G_TLS/" --connect-to "$HOST:$G_TLS:127.0.0.1:$G_TLS" >"$D/rps"
trellis=$(cat "$D/rps") cpu_off=$CPU_US
read -r p50_off p99_off < <(fixed_rate off --insecure --connect-to "$HOST:$G_TLS:127.0.0.1:$G_TLS" "https://$HOST:$G_TLS/")
codes_off=$(codes off)
stop_mesh
start_mesh 1
read -r p50_jwt p99_jwt < <(fixed_rate jwt --insecure --connect-to "$HOST:$G_TLS:127.0.0.1:$G_TLS" -H "authorization: Bearer $TOKEN" "https://$HOST:$G_TLS/")
codes_jwt=$(codes jwt)
max_rps_cpu trellis-jwt "https://$HOST:$G_TLS/" --connect-to "$HOST:$G_TLS:127.0.0.1:$G_TLS" -H "authorization: Bearer $TOKEN" >"$D/rps"
trellis_jwt=$(cat "$D/rps") cpu_jwt=$CPU_US
stop_mesh

echo "Ingress benchmark, ${SECS}s per measurement, load on core 0, servers on core 1; $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "| path | req/s | vs direct | vs nginx TLS proxy | Trellis CPU µs/req (ingress + sidecar) |"
echo "|---|---:|---:|---:|---:|"
row() { awk -v n="$1" -v r="$2" -v d="$direct" -v x="$nginx_tls" -v c="${3:--}" 'BEGIN { printf "| %s | %.0f | %.2fx | %.2fx | %s |\n", n, r, r / d, r / x, c }'; }
row "direct (plaintext, baseline)" "$direct"
row "nginx TLS-terminating proxy -> backend" "$nginx_tls"
row "Trellis ingress -> mTLS -> sidecar -> backend" "$trellis" "$cpu_off"
row "Trellis ingress with RS256 JWT (verified-token cache)" "$trellis_jwt" "$cpu_jwt"
echo
echo "At $RATE req/s through the Trellis ingress (open loop, latency-corrected):"
echo
echo "| | p50 ms | p99 ms | status codes |"
echo "|---|---:|---:|---|"
printf '| no authentication | %.3f | %.3f | %s |\n' "$p50_off" "$p99_off" "$codes_off"
printf '| RS256 JWT verified | %.3f | %.3f | %s |\n' "$p50_jwt" "$p99_jwt" "$codes_jwt"
awk -v a="$p99_jwt" -v b="$p99_off" 'BEGIN { printf "\nadded p99 from JWT verification: %+.3f ms\n", a - b }'
