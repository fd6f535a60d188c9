#!/usr/bin/env bash
# Trellis proxy benchmark: one HTTP backend reached directly and through nginx, haproxy,
# a bare tokio + hyper proxy (the stack's floor), nginx two-hop mTLS, and Trellis (one hop, and
# the real two-sidecar mTLS path), measured in one run on a 2-core machine. Load generators run on core 0, backend and proxies on core 1.
#
#   bash bench/run.sh            # 10 s per measurement (BENCH_SECONDS=N to change)
#   bash bench/run.sh --quick    # 2 s per measurement: smoke test
#   bash bench/run.sh --no-docs  # do not rewrite docs/benchmarks.md
#   bash bench/run.sh --pgo      # also Trellis's profile-guided build (bench/pgo.sh), side by side
#
# Environment: BENCH_SECONDS (10), BENCH_RATE (1000 req/s for the latency runs),
# BENCH_CONNS (32 wrk connections), BENCH_PORT_BASE (28100), BENCH_SKIP_BUILD=1,
# BENCH_AGENT=PATH (another mesh-agent binary), BENCH_AGENT_PGO=PATH (with --pgo: a PGO build made
# before; default target/pgo/release/mesh-agent, built by bench/pgo.sh unless BENCH_SKIP_BUILD=1),
# BENCH_FLOOR_PGO=PATH (with --pgo: the hyper floor built the same way; default
# target/pgo-floor/release/examples/hyper_floor, also from bench/pgo.sh),
# BENCH_HOLD_CONNS (1000). Diagnostics instead of
# the run: BENCH_SYSCALLS=1 (per path: sequential latency, CPU and syscalls per request), with
# BENCH_TIMELINE=PATH (a few requests' syscalls, timestamped) or BENCH_HOLD=1 (keep it all up).
# Method and results: docs/benchmarks.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEMPLATES="$ROOT/bench/templates"
DOC="$ROOT/docs/benchmarks.md"

QUICK=0
WRITE_DOCS=1
PGO=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --no-docs) WRITE_DOCS=0 ;;
        --pgo) PGO=1 ;;
        -h | --help)
            sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done
if ((QUICK)); then SECS=2; else SECS="${BENCH_SECONDS:-10}"; fi
RATE="${BENCH_RATE:-1000}"
CONNS="${BENCH_CONNS:-32}"
PORT_BASE="${BENCH_PORT_BASE:-28100}"
[[ "$SECS" =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_SECONDS must be a positive integer" >&2; exit 2; }

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }
warn() { printf '\033[33mwarning: %s\033[0m\n' "$*" >&2; }
die() { printf '\033[31merror: %s\033[0m\n' "$*" >&2; exit 1; }

# --- processes and cleanup -------------------------------------------------------------------

D="$(mktemp -d -t trellis-bench.XXXXXX)"
chmod 755 "$D" # nginx workers run as nobody and need to reach their temp dirs
mkdir -p "$D/logs" "$D/certs"
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 30); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    if ((rc != 0)) && [[ -d "$D/logs" ]]; then
        echo "logs kept in $D/logs" >&2
    else
        rm -rf "$D"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "bench/run.sh: command failed at line $LINENO" >&2' ERR
trap 'exit 130' INT TERM

# start NAME CMD...: run CMD on core 1 in the background, output to $D/logs/NAME.log
start() {
    local name="$1"
    shift
    taskset -c 1 "$@" >"$D/logs/$name.log" 2>&1 &
    PIDS+=("$!")
    eval "PID_${name//-/_}=$!"
}

# --- prerequisites ---------------------------------------------------------------------------

need_apt=()
for tool in nginx:nginx haproxy:haproxy wrk:wrk jq:jq curl:curl taskset:util-linux openssl:openssl ss:iproute2 python3:python3; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool#*:}")
done
if ((PGO)) && [[ -z "${BENCH_AGENT_PGO:-}" ]]; then # bench/pgo.sh: llvm-profdata of rustc's LLVM
    llvm_major="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
    command -v "llvm-profdata-$llvm_major" >/dev/null 2>&1 || need_apt+=("llvm-$llvm_major")
fi
if ((${#need_apt[@]})); then
    log "installing ${need_apt[*]} with apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
export PATH="$HOME/.cargo/bin:$PATH"
LAT_TOOL=oha
if ! command -v oha >/dev/null 2>&1; then
    log "installing oha with cargo (a few minutes)"
    if ! cargo install oha --locked >"$D/oha-install.log" 2>&1; then
        tail -5 "$D/oha-install.log" >&2
        warn "oha could not be installed: latency comes from wrk's closed-loop run (not fixed-rate, not latency-corrected)"
        LAT_TOOL=wrk
    fi
fi
OHA_JSON=(--output-format json)
if [[ "$LAT_TOOL" == oha ]] && ! oha --help 2>/dev/null | grep -q -- '--output-format'; then
    OHA_JSON=(-j) # oha < 1.5
fi

log "building mesh-agent (cargo build --release --locked -p mesh-agent)"
if [[ -n "${BENCH_AGENT:-}" ]]; then
    log "using BENCH_AGENT=$BENCH_AGENT instead (e.g. an older build, for a before/after)"
elif [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release --locked -p mesh-agent) >"$D/logs/build.log" 2>&1 ||
        { tail -30 "$D/logs/build.log" >&2; die "cargo build failed"; }
fi
AGENT="${BENCH_AGENT:-$ROOT/target/release/mesh-agent}"
[[ -x "$AGENT" ]] || die "$AGENT was not built"
# The stack's floor: a bare tokio + hyper proxy (proxy/examples/hyper_floor.rs), no features.
FLOOR="$ROOT/target/release/examples/hyper_floor"
if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release --locked -p trellis-proxy --example hyper_floor) >>"$D/logs/build.log" 2>&1 ||
        { tail -30 "$D/logs/build.log" >&2; die "cargo build of the hyper floor failed"; }
fi
[[ -x "$FLOOR" ]] || die "$FLOOR was not built"
# The profile-guided build (bench/pgo.sh): a second pair of sidecars, measured beside the first.
if ((PGO)); then
    AGENT_PGO="${BENCH_AGENT_PGO:-$ROOT/target/pgo/release/mesh-agent}"
    if [[ -z "${BENCH_AGENT_PGO:-}" && "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
        log "building the PGO mesh-agent (bench/pgo.sh: two builds and a training run)"
        (unset BENCH_AGENT; bash "$ROOT/bench/pgo.sh") >"$D/logs/pgo.log" 2>&1 ||
            { tail -30 "$D/logs/pgo.log" >&2; die "bench/pgo.sh failed"; }
    fi
    [[ -x "$AGENT_PGO" ]] || die "$AGENT_PGO was not built (bash bench/pgo.sh)"
    # The floor built the same way (bench/pgo.sh, step 4): PGO against PGO.
    FLOOR_PGO="${BENCH_FLOOR_PGO:-$ROOT/target/pgo-floor/release/examples/hyper_floor}"
    [[ -x "$FLOOR_PGO" ]] || die "$FLOOR_PGO was not built (bash bench/pgo.sh)"
fi

# --- ports, certificates, configs ------------------------------------------------------------

# Free ports from PORT_BASE up, skipping anything already listening.
declare -A PORT
used_ports="$(ss -Htan 2>/dev/null | awk '{print $4}' | sed 's/.*://' | sort -u)"
next_port=$PORT_BASE
for name in backend backend_status nginx haproxy floor_pooled floor_paired floor_paired_pgo mtls_a mtls_b mtls_b_status b_in b_out b_admin a_in a_out a_admin pb_in pb_out pb_admin pa_in pa_out pa_admin; do
    while grep -qx "$next_port" <<<"$used_ports"; do next_port=$((next_port + 1)); done
    PORT[$name]=$next_port
    next_port=$((next_port + 1))
done
((next_port < 65535)) || die "no free ports above $PORT_BASE"

CERTS="$D/certs"
log "certificates: mesh-agent cert (trust domain bench.local) in $CERTS"
"$AGENT" cert init --trust-domain bench.local --dir "$CERTS" >/dev/null
for svc in client backend; do "$AGENT" cert issue --service "$svc" --dir "$CERTS" >/dev/null; done
# nginx's proxy_ssl_verify always checks the server name against DNS SANs/CN, and Trellis leaves
# carry only a SPIFFE URI SAN. So nginx B's server certificate is issued by the same Trellis CA
# with openssl, with the same URI SAN plus DNS:backend.bench.local (same key type: P-256).
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$CERTS/nginx-b-key.pem" 2>/dev/null
openssl req -new -key "$CERTS/nginx-b-key.pem" -subj "/CN=backend.bench.local" -out "$CERTS/nginx-b.csr" 2>/dev/null
cat >"$CERTS/nginx-b.ext" <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=DNS:backend.bench.local,URI:spiffe://bench.local/service/backend
EOF
openssl x509 -req -in "$CERTS/nginx-b.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca-key.pem" \
    -set_serial "0x$(openssl rand -hex 16)" -days 1 -sha256 -extfile "$CERTS/nginx-b.ext" \
    -out "$CERTS/nginx-b.pem" 2>/dev/null
openssl verify -CAfile "$CERTS/ca.pem" "$CERTS/nginx-b.pem" "$CERTS/client.pem" >/dev/null ||
    die "openssl cannot verify the benchmark certificates against ca.pem"

# render TEMPLATE OUT KEY=VALUE...: replace @KEY@ with VALUE
render() {
    local src="$TEMPLATES/$1" out="$2" expr=()
    shift 2
    local kv
    for kv in "$@"; do expr+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${expr[@]}" "$src" >"$out"
    if grep -q '@[A-Z_]*@' "$out"; then die "unrendered placeholder in $out"; fi
}

# nginx_instance NAME TEMPLATE KEY=VALUE...
nginx_instance() {
    local name="$1" tpl="$2" dir="$D/$1"
    shift 2
    mkdir -p "$dir/tmp"
    render nginx-common.inc "$dir/common.inc" DIR="$dir"
    render nginx-http-common.inc "$dir/http-common.inc" DIR="$dir"
    render "$tpl" "$dir/nginx.conf" DIR="$dir" CERTS="$CERTS" BACKEND_PORT="${PORT[backend]}" "$@"
    nginx -t -q -c "$dir/nginx.conf" -p "$dir" -e "$dir/error.log" >"$D/logs/$name-test.log" 2>&1 ||
        { cat "$D/logs/$name-test.log" >&2; die "nginx config $name is invalid"; }
    start "$name" nginx -c "$dir/nginx.conf" -p "$dir" -e "$dir/error.log"
}

log "starting backend and proxies on core 1 (ports ${PORT[backend]}-$((next_port - 1)))"
nginx_instance backend nginx-backend.conf PORT="${PORT[backend]}" STATUS_PORT="${PORT[backend_status]}"
nginx_instance nginx nginx-proxy.conf PORT="${PORT[nginx]}"
nginx_instance mtls_b nginx-mtls-b.conf PORT="${PORT[mtls_b]}" STATUS_PORT="${PORT[mtls_b_status]}"
nginx_instance mtls_a nginx-mtls-a.conf PORT="${PORT[mtls_a]}" B_PORT="${PORT[mtls_b]}"
render haproxy.cfg "$D/haproxy.cfg" PORT="${PORT[haproxy]}" BACKEND_PORT="${PORT[backend]}"
haproxy -c -q -f "$D/haproxy.cfg" >"$D/logs/haproxy-test.log" 2>&1 ||
    { cat "$D/logs/haproxy-test.log" >&2; die "haproxy config is invalid"; }
start haproxy haproxy -db -f "$D/haproxy.cfg"
for mode in pooled paired; do
    start "floor_$mode" "$FLOOR" "127.0.0.1:${PORT[floor_$mode]}" "127.0.0.1:${PORT[backend]}" "$mode"
done
if ((PGO)); then
    start floor_paired_pgo "$FLOOR_PGO" "127.0.0.1:${PORT[floor_paired_pgo]}" "127.0.0.1:${PORT[backend]}" paired
fi

# trellis_pair AGENT DIR X: sidecars A (service client) and B (service backend) run by AGENT,
# their configs and mesh file under DIR, ports ${X}a_* and ${X}b_*, processes trellis_${X}a/b.
SIDECARS=()
trellis_pair() {
    local agent="$1" dir="$2" x="$3" s
    mkdir -p "$dir"
    render mesh.yaml "$dir/mesh.yaml" B_INBOUND_PORT="${PORT[${x}b_in]}"
    for s in b a; do
        render sidecar.yaml "$dir/sidecar-$s.yaml" SERVICE="$([[ $s == a ]] && echo client || echo backend)" \
            DIR="$dir" CERTS="$CERTS" BACKEND_PORT="${PORT[backend]}" INBOUND_PORT="${PORT[${x}${s}_in]}" \
            OUTBOUND_PORT="${PORT[${x}${s}_out]}" ADMIN_PORT="${PORT[${x}${s}_admin]}"
    done
    # tokio sizes its runtime from the CPU affinity mask, so taskset -c 1 gives one worker thread.
    start "trellis_${x}b" env RUST_LOG=warn "$agent" run --config "$dir/sidecar-b.yaml"
    start "trellis_${x}a" env RUST_LOG=warn "$agent" run --config "$dir/sidecar-a.yaml"
    SIDECARS+=("${x}a" "${x}b")
}
trellis_pair "$AGENT" "$D" ""
# The same two sidecars from the PGO build, with their own mesh file.
if ((PGO)); then trellis_pair "$AGENT_PGO" "$D/pgo" p; fi

# wait_http URL SECONDS: until URL answers 200
wait_http() {
    local deadline=$((SECONDS + $2))
    until curl -sf -o /dev/null -m 1 "$1"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}
wait_port() {
    local deadline=$((SECONDS + $2))
    until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}
for p in backend nginx haproxy floor_pooled floor_paired mtls_a mtls_b $( ((PGO)) && echo floor_paired_pgo || true); do
    wait_port "${PORT[$p]}" 10 || die "$p did not listen on ${PORT[$p]} (see $D/logs/$p.log and $D/$p/error.log)"
done
for s in "${SIDECARS[@]}"; do
    wait_http "http://127.0.0.1:${PORT[${s}_admin]}/ready" 30 ||
        { tail -20 "$D/logs/trellis_$s.log" >&2; die "Trellis sidecar ${s^^} not ready"; }
done

# nginx runs a master plus one worker: the worker does the work.
worker_of() {
    local w="" i
    for i in $(seq 50); do
        w="$(pgrep -P "$1" | head -1 || true)"
        [[ -n "$w" ]] && break
        sleep 0.1
    done
    echo "$w"
}
declare -A PROC=(
    [backend]="$(worker_of "$PID_backend")"
    [nginx]="$(worker_of "$PID_nginx")"
    [haproxy]="$PID_haproxy"
    [floor_pooled]="$PID_floor_pooled"
    [floor_paired]="$PID_floor_paired"
    [mtls_a]="$(worker_of "$PID_mtls_a")"
    [mtls_b]="$(worker_of "$PID_mtls_b")"
    [trellis_a]="$PID_trellis_a"
    [trellis_b]="$PID_trellis_b"
)
if ((PGO)); then
    PROC[trellis_pa]="$PID_trellis_pa" PROC[trellis_pb]="$PID_trellis_pb"
    PROC[floor_paired_pgo]="$PID_floor_paired_pgo"
fi
for k in "${!PROC[@]}"; do [[ -n "${PROC[$k]}" ]] || die "no worker process for $k"; done

# --- paths -----------------------------------------------------------------------------------

PATHS=(direct nginx haproxy floor_paired floor_pooled nginx2 trellis1 trellis2)
declare -A LABEL=(
    [direct]="direct"
    [nginx]="nginx 1-hop"
    [haproxy]="haproxy 1-hop"
    [floor_paired]="hyper floor 1-hop (paired)"
    [floor_pooled]="hyper floor 1-hop (pooled)"
    [floor_paired_pgo]="hyper floor 1-hop (paired, PGO)"
    [nginx2]="nginx 2-hop mTLS"
    [trellis1]="Trellis 1-hop"
    [trellis2]="Trellis 2-hop mTLS"
    [trellis1_pgo]="Trellis 1-hop (PGO)"
    [trellis2_pgo]="Trellis 2-hop mTLS (PGO)"
)
declare -A URL=(
    [direct]="http://127.0.0.1:${PORT[backend]}/"
    [nginx]="http://127.0.0.1:${PORT[nginx]}/"
    [haproxy]="http://127.0.0.1:${PORT[haproxy]}/"
    [floor_paired]="http://127.0.0.1:${PORT[floor_paired]}/"
    [floor_pooled]="http://127.0.0.1:${PORT[floor_pooled]}/"
    [floor_paired_pgo]="http://127.0.0.1:${PORT[floor_paired_pgo]}/"
    [nginx2]="http://127.0.0.1:${PORT[mtls_a]}/"
    [trellis1]="http://127.0.0.1:${PORT[b_in]}/"
    [trellis2]="http://127.0.0.1:${PORT[a_out]}/"
    [trellis1_pgo]="http://127.0.0.1:${PORT[pb_in]}/"
    [trellis2_pgo]="http://127.0.0.1:${PORT[pa_out]}/"
)
# processes doing the proxying on each path (for per-process CPU and RSS)
declare -A PATH_PROCS=(
    [direct]=""
    [nginx]="nginx"
    [haproxy]="haproxy"
    [floor_paired]="floor_paired"
    [floor_pooled]="floor_pooled"
    [floor_paired_pgo]="floor_paired_pgo"
    [nginx2]="mtls_a mtls_b"
    [trellis1]="trellis_b"
    [trellis2]="trellis_a trellis_b"
    [trellis1_pgo]="trellis_pb"
    [trellis2_pgo]="trellis_pa trellis_pb"
)
if ((PGO)); then PATHS+=(floor_paired_pgo trellis1_pgo trellis2_pgo); fi
# Every request carries Host: backend (the Trellis outbound listener routes on it).
HOST_HDR="Host: backend"

log "checking every path serves 200 \"ok\""
for p in "${PATHS[@]}"; do
    code="$(curl -sS -m 5 -o "$D/check-$p.body" -w '%{http_code}' -H "$HOST_HDR" "${URL[$p]}" 2>"$D/check-$p.err" || true)"
    if [[ "$code" != 200 ]] || [[ "$(cat "$D/check-$p.body")" != ok ]]; then
        cat "$D/check-$p.err" "$D/check-$p.body" >&2 2>/dev/null || true
        die "path '${LABEL[$p]}' (${URL[$p]}) answered HTTP ${code:-none}, expected 200 ok"
    fi
done
# nginx A really verified B and B really verified A: a request without a client cert must fail.
if curl -sk -m 5 -o /dev/null -w '%{http_code}' "https://127.0.0.1:${PORT[mtls_b]}/" | grep -q '^200$'; then
    die "nginx B accepted a request without a client certificate"
fi

# --- syscalls per request (BENCH_SYSCALLS=1: count, print, exit) --------------------------------
# Every process of a path under `strace -c -f` while N sequential GETs go over one keep-alive
# connection: at low load a request's latency is mostly its syscalls and wakeups, so this shows
# where a proxy does more kernel round trips than another (docs/performance.md).
if [[ "${BENCH_SYSCALLS:-0}" == 1 ]]; then
    command -v strace >/dev/null || die "BENCH_SYSCALLS=1 needs strace"
    SN="${BENCH_REQUESTS:-2000}"
    seq_load() { # URL COUNT
        python3 - "$1" "$2" <<'PY'
import http.client, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1]); n = int(sys.argv[2])
c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
for i in range(n):
    c.request("GET", "/", headers={"Host": "backend"})
    r = c.getresponse(); r.read()
    if r.status != 200:
        sys.exit(f"request {i}: {r.status}")
PY
    }
    if [[ "${BENCH_HOLD:-0}" == 1 ]]; then # keep everything running for a look by hand
        for p in "${PATHS[@]}"; do echo "url $p ${URL[$p]}"; done
        for k in "${!PROC[@]}"; do echo "pid $k ${PROC[$k]}"; done
        echo "held; kill $$ to stop"
        # `wait` (not a foreground `sleep`) so that the TERM trap, and the cleanup, run at once
        while :; do sleep 3600 & wait $!; done
    fi
    if [[ -n "${BENCH_TIMELINE:-}" ]]; then # one path's syscalls with timestamps, a few requests
        p="$BENCH_TIMELINE"; args=()
        for k in ${PATH_PROCS[$p]}; do args+=(-p "${PROC[$k]}"); done
        seq_load "${URL[$p]}" 200
        strace -f -ttt -T -qq -o "$D/timeline" "${args[@]}" & st=$!
        sleep 1; seq_load "${URL[$p]}" 20; sleep 0.2; kill -INT $st; wait $st || true
        echo "pids: ${PROC[*]}"; tail -60 "$D/timeline"; exit 0
    fi
    for p in direct nginx haproxy floor_paired trellis1 nginx2 trellis2; do
        # one request at a time (-c 1): the latency of the path alone, no queueing; and the
        # CPU time (schedstat, ns) each process of the path spent per request meanwhile
        declare -A NS0=()
        declare -A CS0=()
        for k in ${PATH_PROCS[$p]} backend; do
            NS0[$k]=$(cat /proc/"${PROC[$k]}"/task/*/schedstat | awk '{ s += $1 } END { print s }')
            CS0[$k]=$(cat /proc/"${PROC[$k]}"/task/*/status | awk '/ctxt_switches/ { s += $2 } END { print s }')
        done
        taskset -c 0 oha -n "$SN" -c 1 --no-tui "${OHA_JSON[@]}" -H "$HOST_HDR" "${URL[$p]}" >"$D/seq.$p.json" 2>/dev/null
        cpu=""
        for k in ${PATH_PROCS[$p]} backend; do
            cpu+=" $k $(cat /proc/"${PROC[$k]}"/task/*/schedstat | awk -v a="${NS0[$k]}" -v n="$SN" '{ s += $1 } END { printf "%.1f", (s - a) / n / 1000 }')"
            cpu+=" (switches $(cat /proc/"${PROC[$k]}"/task/*/status | awk -v a="${CS0[$k]}" -v n="$SN" '/ctxt_switches/ { s += $2 } END { printf "%.2f", (s - a) / n }')/req)"
        done
        printf '%-28s sequential p50 %s p99 %s ms; CPU us/req:%s\n' "${LABEL[$p]}" \
            "$(jq -r '.latencyPercentiles.p50 * 1000 | . * 1000 | round / 1000' "$D/seq.$p.json")" \
            "$(jq -r '.latencyPercentiles.p99 * 1000 | . * 1000 | round / 1000' "$D/seq.$p.json")" "$cpu"
        [[ "$p" == direct ]] && continue
        seq_load "${URL[$p]}" 200
        for k in ${PATH_PROCS[$p]}; do
            pid="${PROC[$k]}"
            [[ -z "$pid" ]] && pid="$(eval echo "\$PID_$k")"
            strace -c -f -qq -o "$D/strace.$p.$k" -p "$pid" &
            eval "ST_$k=$!"
        done
        sleep 1
        seq_load "${URL[$p]}" "$SN"
        for k in ${PATH_PROCS[$p]}; do eval "kill -INT \$ST_$k; wait \$ST_$k" 2>/dev/null || true; done
        for k in ${PATH_PROCS[$p]}; do
            printf '%-28s %-12s' "${LABEL[$p]}" "$k"
            awk -v n="$SN" '$NF != "total" && $4 ~ /^[0-9]+$/ { c[$NF] = $4 } $NF == "total" { t = $4 }
                END { printf " %6.2f/req:", t / n; for (k in c) if (c[k] / n >= 0.05) printf " %s %.2f", k, c[k] / n; print "" }' "$D/strace.$p.$k"
        done
    done
    exit 0
fi

# --- measurement helpers ---------------------------------------------------------------------

HZ="$(getconf CLK_TCK)"
cpu1_busy() { awk '$1 == "cpu1" { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
cpu1_steal() { awk '$1 == "cpu1" { print $9 }' /proc/stat; } # taken by the hypervisor
cpu1_total() { awk '$1 == "cpu1" { s = 0; for (i = 2; i <= NF; i++) s += $i; print s }' /proc/stat; }
proc_cpu() { # utime + stime of all threads, in ticks
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# Connections an nginx instance has accepted so far (stub_status).
nginx_accepts() { curl -sf -m 2 "http://127.0.0.1:$1/" | awk 'NR == 3 { print $1 }'; }
# A counter of a Trellis sidecar's /metrics (sum over the series matching the regex).
trellis_counter() {
    curl -sf -m 2 "http://127.0.0.1:$1/metrics" | awk -v re="$2" '$1 ~ re { s += $2 } END { print s + 0 }'
}
# Between-hop connections and TLS handshakes of a path: nginx B's accepts for nginx 2-hop (each
# accepted connection is one handshake), sidecar B's inbound TLS handshakes for Trellis 2-hop.
hop_handshakes() {
    case "$1" in
        nginx2) nginx_accepts "${PORT[mtls_b_status]}" ;;
        trellis2) trellis_counter "${PORT[b_admin]}" '^trellis_tls_handshakes_total[{].*direction="inbound"' ;;
        trellis2_pgo) trellis_counter "${PORT[pb_admin]}" '^trellis_tls_handshakes_total[{].*direction="inbound"' ;;
        *) echo 0 ;;
    esac
}
procs_cpu() {
    local t=0 k
    for k in $1; do t=$((t + $(proc_cpu "${PROC[$k]}"))); done
    echo "$t"
}

# Is core 1 quiet? Other work there inflates every CPU-per-request number.
b0=$(($(cpu1_busy) + $(cpu1_steal))) t0=$(cpu1_total)
sleep 1
b1=$(($(cpu1_busy) + $(cpu1_steal))) t1=$(cpu1_total)
IDLE_BUSY_PCT=$(awk -v b=$((b1 - b0)) -v t=$((t1 - t0)) 'BEGIN { printf "%.0f", t ? 100 * b / t : 0 }')
if ((IDLE_BUSY_PCT > 5)); then
    warn "core 1 is ${IDLE_BUSY_PCT}% busy (or stolen by the hypervisor) before any load: something else is running, CPU numbers will be inflated"
fi

# Idle RSS of a settled process: a sidecar unmaps its startup code's pages 2 s after it turns
# ready (mesh-agent/src/trim.rs); sample well after that, the same moment for every process.
sleep 3
declare -A RSS_IDLE RSS_LOAD
for k in "${!PROC[@]}"; do RSS_IDLE[$k]=$(rss_kb "${PROC[$k]}"); done

declare -A P50 P99 LAT_OK RPS REQS ERRS CORE_US PROC_US ADDED_US FOREIGN BACKEND_CONNS HOP_HS
ALL_PROCS="${!PROC[*]}"
FAILED=0

# oha fixed-rate, latency-corrected run
latency_run() {
    local p="$1" out="$D/$1.oha.json"
    taskset -c 0 timeout $((SECS + 30)) oha -q "$RATE" -z "${SECS}s" -c "$CONNS" --latency-correction -w \
        --no-tui "${OHA_JSON[@]}" -H "$HOST_HDR" "${URL[$p]}" >"$out" 2>"$D/logs/$p.oha.err" ||
        { cat "$D/logs/$p.oha.err" >&2; die "oha failed on ${LABEL[$p]}"; }
    P50[$p]=$(jq -r '.latencyPercentiles.p50 * 1000' "$out")
    P99[$p]=$(jq -r '.latencyPercentiles.p99 * 1000' "$out")
    LAT_OK[$p]=$(jq -r '((.statusCodeDistribution["200"] // 0) as $ok
        | ([.statusCodeDistribution[]] | add // 0) as $all
        | (.errorDistribution // {} | [.[]] | add // 0) as $err
        | if $all + $err == 0 then 0 else 100 * $ok / ($all + $err) end)' "$out")
}

# wrk closed-loop run with core-1 busy time, proxy process CPU and RSS near the end
max_run() {
    local p="$1" out="$D/$1.wrk.txt"
    local c0 pc0 c1 pc1 wpid s0 s1 a0 a1 t0 t1
    c0=$(cpu1_busy) s0=$(cpu1_steal) t0=$(cpu1_total)
    pc0=$(procs_cpu "${PATH_PROCS[$p]}")
    local bk0 bk1
    bk0=$(procs_cpu backend)
    a0=$(procs_cpu "$ALL_PROCS")
    local bc0 hs0
    bc0=$(nginx_accepts "${PORT[backend_status]}") hs0=$(hop_handshakes "$p")
    taskset -c 0 timeout $((SECS + 30)) wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -H "$HOST_HDR" "${URL[$p]}" >"$out" 2>&1 &
    wpid=$!
    PIDS+=("$wpid")
    sleep "$(awk -v s="$SECS" 'BEGIN { print s * 0.9 }')"
    local k
    for k in ${PATH_PROCS[$p]}; do RSS_LOAD[$k]=$(rss_kb "${PROC[$k]}"); done
    wait "$wpid" || { cat "$out" >&2; die "wrk failed on ${LABEL[$p]}"; }
    c1=$(cpu1_busy) s1=$(cpu1_steal) t1=$(cpu1_total)
    pc1=$(procs_cpu "${PATH_PROCS[$p]}")
    bk1=$(procs_cpu backend)
    a1=$(procs_cpu "$ALL_PROCS")
    BACKEND_CONNS[$p]=$(($(nginx_accepts "${PORT[backend_status]}") - bc0))
    HOP_HS[$p]=$(($(hop_handshakes "$p") - hs0))
    # Noise indicator: share of core 1 stolen by the hypervisor or busy outside the benchmark's
    # processes (their CPU time includes the softirq work they cause, so busy - theirs ~ others).
    FOREIGN[$p]=$(awk -v f=$((c1 - c0 - (a1 - a0))) -v s=$((s1 - s0)) -v t=$((t1 - t0)) \
        'BEGIN { f = f < 0 ? 0 : f; printf "%.0f", t ? 100 * (f + s) / t : 0 }')
    REQS[$p]=$(awk '/requests in/ { print $1 }' "$out")
    RPS[$p]=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$out")
    ERRS[$p]=$(awk '/Non-2xx/ { n += $NF } /Socket errors/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 } END { print n + 0 }' "$out")
    [[ -n "${REQS[$p]}" && "${REQS[$p]}" -gt 0 ]] || { cat "$out" >&2; die "wrk completed no request on ${LABEL[$p]}"; }
    CORE_US[$p]=$(awk -v j=$((c1 - c0)) -v hz="$HZ" -v n="${REQS[$p]}" 'BEGIN { printf "%.2f", j * 1e6 / hz / n }')
    # The issue's definition of a proxy's cost: core-1 busy time per request minus the
    # backend's own CPU in the same run (so the kernel's loopback work the proxy causes counts,
    # and nothing is subtracted across runs).
    ADDED_US[$p]=$(awk -v c=$((c1 - c0)) -v b=$((bk1 - bk0)) -v hz="$HZ" -v n="${REQS[$p]}" 'BEGIN { printf "%.2f", (c - b) * 1e6 / hz / n }')
    PROC_US[$p]=$(awk -v j=$((pc1 - pc0)) -v hz="$HZ" -v n="${REQS[$p]}" 'BEGIN { printf "%.2f", j * 1e6 / hz / n }')
    if [[ "$LAT_TOOL" == wrk ]]; then
        P50[$p]=$(awk '$1 == "50%" { v = $2; u = v; sub(/[a-z]+$/, "", v); sub(/^[0-9.]+/, "", u); print (u == "us" ? v / 1000 : u == "s" ? v * 1000 : v) }' "$out")
        P99[$p]=$(awk '$1 == "99%" { v = $2; u = v; sub(/[a-z]+$/, "", v); sub(/^[0-9.]+/, "", u); print (u == "us" ? v / 1000 : u == "s" ? v * 1000 : v) }' "$out")
        LAT_OK[$p]=100
    fi
    if ((ERRS[$p] > 0)); then
        warn "${LABEL[$p]}: ${ERRS[$p]} errors or non-2xx responses under load"
        FAILED=1
    fi
}

# --- memory with many client connections ------------------------------------------------------
# Measured on the fresh processes, before any load: what 1,000 open keep-alive connections cost
# on top of the idle figure, not what the heap kept from the load runs.

HOLD_CONNS="${BENCH_HOLD_CONNS:-1000}"
declare -A RSS_CONNS
# rss_with_conns PATH PROC: RSS of PROC while HOLD_CONNS connections to PATH are open and idle
rss_with_conns() {
    local p="$1" k="$2" port="${URL[$1]##*:}"
    port="${port%/}"
    coproc HOLD { ulimit -n 4096 && taskset -c 0 python3 "$ROOT/bench/hold_conns.py" "$port" "$HOLD_CONNS" backend; }
    local line=""
    read -r -t 60 line <&"${HOLD[0]}" || true
    [[ "$line" == ready ]] || die "could not open $HOLD_CONNS connections to ${LABEL[$p]}"
    sleep 1
    RSS_CONNS[$k]=$(rss_kb "${PROC[$k]}")
    eval "exec ${HOLD[1]}>&-"
    wait "$HOLD_PID" 2>/dev/null || true
}
log "RSS with $HOLD_CONNS open client connections"
for pair in nginx:nginx trellis2:trellis_a trellis1:trellis_b; do
    rss_with_conns "${pair%%:*}" "${pair#*:}"
    printf '  %-20s %s MB\n' "${LABEL[${pair%%:*}]}" "$(awk -v k="${RSS_CONNS[${pair#*:}]}" 'BEGIN { printf "%.1f", k / 1024 }')"
done

WARMUP=1
CYCLES="${BENCH_CYCLES:-2}"
[[ "$CYCLES" =~ ^[1-9][0-9]*$ ]] || die "BENCH_CYCLES must be a positive integer"
((QUICK)) && CYCLES=1
# Every path is measured once per cycle, cycles one after the other (interleaved), and each
# path keeps its least disturbed cycle: on a shared VM the machine's speed drifts by tens of
# percent over minutes, and noise only ever adds CPU time and latency.
declare -A KEEP
BEST_VARS=(REQS RPS CORE_US PROC_US ADDED_US FOREIGN BACKEND_CONNS HOP_HS)
keep_best() { # PATH CYCLE
    local p="$1" v
    if (($2 == 1)) || awk -v a="${ADDED_US[$p]}" -v b="${KEEP[ADDED_US,$p]}" 'BEGIN { exit !(a < b) }'; then
        for v in "${BEST_VARS[@]}"; do
            declare -n arr="$v"
            KEEP[$v,$p]="${arr[$p]}"
            unset -n arr
        done
    fi
    if (($2 == 1)) || awk -v a="${P99[$p]}" -v b="${KEEP[P99,$p]}" 'BEGIN { exit !(a < b) }'; then
        KEEP[P50,$p]="${P50[$p]}" KEEP[P99,$p]="${P99[$p]}"
    fi
}
log "load: ${SECS}s per run, $CYCLES interleaved cycles; latency: $LAT_TOOL at $RATE req/s; max: wrk -t1 -c$CONNS (client core 0, servers core 1)"
for cycle in $(seq "$CYCLES"); do
    for p in "${PATHS[@]}"; do
        printf '  %-20s' "${LABEL[$p]}"
        taskset -c 0 wrk -t1 -c"$CONNS" -d"${WARMUP}s" -H "$HOST_HDR" "${URL[$p]}" >/dev/null 2>&1 || true
        if [[ "$LAT_TOOL" == oha ]]; then latency_run "$p"; fi
        max_run "$p"
        if [[ "$LAT_TOOL" == oha ]] && [[ "${LAT_OK[$p]%.*}" -lt 100 ]]; then
            warn "${LABEL[$p]}: only ${LAT_OK[$p]}% of the fixed-rate requests succeeded"
            FAILED=1
        fi
        printf 'cycle %s: p50 %6.3f ms  p99 %6.3f ms  %7s req/s  proxy %6s µs/req\n' "$cycle" \
            "${P50[$p]}" "${P99[$p]}" "${RPS[$p]}" "${ADDED_US[$p]}"
        keep_best "$p" "$cycle"
    done
done
for p in "${PATHS[@]}"; do
    for v in "${BEST_VARS[@]}" P50 P99; do
        declare -n arr="$v"
        arr[$p]="${KEEP[$v,$p]}"
        unset -n arr
    done
done

# --- report ----------------------------------------------------------------------------------

declare -A REF=([direct]=nginx [nginx]=nginx [haproxy]=nginx [floor_paired]=nginx [floor_pooled]=nginx [floor_paired_pgo]=nginx [trellis1]=nginx [nginx2]=nginx2 [trellis2]=nginx2 [trellis1_pgo]=nginx [trellis2_pgo]=nginx2)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.2fx", a / b }'; }
mb() { awk -v k="${1:-0}" 'BEGIN { printf "%.1f", k / 1024 }'; }
rss_cell() { # idle/load MB for the processes of a path
    local p="$1" k out=""
    [[ -n "${PATH_PROCS[$p]}" ]] || { echo "-"; return; }
    for k in ${PATH_PROCS[$p]}; do
        out+="${out:+ + }$(mb "${RSS_IDLE[$k]}")/$(mb "${RSS_LOAD[$k]:-${RSS_IDLE[$k]}}")"
    done
    echo "$out"
}

MAIN_TABLE="$(
    printf '| path | p50 ms | p99 ms | max req/s | core-1 µs/req | proxy µs/req (core 1 minus backend) | proxy process µs/req | RSS MB idle/load | core 1 stolen or used by others |\n'
    printf '|---|---:|---:|---:|---:|---:|---:|---|---:|\n'
    for p in "${PATHS[@]}"; do
        printf '| %s | %.3f | %.3f | %s | %s | %s | %s | %s | %s%% |\n' "${LABEL[$p]}" "${P50[$p]}" "${P99[$p]}" \
            "${RPS[$p]}" "${CORE_US[$p]}" "$([[ $p == direct ]] && echo - || echo "${ADDED_US[$p]}")" \
            "$([[ $p == direct ]] && echo - || echo "${PROC_US[$p]}")" "$(rss_cell "$p")" "${FOREIGN[$p]}"
    done
)"
RATIO_TABLE="$(
    printf '| path | p50 vs direct | p99 vs direct | req/s vs direct | core-1 µs/req vs direct | vs | p50 | p99 | req/s | proxy µs/req |\n'
    printf '|---|---:|---:|---:|---:|---|---:|---:|---:|---:|\n'
    for p in "${PATHS[@]}"; do
        [[ $p == direct ]] && continue
        r="${REF[$p]}"
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "${LABEL[$p]}" \
            "$(ratio "${P50[$p]}" "${P50[direct]}")" "$(ratio "${P99[$p]}" "${P99[direct]}")" \
            "$(ratio "${RPS[$p]}" "${RPS[direct]}")" "$(ratio "${CORE_US[$p]}" "${CORE_US[direct]}")" \
            "${LABEL[$r]}" "$(ratio "${P50[$p]}" "${P50[$r]}")" "$(ratio "${P99[$p]}" "${P99[$r]}")" \
            "$(ratio "${RPS[$p]}" "${RPS[$r]}")" "$(ratio "${ADDED_US[$p]}" "${ADDED_US[$r]}")"
    done
)"

CONN_TABLE="$(
    printf '| path | requests | new connections to the backend | new connections (TLS handshakes) between hop A and hop B |\n'
    printf '|---|---:|---:|---:|\n'
    for p in "${PATHS[@]}"; do
        printf '| %s | %s | %s | %s |\n' "${LABEL[$p]}" "${REQS[$p]}" "${BACKEND_CONNS[$p]}" \
            "$([[ $p == nginx2 || $p == trellis2* ]] && echo "${HOP_HS[$p]}" || echo -)"
    done
)"

met() { if awk "BEGIN { exit !($1) }"; then echo "met"; else echo "**NOT met**"; fi; }
added() { awk -v a="$1" -v d="$2" 'BEGIN { printf "%+.3f", a - d }'; }
rss_a=$(mb "${RSS_IDLE[trellis_a]}") rss_b=$(mb "${RSS_IDLE[trellis_b]}")
rss_conns=$(mb "${RSS_CONNS[trellis_a]}")
# cpu_targets SUFFIX NAME: the CPU and latency targets for one Trellis build ("" or "_pgo")
cpu_targets() {
    local t1="trellis1$1" t2="trellis2$1" b="$2" q t n
    printf '| %s 1-hop proxy CPU/req <= 1.0x nginx 1-hop | %s vs %s µs (%s) | %s |\n' "$b" \
        "${ADDED_US[$t1]}" "${ADDED_US[nginx]}" "$(ratio "${ADDED_US[$t1]}" "${ADDED_US[nginx]}")" \
        "$(met "${ADDED_US[$t1]} <= ${ADDED_US[nginx]}")"
    printf '| %s 1-hop max req/s >= nginx 1-hop | %s vs %s | %s |\n' "$b" \
        "${RPS[$t1]}" "${RPS[nginx]}" "$(met "${RPS[$t1]} >= ${RPS[nginx]}")"
    printf '| %s 2-hop mTLS proxy CPU/req <= 0.8x nginx 2-hop mTLS | %s vs %s µs (%s) | %s |\n' "$b" \
        "${ADDED_US[$t2]}" "${ADDED_US[nginx2]}" "$(ratio "${ADDED_US[$t2]}" "${ADDED_US[nginx2]}")" \
        "$(met "${ADDED_US[$t2]} <= 0.8 * ${ADDED_US[nginx2]}")"
    for q in P50 P99; do
        declare -n lat="$q"
        t=$(added "${lat[$t2]}" "${lat[direct]}") n=$(added "${lat[nginx2]}" "${lat[direct]}")
        printf '| %s 2-hop added %s at %s req/s <= nginx 2-hop | %s vs %s ms | %s |\n' "$b" \
            "${q,,}" "$RATE" "$t" "$n" "$(met "$t <= $n")"
        unset -n lat
    done
}
TARGETS="$(
    printf '| target | measured | result |\n|---|---|---|\n'
    cpu_targets "" Trellis
    if ((PGO)); then cpu_targets _pgo "Trellis (PGO)"; fi
    printf '| idle sidecar RSS <= 12 MB | A %s MB, B %s MB | %s |\n' \
        "$rss_a" "$rss_b" "$(met "$rss_a <= 12 && $rss_b <= 12")"
    printf '| sidecar RSS with %s open client connections <= 30 MB | %s MB (nginx 1-hop: %s MB) | %s |\n' \
        "$HOLD_CONNS" "$rss_conns" "$(mb "${RSS_CONNS[nginx]}")" "$(met "$rss_conns <= 30")"
)"

# How much of Trellis's 1-hop cost is the stack under it: the bare hyper proxies do nothing but
# forward, so no proxy built on tokio + hyper can cost less than they do.
FLOOR_TABLE="$(
    printf '| 1-hop path | proxy µs/req | vs nginx 1-hop | max req/s | vs nginx 1-hop |\n'
    printf '|---|---:|---:|---:|---:|\n'
    for p in nginx floor_paired floor_pooled trellis1 $( ((PGO)) && echo floor_paired_pgo trellis1_pgo || true); do
        printf '| %s | %s | %s | %s | %s |\n' "${LABEL[$p]}" "${ADDED_US[$p]}" \
            "$(ratio "${ADDED_US[$p]}" "${ADDED_US[nginx]}")" "${RPS[$p]}" "$(ratio "${RPS[$p]}" "${RPS[nginx]}")"
    done
    # Trellis's inbound reaches the app with hyper's conn::http1 senders from a stack of idle
    # connections (proxy/src/http/h1_pool.rs), the paired floor's shape, not hyper-util's pool.
    printf '| Trellis above the paired floor (its own work) | %s | | | |\n' \
        "$(awk -v a="${ADDED_US[trellis1]}" -v b="${ADDED_US[floor_paired]}" 'BEGIN { printf "%.2f", a - b }')"
    if ((PGO)); then
        printf '| Trellis (PGO) above the paired floor (PGO) | %s | | | |\n' \
            "$(awk -v a="${ADDED_US[trellis1_pgo]}" -v b="${ADDED_US[floor_paired_pgo]}" 'BEGIN { printf "%.2f", a - b }')"
    fi
)"

git_rev="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(cd "$ROOT" && git status --porcelain -- proxy mesh-agent policies Cargo.lock 2>/dev/null)" ]]; then
    git_rev+=" (+ uncommitted changes)"
fi
oha_version="$( [[ $LAT_TOOL == oha ]] && oha --version 2>/dev/null | head -1 || echo "not installed")"
ENV_LINE="$(date -u '+%Y-%m-%d %H:%M UTC'); Trellis $git_rev; $(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)); Linux $(uname -r); $(nginx -v 2>&1 | sed 's/.*: //'); HAProxy $(haproxy -v | awk 'NR == 1 { print $3 }'); $oha_version; wrk $( (wrk -v 2>&1 || true) | awk 'NR == 1 { print $2 }')"
PGO_NOTE=""
((PGO)) && PGO_NOTE="; \"(PGO)\": the same sources built by bench/pgo.sh (profile-guided, trained on the benchmark scripts' traffic)"
MODE_LINE="$SECS s per run, best of $CYCLES interleaved cycles per path$( ((QUICK)) && echo ' (--quick smoke run: noisy, do not quote)'); latency: $( [[ $LAT_TOOL == oha ]] && echo "oha -q $RATE -c $CONNS --latency-correction (open loop)" || echo "wrk closed loop (oha missing: not fixed-rate)"); max: wrk -t1 -c$CONNS; core 1 busy or stolen before load: ${IDLE_BUSY_PCT}%$PGO_NOTE"

echo
echo "Results: $ENV_LINE"
echo "$MODE_LINE"
echo
echo "$MAIN_TABLE"
echo
echo "Ratios (vs: the nginx path of the same shape; proxy µs/req ratio compares the proxies' own cost):"
echo
echo "$RATIO_TABLE"
echo
echo "Connections opened during the max runs (wrk keeps $CONNS connections open throughout):"
echo
echo "$CONN_TABLE"
echo
echo "The stack's floor (bare tokio + hyper proxies, proxy/examples/hyper_floor.rs):"
echo
echo "$FLOOR_TABLE"
echo
echo "Targets:"
echo
echo "$TARGETS"
echo

if ((WRITE_DOCS)); then
    mkdir -p "$(dirname "$DOC")"
    marker='<!-- bench/run.sh writes everything below this line -->'
    if [[ -f "$DOC" ]] && grep -qF "$marker" "$DOC"; then
        awk -v m="$marker" '{ print } $0 == m { exit }' "$DOC" >"$D/doc.head"
    else
        cat "$TEMPLATES/benchmarks-method.md" >"$D/doc.head"
        echo "$marker" >>"$D/doc.head"
    fi
    {
        cat "$D/doc.head"
        echo
        echo "## Results"
        echo
        echo "$ENV_LINE."
        echo
        echo "$MODE_LINE."
        echo
        echo "$MAIN_TABLE"
        echo
        echo "Ratios (\"vs\" is the nginx path of the same shape; its proxy µs/req ratio compares the proxies' own cost):"
        echo
        echo "$RATIO_TABLE"
        echo
        echo "Connections opened during the max runs (wrk keeps its $CONNS connections open throughout; a"
        echo "proxy that reuses its upstream connections opens at most about as many, once):"
        echo
        echo "$CONN_TABLE"
        echo
        echo "The stack's floor: two bare tokio + hyper 1-hop proxies (proxy/examples/hyper_floor.rs) that"
        echo "only forward (paired: one upstream connection per client connection through"
        echo "hyper::client::conn; pooled: hyper-util's legacy pooled client, one shared connection pool as in Trellis's inbound):"
        echo
        echo "$FLOOR_TABLE"
        echo
        echo "Targets:"
        echo
        echo "$TARGETS"
    } >"$DOC"
    log "results written to ${DOC#"$ROOT"/}"
fi

((FAILED == 0)) || die "some requests failed under load (see warnings above)"
