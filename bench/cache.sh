#!/usr/bin/env bash
# The response cache against nginx's proxy_cache, in one run (docs/caching.md#benchmark):
#  1. hit path: max throughput and CPU per request, and p50/p99 at a fixed rate, through
#     nginx (proxy_cache, proxy_cache_lock) and through a Trellis sidecar (inbound, plain HTTP,
#     a CachePolicy), both in front of the same backend sending `Cache-Control: max-age=600`;
#  2. miss path: a distinct URL per request (every request a miss, stored), through the
#     sidecar with the CachePolicy and through the same sidecar without one; and nginx's own
#     reference, the same URLs through nginx's proxy_cache (full and evicting) and through the
#     same nginx configuration without proxy_cache.
# Load on core 0, proxies and the backend on core 1; nginx gets one worker.
#
#   bash bench/cache.sh      # BENCH_SECONDS (10), BENCH_RATE (1000), BENCH_PORT_BASE (28600)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SECS="${BENCH_SECONDS:-10}"
RATE="${BENCH_RATE:-1000}"
BASE="${BENCH_PORT_BASE:-28600}"
bench_init cache
need oha nginx python3 jq curl
build_release

BACKEND=$BASE; NGINX=$((BASE + 1)); S_IN=$((BASE + 2)); S_OUT=$((BASE + 3)); S_ADM=$((BASE + 4))
NGINX_PLAIN=$((BASE + 5))
mkdir -p "$D/nginx/tmp" "$D/nginx/cache" "$D/certs"

# The backend and the caching proxy: one nginx process each, one worker on core 1.
start_nginx_cache 64m "server { listen 127.0.0.1:$BACKEND; keepalive_requests 1000000;
           location / { add_header Cache-Control \"max-age=600\"; return 200 \"ok\\n\"; } }"

backend_sidecar_config
mesh_file() { # WITH-CACHE (0|1)
    echo "services: {}"
    if [[ "$1" == 1 ]]; then
        echo "cache_policies: {bench: {service: backend, max_bytes: 67108864, max_object_bytes: 1048576}}"
    fi
}
start_sidecar() { # WITH-CACHE
    mesh_file "$1" >"$D/mesh.yaml"
    RUST_LOG=warn taskset -c 1 "$AGENT" run --config "$D/sidecar.yaml" 2>"$D/sidecar.log" & SC=$!
    wait_http "sidecar (cache=$1)" "http://127.0.0.1:$S_IN/warm"
}
stop_sidecar() { kill -TERM "$SC"; wait "$SC" 2>/dev/null || true; }

max_rps() { # NAME URL [oha args...]
    local name="$1" url="$2"; shift 2
    taskset -c 0 oha -z "${SECS}s" -c 64 -w --no-tui --output-format json "$@" "$url" \
        >"$D/$name.json" 2>/dev/null || die "oha failed ($name)"
    jq -r '.summary.requestsPerSec' "$D/$name.json"
}
codes() { jq -c '.statusCodeDistribution' "$D/$1.json"; }
# KiB and files in nginx's cache directory (its manager deletes files meanwhile: du and find
# may find one gone, which is no error here).
nginx_cache_kib() { { du -sk "$D/nginx/cache" 2>/dev/null || true; } | cut -f1; }
nginx_cache_files() { { find "$D/nginx/cache" -type f 2>/dev/null || true; } | wc -l; }
cache_status() { # URL: its X-Cache-Status
    curl -s -o /dev/null -D - "$1" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-cache-status" { print $2 }'
}
# max_rps_cpu PID NAME URL [oha args...]: req/s, and CPU_US the process's µs per request.
max_rps_cpu() {
    local pid="$1" t0 t1 rps; shift
    t0=$(tree_ticks "$pid")
    rps=$(max_rps "$@")
    t1=$(tree_ticks "$pid")
    CPU_US=$(awk -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v r="$rps" -v s="$SECS" 'BEGIN { printf "%.1f", t * 1e6 / hz / (r * s) }')
    echo "$rps"
}

wait_http backend "http://127.0.0.1:$BACKEND/"
wait_http nginx "http://127.0.0.1:$NGINX/hit"
wait_http "nginx without proxy_cache" "http://127.0.0.1:$NGINX_PLAIN/hit"
curl -sf -o /dev/null "http://127.0.0.1:$NGINX/hit"
[[ "$(cache_status "http://127.0.0.1:$NGINX/hit")" == HIT ]] || die "nginx does not answer /hit from its cache"
max_rps_cpu "$NGINX_PID" nginx-hit "http://127.0.0.1:$NGINX/hit" >"$D/rps"; nginx_rps=$(cat "$D/rps") nginx_cpu=$CPU_US
read -r nginx_p50 nginx_p99 < <(fixed_rate nginx-hit-rate "http://127.0.0.1:$NGINX/hit")

# nginx's stored miss against nginx without proxy_cache, the same URLs. Its cache full and
# evicting first: past max_size (64 MiB of files, which its cache manager then trims, at most
# 100 files per 50 ms by default) and past its keys zone's ~80,000 keys (10 MiB), beyond which
# each miss's worker evicts the least recently used entries itself.
max_rps_cpu "$NGINX_PLAIN_PID" nginx-plain "http://127.0.0.1:$NGINX_PLAIN/miss/[a-z]{16}" --rand-regex-url >"$D/rps"
nginx_plain_rps=$(cat "$D/rps") nginx_plain_cpu=$CPU_US
filled=0
for k in $(seq 60); do
    taskset -c 0 oha -z 2s -c 64 --no-tui --output-format json --rand-regex-url \
        "http://127.0.0.1:$NGINX/fill$k/[a-z]{16}" >"$D/nginx-fill.json" 2>/dev/null || die "oha failed (nginx fill)"
    filled=$((filled + $(jq '.statusCodeDistribution."200" // 0' "$D/nginx-fill.json")))
    ((filled > 100000 && $(nginx_cache_kib) > 65536)) && break
done
((filled > 100000)) || die "nginx's cache did not fill ($filled requests)"
[[ "$(cache_status "http://127.0.0.1:$NGINX/miss/check")" == MISS ]] || die "nginx does not answer a new URL as a MISS"
max_rps_cpu "$NGINX_PID" nginx-miss "http://127.0.0.1:$NGINX/miss/[a-z]{16}" --rand-regex-url >"$D/rps"
nginx_miss_rps=$(cat "$D/rps") nginx_miss_cpu=$CPU_US
nginx_miss_codes=$(codes nginx-miss)
nginx_files=$(nginx_cache_files)
nginx_held=$(nginx_cache_kib)

start_sidecar 1
curl -sf -o /dev/null "http://127.0.0.1:$S_IN/hit"
[[ "$(cache_status "http://127.0.0.1:$S_IN/hit")" == HIT ]] || die "the sidecar does not answer /hit from its cache"
max_rps_cpu "$SC" trellis-hit "http://127.0.0.1:$S_IN/hit" >"$D/rps"; hit_rps=$(cat "$D/rps") hit_cpu=$CPU_US
read -r hit_p50 hit_p99 < <(fixed_rate trellis-hit-rate "http://127.0.0.1:$S_IN/hit")
# The miss path at steady state: a cache that is full and evicting, as it is after its first
# 64 MiB (filling an empty one also pays for fresh memory, which a running sidecar does once).
metric() { curl -s "http://127.0.0.1:$S_ADM/metrics" | awk -v m="$1" '$1 == m { print int($2) }'; }
for k in $(seq 40); do
    taskset -c 0 oha -z 2s -c 64 --no-tui --output-format json --rand-regex-url \
        "http://127.0.0.1:$S_IN/fill$k/[a-z]{16}" >/dev/null 2>&1 || die "oha failed (fill)"
    (($(metric trellis_cache_evictions_total) > 1000)) && break
done
(($(metric trellis_cache_evictions_total) > 1000)) || die "the cache did not fill"
max_rps_cpu "$SC" trellis-miss "http://127.0.0.1:$S_IN/miss/[a-z]{16}" --rand-regex-url >"$D/rps"; miss_rps=$(cat "$D/rps") miss_cpu=$CPU_US
miss_codes=$(codes trellis-miss)
held=$(metric trellis_cache_bytes)
rss_full=$(awk '/^VmRSS/ { print $2 * 1024 }' "/proc/$SC/status")
stop_sidecar
start_sidecar 0
rss_plain=$(awk '/^VmRSS/ { print $2 * 1024 }' "/proc/$SC/status")
max_rps_cpu "$SC" trellis-plain "http://127.0.0.1:$S_IN/miss/[a-z]{16}" --rand-regex-url >"$D/rps"; plain_rps=$(cat "$D/rps") plain_cpu=$CPU_US
stop_sidecar

echo "Cache benchmark, ${SECS}s per measurement, load on core 0, proxies and backend on core 1; $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "| path | req/s | CPU µs/req (proxy) | p50 ms at $RATE req/s | p99 ms at $RATE req/s |"
echo "|---|---:|---:|---:|---:|"
printf '| nginx proxy_cache hit | %.0f | %s | %.3f | %.3f |\n' "$nginx_rps" "$nginx_cpu" "$nginx_p50" "$nginx_p99"
printf '| Trellis sidecar cache hit | %.0f | %s | %.3f | %.3f |\n' "$hit_rps" "$hit_cpu" "$hit_p50" "$hit_p99"
printf '| Trellis sidecar, every request a miss (stored, cache full) | %.0f | %s | | |\n' "$miss_rps" "$miss_cpu"
printf '| Trellis sidecar without a cache policy, same URLs | %.0f | %s | | |\n' "$plain_rps" "$plain_cpu"
printf '| nginx proxy_cache, every request a miss (stored, cache full) | %.0f | %s | | |\n' "$nginx_miss_rps" "$nginx_miss_cpu"
printf '| nginx without proxy_cache, same URLs | %.0f | %s | | |\n' "$nginx_plain_rps" "$nginx_plain_cpu"
echo
echo "miss statuses: Trellis $miss_codes, nginx $nginx_miss_codes"
awk -v h="$held" -v r="$rss_full" -v p="$rss_plain" 'BEGIN { printf "cache full: %.1f MiB held (bound 64 MiB), sidecar RSS %.1f MiB (%.1f MiB without a policy)\n", h / 1048576, r / 1048576, p / 1048576 }'
awk -v f="$filled" -v n="$nginx_files" -v k="$nginx_held" 'BEGIN { printf "nginx: filled with %d requests; after its miss run %d cache files, %.1f MiB on disk (max_size 64 MiB)\n", f, n, k / 1024 }'
awk -v m="$miss_cpu" -v p="$plain_cpu" 'BEGIN { printf "miss-path CPU overhead vs no cache: Trellis %+.1f %%", (m / p - 1) * 100 }'
awk -v m="$nginx_miss_cpu" -v p="$nginx_plain_cpu" 'BEGIN { printf ", nginx %+.1f %%\n", (m / p - 1) * 100 }'
