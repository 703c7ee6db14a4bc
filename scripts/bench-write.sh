#!/usr/bin/env bash
# Release-mode benchmark of single-node durable write throughput: 1M puts of 100-byte values
# through the library (single and batch) and through HTTP (single and batch, concurrent
# keep-alive clients) against the release binary, plus signed-batch verification, and RSS.
#
# Usage: scripts/bench-write.sh [--quick] [--ops N] [--concurrency C] [--http-concurrency H]
#                               [--batch B] [--batch-concurrency T] [--only library|http|verify]
#                               [--json PATH]
#   --quick   50k ops per workload instead of 1M (CI smoke run)
# Every argument is passed to `cargo bench --bench write -- ARGS`; see benches/write.rs.
set -euo pipefail

# Paths given relative to the caller's directory stay valid after the cd to the repo root.
caller_dir="$PWD"
args=()
expect_path=0
for a in "$@"; do
    if [[ $expect_path == 1 && $a != /* ]]; then
        a="$caller_dir/$a"
    fi
    expect_path=0
    case "$a" in
        --json | --node-bin) expect_path=1 ;;
        --json=[!/]* | --node-bin=[!/]*) a="${a%%=*}=$caller_dir/${a#*=}" ;;
    esac
    args+=("$a")
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --bin peersync
exec cargo bench --bench write -- ${args[@]+"${args[@]}"}
