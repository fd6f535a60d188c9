#!/usr/bin/env bash
# Scale benchmark (issue 16, "a sidecar's cost must not grow with the mesh"): real release
# `mesh-agent run` processes against one real etcd on this machine, loopback only.
#
#   bash bench/scale.sh mesh [SIZES]   # SIZES: INSTANCES:SERVICES..., default "100:100 10000:1000"
#   bash bench/scale.sh fleet [N]      # N sidecars of one service, default 500
#   bash bench/scale.sh all            # both, default sizes
#
# mesh: registrations written straight to etcd (mesh-agent/examples/mesh_scale.rs), then one
#   sidecar calling 5 services and one ingress gateway with an HTTPRoute per service; RSS and
#   CPU idle and under SCALE_CHURN_RATE changes/s for SCALE_CHURN_SECS; then the first request
#   through the sidecar to each of SCALE_LEARN (5) services it does not hold vs a second one.
# fleet: N sidecars start at once; time until all are registered; SCALE_ROUNDS policy applies
#   (`policy apply` then `status --wait`); etcd idle CPU and gRPC traffic by method; etcd
#   SIGKILLed, restarted after 10 s on the same data dir: recovery time and reconnect storm.
#
# Environment: SCALE_CHURN_RATE (20), SCALE_CHURN_SECS (30), SCALE_IDLE_SECS (30),
# SCALE_ROUNDS (20), SCALE_STAGGER (50 sidecars/s when the all-at-once start fails), SCALE_DISCOVERY (auto | on | off: write the scoped-discovery settings
# `store.etcd.discovery`; auto = when this mesh-agent accepts them), BENCH_PORT_BASE (28700),
# BENCH_SKIP_BUILD=1, SCALE_NO_DOCS=1 (do not rewrite docs/benchmarks-scale.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MODE="${1:-}"
case "$MODE" in
    mesh | fleet | all) ;;
    -h | --help | "")
        sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown subcommand $MODE (mesh, fleet, all)" ;;
esac
RATE="${SCALE_CHURN_RATE:-20}"
CHURN_SECS="${SCALE_CHURN_SECS:-30}"
IDLE_SECS="${SCALE_IDLE_SECS:-30}"
ROUNDS="${SCALE_ROUNDS:-20}"
STAGGER="${SCALE_STAGGER:-50}"
DISCOVERY="${SCALE_DISCOVERY:-auto}"
BASE="${BENCH_PORT_BASE:-28700}"
DOC="$ROOT/docs/benchmarks-scale.md"
PREFIX=/trellis
HZ="$(getconf CLK_TCK)"

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }
warn() { printf '\033[33mwarning: %s\033[0m\n' "$*" >&2; }
now_ms() { date +%s%3N; }

bench_init scale
mkdir -p "$D/logs" "$D/certs" "$D/cache"
# Every process we start is in PIDS (agents included); TERM, then KILL after 15 s.
scale_cleanup() {
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
        local keep="/tmp/trellis-scale-logs.$$"
        mv "$D/logs" "$keep" 2>/dev/null && echo "logs kept in $keep" >&2
    fi
    rm -rf "$D"
    exit "$rc"
}
trap scale_cleanup EXIT
trap 'exit 130' INT TERM

need etcd curl jq ss taskset
[[ "$(ulimit -n)" -ge 4096 ]] || ulimit -n 65536 2>/dev/null || warn "ulimit -n is $(ulimit -n)"

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    log "building mesh-agent (release) and the mesh_scale example (debug)"
    build_release
else
    AGENT="$ROOT/target/release/mesh-agent"
fi
(cd "$ROOT" && cargo build --locked -p mesh-agent --example mesh_scale) >"$D/logs/example-build.log" 2>&1 ||
    { tail -20 "$D/logs/example-build.log"; die "example build failed"; }
TOOL="$ROOT/target/debug/examples/mesh_scale"
[[ -x "$AGENT" && -x "$TOOL" ]] || die "binaries missing"
"$AGENT" cert init --trust-domain bench.local --dir "$D/certs" >/dev/null
"$AGENT" cert issue --service client,gateway,fleet --dir "$D/certs" >/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=edge.bench" -addext "subjectAltName=DNS:*.edge.bench" \
    -keyout "$D/certs/web-key.pem" -out "$D/certs/web.pem" 2>/dev/null

# --- ports -------------------------------------------------------------------------------------

used_ports="$(ss -Htan 2>/dev/null | awk '{ print $4 }' | sed 's/.*://' | sort -u)"
next_port=$BASE
port() { # NAME: a free 127.0.0.1 port from BASE up
    while grep -qx "$next_port" <<<"$used_ports"; do next_port=$((next_port + 1)); done
    printf -v "$1" '%s' "$next_port"
    next_port=$((next_port + 1))
}
port ETCD_PORT; port ETCD_PEER; port ETCD_METRICS
port A_IN; port A_OUT; port A_ADM; port G_IN; port G_OUT; port G_ADM; port G_TLS
ENDPOINT="http://127.0.0.1:$ETCD_PORT"

# --- etcd ------------------------------------------------------------------------------------

ETCD_PID=""
start_etcd() { # DATA-DIR
    etcd --name scale --data-dir "$1" \
        --listen-client-urls "$ENDPOINT" --advertise-client-urls "$ENDPOINT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
        --initial-cluster "scale=http://127.0.0.1:$ETCD_PEER" \
        --listen-metrics-urls "http://127.0.0.1:$ETCD_METRICS" >>"$D/logs/etcd.log" 2>&1 &
    ETCD_PID=$!
    PIDS+=("$ETCD_PID")
    local deadline=$((SECONDS + 20))
    until curl -sf -m 1 -o /dev/null "http://127.0.0.1:$ETCD_METRICS/health"; do
        ((SECONDS < deadline)) || die "etcd did not come up (see $D/logs/etcd.log)"
        sleep 0.05
    done
}
stop_pid() { # PID: TERM, KILL after 10 s
    kill -TERM "$1" 2>/dev/null || return 0
    local deadline=$((SECONDS + 10))
    while kill -0 "$1" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
metrics() { curl -sf -m 5 "http://127.0.0.1:$ETCD_METRICS/metrics" || true; }
# Sum of a metric's samples whose labels contain FILTER.
metric_sum() { # FILE NAME [FILTER]
    awk -v n="$2" -v f="${3:-}" '$1 ~ "^"n"[{ ]" || $1 == n { if (index($0, f)) s += $NF } END { printf "%.0f", s }' "$1"
}

# --- processes ---------------------------------------------------------------------------------

proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
pct() { awk -v t="$1" -v s="$2" -v hz="$HZ" 'BEGIN { printf "%.2f", (s > 0 ? 100 * t / hz / s : 0) }'; }
mb() { awk -v k="${1:-0}" 'BEGIN { printf "%.1f", k / 1024 }'; }
secs() { awk -v m="$1" 'BEGIN { if (m >= 999999) print "> 60"; else printf "%.1f", m / 1000 }'; } # ms
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.2fx", a / b }'; }
met() { if awk "BEGIN { exit !($1) }"; then echo met; else echo "**NOT met**"; fi; }

# Does this mesh-agent accept `store.etcd.discovery` (scoped discovery, issue 16)?
discovery_settings_supported() {
    case "$DISCOVERY" in on) return 0 ;; off) return 1 ;; esac
    cat >"$D/probe.yaml" <<CONF
service: client
trust_domain: bench.local
identity: {cert: $D/certs/client.pem, key: $D/certs/client-key.pem, bundle: $D/certs/ca.pem}
inbound: {listen: 127.0.0.1:0, app: 127.0.0.1:9}
outbound: {listen: 127.0.0.1:0}
admin: {listen: 127.0.0.1:0}
tracing: {enabled: false}
store:
  etcd:
    endpoints: [http://127.0.0.1:9]
    prefix: /probe
    cache_file: $D/cache/probe.json
    registration: {enabled: false}
    discovery: {scope: on-demand, dependencies: [svc-0000]}
CONF
    timeout 3 "$AGENT" run --config "$D/probe.yaml" >"$D/logs/probe.log" 2>&1 || true
    ! grep -q 'unknown field.*discovery\|discovery.*unknown field' "$D/logs/probe.log"
}

# sidecar_config SERVICE IN OUT ADMIN INSTANCE [DEPENDENCIES] [INGRESS-TLS-PORT]
sidecar_config() {
    cat <<CONF
service: $1
trust_domain: bench.local
identity: {cert: $D/certs/$1.pem, key: $D/certs/$1-key.pem, bundle: $D/certs/ca.pem}
inbound: {listen: $2, app: 127.0.0.1:9, app_protocol: http1}
outbound: {listen: $3}
admin: {listen: $4}
tracing: {enabled: false}
store:
  etcd:
    endpoints: [$ENDPOINT]
    prefix: $PREFIX
    cache_file: $D/cache/$5.json
    registration: {instance_id: $5}
CONF
    if ((SCOPED)); then
        printf '    discovery: {scope: on-demand%s}\n' "${6:+, dependencies: [$6]}"
    fi
    if [[ -n "${7:-}" ]]; then
        printf 'ingress:\n  listen: 127.0.0.1:%s\n  certificates: [{hosts: ["*.edge.bench"], cert: %s, key: %s}]\n' \
            "$7" "$D/certs/web.pem" "$D/certs/web-key.pem"
    fi
}

wait_ready() { # WHAT ADMIN-ADDR SECONDS
    local deadline=$((SECONDS + $3))
    until curl -sf -m 1 -o /dev/null "http://$2/ready"; do
        ((SECONDS < deadline)) || die "$1 not ready after $3 s"
        sleep 0.05
    done
}
applied_revision() { # ADMIN-ADDR
    curl -sf -m 2 "http://$1/metrics" | awk '$1 ~ /etcd_applied_revision$/ { printf "%.0f", $2 }' || true
}

# Lines "name=value" for the doc writer, per run.
RESULTS="$D/results"
: >"$RESULTS"
result() { echo "$1=$2" >>"$RESULTS"; }
res() { awk -F= -v k="$1" '$1 == k { v = $2 } END { print v }' "$RESULTS"; }

# --- mesh: one sidecar and one ingress against meshes of growing size ---------------------------

mesh_run() { # INSTANCES SERVICES
    local n="$1" s="$2" tag="m$1"
    log "mesh of $n instances in $s services"
    rm -rf "$D/etcd-$tag"
    start_etcd "$D/etcd-$tag"
    "$TOOL" populate "$ENDPOINT" "$PREFIX" "$n" "$s" gateway | tee -a "$D/logs/tool.log"
    local deps
    deps="$(seq -f 'svc-%04g' 0 4 | paste -sd, | sed 's/,/, /g')"
    sidecar_config client "127.0.0.1:$A_IN" "127.0.0.1:$A_OUT" "127.0.0.1:$A_ADM" client-1 "$deps" >"$D/a.yaml"
    sidecar_config gateway "127.0.0.1:$G_IN" "127.0.0.1:$G_OUT" "127.0.0.1:$G_ADM" gateway-1 "" "$G_TLS" >"$D/g.yaml"
    local t0 pa pg
    t0=$(now_ms)
    RUST_LOG=warn "$AGENT" run --config "$D/a.yaml" >"$D/logs/a-$tag.log" 2>&1 &
    pa=$!
    PIDS+=("$pa")
    RUST_LOG=warn "$AGENT" run --mode ingress --config "$D/g.yaml" >"$D/logs/g-$tag.log" 2>&1 &
    pg=$!
    PIDS+=("$pg")
    wait_ready sidecar "127.0.0.1:$A_ADM" 60
    result "$tag.a.ready_ms" $(($(now_ms) - t0))
    wait_ready ingress "127.0.0.1:$G_ADM" 60
    result "$tag.g.ready_ms" $(($(now_ms) - t0))
    # Use the 5 dependencies (on-demand discovery loads what is asked for) and 5 edge hosts.
    local k codes_a="" codes_g=""
    for k in 0 1 2 3 4; do
        codes_a+="$(curl -s -m 5 -o /dev/null -w '%{http_code}' -H "Host: svc-000$k" "http://127.0.0.1:$A_OUT/" || true) "
        codes_g+="$(curl -sk -m 5 -o /dev/null -w '%{http_code}' --resolve "svc-000$k.edge.bench:$G_TLS:127.0.0.1" "https://svc-000$k.edge.bench:$G_TLS/" || true) "
    done
    echo "  requests through the sidecar: $codes_a; through the ingress: $codes_g"
    result "$tag.a.codes" "${codes_a% }"
    result "$tag.g.codes" "${codes_g% }"
    sleep 2

    # Idle.
    local a0 g0 a1 g1 t
    result "$tag.a.rss_start" "$(rss_kb "$pa")"
    result "$tag.g.rss_start" "$(rss_kb "$pg")"
    a0=$(proc_ticks "$pa") g0=$(proc_ticks "$pg") t=$(now_ms)
    sleep "$IDLE_SECS"
    a1=$(proc_ticks "$pa") g1=$(proc_ticks "$pg")
    t=$(awk -v d=$(($(now_ms) - t)) 'BEGIN { print d / 1000 }')
    result "$tag.a.cpu_idle" "$(pct $((a1 - a0)) "$t")"
    result "$tag.g.cpu_idle" "$(pct $((g1 - g0)) "$t")"

    # Churn, RSS sampled every 0.5 s.
    local ra rg max_a=0 max_g=0 cp deadline
    a0=$(proc_ticks "$pa") g0=$(proc_ticks "$pg") t=$(now_ms)
    "$TOOL" churn "$ENDPOINT" "$PREFIX" "$n" "$s" "$RATE" "$CHURN_SECS" >"$D/churn.out" 2>&1 &
    cp=$!
    PIDS+=("$cp")
    deadline=$((SECONDS + CHURN_SECS + 30))
    while kill -0 "$cp" 2>/dev/null && ((SECONDS < deadline)); do
        ra=$(rss_kb "$pa") rg=$(rss_kb "$pg")
        ((ra > max_a)) && max_a=$ra
        ((rg > max_g)) && max_g=$rg
        sleep 0.5
    done
    wait "$cp" || die "churn failed: $(cat "$D/churn.out")"
    local am gm tm
    am=$(proc_ticks "$pa") gm=$(proc_ticks "$pg") tm=$(now_ms)
    # Then until each has applied the last change (at most 120 s): how far behind it fell.
    # A marker change right after the churn, in svc-0000 (which both processes hold: a declared
    # dependency, a routed backend): its revision, once applied, means every earlier change
    # was processed. (A scoped sidecar never applies a revision of a service it does not
    # hold, so the churn's own last revision would never be reached.)
    local rev r ok
    rev=$("$TOOL" touch "$ENDPOINT" "$PREFIX" "$n" "$s" 0 | sed -n 's/^revision \([0-9]*\)$/\1/p')
    [[ -n "$rev" ]] || die "marker write failed"
    deadline=$((SECONDS + 120))
    declare -A lag=()
    while ((SECONDS < deadline)); do
        ok=1
        for r in a g; do
            [[ -n "${lag[$r]:-}" ]] && continue
            local adm=$A_ADM
            [[ $r == g ]] && adm=$G_ADM
            if [[ "$(applied_revision "127.0.0.1:$adm")" -ge "$rev" ]]; then lag[$r]=$(($(now_ms) - tm)); else ok=0; fi
        done
        ((ok)) && break
        sleep 0.05
    done
    a1=$(proc_ticks "$pa") g1=$(proc_ticks "$pg")
    local changes tc tall
    tc=$(awk -v d=$((tm - t)) 'BEGIN { print d / 1000 }')
    tall=$(awk -v d=$(($(now_ms) - t)) 'BEGIN { print d / 1000 }')
    changes=$(sed -n 's/^churn: \([0-9]*\) changes.*/\1/p' "$D/churn.out")
    cat "$D/churn.out"
    result "$tag.changes" "$changes"
    for r in a g; do
        local p c0 cm c1 mx
        if [[ $r == a ]]; then p=$pa c0=$a0 cm=$am c1=$a1 mx=$max_a; else p=$pg c0=$g0 cm=$gm c1=$g1 mx=$max_g; fi
        result "$tag.$r.cpu_churn" "$(pct $((cm - c0)) "$tc")"
        result "$tag.$r.lag_ms" "${lag[$r]:->120000}"
        result "$tag.$r.rss_max" "$(( mx > $(rss_kb "$p") ? mx : $(rss_kb "$p") ))"
        # CPU per change beyond the idle rate, in ms, until the last change was applied.
        result "$tag.$r.ms_per_change" "$(awk -v c=$((c1 - c0)) -v hz="$HZ" -v t="$tall" -v idle="$(res "$tag.$r.cpu_idle")" -v n="$changes" \
            'BEGIN { x = (c / hz - idle / 100 * t) * 1000 / n; printf "%.2f", x < 0 ? 0 : x }')"
    done
    result "$tag.a.held" "$(held_services "127.0.0.1:$A_ADM")"
    result "$tag.g.held" "$(held_services "127.0.0.1:$G_ADM")"
    learn_latency "$tag" "$s"
    stop_pid "$pa"
    stop_pid "$pg"
    stop_pid "$ETCD_PID"
    printf '  sidecar: RSS %s -> %s MB, CPU idle %s%% churn %s%%; ingress: RSS %s -> %s MB, CPU idle %s%% churn %s%%\n' \
        "$(mb "$(res "$tag.a.rss_start")")" "$(mb "$(res "$tag.a.rss_max")")" "$(res "$tag.a.cpu_idle")" "$(res "$tag.a.cpu_churn")" \
        "$(mb "$(res "$tag.g.rss_start")")" "$(mb "$(res "$tag.g.rss_max")")" "$(res "$tag.g.cpu_idle")" "$(res "$tag.g.cpu_churn")"
}

held_services() { # ADMIN-ADDR: services whose instances it holds (discovery_services; "-" in full scope)
    curl -sf -m 2 "http://$1/metrics" | awk '$1 ~ /discovery_services$/ { v = $2 } END { if (v == "" || v + 0 == 0) print "-"; else printf "%.0f", v }' || echo -
}

# First request to a service the sidecar does not hold yet (on-demand learning: one range read
# and one more watch before the request goes on) vs a second request to the same service.
# SCALE_LEARN (5) services from the middle of the mesh, none of them a dependency.
learn_latency() { # TAG SERVICES
    local tag="$1" s="$2" k svc first second c1 c2 out="$D/learn-$1.txt" before after
    : >"$out"
    before=$(curl -sf -m 2 "http://127.0.0.1:$A_ADM/metrics" | awk '$1 ~ /discovery_on_demand_total\{.*found/ { s += $NF } END { print s + 0 }' || true)
    for ((k = 0; k < ${SCALE_LEARN:-5}; k++)); do
        printf -v svc 'svc-%04d' $((s / 2 + k))
        read -r c1 first < <(curl -s -m 5 -o /dev/null -w '%{http_code} %{time_total}\n' -H "Host: $svc" "http://127.0.0.1:$A_OUT/" || echo "000 0")
        read -r c2 second < <(curl -s -m 5 -o /dev/null -w '%{http_code} %{time_total}\n' -H "Host: $svc" "http://127.0.0.1:$A_OUT/" || echo "000 0")
        awk -v s="$svc" -v a="$first" -v b="$second" -v c1="$c1" -v c2="$c2" \
            'BEGIN { printf "%s %.2f %.2f %.2f %s %s\n", s, a * 1000, b * 1000, (a - b) * 1000, c1, c2 }' >>"$out"
    done
    after=$(curl -sf -m 2 "http://127.0.0.1:$A_ADM/metrics" | awk '$1 ~ /discovery_on_demand_total\{.*found/ { s += $NF } END { print s + 0 }' || true)
    echo "  first request to an unseen service vs the second (ms: first, second, added; codes):"
    sed 's/^/    /' "$out"
    result "$tag.learn_first_p50" "$(awk '{ print $2 }' "$out" | percentile 50)"
    result "$tag.learn_second_p50" "$(awk '{ print $3 }' "$out" | percentile 50)"
    result "$tag.learn_added_p50" "$(awk '{ print $4 }' "$out" | percentile 50)"
    result "$tag.learn_added_max" "$(awk '{ print $4 }' "$out" | percentile 100)"
    result "$tag.learn_codes" "$(awk '{ printf "%s%s/%s", (NR > 1 ? " " : ""), $5, $6 }' "$out")"
    result "$tag.learn_found" "$(awk -v a="${before:-0}" -v b="${after:-0}" 'BEGIN { printf "%.0f", b - a }')"
    cp "$out" "$D/logs/" 2>/dev/null || true
}

mesh_report() { # SIZES...
    local first="m${1%%:*}" size tag role label
    printf '| mesh | process | services held | ready s | RSS start MB | RSS max under churn MB | CPU idle %% | CPU under churn %% | behind at churn end ms | CPU ms / change | RSS max vs %s | CPU churn vs %s |\n' "${first#m}" "${first#m}"
    printf '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
    for size in "$@"; do
        tag="m${size%%:*}"
        for role in a g; do
            [[ $role == a ]] && label="sidecar calling 5 services" || label="ingress routing to every service"
            printf '| %s instances / %s services | %s | %s | %.1f | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "${size%%:*}" "${size#*:}" "$label" "$(res "$tag.$role.held")" "$(awk -v m="$(res "$tag.$role.ready_ms")" 'BEGIN { print m / 1000 }')" \
                "$(mb "$(res "$tag.$role.rss_start")")" "$(mb "$(res "$tag.$role.rss_max")")" \
                "$(res "$tag.$role.cpu_idle")" "$(res "$tag.$role.cpu_churn")" "$(res "$tag.$role.lag_ms")" "$(res "$tag.$role.ms_per_change")" \
                "$(ratio "$(res "$tag.$role.rss_max")" "$(res "$first.$role.rss_max")")" \
                "$(ratio "$(res "$tag.$role.cpu_churn")" "$(res "$first.$role.cpu_churn")")"
        done
    done
    local last="m${*: -1}"
    last="${last%%:*}"
    echo
    echo "First request through the sidecar to a service it did not hold (learned on demand) vs a second request to the same service, ${SCALE_LEARN:-5} services, ms:"
    echo
    echo '| mesh | first p50 | second p50 | added p50 | added max | codes (first/second) | lookups found |'
    echo '|---|---:|---:|---:|---:|---|---:|'
    for size in "$@"; do
        tag="m${size%%:*}"
        printf '| %s instances / %s services | %s | %s | %s | %s | %s | %s |\n' "${size%%:*}" "${size#*:}" \
            "$(res "$tag.learn_first_p50")" "$(res "$tag.learn_second_p50")" "$(res "$tag.learn_added_p50")" \
            "$(res "$tag.learn_added_max")" "$(res "$tag.learn_codes")" "$(res "$tag.learn_found")"
    done
    echo
    printf '| target (largest mesh vs smallest) | measured | result |\n|---|---|---|\n'
    local ra ca rm cm gr gc
    ra=$(ratio "$(res "$last.a.rss_max")" "$(res "$first.a.rss_max")")
    ca=$(ratio "$(res "$last.a.cpu_churn")" "$(res "$first.a.cpu_churn")")
    rm=$(mb "$(res "$last.a.rss_max")") cm=$(res "$last.a.cpu_churn")
    gr=$(mb "$(res "$last.g.rss_max")") gc=$(res "$last.g.cpu_churn")
    printf '| sidecar RSS within 1.2x of the smallest mesh | %s | %s |\n' "$ra" "$(met "${ra%x} <= 1.2")"
    printf '| sidecar CPU under churn within 1.2x of the smallest mesh | %s | %s |\n' "$ca" "$(met "${ca%x} <= 1.2")"
    printf '| sidecar RSS <= 15 MB, CPU <= 1 %% of a core | %s MB, %s %% | %s |\n' "$rm" "$cm" "$(met "$rm <= 15 && $cm <= 1")"
    printf '| ingress RSS <= 60 MB, CPU <= 10 %% of a core | %s MB, %s %% | %s |\n' "$gr" "$gc" "$(met "$gr <= 60 && $gc <= 10")"
    local la
    la=$(res "$last.learn_added_max")
    printf '| first request to an unseen service adds <= 10 ms (max of %s) | %s ms | %s |\n' "${SCALE_LEARN:-5}" "$la" "$(met "${la:-999} <= 10")"
}

# --- fleet: N sidecars of one service ---------------------------------------------------------

FLEET_PIDS=()
fleet_addr() { echo "127.0.$((10 + $1 / 250)).$((1 + $1 % 250))"; }
fleet_start() { # N PER-SECOND (0: all at once)
    local i
    FLEET_PIDS=()
    for ((i = 0; i < $1; i++)); do
        RUST_LOG=warn "$AGENT" run --config "$D/f-$i.yaml" >"$D/logs/f-$i.log" 2>&1 &
        FLEET_PIDS+=($!)
        PIDS+=($!)
        if (($2 > 0 && (i + 1) % $2 == 0)); then sleep 1; fi
    done
}
fleet_stop() { # TERM, KILL after 20 s
    local p deadline=$((SECONDS + 20))
    for p in "${FLEET_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${FLEET_PIDS[@]}"; do
        while kill -0 "$p" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
}

# Per-second rates of etcd's gRPC traffic between two metric dumps, by method.
grpc_rates() { # BEFORE AFTER SECONDS
    awk -v secs="$3" '
        FNR == 1 { f++ }
        /^grpc_server_(handled|msg_received|started)_total/ {
            m = $0; sub(/.*grpc_method="/, "", m); sub(/".*/, "", m)
            n = $1; sub(/\{.*/, "", n); sub(/^grpc_server_/, "", n); sub(/_total$/, "", n)
            v[f, n, m] += $NF; seen[m] = 1
        }
        END {
            for (m in seen) {
                h = (v[2, "handled", m] - v[1, "handled", m]) / secs
                r = (v[2, "msg_received", m] - v[1, "msg_received", m]) / secs
                s = (v[2, "started", m] - v[1, "started", m]) / secs
                if (h > 0 || r > 0 || s > 0) printf "%s %.2f %.2f %.2f\n", m, s, h, r
            }
        }' "$1" "$2" | sort
}

fleet_policy() { # ROUND: a ServicePolicy of the fleet's service changed each round
    cat >"$D/policy.yaml" <<DOC
apiVersion: trellis.dev/v1
kind: ServicePolicy
metadata: {name: fleet}
spec: {request_timeout: $((10 + $1))s}
DOC
    "$AGENT" policy apply -f "$D/policy.yaml" --etcd-endpoints "$ENDPOINT" --etcd-prefix "$PREFIX" --author bench 2>>"$D/logs/apply.log" |
        sed -n 's/^applied at revision \([0-9]*\)$/\1/p'
}

percentile() { # P < numbers: nearest rank
    sort -n | awk -v p="$1" '{ a[NR] = $1 } END { if (NR == 0) { print "-"; exit } i = int(p / 100 * NR + 0.999); if (i < 1) i = 1; if (i > NR) i = NR; print a[i] }'
}

fleet_run() { # N
    local n="$1" i addr t0 t1="" rev
    log "fleet of $n sidecars"
    rm -rf "$D/etcd-fleet"
    start_etcd "$D/etcd-fleet"
    for ((i = 0; i < n; i++)); do
        addr=$(fleet_addr "$i")
        sidecar_config fleet "$addr:15006" "$addr:15001" "$addr:15000" "f-$i" >"$D/f-$i.yaml"
    done
    # All at once, as after a cluster-wide restart or a deploy of every node.
    t0=$(now_ms)
    fleet_start "$n" 0
    result fleet.spawn_ms $(($(now_ms) - t0))
    if t1=$("$TOOL" wait-count "$ENDPOINT" "$PREFIX" fleet "$n" 60 2>"$D/count.err"); then
        result fleet.registered "$(awk -v m=$((t1 - t0)) 'BEGIN { printf "%.1f s", m / 1000 }')"
    else
        result fleet.registered "not after 60 s ($(sed -n 's/.* at \([0-9]*\) of.*/\1/p' "$D/count.err") of $n)"
        warn "all-at-once start: $(cat "$D/count.err"); starting again, ${STAGGER} sidecars/s"
        fleet_stop
        stop_pid "$ETCD_PID"
        rm -rf "$D/etcd-fleet" "$D/cache"
        mkdir -p "$D/cache"
        start_etcd "$D/etcd-fleet"
        t0=$(now_ms)
        fleet_start "$n" "$STAGGER"
        t1=$("$TOOL" wait-count "$ENDPOINT" "$PREFIX" fleet "$n" 120) || die "staggered start: not all $n registered within 120 s"
        result fleet.registered_staggered "$(awk -v m=$((t1 - t0)) 'BEGIN { printf "%.1f s", m / 1000 }')"
    fi
    echo "  all at once: $(res fleet.registered)$( [[ -z "$(res fleet.registered_staggered)" ]] || echo "; staggered ($STAGGER/s): $(res fleet.registered_staggered)")"

    # Policy rounds: apply, then the exact time every status key shows the revision, then the
    # CLI's own view (`status --wait`).
    local r ta tw tc applied="$D/applied.txt" cli="$D/cli.txt" apply_ms="$D/apply_ms.txt"
    : >"$applied"; : >"$cli"; : >"$apply_ms"
    for ((r = 1; r <= ROUNDS; r++)); do
        ta=$(now_ms)
        rev=$(fleet_policy "$r")
        [[ -n "$rev" ]] || die "policy apply failed (see $D/logs/apply.log)"
        echo $(($(now_ms) - ta)) >>"$apply_ms"
        tw=$("$TOOL" wait-applied "$ENDPOINT" "$PREFIX" fleet "$n" "$rev" 60) || die "round $r: not converged in 60 s"
        echo $((tw - ta)) >>"$applied"
        timeout 120 "$AGENT" status --wait --timeout 60s --etcd-endpoints "$ENDPOINT" --etcd-prefix "$PREFIX" >"$D/status.out" 2>&1 ||
            die "round $r: status --wait failed: $(tail -3 "$D/status.out")"
        tc=$(now_ms)
        echo $((tc - ta)) >>"$cli"
        printf '  round %2d: revision %s, every instance applied after %s ms, status --wait returned after %s ms\n' "$r" "$rev" $((tw - ta)) $((tc - ta))
        sleep 0.3
    done
    result fleet.apply_p50 "$(percentile 50 <"$applied")"
    result fleet.apply_p99 "$(percentile 99 <"$applied")"
    result fleet.apply_max "$(percentile 100 <"$applied")"
    result fleet.cli_p50 "$(percentile 50 <"$cli")"
    result fleet.cli_p99 "$(percentile 99 <"$cli")"
    result fleet.applycmd_p50 "$(percentile 50 <"$apply_ms")"
    # One `status --wait` poll: its cost grows with the fleet (one lease lookup per instance).
    t0=$(now_ms)
    "$AGENT" status --etcd-endpoints "$ENDPOINT" --etcd-prefix "$PREFIX" >/dev/null 2>&1 || true
    result fleet.status_ms $(($(now_ms) - t0))

    # Idle: etcd CPU and its gRPC traffic by method.
    sleep 3
    local e0 e1 ag0=0 ag1=0 p t
    metrics >"$D/m0.txt"
    e0=$(proc_ticks "$ETCD_PID")
    for p in "${FLEET_PIDS[@]}"; do ag0=$((ag0 + $(proc_ticks "$p"))); done
    t=$(now_ms)
    sleep "$IDLE_SECS"
    metrics >"$D/m1.txt"
    e1=$(proc_ticks "$ETCD_PID")
    for p in "${FLEET_PIDS[@]}"; do ag1=$((ag1 + $(proc_ticks "$p"))); done
    t=$(awk -v d=$(($(now_ms) - t)) 'BEGIN { print d / 1000 }')
    result fleet.etcd_idle_cpu "$(pct $((e1 - e0)) "$t")"
    result fleet.agent_idle_cpu "$(awk -v c=$((ag1 - ag0)) -v n="$n" -v hz="$HZ" -v t="$t" 'BEGIN { printf "%.3f", 100 * c / hz / t / n }')"
    grpc_rates "$D/m0.txt" "$D/m1.txt" "$t" >"$D/idle-rates.txt"
    local conns rss=0
    conns=$(ss -Htn state established "( sport = :$ETCD_PORT )" | wc -l)
    result fleet.etcd_conns "$conns"
    for p in "${FLEET_PIDS[@]}"; do rss=$((rss + $(rss_kb "$p"))); done
    result fleet.agent_rss_avg "$((rss / n))"
    result fleet.etcd_rss "$(rss_kb "$ETCD_PID")"
    echo "  idle ${t}s: etcd $(res fleet.etcd_idle_cpu)% of a core, $conns client connections; per method (started/s, handled/s, msgs received/s):"
    sed 's/^/    /' "$D/idle-rates.txt"

    # etcd killed, restarted after 10 s: recovery and reconnect storm.
    log "SIGKILL etcd, restart in 10 s"
    kill -KILL "$ETCD_PID"
    wait "$ETCD_PID" 2>/dev/null || true
    sleep 10
    local sampler tu tr tw2
    tu=$(now_ms)
    start_etcd "$D/etcd-fleet"
    result fleet.etcd_up_ms $(($(now_ms) - tu))
    mkdir -p "$D/storm"
    (
        end=$((SECONDS + 15))
        while ((SECONDS < end)); do
        {
            echo "# t $(now_ms) conns $(ss -Htn state established "( sport = :$ETCD_PORT )" | wc -l)"
            metrics | grep '^grpc_server_started_total'
        } >"$D/storm/$(now_ms).txt"
            sleep 0.5
        done
    ) &
    sampler=$!
    PIDS+=("$sampler")
    local counter
    "$TOOL" wait-count "$ENDPOINT" "$PREFIX" fleet "$n" 60 >"$D/restart-count.txt" 2>&1 &
    counter=$!
    PIDS+=("$counter")
    rev=$(fleet_policy 100)
    [[ -n "$rev" ]] || die "policy apply after restart failed"
    if tw2=$("$TOOL" wait-applied "$ENDPOINT" "$PREFIX" fleet "$n" "$rev" 60 2>"$D/applied.err"); then
        result fleet.restart_applied_ms $((tw2 - tu))
    else
        result fleet.restart_applied_ms 999999
        warn "after the restart: $(cat "$D/applied.err")"
    fi
    if wait "$counter"; then
        result fleet.restart_registered_ms $(($(cat "$D/restart-count.txt") - tu))
    else
        result fleet.restart_registered_ms 999999
        warn "after the restart: $(cat "$D/restart-count.txt")"
    fi
    wait "$sampler" || true
    # Peak per-second rates over the samples: new gRPC calls/streams by method, connections.
    awk '
        FNR == 1 { f++; t[f] = $3; c[f] = $5; next }
        { m = $0; sub(/.*grpc_method="/, "", m); sub(/".*/, "", m); v[f, m] += $NF; seen[m] = 1 }
        END {
            for (i = 2; i <= f; i++) {
                dt = (t[i] - t[i - 1]) / 1000; if (dt <= 0) continue
                tot = 0
                for (m in seen) { r = (v[i, m] - v[i - 1, m]) / dt; tot += r; if (r > pk[m]) pk[m] = r }
                if (tot > pkall) pkall = tot
                cr = (c[i] - c[i - 1]) / dt; if (cr > pkc) pkc = cr
            }
            printf "ALL %.0f\nCONNS %.0f\n", pkall, pkc
            for (m in seen) if (pk[m] > 0) printf "%s %.0f\n", m, pk[m]
        }' $(ls "$D"/storm/*.txt | sort) >"$D/storm-peaks.txt"
    # The first sample is the total since the restart (etcd's counters start at 0).
    awk '!/^#/ { m = $0; sub(/.*grpc_method="/, "", m); sub(/".*/, "", m); v[m] += $NF } END { for (m in v) if (v[m] > 0) printf "%s %.0f\n", m, v[m] }' \
        "$(ls "$D"/storm/*.txt | sort | head -1)" | sort >"$D/storm-first.txt"
    cp "$D"/storm-*.txt "$D/idle-rates.txt" "$D/logs/" 2>/dev/null || true
    echo "  after restart: registered +$(res fleet.restart_registered_ms) ms, policy applied everywhere +$(res fleet.restart_applied_ms) ms (etcd answered after $(res fleet.etcd_up_ms) ms)"
    echo "  peak rates (per second) right after the restart:"
    sed 's/^/    /' "$D/storm-peaks.txt"
    fleet_stop
    stop_pid "$ETCD_PID"
}

fleet_report() { # N
    local n="$1"
    printf '| fleet | all registered from the first start | apply -> all applied p50 / p99 / max ms | apply + `status --wait` p50 / p99 ms | one `status` call ms | etcd idle CPU %% | etcd client connections (per sidecar) | sidecar idle CPU %% (each) | sidecar RSS MB (mean) | etcd RSS MB | after etcd restart: all registered / policy applied s |\n'
    printf '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
    local reg_cell
    reg_cell="all at once: $(res fleet.registered)"
    [[ -z "$(res fleet.registered_staggered)" ]] || reg_cell+="; $STAGGER/s: $(res fleet.registered_staggered)"
    printf '| %s | %s | %s / %s / %s | %s / %s | %s | %s | %s | %s | %s | %s | %s / %s |\n' "$n" "$reg_cell" \
        "$(res fleet.apply_p50)" "$(res fleet.apply_p99)" "$(res fleet.apply_max)" \
        "$(res fleet.cli_p50)" "$(res fleet.cli_p99)" "$(res fleet.status_ms)" \
        "$(res fleet.etcd_idle_cpu)" "$(res fleet.etcd_conns) ($(awk -v c="$(res fleet.etcd_conns)" -v n="$n" 'BEGIN { printf "%.2f", c / n }'))" "$(res fleet.agent_idle_cpu)" \
        "$(mb "$(res fleet.agent_rss_avg)")" "$(mb "$(res fleet.etcd_rss)")" \
        "$(secs "$(res fleet.restart_registered_ms)")" "$(secs "$(res fleet.restart_applied_ms)")"
    echo
    echo "etcd's gRPC traffic with the fleet idle (${IDLE_SECS} s), per second and per sidecar:"
    echo
    echo '| method | calls or streams started /s | handled /s | messages received /s | messages received /s / sidecar |'
    echo '|---|---:|---:|---:|---:|'
    awk -v n="$n" '{ printf "| %s | %s | %s | %s | %.3f |\n", $1, $2, $3, $4, $4 / n }' "$D/idle-rates.txt"
    echo
    echo "Right after the restart (samples every 0.5 s for 15 s; peak per-second rates):"
    echo
    echo '| | peak /s | total in the first sample |'
    echo '|---|---:|---:|'
    printf '| new client connections | %s | - |\n' "$(awk '$1 == "CONNS" { print $2 }' "$D/storm-peaks.txt")"
    printf '| gRPC calls and streams started (all methods) | %s | %s |\n' "$(awk '$1 == "ALL" { print $2 }' "$D/storm-peaks.txt")" \
        "$(awk '{ s += $2 } END { print s + 0 }' "$D/storm-first.txt")"
    awk 'NR == FNR { first[$1] = $2; next } $1 != "ALL" && $1 != "CONNS" { printf "| %s started | %s | %s |\n", $1, $2, first[$1] + 0 }' \
        "$D/storm-first.txt" "$D/storm-peaks.txt" | sort
    echo
    local p99 idle reg rr
    p99=$(res fleet.apply_p99) idle=$(res fleet.etcd_idle_cpu)
    reg=$(res fleet.registered)
    rr=$(awk -v a="$(res fleet.restart_applied_ms)" -v b="$(res fleet.restart_registered_ms)" 'BEGIN { print (a > b ? a : b) / 1000 }')
    printf '| target (%s sidecars) | measured | result |\n|---|---|---|\n' "$n"
    printf '| all registered <= 10 s from start (all at once) | %s | %s |\n' "$reg" "$( [[ $reg == *" s" ]] && met "${reg% s} <= 10" || echo "**NOT met**")"
    printf '| apply -> every instance on the new revision, p99 <= 500 ms | %s ms | %s |\n' "$p99" "$(met "$p99 <= 500")"
    local cp99
    cp99=$(res fleet.cli_p99)
    printf '| apply -> `status --wait` returned, p99 <= 500 ms | %s ms | %s |\n' "$cp99" "$(met "$cp99 <= 500")"
    printf '| etcd idle CPU <= 5 %% of a core | %s %% | %s |\n' "$idle" "$(met "$idle <= 5")"
    printf '| after an etcd restart, all registered and a policy applied <= 5 s | %s s | %s |\n' "$rr" "$(met "$rr <= 5")"
}

# --- results document ----------------------------------------------------------------------------

# Replace the section between <!-- scale:NAME --> and <!-- /scale:NAME --> (appended if absent).
write_section() { # NAME FILE
    local begin="<!-- scale:$1 -->" end="<!-- /scale:$1 -->"
    [[ -f "$DOC" ]] || die "$DOC is missing (it holds the method; sections are filled in)"
    if grep -qF "$begin" "$DOC"; then
        awk -v b="$begin" -v e="$end" -v f="$2" '
            $0 == b { print; while ((getline l < f) > 0) print l; skip = 1; next }
            $0 == e { skip = 0 }
            !skip { print }' "$DOC" >"$D/doc.new"
    else
        { cat "$DOC"; echo; echo "$begin"; cat "$2"; echo "$end"; } >"$D/doc.new"
    fi
    cp "$D/doc.new" "$DOC"
}

env_line() {
    local rev
    rev="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    [[ -z "$(cd "$ROOT" && git status --porcelain -- proxy mesh-agent/src policies Cargo.lock 2>/dev/null)" ]] || rev+=" (+ uncommitted changes)"
    printf '%s; Trellis %s; %s cores (%s), %s GB RAM; Linux %s; etcd %s; scoped discovery settings %s' \
        "$(date -u '+%Y-%m-%d %H:%M UTC')" "$rev" "$(nproc)" \
        "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)" \
        "$(awk '/MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)" "$(uname -r)" \
        "$(etcd --version | awk 'NR == 1 { print $3 }')" \
        "$( ((SCOPED)) && echo "written (store.etcd.discovery, scope on-demand)" || echo "not supported by this build: full-mesh discovery")"
}

# --- main --------------------------------------------------------------------------------------

SCOPED=0
if discovery_settings_supported; then SCOPED=1; fi
log "scoped discovery settings: $( ((SCOPED)) && echo written || echo "not supported, measuring full-mesh discovery")"

if [[ $MODE == mesh || $MODE == all ]]; then
    if [[ $MODE == mesh && -n "${2:-}" ]]; then read -r -a SIZES <<<"${*:2}"; else SIZES=(100:100 10000:1000); fi
    for size in "${SIZES[@]}"; do
        [[ "$size" =~ ^[0-9]+:[0-9]+$ ]] || die "size $size is not INSTANCES:SERVICES"
        ((${size#*:} >= 5)) || die "the sidecar calls 5 services: SERVICES must be >= 5"
        mesh_run "${size%%:*}" "${size#*:}"
    done
    {
        echo "$(env_line)."
        echo
        echo "Churn: $RATE changes/s for $CHURN_SECS s; idle window $IDLE_SECS s; sizes ${SIZES[*]} (instances:services)."
        echo
        mesh_report "${SIZES[@]}"
    } >"$D/mesh.md"
    echo
    cat "$D/mesh.md"
    [[ "${SCALE_NO_DOCS:-0}" == 1 ]] || write_section mesh "$D/mesh.md"
fi

if [[ $MODE == fleet || $MODE == all ]]; then
    N=500
    [[ $MODE == fleet && -n "${2:-}" ]] && N="$2"
    [[ "$N" =~ ^[1-9][0-9]*$ ]] && ((N <= 2500)) || die "fleet size must be 1..2500"
    fleet_run "$N"
    {
        echo "$(env_line)."
        echo
        echo "$ROUNDS policy rounds; idle window $IDLE_SECS s."
        echo
        fleet_report "$N"
    } >"$D/fleet.md"
    echo
    cat "$D/fleet.md"
    [[ "${SCALE_NO_DOCS:-0}" == 1 ]] || write_section fleet "$D/fleet.md"
fi
[[ "${SCALE_NO_DOCS:-0}" == 1 ]] || log "results written to ${DOC#"$ROOT"/}"
