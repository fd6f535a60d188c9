#!/usr/bin/env bash
# A two-service Trellis mesh with etcd on this machine, no containers, every step checked:
#
#   client -> frontend app -> frontend sidecar ==mTLS==> orders sidecar -> orders app
#
#   1. start etcd                        5. apply policies from policies.yaml
#   2. create a CA, issue certificates   6. one request end to end, identity verified
#   3. start the apps and sidecars       7. stop orders' sidecar with SIGTERM: it deregisters
#   4. both instances registered         8. clean up
#
# Usage: bash examples/local/walkthrough.sh            (uses target/debug/mesh-agent, built if missing)
#        MESH_AGENT=/path/to/mesh-agent KEEP=1 bash examples/local/walkthrough.sh   (KEEP: leave the
#        processes running and print how to reach them; stop them with the printed kill command)
# Needs `etcd` (apt-get install etcd-server) and `curl`. Exits non-zero at the first failed check.
# Every process it starts is stopped on exit (by PID); every port is picked free on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=examples/local

fail() { echo "FAIL: $*" >&2; exit 1; }
step() { echo; echo "== $*"; }
ok() { echo "   ok: $*"; }

for tool in etcd curl ss; do command -v "$tool" >/dev/null || fail "$tool is not installed"; done
BIN=${MESH_AGENT:-target/debug/mesh-agent}
if [ ! -x "$BIN" ]; then
  step "building mesh-agent"
  cargo build --locked -p mesh-agent
fi
BIN=$(realpath "$BIN")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/trellis-walkthrough.XXXXXX")
PIDS=()
cleanup() {
  if [ -n "${KEEP:-}" ]; then
    echo; echo "left running (KEEP=1): kill ${PIDS[*]}; rm -rf $WORK"
    return
  fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# A free TCP port below the ephemeral range (so that no outgoing connection takes it meanwhile).
USED=" "
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 12000))
    case $USED in *" $p "*) continue ;; esac
    if [ -z "$(ss -Hltn "sport = :$p")" ]; then USED="$USED$p "; echo "$p"; return; fi
  done
  fail "no free port"
}

# Poll until a command succeeds (at most $1 tenths of a second); never a fixed sleep.
until_ok() {
  local tries=$1; shift
  for _ in $(seq 1 "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

step "1. etcd"
ETCD_CLIENT=$(free_port); ETCD_PEER=$(free_port)
ETCD=http://127.0.0.1:$ETCD_CLIENT
etcd --name walkthrough --data-dir "$WORK/etcd" \
  --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "walkthrough=http://127.0.0.1:$ETCD_PEER" --initial-cluster-state new \
  --heartbeat-interval 10 --election-timeout 100 >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
until_ok 100 curl -fsS "$ETCD/health" || { tail -5 "$WORK/etcd.log"; fail "etcd did not become healthy"; }
export TRELLIS_ETCD_ENDPOINTS=$ETCD   # read by every mesh-agent command below
"$BIN" status >/dev/null || fail "mesh-agent status cannot reach etcd"
ok "etcd at $ETCD"

step "2. certificates"
CERTS=$WORK/certs
"$BIN" cert init --trust-domain local.test --dir "$CERTS"
"$BIN" cert issue --service frontend,orders --dir "$CERTS" --ttl 1h
for f in ca.pem frontend.pem frontend-key.pem orders.pem orders-key.pem; do
  [ -s "$CERTS/$f" ] || fail "missing $CERTS/$f"
done
[ "$(stat -c %a "$CERTS/orders-key.pem")" = 600 ] || fail "orders-key.pem is not private (0600)"
ok "CA for local.test, one certificate per service, keys 0600"

step "3. apps and sidecars"
# sidecar SERVICE: writes its config and starts it; its ports go into the arrays below.
declare -A ADMIN OUTBOUND APP SIDECAR
sidecar() {
  local svc=$1 deps=${2:-} inbound outbound admin app
  inbound=$(free_port); outbound=$(free_port); admin=$(free_port); app=$(free_port)
  sed -e "s|@SERVICE@|$svc|g" -e "s|@CERTS@|$CERTS|g" -e "s|@WORK@|$WORK|g" \
    -e "s|@INBOUND@|$inbound|g" -e "s|@OUTBOUND@|$outbound|g" -e "s|@ADMIN@|$admin|g" \
    -e "s|@APP@|$app|g" -e "s|@ETCD@|$ETCD|g" -e "s|@DEPENDENCIES@|$deps|g" "$HERE/sidecar.yaml.in" >"$WORK/$svc.yaml"
  "$BIN" run --config "$WORK/$svc.yaml" >"$WORK/$svc-sidecar.log" 2>&1 &
  PIDS+=($!)
  SIDECAR[$svc]=$!; ADMIN[$svc]=$admin; OUTBOUND[$svc]=$outbound; APP[$svc]=$app
}
sidecar orders
sidecar frontend orders
# The apps: orders answers; frontend calls orders through its own sidecar for every request.
"$BIN" demo-app --listen "127.0.0.1:${APP[orders]}" --name orders-1 >"$WORK/orders-app.log" 2>&1 &
PIDS+=($!)
"$BIN" demo-app --listen "127.0.0.1:${APP[frontend]}" --name frontend-1 \
  --call orders/api/orders --outbound "127.0.0.1:${OUTBOUND[frontend]}" >"$WORK/frontend-app.log" 2>&1 &
PIDS+=($!)
for svc in orders frontend; do
  # What an app's entrypoint does: block until its sidecar can route.
  "$BIN" wait-ready --admin "127.0.0.1:${ADMIN[$svc]}" --timeout 30s \
    || { tail -20 "$WORK/$svc-sidecar.log"; fail "$svc sidecar not ready"; }
done
ok "both sidecars ready (admin 127.0.0.1:${ADMIN[orders]} and 127.0.0.1:${ADMIN[frontend]})"

step "4. registration"
registered() { "$BIN" status >"$WORK/status.txt" && grep -q "^$1 .* yes$" "$WORK/status.txt"; }
for svc in orders frontend; do
  until_ok 100 registered "$svc" || { cat "$WORK/status.txt"; fail "$svc not registered and converged"; }
done
"$BIN" status
ok "both instances registered under a lease, and converged"

step "5. policies"
"$BIN" policy validate -f "$HERE/policies.yaml"
"$BIN" policy apply -f "$HERE/policies.yaml"
stored=$("$BIN" policy get ServicePolicy/orders)
grep -q 'request_timeout' <<<"$stored" || fail "ServicePolicy/orders not stored: $stored"
policy_seen() { grep -q '"request_timeout": *"3s"' <<<"$(curl -fsS "http://127.0.0.1:${ADMIN[frontend]}/config_dump")"; }
until_ok 100 policy_seen || fail "frontend's sidecar did not apply ServicePolicy/orders"
ok "stored in etcd and applied by frontend's sidecar (request_timeout 3s in /config_dump)"

step "6. a request end to end"
resp=$(curl -fsS "http://127.0.0.1:${APP[frontend]}/") || fail "request failed"
echo "   $resp"
grep -q '"instance":"orders-1"' <<<"$resp" || fail "orders did not answer"
grep -q '"caller":"spiffe://local.test/service/frontend"' <<<"$resp" \
  || fail "orders' sidecar did not verify frontend's identity"
ok "frontend -> orders over mTLS; orders saw spiffe://local.test/service/frontend"
metric() { grep -E "^trellis_requests_total\{direction=\"$2\",service=\"orders\"" <<<"$(curl -fsS "http://127.0.0.1:$1/metrics")" || true; }
[ -n "$(metric "${ADMIN[frontend]}" outbound)" ] || fail "frontend's sidecar counted no outbound request to orders"
[ -n "$(metric "${ADMIN[orders]}" inbound)" ] || fail "orders' sidecar counted no inbound request"
ok "counted by both sidecars"

if [ -n "${KEEP:-}" ]; then
  echo; echo "try: curl http://127.0.0.1:${APP[frontend]}/   and   curl http://127.0.0.1:${ADMIN[frontend]}/config_dump"
  exit 0
fi

step "7. SIGTERM: drain and deregister"
kill -TERM "${SIDECAR[orders]}"
code=0; wait "${SIDECAR[orders]}" || code=$?
[ "$code" = 0 ] || fail "orders' sidecar exited $code after SIGTERM"
left=$("$BIN" status)
if grep -q '^orders ' <<<"$left"; then fail "orders still registered after its sidecar stopped: $left"; fi
gone() { grep -q '"error"' <<<"$(curl -sS "http://127.0.0.1:${APP[frontend]}/")"; }
until_ok 50 gone || fail "frontend still reaches orders after its only instance left"
ok "exit 0, registration revoked, frontend's sidecar no longer routes to it"

step "PASS: walkthrough complete"
