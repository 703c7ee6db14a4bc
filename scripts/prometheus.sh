#!/usr/bin/env bash
# A real Prometheus scraping a 3-node cluster: checks each node's /metrics with `promtool check
# metrics` (must report nothing), starts Prometheus (Debian's package, installed with apt-get when
# missing) scraping the three nodes every second, writes through the cluster, then queries a few
# series through Prometheus's HTTP API and fails unless each has data from every node.
#
# Usage: scripts/prometheus.sh [--keep]   (--keep leaves Prometheus and the nodes running)
# Ports: nodes' APIs 7861-7863 (p2p 7961-7963), Prometheus 19090. Data in target/prometheus.
# PEERSYNC_BIN: run that binary instead of building target/release/peersync.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$root/target/prometheus
base=7860
prom_port=19090
keep=${1:-}
say() { printf '[prometheus.sh] %s\n' "$*" >&2; }

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    say "installing prometheus (Debian package) ..."
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >&2 ||
            { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >&2; }
    else
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >&2
    fi
fi
# The package starts a system service on 9090; this script runs its own.
# PEERSYNC_BIN (an executable peersync, passed on to cluster.sh) skips the build.
if [ -n "${PEERSYNC_BIN:-}" ] && [ -x "$PEERSYNC_BIN" ]; then
    say "using $PEERSYNC_BIN"
else
    (cd "$root" && cargo build --release --bin peersync) >&2
fi

rm -rf "$dir"
mkdir -p "$dir"
prom_pid=""
cleanup() {
    local rc=$?
    if [ "$keep" != "--keep" ]; then
        [ -n "$prom_pid" ] && kill "$prom_pid" 2>/dev/null && wait "$prom_pid" 2>/dev/null || true
        PEERSYNC_CLUSTER_DIR=$dir/cluster "$root/scripts/cluster.sh" stop >/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT

PEERSYNC_CLUSTER_DIR=$dir/cluster PEERSYNC_BASE_PORT=$base "$root/scripts/cluster.sh" start 3 >&2
apis=("127.0.0.1:$((base + 1))" "127.0.0.1:$((base + 2))" "127.0.0.1:$((base + 3))")

for i in $(seq 1 60); do
    for a in "${apis[@]}"; do curl -fsS -X PUT "http://$a/v1/registers/prom/k$i" --data-binary "v$i" >/dev/null; done
done
curl -fsS -X POST "http://${apis[0]}/v1/counters/prom/hits" -d '{"delta": 3}' >/dev/null

for a in "${apis[@]}"; do
    out=$(curl -fsS "http://$a/metrics" | promtool check metrics 2>&1) || { say "promtool failed on $a: $out"; exit 1; }
    if [ -n "$out" ]; then
        say "promtool check metrics reported problems on $a:"
        echo "$out" >&2
        exit 1
    fi
done
say "promtool check metrics: clean on all three nodes"

targets=$(printf "'%s'," "${apis[@]}")
cat >"$dir/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: peersync
    static_configs:
      - targets: [${targets%,}]
YML
promtool check config "$dir/prometheus.yml" >&2
prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/tsdb" \
    --web.listen-address="127.0.0.1:$prom_port" >"$dir/prometheus.log" 2>&1 &
prom_pid=$!

query() { curl -fsS --get "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode "query=$1"; }
# Series and how many results each must have (one per node unless said otherwise).
checks=(
    'up{job="peersync"} == 1|3'
    'peersync_ops_local_total|3'
    'peersync_applied_ops|3'
    'sum by (instance) (peersync_peers{state="connected"})|3'
    'sum by (instance) (peersync_bytes_received_total)|3'
    'peersync_lag_ops|9'
)
deadline=$((SECONDS + 60))
for c in "${checks[@]}"; do
    q=${c%|*} want=${c##*|}
    while :; do
        got=$(query "$q" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]["result"]))' 2>/dev/null || echo 0)
        [ "$got" -ge "$want" ] && break
        if [ $SECONDS -ge $deadline ]; then
            say "query $q: $got results, wanted $want (Prometheus log: $dir/prometheus.log)"
            exit 1
        fi
        sleep 0.5
    done
    say "query $q: $got results"
done
# Every node applied all 180 writes, as Prometheus saw it.
while :; do
    total=$(query 'min(peersync_applied_ops)' | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(int(float(r[0]["value"][1])) if r else 0)')
    [ "$total" -ge 181 ] && break
    [ $SECONDS -ge $deadline ] && { say "min(peersync_applied_ops) = $total, wanted 181"; exit 1; }
    sleep 0.5
done
say "min(peersync_applied_ops) = $total: every node applied every write, as scraped"
say "PASS"
