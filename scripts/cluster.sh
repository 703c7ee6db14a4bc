#!/usr/bin/env bash
# Runs a local peersync cluster on 127.0.0.1, for trying things out and for benchmarks.
#
#   scripts/cluster.sh [start] [N]   start N nodes (default 3), bootstrapped in a chain: node2 -> node1,
#                                    node3 -> node2, ...; prints each node's API address
#   scripts/cluster.sh stop          stop exactly the processes this script started (by pid file)
#   scripts/cluster.sh status        print each node's /v1/status
#   scripts/cluster.sh stop-node I   stop node I only (its data stays)
#   scripts/cluster.sh start-node I  start node I again with the same flags, bootstrapped from node I-1
#                                    (node2 for node1)
#
# Environment: PEERSYNC_CLUSTER_DIR (data, logs, pid files; default target/cluster),
# PEERSYNC_BASE_PORT (API ports BASE+i, p2p ports BASE+100+i; default 7800),
# PEERSYNC_ROLES (space-separated roles per node; default all primary), PEERSYNC_BIN (binary to run).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${PEERSYNC_CLUSTER_DIR:-$root/target/cluster}
base=${PEERSYNC_BASE_PORT:-7800}
bin=${PEERSYNC_BIN:-$root/target/release/peersync}
cmd=${1:-start}

stop() { # [I]: node I only, else every node
    shopt -s nullglob
    local pidfiles=("$dir"/node*.pid)
    if [ -n "${1:-}" ]; then pidfiles=("$dir/node$1.pid"); fi
    for pidfile in "${pidfiles[@]}"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        # Only signal the process we started: same pid and still a peersync node.
        if kill -0 "$pid" 2>/dev/null && grep -q peersync "/proc/$pid/cmdline" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 100); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            if kill -0 "$pid" 2>/dev/null; then
                echo "node with pid $pid did not stop within 10 s; killing it" >&2
                kill -KILL "$pid"
            fi
            echo "stopped $(basename "$pidfile" .pid) (pid $pid)"
        fi
        rm -f "$pidfile"
    done
}

case "$cmd" in
stop)
    stop
    exit 0
    ;;
status)
    shopt -s nullglob
    for pidfile in "$dir"/node*.pid; do
        i=${pidfile##*/node}
        i=${i%.pid}
        echo "== node$i"
        curl -fsS "http://127.0.0.1:$((base + i))/v1/status" || echo "(not answering)"
        echo
    done
    exit 0
    ;;
stop-node)
    [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 stop-node I" >&2; exit 2; }
    stop "$2"
    exit 0
    ;;
start-node)
    [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 start-node I" >&2; exit 2; }
    ;;
start) n=${2:-3} ;;
[0-9]*) n=$1 ;;
*)
    echo "usage: $0 [start] [N] | stop | status | stop-node I | start-node I" >&2
    exit 2
    ;;
esac

if [ ! -x "$bin" ]; then
    echo "building $bin ..." >&2
    (cd "$root" && cargo build --release --bin peersync)
fi
mkdir -p "$dir"

start_node() { # I BOOTSTRAP: starts node I (bootstrapping from BOOTSTRAP unless empty), waits for its API
    local i=$1 boot=$2
    local data="$dir/node$i" api_port=$((base + i)) p2p_port=$((base + 100 + i))
    local role=${roles[$((i - 1))]:-primary}
    peer=$("$bin" id --data-dir "$data") || return 1
    local args=(node --data-dir "$data" --api "127.0.0.1:$api_port" --listen "/ip4/127.0.0.1/tcp/$p2p_port"
        --role "$role" --no-mdns --gossip-heartbeat-ms 200 --discovery-interval-ms 1000)
    if [ -n "$boot" ]; then
        args+=(--bootstrap "$boot")
    fi
    "$bin" "${args[@]}" >>"$dir/node$i.out" 2>>"$dir/node$i.log" &
    echo $! >"$dir/node$i.pid"
    # Wait (with a deadline) until the API answers.
    for attempt in $(seq 100); do
        if curl -fsS "http://127.0.0.1:$api_port/v1/status" >/dev/null 2>&1; then
            break
        fi
        if ! kill -0 "$(cat "$dir/node$i.pid")" 2>/dev/null || [ "$attempt" = 100 ]; then
            echo "node$i did not start; its log:" >&2
            cat "$dir/node$i.log" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "node$i $role api=http://127.0.0.1:$api_port peer=$peer p2p=/ip4/127.0.0.1/tcp/$p2p_port"
}
read -r -a roles <<<"${PEERSYNC_ROLES:-}"

if [ "$cmd" = start-node ]; then
    i=$2
    if [ -f "$dir/node$i.pid" ] && kill -0 "$(cat "$dir/node$i.pid")" 2>/dev/null; then
        echo "node$i is still running; run '$0 stop-node $i' first" >&2
        exit 1
    fi
    [ -d "$dir/node$i" ] || { echo "no node$i in $dir; start the cluster first" >&2; exit 1; }
    from=$((i > 1 ? i - 1 : 2))
    boot=""
    if [ -d "$dir/node$from" ]; then
        boot="/ip4/127.0.0.1/tcp/$((base + 100 + from))/p2p/$("$bin" id --data-dir "$dir/node$from")"
    fi
    start_node "$i" "$boot" || { stop "$i"; exit 1; }
    exit 0
fi

if compgen -G "$dir/node*.pid" >/dev/null; then
    echo "a cluster started from $dir is still running; run '$0 stop' first" >&2
    exit 1
fi
prev=""
for i in $(seq 1 "$n"); do
    : >"$dir/node$i.out"
    : >"$dir/node$i.log"
    start_node "$i" "$prev" || { stop; exit 1; }
    prev="/ip4/127.0.0.1/tcp/$((base + 100 + i))/p2p/$peer"
done
