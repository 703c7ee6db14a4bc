#!/usr/bin/env bash
# peersync side by side with its anchors, in one command (release build, loopback only):
#   W1 initial sync of 1M keys x 100 B        vs a Redis 7 replica joining its primary (diskless, no delay)
#   W2 catch-up after 100k missed writes      vs a SIGSTOPped/SIGCONTed Redis replica
#   W3 propagation p50/p99, 5 nodes, 1k w/s   vs Redis primary + 4 replicas (keyspace notifications)
#   W4 replicated write throughput, 3 nodes   vs redis-benchmark SET against a primary with 2 replicas
#   W5 1 GiB snapshot transfer, MiB/s         vs iperf3 over loopback (the ceiling), and iroh's sendme (full run)
#   W6 write with ack=1 / ack=all p50/p99     vs Redis SET + WAIT 1 / WAIT 2, primary + 2 replicas
#   W7 RSS idle and holding 1M keys           vs redis-server
#   W8 lease acquire p50/p99, 3 primaries     vs etcd lease grant + put, 3 members (Redis SET NX + WAIT 2 without etcd)
#
# Usage: scripts/bench.sh [--quick] [--runs N] [--only W1,W3,...] [--out DIR] [--keep-data]
#   --quick   small sizes (50k keys, 10k missed writes, 2k latency writes, 30k ops, 64 MiB, 300 acquires),
#             1 run each; W5 is skipped (not failed) when its filesystem lacks the room it needs
# Prints a table of medians and the ratio peersync/anchor, writes bench-results/bench.json and draws
# bench-results/bench.png. Installs redis-server, iperf3 and etcd-server with apt-get when missing, and
# matplotlib into a venv under target/bench-venv (gnuplot from apt if pip cannot). Temporary data, logs and
# pid files live in target/bench-tmp; every process started is stopped by its pid on exit.
# Methods: scripts/bench/README.md.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
tmp=$root/target/bench-tmp
venv=$root/target/bench-venv
out=$root/bench-results
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        -h | --help)
            sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        --out) out=$(realpath -m "${args[$((i + 1))]}") ;;
        --out=*) out=$(realpath -m "${args[$i]#--out=}") ;;
    esac
done

say() { printf '[bench.sh] %s\n' "$*" >&2; }

# --- tools: redis-server/redis-cli/redis-benchmark and iperf3 from Debian's packages
# shellcheck source=lib/apt.sh
. "$root/scripts/lib/apt.sh"
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install redis-server redis-tools
fi
command -v iperf3 >/dev/null || apt_install iperf3
# W8's anchor; without it bench.py falls back to Redis SET NX PX + WAIT 2.
command -v etcd >/dev/null || apt_install etcd-server || say "no etcd: W8 compares with Redis SET NX + WAIT 2"
# The Debian packages may start a redis service on 6379 and an etcd on 2379; the benchmark never touches
# them (ports 18xxx/19xxx).
# W5's second anchor, iroh's sendme, for a full run only (building it takes ~5 minutes, once; --quick and
# CI skip it): under target/sendme, with a build directory of its own.
quick=0
for a in "${args[@]}"; do [ "$a" = --quick ] && quick=1; done
sendme=$root/target/sendme/bin/sendme
if [ "$quick" = 0 ] && [ ! -x "$sendme" ] && [ -z "${SENDME:-}" ]; then
    say "installing sendme 0.37.1 into target/sendme (W5's anchor; once)"
    CARGO_TARGET_DIR=$root/target/sendme-build cargo install --quiet sendme --version 0.37.1 \
        --root "$root/target/sendme" >&2 || say "could not build sendme: W5 compares with iperf3 only"
fi

# --- chart: matplotlib in a venv under target/, or gnuplot from apt
chart=none
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    chart=matplotlib
else
    say "installing matplotlib into $venv"
    if python3 -m venv "$venv" >&2 && "$venv/bin/pip" install -q matplotlib >&2; then
        chart=matplotlib
    elif command -v gnuplot >/dev/null || apt_install gnuplot-nox; then
        chart=gnuplot
    else
        say "no matplotlib and no gnuplot: the chart will be skipped"
    fi
fi
py=python3
if [ -x "$venv/bin/python" ]; then py=$venv/bin/python; fi

# --- release build (incremental; never cleans)
say "building target/release/peersync (release)"
cargo build --release --bin peersync >&2

# --- run, stopping exactly what was started
driver=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$driver" ] && kill -0 "$driver" 2>/dev/null; then
        kill -TERM "$driver" 2>/dev/null || true
        wait "$driver" 2>/dev/null || true
    fi
    # Anything the driver could not stop (it was killed hard): stop by pid, checking it is ours.
    shopt -s nullglob
    for f in "$tmp"/pids/*.pid; do
        read -r pid name <"$f" || continue
        if kill -0 "$pid" 2>/dev/null && grep -qaE 'peersync|redis|iperf3|etcd|sendme' "/proc/$pid/cmdline" 2>/dev/null; then
            say "stopping leftover $name (pid $pid)"
            kill -CONT "$pid" 2>/dev/null || true
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        fi
        rm -f "$f"
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start=$(date +%s)
"$py" "$root/scripts/bench/bench.py" --tmp "$tmp" --bin "$root/target/release/peersync" "$@" &
driver=$!
rc=0
wait "$driver" || rc=$?
driver=""
if [ ! -s "$out/bench.json" ]; then
    exit "$rc"
fi

case $chart in
    matplotlib) "$venv/bin/python" "$root/scripts/bench/chart.py" "$out/bench.json" "$out/bench.png" ;;
    gnuplot) "$py" "$root/scripts/bench/chart_gnuplot.py" "$out/bench.json" "$out/bench.png" ;;
esac
[ "$chart" != none ] && echo "chart: $out/bench.png"
say "done in $(($(date +%s) - start)) s (excluding the build)"
exit "$rc"
