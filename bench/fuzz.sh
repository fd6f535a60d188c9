#!/usr/bin/env bash
# Long fuzzing runs: every target of crate trellis-fuzz (or the ones named) for FUZZ_SECONDS
# each, one after the other, with a report of executions and findings per target.
#
#   bash bench/fuzz.sh                      # every target, 600 s each (stable driver)
#   FUZZ_SECONDS=60 bash bench/fuzz.sh jwt  # one target, one minute
#   FUZZ_DRIVER=afl bash bench/fuzz.sh      # AFL++ (coverage-guided; needs cargo-afl)
#
# Environment: FUZZ_SECONDS (600), FUZZ_DRIVER (stable | afl), FUZZ_OUT (where crashes, new
# corpus entries and the summary go; default target/fuzz-runs/<date>), FUZZ_TIMEOUT (10 s: one
# execution longer than this is a hang), CARGO_TARGET_DIR as usual.
# Exit status 1 when any target had a finding. See docs/fuzzing.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-600}"
DRIVER="${FUZZ_DRIVER:-stable}"
TIMEOUT="${FUZZ_TIMEOUT:-10}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${FUZZ_OUT:-$TARGET_DIR/fuzz-runs/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"

case "$DRIVER" in
stable)
    cargo build --locked --profile fuzz -p trellis-fuzz --bin trellis-fuzz
    BIN="$TARGET_DIR/fuzz/trellis-fuzz"
    ;;
afl)
    if ! cargo afl --version >/dev/null 2>&1; then
        echo "FUZZ_DRIVER=afl needs cargo-afl: cargo install cargo-afl --locked" >&2
        exit 2
    fi
    # A target directory of its own: instrumented artifacts would otherwise replace the
    # stable build's (RUSTFLAGS do not change artifact names).
    CARGO_TARGET_DIR="$TARGET_DIR/afl" cargo afl build --locked --profile fuzz -p trellis-fuzz \
        --features afl --bin trellis-fuzz-afl
    cargo build --locked --profile fuzz -p trellis-fuzz --bin trellis-fuzz
    BIN="$TARGET_DIR/fuzz/trellis-fuzz"
    AFL_BIN="$TARGET_DIR/afl/fuzz/trellis-fuzz-afl"
    ;;
*)
    echo "FUZZ_DRIVER must be stable or afl" >&2
    exit 2
    ;;
esac

if [ $# -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <("$BIN" list)
fi

echo "fuzz: ${#TARGETS[@]} targets x ${SECONDS_PER_TARGET}s, driver $DRIVER, output $OUT" | tee "$SUMMARY"
failed=0
for t in "${TARGETS[@]}"; do
    if [ "$DRIVER" = stable ]; then
        if ! "$BIN" run "$t" --seconds "$SECONDS_PER_TARGET" --timeout-seconds "$TIMEOUT" \
            --crashes "$OUT/crashes" --corpus-out "$OUT/new-corpus" 2>&1 | tee -a "$SUMMARY"; then
            failed=1
        fi
    else
        # AFL++ wants whole-file inputs; -V ends the run after the time given.
        mkdir -p "$OUT/afl"
        AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
            TRELLIS_FUZZ_TARGET="$t" cargo afl fuzz -V "$SECONDS_PER_TARGET" -t $((TIMEOUT * 1000)) \
            -i "fuzz/corpus/$t" -o "$OUT/afl/$t" "$AFL_BIN" >"$OUT/afl-$t.log" 2>&1 || true
        stats="$OUT/afl/$t/default/fuzzer_stats"
        if [ ! -f "$stats" ]; then
            echo "$t: AFL did not start (see $OUT/afl-$t.log)" | tee -a "$SUMMARY"
            failed=1
            continue
        fi
        get() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
        crashes=$(get saved_crashes)
        hangs=$(get saved_hangs)
        echo "$t: execs $(get execs_done) ($(get execs_per_sec)/s), edges $(get edges_found)/$(get total_edges), corpus $(get corpus_count), crashes $crashes, hangs $hangs" | tee -a "$SUMMARY"
        if [ "${crashes:-0}" != 0 ] || [ "${hangs:-0}" != 0 ]; then
            failed=1
            # Replay them through the stable driver for the panic message.
            for f in "$OUT/afl/$t"/default/crashes/id:* "$OUT/afl/$t"/default/hangs/id:*; do
                [ -f "$f" ] && echo "  finding: $f" | tee -a "$SUMMARY"
            done
        fi
    fi
done
echo "summary: $SUMMARY" >&2
exit "$failed"
