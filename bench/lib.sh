# Shared by the benchmark scripts (source it): a temp dir removed on exit with every background
# process, tool checks, the release build, and an nginx backend answering 200 "ok".
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"; bench_init NAME

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PIDS=()

die() { echo "error: $*" >&2; exit 1; }

bench_cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$D"
}

# A fresh temp dir `$D` (readable by nginx workers), cleaned up on exit.
bench_init() {
    D="$(mktemp -d -t "trellis-$1.XXXXXX")"
    chmod 755 "$D"
    trap bench_cleanup EXIT
}

need() {
    for t in "$@"; do
        command -v "$t" >/dev/null || die "$t is needed"
    done
}

# cargo build --release --locked -p mesh-agent; sets AGENT and TARGET (the target directory:
# CARGO_TARGET_DIR when set). BENCH_AGENT names another build of mesh-agent to measure instead
# (e.g. bench/pgo.sh's), and nothing is built, as in bench/run.sh.
build_release() {
    TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
    AGENT="${BENCH_AGENT:-$TARGET/release/mesh-agent}"
    [[ "${BENCH_SKIP_BUILD:-0}" == 1 || -n "${BENCH_AGENT:-}" ]] && return
    (cd "$ROOT" && cargo build --release --locked -p mesh-agent) >"$D/build.log" 2>&1 ||
        { tail -20 "$D/build.log"; die "build failed"; }
}

# $D/sidecar.yaml: a sidecar of `backend` (certificates under $D/certs, made here) whose plain
# inbound listener ($S_IN, permissive) fronts the app at $BACKEND, its mesh read from
# $D/mesh.yaml, outbound on $S_OUT, admin on $S_ADM (the cache benchmarks).
backend_sidecar_config() {
    "$AGENT" cert init --trust-domain bench.local --dir "$D/certs" >/dev/null
    "$AGENT" cert issue --service backend --dir "$D/certs" >/dev/null
    cat >"$D/sidecar.yaml" <<CONF
service: backend
trust_domain: bench.local
identity: {cert: $D/certs/backend.pem, key: $D/certs/backend-key.pem, bundle: $D/certs/ca.pem}
inbound: {listen: 127.0.0.1:$S_IN, app: 127.0.0.1:$BACKEND, app_protocol: http1, mode: permissive}
outbound: {listen: 127.0.0.1:$S_OUT}
admin: {listen: 127.0.0.1:$S_ADM}
store: {file: $D/mesh.yaml}
tracing: {enabled: false}
CONF
}

# A one-member etcd on core 1, clients at $ENDPOINT ($ETCD), peers on $ETCD_PEER, health on
# $ETCD_METRICS, data under $D/etcd; returns once it answers.
start_etcd() {
    taskset -c 1 etcd --name bench --data-dir "$D/etcd" \
        --listen-client-urls "$ENDPOINT" --advertise-client-urls "$ENDPOINT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
        --initial-cluster "bench=http://127.0.0.1:$ETCD_PEER" \
        --listen-metrics-urls "http://127.0.0.1:$ETCD_METRICS" >"$D/etcd.log" 2>&1 &
    PIDS+=($!)
    wait_http etcd "http://127.0.0.1:$ETCD_METRICS/health"
}

# A sidecar of SERVICE in etcd mode (certificates under $D/certs, the store at $ENDPOINT): inbound
# on IN in front of its app at 127.0.0.1:APP speaking APP_PROTOCOL, outbound on OUT, admin on
# ADMIN. A caller that runs it as an ingress appends its `ingress:` section.
etcd_sidecar_config() { # SERVICE IN OUT ADMIN APP APP_PROTOCOL
    cat <<CONF
service: $1
trust_domain: bench.local
identity: {cert: $D/certs/$1.pem, key: $D/certs/$1-key.pem, bundle: $D/certs/ca.pem}
inbound: {listen: 127.0.0.1:$2, app: 127.0.0.1:$5, app_protocol: $6}
outbound: {listen: 127.0.0.1:$3}
admin: {listen: 127.0.0.1:$4}
tracing: {enabled: false}
store:
  etcd: {endpoints: [$ENDPOINT], cache_file: $D/$1.cache.json}
CONF
}

# The head of an nginx configuration NAME (one worker, files under $D/nginx), up to and inside
# `http {`: the caller writes its servers and the closing brace.
nginx_conf_head() { # NAME
    cat <<CONF
worker_processes 1;
pid $D/nginx/$1.pid;
error_log $D/nginx/$1-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $D/nginx/tmp; proxy_temp_path $D/nginx/tmp;
  fastcgi_temp_path $D/nginx/tmp; uwsgi_temp_path $D/nginx/tmp; scgi_temp_path $D/nginx/tmp;
CONF
}

# An nginx server on 127.0.0.1:PORT answering `200 ok`, one worker on core 1.
start_backend() {
    mkdir -p "$D/nginx/tmp"
    { nginx_conf_head nginx; cat <<CONF
  server { listen 127.0.0.1:$1; keepalive_requests 1000000;
           location / { return 200 "ok\n"; } }
}
CONF
    } >"$D/nginx/nginx.conf"
    taskset -c 1 nginx -c "$D/nginx/nginx.conf" -p "$D/nginx" -g 'daemon off;' &
    PIDS+=($!)
}

# nginx's proxy_cache on $NGINX in front of the backend on $BACKEND, configured as a careful
# operator would (lock, revalidate, use_stale, background update), and that backend (its
# server block given), each one worker on core 1; NGINX_PID is the cache's. With
# $NGINX_PLAIN set, also the same proxy without proxy_cache on that port (its own process, one
# worker on core 1, NGINX_PLAIN_PID): what the cache adds to nginx's own forwarding.
start_nginx_cache() { # MAX-SIZE BACKEND-SERVER-BLOCK [HTTP-EXTRA]
    local max="$1" server="$2" extra="${3:-}"
    mkdir -p "$D/nginx/tmp" "$D/nginx/cache"
    { nginx_conf_head backend; printf '%s\n  %s\n}\n' "$extra" "$server"; } >"$D/nginx/backend.conf"
    # The forwarding both proxies share; the cache's directives are the last two arguments.
    nginx_proxy_conf() { # NAME PORT HTTP-CACHE-DIRECTIVES LOCATION-CACHE-DIRECTIVES
        nginx_conf_head "$1"; cat <<CONF
  $extra
  $3
  upstream backend { server 127.0.0.1:$BACKEND; keepalive 64; }
  server {
    listen 127.0.0.1:$2; keepalive_requests 1000000;
    location / {
      proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";
      $4
      add_header X-Cache-Status \$upstream_cache_status;
    }
  }
}
CONF
    }
    nginx_proxy_conf cache "$NGINX" "proxy_cache_path $D/nginx/cache keys_zone=c:10m max_size=$max;" \
        'proxy_cache c; proxy_cache_lock on; proxy_cache_revalidate on;
      proxy_cache_use_stale error timeout updating; proxy_cache_background_update on;' >"$D/nginx/cache.conf"
    taskset -c 1 nginx -c "$D/nginx/backend.conf" -p "$D/nginx" -g 'daemon off;' & PIDS+=($!)
    taskset -c 1 nginx -c "$D/nginx/cache.conf" -p "$D/nginx" -g 'daemon off;' & NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    if [[ -n "${NGINX_PLAIN:-}" ]]; then
        nginx_proxy_conf plain "$NGINX_PLAIN" '' '' >"$D/nginx/plain.conf"
        taskset -c 1 nginx -c "$D/nginx/plain.conf" -p "$D/nginx" -g 'daemon off;' & NGINX_PLAIN_PID=$!
        PIDS+=("$NGINX_PLAIN_PID")
    fi
}

# CPU ticks (user + system) of a process and its children (nginx's worker).
tree_ticks() { # PID
    local pids
    pids="$1 $(pgrep -P "$1" | tr '\n' ' ' || true)"
    for p in $pids; do cat "/proc/$p/stat"; done | awk '{ sub(/^.*\) /, ""); t += $12 + $13 } END { print t }'
}

# Wait (at most 10 s) until `curl CURL-ARGS...` succeeds.
wait_http() { # WHAT CURL-ARGS...
    local what="$1"; shift
    for _ in $(seq 100); do
        curl -sf -o /dev/null -m 1 "$@" && return 0
        sleep 0.1
    done
    die "$what not ready"
}

# Open-loop load at $RATE req/s for $SECS s (oha on core 0, latency-corrected) into
# $D/NAME.json; prints "p50 p99" in milliseconds.
fixed_rate() { # NAME OHA-ARGS... URL
    local name="$1"; shift
    taskset -c 0 oha -q "$RATE" -z "${SECS}s" -c 32 --latency-correction -w --no-tui \
        --output-format json "$@" >"$D/$name.json" 2>/dev/null || die "oha failed ($name)"
    jq -r '"\(.latencyPercentiles.p50 * 1000) \(.latencyPercentiles.p99 * 1000)"' "$D/$name.json"
}
