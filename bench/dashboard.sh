#!/usr/bin/env bash
# Dashboard cost benchmark (issue 18): one real `mesh-agent dashboard` watching a fleet of real
# release `mesh-agent run` sidecars registered in one real etcd, all on this machine, loopback.
#
#   bash bench/dashboard.sh [--quick] [--no-docs]
#
# Target: a dashboard watching 300 sidecars refreshes within 2 s using <= 20 % of a core at a
# 10 s interval, and being observed costs a sidecar <= 0.1 % of a core.
#
# What it does: etcd on a temp dir; a CA and one certificate per service and for the dashboard
# (`mesh-agent cert`); an nginx backend; DASH_SIDECARS sidecars in DASH_SERVICES services, each
# with its own inbound/outbound/admin ports on 127.0.0.1 and one tokio worker, allowing the
# dashboard's identity in `telemetry.readers`; light traffic (every service calls the next
# once, then ~8 req/s through 4 sidecars for the rest of the run); the dashboard at
# DASH_INTERVAL. Then three windows of DASH_SECS each:
#   before:  the dashboard not started yet: the sidecars' CPU;
#   running: its CPU and RSS, every round's `refresh` from /api/v1/overview (duration,
#            instances read and failed), the sidecars' CPU;
#   after:   the dashboard stopped: the sidecars' CPU.
# Running minus the mean of before and after is what being observed costs a sidecar: for
# DASH_SAMPLE sidecars that carry no traffic during the windows, and for the whole fleet.
#
# --quick: 30 sidecars in 6 services, 20 s windows (a smoke test: figures are noisy).
# --no-docs: do not rewrite the fleet section of docs/dashboard.md.
# Environment: DASH_SIDECARS (300), DASH_SERVICES (30), DASH_SECS (60), DASH_SAMPLE (10),
# DASH_INTERVAL (10; seconds), DASH_CONCURRENCY (the dashboard's default), BENCH_PORT_BASE
# (32000), BENCH_SKIP_BUILD=1 (use target/release/mesh-agent as it is).
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

QUICK=0
DOCS=1
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --no-docs) DOCS=0 ;;
        -h | --help)
            sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown argument $arg (--quick, --no-docs)" ;;
    esac
done
if ((QUICK)); then
    N="${DASH_SIDECARS:-30}" S="${DASH_SERVICES:-6}" SECS="${DASH_SECS:-20}"
else
    N="${DASH_SIDECARS:-300}" S="${DASH_SERVICES:-30}" SECS="${DASH_SECS:-60}"
fi
K="${DASH_SAMPLE:-10}"
INTERVAL="${DASH_INTERVAL:-10}"
CONCURRENCY="${DASH_CONCURRENCY:-}"
BASE="${BENCH_PORT_BASE:-32000}"
for v in N S SECS K INTERVAL BASE; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (is ${!v})"
done
((S >= 6)) || die "DASH_SERVICES must be >= 6 (4 carry traffic, the sample comes from the others)"
((N >= S && N % S == 0)) || die "DASH_SIDECARS ($N) must be a multiple of DASH_SERVICES ($S)"
((N <= 1000)) || die "at most 1000 sidecars"
PER=$((N / S))
PREFIX=/trellis
HZ="$(getconf CLK_TCK)"
DOC="$ROOT/docs/dashboard.md"
READER="spiffe://bench.local/service/dashboard"

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }
warn() { printf '\033[33mwarning: %s\033[0m\n' "$*" >&2; }
now_ms() { date +%s%3N; }

bench_init dashboard
mkdir -p "$D/logs" "$D/certs" "$D/cache" "$D/conf"
# Every process we start is in PIDS: TERM, then KILL after 15 s.
dash_cleanup() {
    local rc=$? p alive deadline=$((SECONDS + 15))
    trap - EXIT
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    while ((SECONDS < deadline)); do
        alive=0
        for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && { alive=1; break; }; done
        ((alive)) || break
        sleep 0.2
    done
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if ((rc != 0)); then
        local keep="/tmp/trellis-dashboard-logs.$$"
        mv "$D/logs" "$keep" 2>/dev/null && echo "logs kept in $keep" >&2
    fi
    rm -rf "$D"
    exit "$rc"
}
trap dash_cleanup EXIT
trap 'exit 130' INT TERM

need etcd curl jq ss nginx taskset awk
[[ "$(ulimit -n)" -ge 8192 ]] || ulimit -n 65536 2>/dev/null || warn "ulimit -n is $(ulimit -n)"
[[ "$(ulimit -n)" -ge $((N * 8 + 1024)) ]] || warn "ulimit -n $(ulimit -n) may be short for $N sidecars"

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    log "building mesh-agent (release)"
fi
# shellcheck disable=SC2119 # no extra cargo arguments
build_release
[[ -x "$AGENT" ]] || die "$AGENT is missing"

# --- ports -------------------------------------------------------------------------------------

used_ports="$(ss -Htan 2>/dev/null | awk '{ print $4 }' | sed 's/.*://' | sort -un)"
declare -A USED=()
for p in $used_ports; do USED[$p]=1; done
next_port=$BASE
port() { # NAME: a free 127.0.0.1 port from BASE up
    while [[ -n "${USED[$next_port]:-}" ]]; do next_port=$((next_port + 1)); done
    ((next_port < 65000)) || die "out of ports from $BASE"
    printf -v "$1" '%s' "$next_port"
    next_port=$((next_port + 1))
}
port ETCD_PORT; port ETCD_PEER; port ETCD_METRICS; port BACKEND_PORT; port DASH_PORT
ENDPOINT="http://127.0.0.1:$ETCD_PORT"
DASH="http://127.0.0.1:$DASH_PORT"

svc_name() { printf 'svc-%02d' "$1"; }
IN=() OUT=() ADM=() SVC=() INST=()
for ((i = 0; i < N; i++)); do
    port "IN[$i]"; port "OUT[$i]"; port "ADM[$i]"
    SVC[i]=$(svc_name $((i / PER)))
    INST[i]="${SVC[i]}-$((i % PER))"
done

# --- certificates, etcd, backend ---------------------------------------------------------------

log "CA and certificates ($S services and the dashboard)"
"$AGENT" cert init --trust-domain bench.local --dir "$D/certs" >/dev/null
services="dashboard"
for ((s = 0; s < S; s++)); do services+=",$(svc_name "$s")"; done
"$AGENT" cert issue --service "$services" --dir "$D/certs" >/dev/null

log "etcd on 127.0.0.1:$ETCD_PORT"
etcd --name dash --data-dir "$D/etcd" \
    --listen-client-urls "$ENDPOINT" --advertise-client-urls "$ENDPOINT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "dash=http://127.0.0.1:$ETCD_PEER" \
    --listen-metrics-urls "http://127.0.0.1:$ETCD_METRICS" >"$D/logs/etcd.log" 2>&1 &
ETCD_PID=$!
PIDS+=("$ETCD_PID")
deadline=$((SECONDS + 20))
until curl -sf -m 1 -o /dev/null "http://127.0.0.1:$ETCD_METRICS/health"; do
    ((SECONDS < deadline)) || die "etcd did not come up (see logs/etcd.log)"
    sleep 0.1
done
start_backend "$BACKEND_PORT"
NGINX_PID="${PIDS[-1]}"
wait_http backend "http://127.0.0.1:$BACKEND_PORT/"

# --- sidecars ----------------------------------------------------------------------------------

sidecar_config() { # INDEX
    local i="$1"
    cat <<CONF
service: ${SVC[i]}
trust_domain: bench.local
identity: {cert: $D/certs/${SVC[i]}.pem, key: $D/certs/${SVC[i]}-key.pem, bundle: $D/certs/ca.pem}
inbound: {listen: 127.0.0.1:${IN[i]}, app: 127.0.0.1:$BACKEND_PORT, app_protocol: http1}
outbound: {listen: 127.0.0.1:${OUT[i]}}
admin: {listen: 127.0.0.1:${ADM[i]}}
tracing: {enabled: false}
telemetry: {readers: ["$READER"]}
store:
  etcd:
    endpoints: [$ENDPOINT]
    prefix: $PREFIX
    cache_file: $D/cache/${INST[i]}.json
    registration: {instance_id: ${INST[i]}}
CONF
}

log "starting $N sidecars ($S services x $PER instances), 50 per second, one tokio worker each"
SIDECARS=()
for ((i = 0; i < N; i++)); do
    sidecar_config "$i" >"$D/conf/$i.yaml"
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn "$AGENT" run --config "$D/conf/$i.yaml" >"$D/logs/sidecar-$i.log" 2>&1 &
    SIDECARS+=($!)
    PIDS+=($!)
    if (((i + 1) % 50 == 0)); then sleep 1; fi
done
t0=$SECONDS
deadline=$((SECONDS + 60 + N / 5))
for ((i = 0; i < N; i++)); do
    until curl -sf -m 1 -o /dev/null "http://127.0.0.1:${ADM[i]}/ready"; do
        kill -0 "${SIDECARS[i]}" 2>/dev/null || die "sidecar $i exited: $(tail -3 "$D/logs/sidecar-$i.log")"
        ((SECONDS < deadline)) || die "sidecar $i (${INST[i]}) not ready after $((SECONDS - t0)) s"
        sleep 0.1
    done
done
echo "  all $N ready after $((SECONDS - t0)) s"

# --- traffic -----------------------------------------------------------------------------------

# COUNT times `-o /dev/null URL`, for one curl (one connection, kept alive).
urls() { # PORT COUNT
    local k
    for ((k = 0; k < $2; k++)); do printf -- '-o /dev/null http://127.0.0.1:%s/ ' "$1"; done
}
# Every service calls the next once per instance of it, twice: every sidecar has inbound or
# outbound series in its summary.
log "warm-up traffic: each service's first instance calls the next service $((2 * PER)) times"
ok=0 total=0
for ((s = 0; s < S; s++)); do
    caller=$((s * PER))
    callee=$(svc_name $(((s + 1) % S)))
    # shellcheck disable=SC2046 # one URL per word
    codes=$(curl -s -m 20 -w '%{http_code}\n' -H "Host: $callee" $(urls "${OUT[caller]}" $((2 * PER))) || true)
    ok=$((ok + $(grep -c '^200$' <<<"$codes" || true)))
    total=$((total + 2 * PER))
done
echo "  $ok of $total answered 200"
((ok > 0)) || die "no request went through the mesh"

# For the rest of the run, ~8 req/s: svc-00 -> svc-01 and svc-02 -> svc-03 (first instances).
TRAFFIC_END=$((SECONDS + 3 * SECS + 600))
# Its curl runs in the background and is waited for, so that TERM (cleanup) ends both at once.
(
    trap 'kill $(jobs -p) 2>/dev/null; exit 0' TERM
    while ((SECONDS < TRAFFIC_END)); do
        # shellcheck disable=SC2046
        curl -s -m 5 -H "Host: $(svc_name 1)" $(urls "${OUT[0]}" 4) \
            --next -s -m 5 -H "Host: $(svc_name 3)" $(urls "${OUT[$((2 * PER))]}" 4) &
        wait $! || true
        sleep 1 &
        wait $! || true
    done
) &
PIDS+=($!)

# The sample: DASH_SAMPLE sidecars spread over the services that carry no traffic now.
SAMPLE=()
candidates=$((N - 4 * PER))
((K <= candidates)) || K=$candidates
for ((k = 0; k < K; k++)); do SAMPLE+=($((4 * PER + k * candidates / K))); done

# --- measurement helpers -----------------------------------------------------------------------

# utime + stime in clock ticks (whole process, exited threads included).
# A process gone by now counts 0 (the callers check that none is).
ticks() { # PID...
    local f=() p
    for p in "$@"; do f+=("/proc/$p/stat"); done
    { cat "${f[@]}" 2>/dev/null || true; } | awk '{ sub(/^.*\) /, ""); s += $12 + $13 } END { printf "%.0f", s }'
}
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
# The machine's cpu line: "busy steal total" in ticks.
machine() { awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, $9, t }' /proc/stat; }
alive() { # PID...: how many are alive
    local p n=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done
    echo "$n"
}

RESULTS="$D/results"
: >"$RESULTS"
result() { echo "$1=$2" >>"$RESULTS"; }
res() { awk -F= -v k="$1" '$1 == k { v = $2 } END { print v }' "$RESULTS"; }

SAMPLE_PIDS=()
for i in "${SAMPLE[@]}"; do SAMPLE_PIDS+=("${SIDECARS[i]}"); done

# Start of a window: every counter; window_end TAG SECONDS writes the rates.
window_start() {
    W_T=$(now_ms)
    W_SAMPLE=$(ticks "${SAMPLE_PIDS[@]}")
    W_FLEET=$(ticks "${SIDECARS[@]}")
    W_ETCD=$(ticks "$ETCD_PID")
    W_OURS=$(ticks "${SIDECARS[@]}" "$ETCD_PID" "$NGINX_PID" "${WINDOW_EXTRA[@]}")
    read -r W_BUSY W_STEAL W_TOTAL < <(machine)
}
window_end() { # TAG
    local t sample fleet etcd ours busy steal total
    t=$(($(now_ms) - W_T))
    sample=$(ticks "${SAMPLE_PIDS[@]}")
    fleet=$(ticks "${SIDECARS[@]}")
    etcd=$(ticks "$ETCD_PID")
    ours=$(ticks "${SIDECARS[@]}" "$ETCD_PID" "$NGINX_PID" "${WINDOW_EXTRA[@]}")
    read -r busy steal total < <(machine)
    [[ "$(alive "${SIDECARS[@]}")" == "$N" ]] || die "a sidecar exited during the $1 window"
    result "$1.secs" "$(awk -v t="$t" 'BEGIN { printf "%.1f", t / 1000 }')"
    # % of one core per sidecar.
    result "$1.sample" "$(awk -v c=$((sample - W_SAMPLE)) -v t="$t" -v k="$K" -v hz="$HZ" 'BEGIN { printf "%.4f", 100 * c / hz / (t / 1000) / k }')"
    result "$1.fleet" "$(awk -v c=$((fleet - W_FLEET)) -v t="$t" -v n="$N" -v hz="$HZ" 'BEGIN { printf "%.4f", 100 * c / hz / (t / 1000) / n }')"
    result "$1.etcd" "$(awk -v c=$((etcd - W_ETCD)) -v t="$t" -v hz="$HZ" 'BEGIN { printf "%.2f", 100 * c / hz / (t / 1000) }')"
    result "$1.busy" "$(awk -v b=$((busy - W_BUSY)) -v a=$((total - W_TOTAL)) 'BEGIN { printf "%.0f", (a > 0 ? 100 * b / a : 0) }')"
    # What the rest of the machine (other users) used, in % of all cores.
    result "$1.others" "$(awk -v b=$((busy - W_BUSY)) -v o=$((ours - W_OURS)) -v a=$((total - W_TOTAL)) 'BEGIN { x = (a > 0 ? 100 * (b - o) / a : 0); printf "%.0f", (x < 0 ? 0 : x) }')"
    result "$1.steal" "$(awk -v s=$((steal - W_STEAL)) -v a=$((total - W_TOTAL)) 'BEGIN { printf "%.1f", (a > 0 ? 100 * s / a : 0) }')"
}

overview() { curl -sf -m 5 "$DASH/api/v1/overview?window=1m" || true; }

# --- the dashboard -----------------------------------------------------------------------------

# Window "before": the same sidecars before the dashboard starts (with the window "after" it
# stopped, what they cost unobserved; two windows around the observed one cancel a drift of
# the machine's load).
log "window before the dashboard starts: ${SECS} s"
WINDOW_EXTRA=()
window_start
sleep "$SECS"
window_end before

log "dashboard at a ${INTERVAL} s interval on $DASH"
dash_args=(dashboard --identity-dir "$D/certs" --name dashboard --trust-domain bench.local
    --etcd-endpoints "$ENDPOINT" --etcd-prefix "$PREFIX" --listen "127.0.0.1:$DASH_PORT" --interval "${INTERVAL}s")
[[ -z "$CONCURRENCY" ]] || dash_args+=(--concurrency "$CONCURRENCY")
RUST_LOG=warn "$AGENT" "${dash_args[@]}" >"$D/logs/dashboard.log" 2>&1 &
DASH_PID=$!
PIDS+=("$DASH_PID")
wait_http dashboard "$DASH/healthz"
# Every instance registered and read (bounded: a few rounds).
t0=$SECONDS
deadline=$((SECONDS + 6 * INTERVAL + 30))
while :; do
    seen=$(overview | jq -r '"\([.services[].instances] | add // 0) \([.services[].up] | add // 0)"' 2>/dev/null || echo "0 0")
    [[ "$seen" == "$N $N" ]] && break
    kill -0 "$DASH_PID" 2>/dev/null || die "the dashboard exited: $(tail -3 "$D/logs/dashboard.log")"
    ((SECONDS < deadline)) || die "the dashboard sees $seen (instances, up) of $N after $((SECONDS - t0)) s"
    sleep 0.5
done
echo "  the dashboard sees all $N instances, all read, after $((SECONDS - t0)) s"

# Waits (bounded) for the next round to be recorded; prints its `refresh` as one JSON line.
next_round() { # AFTER-ROUNDS
    local deadline=$((SECONDS + 3 * INTERVAL + 10)) r
    while ((SECONDS < deadline)); do
        r=$(overview | jq -c '.refresh // empty' 2>/dev/null || true)
        if [[ -n "$r" ]] && (($(jq -r .rounds <<<"$r") > $1)); then
            echo "$r"
            return 0
        fi
        sleep 0.2
    done
    die "no refresh round after round $1 within $((3 * INTERVAL + 10)) s"
}

# Window "on": starts 1 s after a round ended, so it holds SECS / INTERVAL whole rounds.
last=$(next_round 0)
last=$(next_round "$(jq -r .rounds <<<"$last")")
sleep 1
log "window with the dashboard running: ${SECS} s"
ROUNDS="$D/rounds.jsonl"
: >"$ROUNDS"
d0=$(ticks "$DASH_PID")
WINDOW_EXTRA=("$DASH_PID")
window_start
rss_max=0
seen_round=$(jq -r .rounds <<<"$last")
end=$(($(now_ms) + SECS * 1000))
while (($(now_ms) < end)); do
    kill -0 "$DASH_PID" 2>/dev/null || die "the dashboard exited: $(tail -3 "$D/logs/dashboard.log")"
    r=$(rss_kb "$DASH_PID")
    ((r > rss_max)) && rss_max=$r
    cur=$(overview | jq -c '.refresh // empty' 2>/dev/null || true)
    if [[ -n "$cur" ]] && (($(jq -r .rounds <<<"$cur") > seen_round)); then
        echo "$cur" >>"$ROUNDS"
        seen_round=$(jq -r .rounds <<<"$cur")
        jq -r '"  round \(.rounds): \(.duration_ms | floor) ms (etcd \(.fleet_ms | floor) ms), \(.read) of \(.instances) read, \(.failed) failed"' <<<"$cur"
    fi
    sleep 1
done
window_end on
d1=$(ticks "$DASH_PID")
result dash.cpu "$(awk -v c=$((d1 - d0)) -v t="$(res on.secs)" -v hz="$HZ" 'BEGIN { printf "%.2f", 100 * c / hz / t }')"
result dash.rss "$(awk -v k="$rss_max" 'BEGIN { printf "%.1f", k / 1024 }')"
[[ -s "$ROUNDS" ]] || die "no refresh round was seen in the window"
result rounds "$(wc -l <"$ROUNDS")"
result refresh.p50 "$(jq -s '[.[].duration_ms] | sort | .[(length - 1) / 2 | floor] | floor' "$ROUNDS")"
result refresh.max "$(jq -s '[.[].duration_ms] | max | floor' "$ROUNDS")"
result refresh.fleet_max "$(jq -s '[.[].fleet_ms] | max | floor' "$ROUNDS")"
result refresh.read_min "$(jq -s '[.[].read] | min' "$ROUNDS")"
result refresh.failed_max "$(jq -s '[.[].failed] | max' "$ROUNDS")"

# What the dashboard counted of the light traffic (a check that the summaries were read and
# folded, not only fetched).
result traffic.rps "$(overview | jq --arg a "$(svc_name 1)" --arg b "$(svc_name 3)" \
    '[.services[] | select(.name == $a or .name == $b) | .stats.rps] | add // 0 | . * 10 | round / 10')"

log "stopping the dashboard"
kill -INT "$DASH_PID" 2>/dev/null || true
deadline=$((SECONDS + 10))
while kill -0 "$DASH_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
kill -KILL "$DASH_PID" 2>/dev/null || true
wait "$DASH_PID" 2>/dev/null || true
sleep 3

log "window after the dashboard stopped: ${SECS} s"
WINDOW_EXTRA=()
window_start
sleep "$SECS"
window_end after

# --- report ------------------------------------------------------------------------------------

# Observed minus the mean of before and after.
cost() { awk -v a="$(res "on.$1")" -v b="$(res "before.$1")" -v c="$(res "after.$1")" 'BEGIN { printf "%.4f", a - (b + c) / 2 }'; }
result cost.sample "$(cost sample)"
result cost.fleet "$(cost fleet)"
met() { if awk "BEGIN { exit !($1) }"; then echo met; else echo "**NOT met**"; fi; }

env_line() {
    local rev
    rev="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    [[ -z "$(cd "$ROOT" && git status --porcelain -- proxy mesh-agent/src policies Cargo.lock 2>/dev/null)" ]] || rev+=" (+ uncommitted changes)"
    printf '%s; Trellis %s; %s cores (%s), %s GB RAM; Linux %s; etcd %s' \
        "$(date -u '+%Y-%m-%d %H:%M UTC')" "$rev" "$(nproc)" \
        "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)" \
        "$(awk '/MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)" "$(uname -r)" \
        "$(etcd --version | awk 'NR == 1 { print $3 }')"
}

report() {
    echo "$(env_line). $N sidecars ($S services x $PER instances) and etcd, the dashboard and nginx all on this machine; dashboard interval ${INTERVAL} s, concurrency ${CONCURRENCY:-default}; three windows of $SECS s: before the dashboard starts, while it runs ($(res rounds) rounds), after it stopped. Both cores busy $(res before.busy) / $(res on.busy) / $(res after.busy) % (before / running / after), of which other users' processes $(res before.others) / $(res on.others) / $(res after.others) %; steal $(res before.steal) / $(res on.steal) / $(res after.steal) %."
    echo
    echo '| figure | measured | target | result |'
    echo '|---|---:|---:|---|'
    printf '| refresh round (etcd read + every summary), p50 / max | %s / %s ms | <= 2,000 ms | %s |\n' \
        "$(res refresh.p50)" "$(res refresh.max)" "$(met "$(res refresh.max) <= 2000")"
    printf '| of which the fleet read from etcd, max | %s ms | | |\n' "$(res refresh.fleet_max)"
    printf '| instances read per round (min) / failed (max) | %s / %s of %s | all | %s |\n' \
        "$(res refresh.read_min)" "$(res refresh.failed_max)" "$N" "$(met "$(res refresh.read_min) == $N")"
    printf '| requests the dashboard counted (%s and %s, last minute) | %s req/s | ~8 (what was sent) | |\n' \
        "$(svc_name 1)" "$(svc_name 3)" "$(res traffic.rps)"
    printf '| dashboard CPU | %s %% of a core | <= 20 %% | %s |\n' "$(res dash.cpu)" "$(met "$(res dash.cpu) <= 20")"
    printf '| dashboard RSS (max) | %s MB | | |\n' "$(res dash.rss)"
    printf '| %s idle sidecars: CPU each, before / running / after | %s / %s / %s %% of a core | | |\n' \
        "$K" "$(res before.sample)" "$(res on.sample)" "$(res after.sample)"
    printf '| all %s sidecars: CPU each, before / running / after | %s / %s / %s %% of a core | | |\n' \
        "$N" "$(res before.fleet)" "$(res on.fleet)" "$(res after.fleet)"
    printf '| being observed, per sidecar (those %s) | %s %% of a core | <= 0.1 %% | %s |\n' \
        "$K" "$(res cost.sample)" "$(met "$(res cost.sample) <= 0.1")"
    printf '| being observed, per sidecar (mean of all %s) | %s %% of a core | <= 0.1 %% | %s |\n' \
        "$N" "$(res cost.fleet)" "$(met "$(res cost.fleet) <= 0.1")"
    printf '| etcd CPU, before / running / after | %s / %s / %s %% of a core | | |\n' "$(res before.etcd)" "$(res on.etcd)" "$(res after.etcd)"
}
report >"$D/report.md"
echo
cat "$D/report.md"

if ((DOCS)) && ((!QUICK)); then
    begin="<!-- dashboard:fleet -->" end="<!-- /dashboard:fleet -->"
    grep -qF "$begin" "$DOC" || die "$DOC has no $begin section"
    awk -v b="$begin" -v e="$end" -v f="$D/report.md" '
        $0 == b { print; while ((getline l < f) > 0) print l; skip = 1; next }
        $0 == e { skip = 0 }
        !skip { print }' "$DOC" >"$D/doc.new"
    cp "$D/doc.new" "$DOC"
    log "figures written to ${DOC#"$ROOT"/}"
elif ((DOCS)); then
    log "--quick: ${DOC#"$ROOT"/} left as it is"
fi
