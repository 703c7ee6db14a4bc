#!/usr/bin/env bash
# Scale test: N real `peersync node` processes on 127.0.0.1 with the defaults a user gets.
#
#   scripts/scale.sh [N]            N nodes (default 50, or $SCALE_N), chain bootstrap as cluster.sh:
#                                   node i bootstraps from node i-1; all --no-mdns, other flags default
#
# Phases (each reported on stdout; progress on stderr):
#   1. start all N, wait until every node's GET /v1/status says "state":"active" (time to all-active)
#   2. idle window: per-node CPU % of one core (/proc/PID/stat), VmRSS, established p2p TCP
#      connections (/proc/net/tcp matched to the pid's sockets), connected peers (status), digest
#      requests received per second (peersync_sync_requests_received_total{kind="digest"}, n/a when
#      the metric is absent); min/median/max across nodes
#   3. SCALE_WRITES single writes, round robin over the nodes (PUT /v1/registers/scale/k{i})
#   4. convergence: every node the same state_root and the same version vector, covering every write
#   5. "at capacity" lines (libp2p dropping a stream) in the node logs
# then one summary line (for a README table), also written as JSON to $SCALE_JSON when set.
# Exit status: 0 when every phase passed, 1 when a node did not become active, a write failed, a node
# died or the nodes did not converge by the deadline, 2 on bad usage.
#
# Environment (defaults in brackets):
#   SCALE_N [50]  SCALE_IDLE_SECS [20]  SCALE_SETTLE_SECS [0] (pause between all-active and the idle
#   window)  SCALE_WRITES [200]  SCALE_WRITE_CONCURRENCY [4]  SCALE_ACTIVE_SECS [120]
#   SCALE_CONVERGE_SECS [60]  SCALE_POLL_SECS [0.2]  SCALE_API_BASE [9100] (API port BASE+i)
#   SCALE_P2P_BASE [9300] (p2p port BASE+i)  SCALE_TMPDIR [target] (where the temp dir is made)
#   SCALE_KEEP=1 keep the temp dir (data dirs, node logs *.log = stderr, *.out = stdout)
#   SCALE_JSON=path  write the summary and all figures as JSON
#   PEERSYNC_BIN [target/release/peersync]; built with `cargo build --release --locked` when missing.
#   SCALE_COMMIT  the commit named in the summary [git HEAD, +dirty for local changes to src/]
# Every node is started by this script and stopped by its pid on exit (SIGTERM, SIGKILL after 15 s).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf '[scale.sh] %s\n' "$*" >&2; }

case "${1:-}" in
-h | --help)
    sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac
n=${1:-${SCALE_N:-50}}
if ! [[ $n =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ]; then
    echo "usage: $0 [N]   (N >= 1; see --help)" >&2
    exit 2
fi
api_base=${SCALE_API_BASE:-9100}
p2p_base=${SCALE_P2P_BASE:-9300}
for v in "$api_base" "$p2p_base"; do
    if ! [[ $v =~ ^[0-9]+$ ]] || [ $((v + n)) -gt 65535 ]; then
        echo "bad port base $v for $n nodes" >&2
        exit 2
    fi
done
# The two port ranges [BASE+1, BASE+N] must not overlap.
if [ $((api_base + 1)) -le $((p2p_base + n)) ] && [ $((p2p_base + 1)) -le $((api_base + n)) ]; then
    echo "API ports $((api_base + 1))-$((api_base + n)) overlap p2p ports $((p2p_base + 1))-$((p2p_base + n)); set SCALE_API_BASE/SCALE_P2P_BASE" >&2
    exit 2
fi

bin=${PEERSYNC_BIN:-$root/target/release/peersync}
if [ ! -x "$bin" ]; then
    say "$bin is missing: building it with cargo build --release --locked"
    (cd "$root" && cargo build --release --locked)
fi
bin=$(realpath "$bin")

# 50 nodes with ~50 connections each, their databases and the poller's sockets.
want_fds=8192
cur_fds=$(ulimit -n)
if [ "$cur_fds" != unlimited ] && [ "$cur_fds" -lt $want_fds ]; then
    hard=$(ulimit -Hn)
    if [ "$hard" = unlimited ] || [ "$hard" -ge $want_fds ]; then
        ulimit -n $want_fds
    else
        ulimit -n "$hard"
    fi
    say "raised ulimit -n from $cur_fds to $(ulimit -n)"
fi

# Refuse to start when one of our ports is already listening (another cluster, a previous run).
busy=$(ss -ltnH 2>/dev/null | awk '{print $4}' | sed 's/.*://' | sort -un || true)
for i in $(seq 1 "$n"); do
    for p in $((api_base + i)) $((p2p_base + i)); do
        if grep -qx "$p" <<<"$busy"; then
            echo "port $p is already in use; set SCALE_API_BASE/SCALE_P2P_BASE or stop what holds it" >&2
            exit 1
        fi
    done
done

tmp_parent=${SCALE_TMPDIR:-$root/target}
mkdir -p "$tmp_parent"
tmp=$(mktemp -d "$tmp_parent/scale.XXXXXX")
pids=()
helper=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$helper" ] && kill -0 "$helper" 2>/dev/null; then
        kill -TERM "$helper" 2>/dev/null || true
        local hd=$((SECONDS + 5))
        while kill -0 "$helper" 2>/dev/null && [ $SECONDS -lt $hd ]; do sleep 0.1; done
        kill -KILL "$helper" 2>/dev/null || true
        wait "$helper" 2>/dev/null || true
    fi
    local live=()
    for pid in "${pids[@]}"; do
        # Only signal a process we started that is still ours: its command line names our temp dir.
        if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$tmp/"; then
            kill -TERM "$pid" 2>/dev/null || true
            live+=("$pid")
        fi
    done
    if [ ${#live[@]} -gt 0 ]; then
        local deadline=$((SECONDS + 15)) still
        while :; do
            still=()
            for pid in "${live[@]}"; do
                if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); fi
            done
            [ ${#still[@]} -eq 0 ] && break
            if [ $SECONDS -ge $deadline ]; then
                say "${#still[@]} node(s) did not stop within 15 s; killing pids ${still[*]}"
                kill -KILL "${still[@]}" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
        # Reap them (they are our children), bounded: they are dead or SIGKILLed by now.
        for pid in "${live[@]}"; do wait "$pid" 2>/dev/null || true; done
        say "stopped ${#live[@]} node(s)"
    fi
    if [ "${SCALE_KEEP:-0}" = 1 ]; then
        say "kept $tmp (SCALE_KEEP=1)"
    else
        rm -rf "$tmp"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The commit the summary names: SCALE_COMMIT when set (a PEERSYNC_BIN built from another commit),
# else the work tree's HEAD (with +dirty when src/ or Cargo.* have uncommitted changes).
commit=${SCALE_COMMIT:-}
if [ -z "$commit" ]; then
    commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [ -n "$(git -C "$root" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
        commit="$commit+dirty"
    fi
fi
say "n=$n bin=$bin (commit $commit) tmp=$tmp api=$((api_base + 1)).. p2p=$((p2p_base + 1)).."

# Peer ids first (this also creates each node's identity), so the chain can be started at once.
peers=()
for i in $(seq 1 "$n"); do
    peers+=("$("$bin" id --data-dir "$tmp/node$i")")
done

nodes_tsv=$tmp/nodes.tsv
: >"$nodes_tsv"
t_start=$(date +%s.%N)
prev=""
for i in $(seq 1 "$n"); do
    api_port=$((api_base + i))
    p2p_port=$((p2p_base + i))
    args=(node --data-dir "$tmp/node$i" --api "127.0.0.1:$api_port" --listen "/ip4/127.0.0.1/tcp/$p2p_port" --no-mdns)
    if [ -n "$prev" ]; then
        args+=(--bootstrap "$prev")
    fi
    # RUST_LOG unset: the node's own default log filter, as a user gets it.
    env -u RUST_LOG "$bin" "${args[@]}" >"$tmp/node$i.out" 2>"$tmp/node$i.log" </dev/null &
    pid=$!
    pids+=("$pid")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "$pid" "$api_port" "$p2p_port" "${peers[$((i - 1))]}" "$tmp/node$i.log" >>"$nodes_tsv"
    # As cluster.sh: wait (deadline 10 s) until this node's API answers before starting the next one,
    # so its p2p listener is up when the next node dials it.
    deadline=$((SECONDS + 10))
    until curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$api_port/v1/status" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
            say "node$i did not start (its API did not answer within 10 s); its log:"
            tail -n 30 "$tmp/node$i.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    prev="/ip4/127.0.0.1/tcp/$p2p_port/p2p/${peers[$((i - 1))]}"
done
t_started=$(date +%s.%N)
say "started $n nodes in $(awk -v a="$t_start" -v b="$t_started" 'BEGIN{printf "%.1f", b-a}') s"

# In the background so that a SIGTERM/SIGINT to this script runs the cleanup at once (bash defers
# traps while a foreground child runs); the cleanup stops it by its pid too.
SCALE_COMMIT=$commit python3 "$root/scripts/scale/scale.py" --nodes "$nodes_tsv" --t-start "$t_start" \
    --t-started "$t_started" --tmp "$tmp" &
helper=$!
rc=0
wait "$helper" || rc=$?
helper=""
exit "$rc"
