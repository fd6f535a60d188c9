#!/usr/bin/env bash
# The response cache against nginx's proxy_cache, in one run (docs/caching.md#benchmark):
#  1. hit path: max throughput and CPU per request, and p50/p99 at a fixed rate, through
#     nginx (proxy_cache, proxy_cache_lock) and through a Trellis sidecar (inbound, plain HTTP,
#     a CachePolicy), both in front of the same backend sending `Cache-Control: max-age=600`;
#  2. miss path: a distinct URL per request (every request a miss, stored), through the
#     sidecar with the CachePolicy and through the same sidecar without one; and nginx's own
#     reference, the same URLs through nginx's proxy_cache (full and evicting) and through the
#     same nginx configuration without proxy_cache.
# Load on core 0, proxies and the backend on core 1; nginx gets one worker. The hit and miss
# measurements repeat in BENCH_ROUNDS interleaved rounds (nginx then Trellis; with a policy then
# without, two sidecars side by side), ratios taken per round and their median reported. All of
# Trellis's runs come before nginx's disk phases (see below).
#
#   bash bench/cache.sh      # BENCH_SECONDS (10), BENCH_RATE (1000), BENCH_ROUNDS (3), BENCH_PORT_BASE (28600)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SECS="${BENCH_SECONDS:-10}"
RATE="${BENCH_RATE:-1000}"
ROUNDS="${BENCH_ROUNDS:-3}"
BASE="${BENCH_PORT_BASE:-28600}"
bench_init cache
need oha nginx python3 jq curl
build_release

BACKEND=$BASE; NGINX=$((BASE + 1)); S_IN=$((BASE + 2)); S_OUT=$((BASE + 3)); S_ADM=$((BASE + 4))
NGINX_PLAIN=$((BASE + 5)); P_IN=$((BASE + 6)); P_OUT=$((BASE + 7)); P_ADM=$((BASE + 8))
mkdir -p "$D/nginx/tmp" "$D/nginx/cache" "$D/certs"

# The backend and the caching proxy: one nginx process each, one worker on core 1.
start_nginx_cache 64m "server { listen 127.0.0.1:$BACKEND; keepalive_requests 1000000;
           location / { add_header Cache-Control \"max-age=600\"; return 200 \"ok\\n\"; } }"

backend_sidecar_config
# Two sidecars of `backend` in front of the same app: C with a CachePolicy (its own mesh file),
# P without one (the same configuration on other ports).
echo "services: {}
cache_policies: {bench: {service: backend, max_bytes: 67108864, max_object_bytes: 1048576}}" >"$D/mesh.yaml"
echo "services: {}" >"$D/mesh-plain.yaml"
sed -e "s/:$S_IN,/:$P_IN,/; s/:$S_OUT}/:$P_OUT}/; s/:$S_ADM}/:$P_ADM}/; s#$D/mesh.yaml#$D/mesh-plain.yaml#" \
    "$D/sidecar.yaml" >"$D/sidecar-plain.yaml"
start_sidecar() { # CONFIG LOG: its pid in SC
    RUST_LOG=warn taskset -c 1 "$AGENT" run --config "$1" 2>"$2" & SC=$!
    PIDS+=("$SC")
}
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

# median FILE: the median of the numbers in FILE, one per line.
median() { sort -g "$1" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
all() { awk -v f="${2:-%s}" '{ printf "%s" f, (NR > 1 ? "/" : ""), $1 }' "$1"; } # FILE [FORMAT]: a/b/c
med() { awk -v f="$2" -v m="$(median "$1")" 'BEGIN { printf f, m }'; } # FILE FORMAT: its median
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f\n", a / b }'; }

wait_http backend "http://127.0.0.1:$BACKEND/"
wait_http nginx "http://127.0.0.1:$NGINX/hit"
wait_http "nginx without proxy_cache" "http://127.0.0.1:$NGINX_PLAIN/hit"
start_sidecar "$D/sidecar.yaml" "$D/sidecar.log"; SC_C=$SC
start_sidecar "$D/sidecar-plain.yaml" "$D/sidecar-plain.log"; SC_P=$SC
wait_http "sidecar with a CachePolicy" "http://127.0.0.1:$S_IN/warm"
wait_http "sidecar without one" "http://127.0.0.1:$P_IN/warm"
curl -sf -o /dev/null "http://127.0.0.1:$NGINX/hit"
curl -sf -o /dev/null "http://127.0.0.1:$S_IN/hit"
[[ "$(cache_status "http://127.0.0.1:$NGINX/hit")" == HIT ]] || die "nginx does not answer /hit from its cache"
[[ "$(cache_status "http://127.0.0.1:$S_IN/hit")" == HIT ]] || die "the sidecar does not answer /hit from its cache"
[[ -z "$(cache_status "http://127.0.0.1:$P_IN/hit")" ]] || die "the sidecar without a policy answers from a cache"

# Hits: each round nginx then Trellis, throughput and CPU, then latency at a fixed rate.
for r in $(seq "$ROUNDS"); do
    max_rps_cpu "$NGINX_PID" nginx-hit "http://127.0.0.1:$NGINX/hit" >>"$D/nginx-hit-rps"; echo "$CPU_US" >>"$D/nginx-hit-cpu"
    max_rps_cpu "$SC_C" trellis-hit "http://127.0.0.1:$S_IN/hit" >>"$D/hit-rps"; echo "$CPU_US" >>"$D/hit-cpu"
    ratio "$(tail -1 "$D/hit-cpu")" "$(tail -1 "$D/nginx-hit-cpu")" >>"$D/hit-cpu-ratio"
    read -r p50 p99 < <(fixed_rate nginx-hit-rate "http://127.0.0.1:$NGINX/hit"); echo "$p50" >>"$D/nginx-p50"; echo "$p99" >>"$D/nginx-p99"
    read -r p50 p99 < <(fixed_rate trellis-hit-rate "http://127.0.0.1:$S_IN/hit"); echo "$p50" >>"$D/hit-p50"; echo "$p99" >>"$D/hit-p99"
    ratio "$(tail -1 "$D/hit-p99")" "$(tail -1 "$D/nginx-p99")" >>"$D/hit-p99-ratio"
done

# The miss path at steady state: a cache that is full and evicting, as it is after its first
# 64 MiB (filling an empty one also pays for fresh memory, which a running sidecar does once).
metric() { curl -s "http://127.0.0.1:$S_ADM/metrics" | awk -v m="$1" '$1 == m { print int($2) }'; }
for k in $(seq 40); do
    taskset -c 0 oha -z 2s -c 64 --no-tui --output-format json --rand-regex-url \
        "http://127.0.0.1:$S_IN/fill$k/[a-z]{16}" >/dev/null 2>&1 || die "oha failed (fill)"
    (($(metric trellis_cache_evictions_total) > 1000)) && break
done
(($(metric trellis_cache_evictions_total) > 1000)) || die "the cache did not fill"
# Each round the same kind of URLs (a new key per request) through the sidecar with the policy
# and through the one without.
miss_run() { max_rps_cpu "$SC_C" trellis-miss "http://127.0.0.1:$S_IN/miss$r/[a-z]{16}" --rand-regex-url >>"$D/miss-rps"; echo "$CPU_US" >>"$D/miss-cpu"; }
plain_run() { max_rps_cpu "$SC_P" trellis-plain "http://127.0.0.1:$P_IN/miss$r/[a-z]{16}" --rand-regex-url >>"$D/plain-rps"; echo "$CPU_US" >>"$D/plain-cpu"; }
for r in $(seq "$ROUNDS"); do
    # Alternating which goes first (ABBA), so that a drift of the machine within a round
    # does not favour one of them.
    if ((r % 2)); then miss_run; plain_run; else plain_run; miss_run; fi
    ratio "$(tail -1 "$D/miss-cpu")" "$(tail -1 "$D/plain-cpu")" >>"$D/miss-ratio"
done
miss_codes=$(codes trellis-miss)
held=$(metric trellis_cache_bytes)
rss_full=$(awk '/^VmRSS/ { print $2 * 1024 }' "/proc/$SC_C/status")
rss_plain=$(awk '/^VmRSS/ { print $2 * 1024 }' "/proc/$SC_P/status")
kill -TERM "$SC_C" "$SC_P"; wait "$SC_C" "$SC_P" 2>/dev/null || true

# nginx's stored miss against nginx without proxy_cache, the same URLs, once, for reference.
# Last, because nginx's cache manager keeps deleting files on core 1 for a minute after its
# cache filled, which inflated every figure measured after it (a Trellis hit's p99 read 1.2 ms
# instead of 0.2). Its cache full and evicting first: past max_size (64 MiB of files, which its
# cache manager then trims, at most 100 files per 50 ms by default) and past its keys zone's
# ~80,000 keys (10 MiB), beyond which each miss's worker evicts the least recently used
# entries itself.
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

echo "Cache benchmark, ${SECS}s per measurement, $ROUNDS interleaved rounds (values per round a/b/c, median in bold), load on core 0, proxies and backend on core 1; $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "| path | req/s | CPU µs/req (proxy) | p50 ms at $RATE req/s | p99 ms at $RATE req/s |"
echo "|---|---:|---:|---:|---:|"
row() { # LABEL RPS CPU [P50 P99]: files of per-round values
    local p50="" p99=""
    [[ -n "${4:-}" ]] && p50="$(all "$4" %.3f) **$(med "$4" %.3f)**" && p99="$(all "$5" %.3f) **$(med "$5" %.3f)**"
    echo "| $1 | $(all "$2" %.0f) | $(all "$3") **$(med "$3" %.1f)** | $p50 | $p99 |"
}
row "nginx proxy_cache hit" "$D/nginx-hit-rps" "$D/nginx-hit-cpu" "$D/nginx-p50" "$D/nginx-p99"
row "Trellis sidecar cache hit" "$D/hit-rps" "$D/hit-cpu" "$D/hit-p50" "$D/hit-p99"
row "Trellis sidecar, every request a miss (stored, cache full)" "$D/miss-rps" "$D/miss-cpu"
row "Trellis sidecar without a cache policy, same kind of URLs" "$D/plain-rps" "$D/plain-cpu"
printf '| nginx proxy_cache, every request a miss (stored, cache full), once | %.0f | %s | | |\n' "$nginx_miss_rps" "$nginx_miss_cpu"
printf '| nginx without proxy_cache, same URLs, once | %.0f | %s | | |\n' "$nginx_plain_rps" "$nginx_plain_cpu"
echo
echo "miss statuses (last round): Trellis $miss_codes, nginx $nginx_miss_codes"
awk -v h="$held" -v r="$rss_full" -v p="$rss_plain" 'BEGIN { printf "cache full: %.1f MiB held (bound 64 MiB), sidecar RSS %.1f MiB (%.1f MiB without a policy)\n", h / 1048576, r / 1048576, p / 1048576 }'
awk -v f="$filled" -v n="$nginx_files" -v k="$nginx_held" 'BEGIN { printf "nginx: filled with %d requests; after its miss run %d cache files, %.1f MiB on disk (max_size 64 MiB)\n", f, n, k / 1024 }'
pct() { awk '{ printf "%s%+.1f %%", (NR > 1 ? " / " : ""), ($1 - 1) * 100 }' "$1"; }
echo "hit CPU per request, Trellis / nginx, per round: $(all "$D/hit-cpu-ratio" %.2f), median **$(med "$D/hit-cpu-ratio" %.2f)x**"
echo "hit p99 at $RATE req/s, Trellis / nginx, per round: $(all "$D/hit-p99-ratio" %.2f), median **$(med "$D/hit-p99-ratio" %.2f)x**"
echo "miss-path CPU overhead vs no cache, Trellis, per round: $(pct "$D/miss-ratio"), median **$(awk -v m="$(median "$D/miss-ratio")" 'BEGIN { printf "%+.1f %%", (m - 1) * 100 }')**"
awk -v m="$nginx_miss_cpu" -v p="$nginx_plain_cpu" 'BEGIN { printf "nginx stored miss over forwarding (once): %+.1f %%\n", (m / p - 1) * 100 }'
