#!/usr/bin/env bash
# The cache's miss path in instructions per request (valgrind's callgrind: repeatable on a busy
# machine, unlike CPU time): a sidecar with a CachePolicy whose store is full and evicting,
# every request a new URL (a miss, stored), against the same sidecar without a policy, same
# URLs. docs/caching.md#benchmark.
#
#   bash bench/cache_callgrind.sh   # BENCH_REQUESTS (2000), BENCH_CACHE_BYTES (4 MiB),
#                                   # BENCH_PORT_BASE (28700), BENCH_SKIP_BUILD=1,
#                                   # BENCH_MIN_USES (the policy's min_uses, default 1),
#                                   # BENCH_CG_KEEP=DIR (keep the profiles there, for
#                                   # callgrind_annotate DIR/cg.1.* / DIR/cg.0.*)
#   BENCH_MODE=hit bash bench/cache_callgrind.sh   # the hit path instead: 500 URLs stored
#                                   # (no fill), then each asked N/500 times (N hits); the
#                                   # sidecar without a policy forwards the same requests
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
N="${BENCH_REQUESTS:-2000}"
BYTES="${BENCH_CACHE_BYTES:-4194304}"
BASE="${BENCH_PORT_BASE:-28700}"
MIN_USES="${BENCH_MIN_USES:-1}"
KEEP="${BENCH_CG_KEEP:-}"
MODE="${BENCH_MODE:-miss}"
[[ "$MODE" == miss || "$MODE" == hit ]] || { echo "BENCH_MODE is miss or hit" >&2; exit 2; }
EXTRA=""; [[ "$MIN_USES" == 1 ]] || EXTRA=", min_uses: $MIN_USES"
bench_init cache-callgrind
need valgrind callgrind_control nginx python3 curl
build_release

BACKEND=$BASE; S_IN=$((BASE + 1)); S_OUT=$((BASE + 2)); S_ADM=$((BASE + 3))
mkdir -p "$D/nginx/tmp" "$D/certs"
{ nginx_conf_head backend; cat <<CONF
  server { listen 127.0.0.1:$BACKEND; keepalive_requests 1000000;
           location / { add_header Cache-Control "max-age=600"; return 200 "ok\n"; } }
}
CONF
} >"$D/nginx/backend.conf"
nginx -c "$D/nginx/backend.conf" -p "$D/nginx" -g 'daemon off;' & PIDS+=($!)

backend_sidecar_config

# COUNT distinct paths under PREFIX, each asked REPEAT times in a row (default 1), on one
# keep-alive connection.
load() { # PREFIX COUNT [REPEAT]
    python3 - "$S_IN" "$1" "$2" "${3:-1}" <<'PY'
import http.client, sys
port, prefix, n, rep = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for i in range(n):
    for _ in range(rep):
        c.request("GET", f"{prefix}/{i}", headers={"Host": "backend"})
        r = c.getresponse(); r.read()
        if r.status != 200:
            sys.exit(f"{prefix}/{i}: {r.status}")
PY
}
metric() { curl -s "http://127.0.0.1:$S_ADM/metrics" | awk -v m="$1" '$1 == m { print int($2) }'; }

# Instructions per request of the sidecar over N misses, after filling its store.
run() { # WITH-CACHE (0|1)
    echo "services: {}" >"$D/mesh.yaml"
    if [[ "$1" == 1 ]]; then
        echo "cache_policies: {bench: {service: backend, max_bytes: $BYTES, max_object_bytes: 65536$EXTRA}}" >>"$D/mesh.yaml"
    fi
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$D/cg.$1.%p" \
        "$AGENT" run --config "$D/sidecar.yaml" 2>"$D/sidecar.$1.log" & SC=$!
    for _ in $(seq 600); do curl -sf -o /dev/null -m 2 "http://127.0.0.1:$S_IN/warm" && break; sleep 0.2; done
    # Fill until the store evicts (without a policy: the same warm-up).
    # With min_uses N a URL is stored at its Nth request: each is asked N times in a row
    # (asked again only after thousands of others, its uses would be forgotten).
    # (Not for hits: an S3-FIFO store that is full evicts new entries from its small queue
    # before they are asked again.)
    [[ "$MODE" == hit ]] || load "/fill" $((BYTES / 1000)) "$MIN_USES"
    if [[ "$1" == 1 && "$MODE" == miss ]]; then
        (($(metric trellis_cache_evictions_total) > 100)) || die "the cache did not fill"
    fi
    if [[ "$MODE" == hit ]]; then
        # Past the sidecar's one-off work after readiness (mesh-agent's trim of its startup
        # pages, 2 s after it; the fill outlasts it in the miss mode): measured in the hit
        # window, it added about 1,500 instructions per hit.
        sleep 8
        load "/hit" 500
        local before
        before=$(metric 'trellis_cache_requests_total{status="HIT"}')
        callgrind_control -z "$SC" >/dev/null
        load "/hit" 500 $((N / 500))
        callgrind_control -d "$SC" >/dev/null
        if [[ "$1" == 1 ]]; then
            local hits=$(($(metric 'trellis_cache_requests_total{status="HIT"}') - ${before:-0}))
            ((hits == N)) || die "$hits hits of $N requests"
        fi
    else
        callgrind_control -z "$SC" >/dev/null
        load "/miss" "$N"
        callgrind_control -d "$SC" >/dev/null
    fi
    local ir
    ir=$(cat "$D"/cg."$1".*.* 2>/dev/null | awk '/^(summary|totals):/ { if ($2 > t) t = $2 } END { print t + 0 }')
    kill -TERM "$SC"; wait "$SC" 2>/dev/null || true
    if [[ -n "$KEEP" ]]; then mkdir -p "$KEEP" && cp "$D"/cg."$1".* "$KEEP"/; fi
    rm -f "$D"/cg."$1".*
    echo $((ir / N))
}

with=$(run 1)
without=$(run 0)
if [[ "$MODE" == hit ]]; then
    echo "Hit path, instructions per request (callgrind, $N hits of 500 stored URLs, store of $BYTES bytes); $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "| sidecar | instructions/request |"
    echo "|---|---:|"
    echo "| with a CachePolicy (every request a hit) | $with |"
    echo "| without a policy, same requests (forwarded) | $without |"
    exit 0
fi
echo "Miss path, instructions per request (callgrind, $N requests, store of $BYTES bytes full and evicting); $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "| sidecar | instructions/request |"
echo "|---|---:|"
echo "| with a CachePolicy (every request a miss of a new URL; min_uses $MIN_USES) | $with |"
echo "| without a policy, same URLs | $without |"
awk -v a="$with" -v b="$without" 'BEGIN { printf "miss-path overhead: %+.1f %%\n", (a / b - 1) * 100 }'
