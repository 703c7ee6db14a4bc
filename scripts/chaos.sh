#!/usr/bin/env bash
# Chaos run with real processes: 5 nodes (3 primaries, 2 replicas), each in its own network namespace
# on a bridge, under continuous register writes, counter increments and lease acquisitions, with a
# fault every ~6 s (kill -9 and restart, SIGSTOP/SIGCONT, a partition of one or two nodes). After the
# faults heal a checker verifies: convergence (version vector and state root), every acknowledged write
# on every node with its value, counters within acknowledged..acknowledged+indeterminate, no 404 on an
# active node for a key acknowledged before it started, no node crashed; lease grants are checked for
# shared tokens, overlapping holders and a new holder's token not above earlier ones (leases run on a
# Raft quorum of the primaries: a violation fails the run unless --no-strict-leases). A 503 no_quorum
# answer to a lease request counts as refused (lease_no_quorum in the summary).
#
# Usage: scripts/chaos.sh [--duration SECONDS (default 600)] [--fault-every S] [--seed N]
#                         [--no-strict-leases] [--out FILE.json]
# Needs root (ip netns, a bridge); creates pschaos0..5 and removes them on exit. Builds the release
# binary if missing. Data and logs go to target/chaos.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${PEERSYNC_BIN:-$root/target/release/peersync}
dir=$root/target/chaos

if [ "$(id -u)" != 0 ]; then
    echo "chaos.sh needs root: it creates network namespaces and a bridge" >&2
    exit 2
fi
command -v ip >/dev/null || { echo "chaos.sh needs iproute2 (ip)" >&2; exit 2; }
if [ ! -x "$bin" ]; then
    echo "building $bin ..." >&2
    (cd "$root" && cargo build --release --bin peersync)
fi
rm -rf "$dir"
mkdir -p "$dir"
exec python3 "$root/scripts/chaos/chaos.py" --bin "$bin" --dir "$dir" "$@"
