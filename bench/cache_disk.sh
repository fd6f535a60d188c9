#!/usr/bin/env bash
# The response cache's disk tier against nginx's proxy_cache (itself a disk cache), in one run
# (docs/caching.md#benchmark): hits of a 1 MiB object, which the sidecar's policy sends to its
# disk tier (memory's max_object_bytes is 64 KiB), through nginx (proxy_cache as cache.sh sets
# it, plus sendfile on: what an nginx operator serving large cached files would set) and through a Trellis sidecar
# (inbound, plain HTTP), both in front of the same backend (an nginx serving the file with
# `Cache-Control: max-age=600`). Max throughput and CPU per hit, then p50/p99 at a fixed rate.
# Load on core 0, proxies and the backend on core 1; nginx gets one worker. Both caches' files
# sit in the page cache after the first hit: this measures serving a hot file, not the disk.
#
#   bash bench/cache_disk.sh   # BENCH_SECONDS (10), BENCH_RATE (200), BENCH_PORT_BASE (28650),
#                              # BENCH_OBJECT_BYTES (1048576), BENCH_SKIP_BUILD=1
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SECS="${BENCH_SECONDS:-10}"
RATE="${BENCH_RATE:-200}"
BASE="${BENCH_PORT_BASE:-28650}"
SIZE="${BENCH_OBJECT_BYTES:-1048576}"
bench_init cache-disk
need nginx oha jq curl taskset
build_release

BACKEND=$BASE; NGINX=$((BASE + 1)); S_IN=$((BASE + 2)); S_OUT=$((BASE + 3)); S_ADM=$((BASE + 4))
mkdir -p "$D/nginx/tmp" "$D/nginx/cache" "$D/certs" "$D/www" "$D/disk"
head -c "$SIZE" /dev/urandom >"$D/www/obj"

start_nginx_cache 1g "server { listen 127.0.0.1:$BACKEND; keepalive_requests 1000000;
           location /big/ { alias $D/www/; add_header Cache-Control \"max-age=600\"; } }" "sendfile on;"

backend_sidecar_config
cat >"$D/mesh.yaml" <<CONF
services: {}
cache_policies:
  bench:
    service: backend
    max_bytes: 67108864
    max_object_bytes: 65536
    disk: {path: $D/disk, max_bytes: 1073741824}
CONF
RUST_LOG=warn taskset -c 1 "$AGENT" run --config "$D/sidecar.yaml" 2>"$D/sidecar.log" & SC=$!
PIDS+=("$SC")

# max_rps_cpu PID NAME URL: req/s, and CPU_US the process's µs per request.
max_rps_cpu() {
    local pid="$1" name="$2" url="$3" t0 t1 rps
    t0=$(tree_ticks "$pid")
    taskset -c 0 oha -z "${SECS}s" -c 16 -w --no-tui --output-format json "$url" \
        >"$D/$name.json" 2>/dev/null || die "oha failed ($name)"
    rps=$(jq -r '.summary.requestsPerSec' "$D/$name.json")
    t1=$(tree_ticks "$pid")
    CPU_US=$(awk -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v r="$rps" -v s="$SECS" 'BEGIN { printf "%.1f", t * 1e6 / hz / (r * s) }')
    CODES=$(jq -c '.statusCodeDistribution' "$D/$name.json")
    echo "$rps"
}
# The cache status of a GET, and that the body is the object, byte for byte.
check_hit() { # URL
    local st
    st=$(curl -s -o "$D/got" -D - "$1" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-cache-status" { print $2 }')
    cmp -s "$D/got" "$D/www/obj" || die "$1: the body is not the object"
    echo "$st"
}

wait_http backend "http://127.0.0.1:$BACKEND/big/obj"
wait_http nginx "http://127.0.0.1:$NGINX/big/obj"
wait_http sidecar "http://127.0.0.1:$S_IN/big/obj"
metric() { curl -s "http://127.0.0.1:$S_ADM/metrics" | awk -v m="$1" '$1 == m { print int($2) }'; }
[[ "$(check_hit "http://127.0.0.1:$NGINX/big/obj")" == HIT ]] || die "nginx does not answer from its cache"
# The sidecar's disk write completes as the first response ends: wait for the file.
for _ in $(seq 50); do (($(metric trellis_cache_disk_writes_total) >= 1)) && break; sleep 0.1; done
[[ "$(check_hit "http://127.0.0.1:$S_IN/big/obj")" == HIT ]] || die "the sidecar does not answer from its cache"
hits0=$(metric trellis_cache_disk_hits_total)
((hits0 >= 1)) || die "the sidecar's hit did not come from its disk tier"

# Not in a subshell: max_rps_cpu sets CPU_US and CODES.
max_rps_cpu "$NGINX_PID" nginx "http://127.0.0.1:$NGINX/big/obj" >"$D/rps"
nginx_rps=$(cat "$D/rps") nginx_cpu=$CPU_US nginx_codes=$CODES
max_rps_cpu "$SC" trellis "http://127.0.0.1:$S_IN/big/obj" >"$D/rps"
trellis_rps=$(cat "$D/rps") trellis_cpu=$CPU_US trellis_codes=$CODES
disk_hits=$(($(metric trellis_cache_disk_hits_total) - hits0))
read -r nginx_p50 nginx_p99 < <(fixed_rate nginx-rate "http://127.0.0.1:$NGINX/big/obj")
read -r trellis_p50 trellis_p99 < <(fixed_rate trellis-rate "http://127.0.0.1:$S_IN/big/obj")
rss=$(awk '/^VmRSS/ { print $2 * 1024 }' "/proc/$SC/status")

echo "Disk-tier cache hits of a $SIZE-byte object, ${SECS}s per measurement, 16 connections for the maximum, $RATE req/s for the latency; load on core 0, proxies and backend on core 1; $(date -u '+%Y-%m-%d %H:%M UTC'); Trellis $(git -C "$ROOT" rev-parse --short HEAD)"
echo
echo "| path | req/s | MiB/s | CPU µs/req (proxy) | p50 ms at $RATE req/s | p99 ms at $RATE req/s |"
echo "|---|---:|---:|---:|---:|---:|"
for row in "nginx proxy_cache hit (sendfile on):$nginx_rps:$nginx_cpu:$nginx_p50:$nginx_p99" \
    "Trellis sidecar, disk-tier hit:$trellis_rps:$trellis_cpu:$trellis_p50:$trellis_p99"; do
    IFS=: read -r n r c p50 p99 <<<"$row"
    awk -v n="$n" -v r="$r" -v c="$c" -v a="$p50" -v b="$p99" -v s="$SIZE" \
        'BEGIN { printf "| %s | %.0f | %.0f | %s | %.3f | %.3f |\n", n, r, r * s / 1048576, c, a, b }'
done
echo
echo "statuses: nginx $nginx_codes, Trellis $trellis_codes; the sidecar's disk hits counted during its maximum run: $disk_hits; sidecar RSS after: $(awk -v r="$rss" 'BEGIN { printf "%.1f MiB", r / 1048576 }')"
