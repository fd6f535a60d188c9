#!/usr/bin/env bash
# Is hyper's HTTP/2 client slower than driving the h2 crate directly? Proxy process CPU per request,
# HTTP/1.1 in (wrk -c32 on core 0) and h2c out to one upstream, both on core 1 (proxy/examples/h2_floor.rs).
# Usage: bash bench/h2_client.sh (after: cargo build --release --example h2_floor -p trellis-proxy)
set -uo pipefail
B=$(cd "$(dirname "$0")/.." && pwd)/target/release/examples/h2_floor; SECS=${SECS:-6}
taskset -c 1 $B 127.0.0.1:29101 - server & S=$!
sleep 0.3
taskset -c 1 $B 127.0.0.1:29102 127.0.0.1:29101 hyper & H=$!
taskset -c 1 $B 127.0.0.1:29103 127.0.0.1:29101 h2 & D=$!
sleep 0.5
cpu(){ awk '{print $14+$15}' /proc/$1/stat; }
for r in 1 2; do for x in hyper:$H:29102 h2:$D:29103; do IFS=: read n pid port <<<"$x"
  taskset -c 0 wrk -t1 -c32 -d1s http://127.0.0.1:$port/ >/dev/null
  c0=$(cpu $pid); out=$(taskset -c 0 wrk -t1 -c32 -d${SECS}s http://127.0.0.1:$port/); c1=$(cpu $pid)
  req=$(awk '/requests in/{print $1}' <<<"$out")
  echo "$n rps=$((req/SECS)) proxy_us/req=$(echo "scale=2; ($c1-$c0)*10000/$req" | bc)"
done; done
kill $S $H $D
