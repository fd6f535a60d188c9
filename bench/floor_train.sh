#!/usr/bin/env bash
# Training traffic for a profile-instrumented build of the stack's floor
# (proxy/examples/hyper_floor.rs): each of its two modes (paired, pooled) in front of an nginx
# backend, on core 1, under wrk -t1 -c32 on core 0 for SECONDS_PER_MODE seconds, then SIGINT, on
# which it exits normally and writes its profile (where LLVM_PROFILE_FILE says). Run by
# bench/pgo.sh, which builds the instrumented binary and passes it as FLOOR.
#
#   FLOOR=PATH [SECONDS_PER_MODE=3] [BENCH_PORT_BASE=28950] bash bench/floor_train.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ -x "${FLOOR:-}" ]] || die "FLOOR must name the (instrumented) hyper_floor binary"
SECS="${SECONDS_PER_MODE:-3}"
BASE="${BENCH_PORT_BASE:-28950}"
BACKEND=$BASE
P=$((BASE + 1))
bench_init floor-train
need nginx wrk curl taskset
start_backend "$BACKEND"
wait_http backend "http://127.0.0.1:$BACKEND/"
for mode in paired pooled; do
    taskset -c 1 "$FLOOR" "127.0.0.1:$P" "127.0.0.1:$BACKEND" "$mode" &
    pid=$!
    PIDS+=("$pid") # killed on the way out if anything below fails
    wait_http "hyper_floor ($mode)" "http://127.0.0.1:$P/"
    taskset -c 0 wrk -t1 -c32 -d"${SECS}s" "http://127.0.0.1:$P/" | grep 'Requests/sec' |
        sed "s/^/$mode: /"
    kill -INT "$pid"
    wait "$pid" || die "hyper_floor ($mode) did not exit cleanly on SIGINT: no profile written"
done
