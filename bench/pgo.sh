#!/usr/bin/env bash
# A profile-guided (PGO) release build of mesh-agent (`cargo build --release` makes the plain one;
# the Docker image too, unless given this script's profile: Dockerfile, PGO_PROFILE):
#  1. an instrumented release build (rustc -Cprofile-generate) in target/pgo-gen;
#  2. training: that binary serves the benchmarks' traffic for a few seconds each (bench/run.sh:
#     the inbound listener over HTTP/1.1 and the two-sidecar mTLS path over HTTP/2, 1,000 idle
#     connections; bench/gateway.sh: the ingress over TLS with and without JWT; bench/transcode.sh:
#     gRPC and gRPC-JSON transcoding over h2c; bench/cache.sh: the response cache's hits and
#     misses; bench/routing.sh: a 100-rule HTTPRoute); each process writes its counters when it
#     exits;
#  3. llvm-profdata merges them; the release build is made again with -Cprofile-use, in
#     target/pgo (the output: target/pgo/release/mesh-agent);
#  4. the same three steps for the stack's floor (proxy/examples/hyper_floor.rs, trained on its
#     two modes in front of an nginx backend) into target/pgo-floor: bench/run.sh --pgo measures
#     Trellis's PGO build against a floor built the same way, not against a plain one.
# Code the training never ran is still compiled, only laid out and inlined as cold: behaviour is
# the same as the plain release build's, only speed differs (docs/performance.md, "Profile-guided
# build", which also says what code the training leaves cold costs).
#
#   bash bench/pgo.sh    # then BENCH_SKIP_BUILD=1 bash bench/run.sh --pgo: both builds side by side
#
# Needs llvm-profdata of rustc's own LLVM major version (Debian: apt-get install llvm-NN, where
# NN is the "LLVM version" of `rustc -vV`); PGO_PROFDATA=PATH picks another binary.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { echo "error: $*" >&2; exit 1; }

LLVM_MAJOR="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
PROFDATA="${PGO_PROFDATA:-$(command -v "llvm-profdata-$LLVM_MAJOR" || true)}"
[[ -n "$PROFDATA" ]] || die "llvm-profdata-$LLVM_MAJOR not found (rustc uses LLVM $LLVM_MAJOR: apt-get install llvm-$LLVM_MAJOR)"
"$PROFDATA" --version | grep -q "version $LLVM_MAJOR\." ||
    die "$PROFDATA is not LLVM $LLVM_MAJOR (rustc's): its profiles would not match"

GEN_DIR="$ROOT/target/pgo-gen"
USE_DIR="$ROOT/target/pgo"
RAW="$GEN_DIR/profiles"
rm -rf "$RAW" && mkdir -p "$RAW"

log "1/4 instrumented builds (target/pgo-gen): mesh-agent and the hyper floor"
# The same RUSTFLAGS for both, so that they share what they can; each run writes its profiles
# where LLVM_PROFILE_FILE says.
(cd "$ROOT" && CARGO_TARGET_DIR="$GEN_DIR" RUSTFLAGS="-Cprofile-generate=$RAW" \
    cargo build --release --locked -p mesh-agent &&
    CARGO_TARGET_DIR="$GEN_DIR" RUSTFLAGS="-Cprofile-generate=$RAW" \
        cargo build --release --locked -p trellis-proxy --example hyper_floor) >"$GEN_DIR.log" 2>&1 ||
    { tail -30 "$GEN_DIR.log" >&2; die "instrumented build failed"; }

log "2/4 training: the benchmarks' traffic through the instrumented binary"
# The benchmark scripts run the instrumented mesh-agent; what else they need (the hyper floor,
# the transcoding load client) is built here, plain, and the scripts build nothing more.
(cd "$ROOT" && cargo build --release --locked -p trellis-proxy --example hyper_floor --example transcode_load) \
    >"$GEN_DIR/examples.log" 2>&1 || { tail -30 "$GEN_DIR/examples.log" >&2; die "building the load tools failed"; }
export LLVM_PROFILE_FILE="$RAW/%m_%p.profraw"
export BENCH_AGENT="$GEN_DIR/release/mesh-agent" BENCH_SKIP_BUILD=1 BENCH_SECONDS="${PGO_SECONDS:-3}"
train() { # NAME CMD...
    log "   $1"
    "${@:2}" >"$GEN_DIR/train-$1.log" 2>&1 || { tail -20 "$GEN_DIR/train-$1.log" >&2; die "training run $1 failed"; }
}
train run env BENCH_CYCLES=1 bash "$ROOT/bench/run.sh" --no-docs
train gateway bash "$ROOT/bench/gateway.sh"
train transcode env BENCH_ROUNDS=1 BENCH_REQUESTS=5000 bash "$ROOT/bench/transcode.sh"
train cache env BENCH_ROUNDS=1 bash "$ROOT/bench/cache.sh"
train routing bash "$ROOT/bench/routing.sh"
n="$(find "$RAW" -name '*.profraw' | wc -l)"
((n > 0)) || die "no profile was written (did the sidecars exit cleanly?)"
rm -f "$GEN_DIR"/merged-*.profdata # the last run's (about 18 MB each)
"$PROFDATA" merge -o "$GEN_DIR/merged.profdata" "$RAW"
# Named by content: cargo tracks RUSTFLAGS, not the profile's bytes, so a new profile must be a
# new path for the build below to happen again (and the same one reuses the last build).
PROFILE="$GEN_DIR/merged-$(sha256sum "$GEN_DIR/merged.profdata" | cut -c1-16).profdata"
mv "$GEN_DIR/merged.profdata" "$PROFILE"
log "   $n process profiles merged into ${PROFILE#"$ROOT"/}"

log "3/4 release build with the profile (target/pgo)"
(cd "$ROOT" && CARGO_TARGET_DIR="$USE_DIR" RUSTFLAGS="-Cprofile-use=$PROFILE" \
    cargo build --release --locked -p mesh-agent) >"$USE_DIR.log" 2>&1 ||
    { tail -30 "$USE_DIR.log" >&2; die "build with the profile failed"; }
log "built ${USE_DIR#"$ROOT"/}/release/mesh-agent"

log "4/4 the hyper floor: trained in both its modes, then built with its profile (target/pgo-floor)"
FLOOR_RAW="$GEN_DIR/floor-profiles"
rm -rf "$FLOOR_RAW" && mkdir -p "$FLOOR_RAW"
train floor env LLVM_PROFILE_FILE="$FLOOR_RAW/%m_%p.profraw" FLOOR="$GEN_DIR/release/examples/hyper_floor" \
    SECONDS_PER_MODE="${PGO_SECONDS:-3}" bash "$ROOT/bench/floor_train.sh"
rm -f "$GEN_DIR"/floor-*.profdata # the last run's
"$PROFDATA" merge -o "$GEN_DIR/floor.merged" "$FLOOR_RAW"
# Named by content, as the mesh-agent's profile above.
FLOOR_PROFILE="$GEN_DIR/floor-$(sha256sum "$GEN_DIR/floor.merged" | cut -c1-16).profdata"
mv "$GEN_DIR/floor.merged" "$FLOOR_PROFILE"
(cd "$ROOT" && CARGO_TARGET_DIR="$ROOT/target/pgo-floor" RUSTFLAGS="-Cprofile-use=$FLOOR_PROFILE" \
    cargo build --release --locked -p trellis-proxy --example hyper_floor) >"$ROOT/target/pgo-floor.log" 2>&1 ||
    { tail -30 "$ROOT/target/pgo-floor.log" >&2; die "the floor's build with its profile failed"; }
log "built target/pgo-floor/release/examples/hyper_floor"
