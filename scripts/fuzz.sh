#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer, cargo-fuzz) of everything in peersync that decodes bytes from
# peers: gossip, repair requests and responses (through the real CBOR codec), snapshot manifests and
# chunks, membership certificates and revocations, and the sync engine driven by arbitrary inputs.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  default 60; each target runs that long, one after another (one process)
#   TARGET...           default: gossip sync_request sync_response manifest chunk cert engine
#
# Installs what it needs when missing: the nightly toolchain (rustup) and cargo-fuzz (crates.io).
# Builds every target once first (a fresh build with the sanitizer takes a long while), then prints
# per target the executions reached, the wall time, exec/s and whether it was clean. Exits non-zero
# if any target crashed; the crashing input is in fuzz/artifacts/TARGET/, the log in
# fuzz/artifacts/TARGET/fuzz.log. Corpora grow in fuzz/corpus/TARGET (seeded from fuzz/seeds/TARGET,
# written by `cargo run --manifest-path fuzz/Cargo.toml --example seeds`). Targets and findings:
# fuzz/README.md and fuzz/regressions/README.md.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

all_targets=(gossip sync_request sync_response manifest chunk cert engine)
secs=60
if [[ $# -gt 0 ]]; then
    case "$1" in
        -h | --help)
            sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
    esac
    if [[ "$1" =~ ^[0-9]+$ ]]; then
        secs=$1
        shift
    fi
fi
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${all_targets[@]}")

toolchain=${FUZZ_TOOLCHAIN:-nightly}
if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
    echo "installing the $toolchain toolchain (cargo-fuzz needs it for the sanitizer flags)" >&2
    rustup toolchain install "$toolchain" --profile minimal
fi
if ! cargo "+$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz from crates.io" >&2
    cargo install cargo-fuzz --locked
fi

echo "building the fuzz targets (release, cargo fuzz defaults)..." >&2
# `cargo fuzz build` takes one target or all of them.
if [[ ${#targets[@]} -ne 1 ]]; then
    cargo "+$toolchain" fuzz build >&2
else
    cargo "+$toolchain" fuzz build "${targets[0]}" >&2
fi

failed=()
printf '\n%-14s %12s %8s %9s  %s\n' target executions wall_s exec/s result
for t in "${targets[@]}"; do
    corpus=$root/fuzz/corpus/$t
    seeds=$root/fuzz/seeds/$t
    artifacts=$root/fuzz/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    dirs=("$corpus")
    [[ -d "$seeds" ]] && dirs+=("$seeds")
    log=$artifacts/fuzz.log
    start=$(date +%s)
    rc=0
    cargo "+$toolchain" fuzz run "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 >"$log" 2>&1 || rc=$?
    wall=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    if [[ -z "$execs" ]]; then
        # A crash ends the run before the final stats: take the last status line's count.
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#' || true)
    fi
    if [[ $rc -eq 0 ]] && ! grep -qE '^==[0-9]+==ERROR|panicked at|SUMMARY: libFuzzer' "$log"; then
        result=clean
    else
        result="CRASH (rc $rc): $(grep -m1 -E 'panicked at|==ERROR|SUMMARY' "$log" | cut -c1-160)"
        failed+=("$t")
    fi
    printf '%-14s %12s %8s %9s  %s\n' "$t" "${execs:-?}" "$wall" "${rate:-?}" "$result"
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo >&2
    echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/TARGET/, logs in fuzz/artifacts/TARGET/fuzz.log;" >&2
    echo "reproduce with: cargo +$toolchain fuzz run TARGET fuzz/artifacts/TARGET/crash-...)" >&2
    exit 1
fi
