#!/usr/bin/env python3
"""A/B of peersync builds on W1 (a new replica replaying a primary's log), for judging a change on a
noisy machine: one primary is loaded once, then replicas of each build join it in turn, REPS rounds.
Prints wall time to active and, when `perf` is installed, the replica's instructions and cycles
(`perf stat`), which vary far less than wall time from run to run. perf attaches just after the
replica starts, so for small N the counts miss part of the run; at the default N they are stable.

Usage: scripts/bench/ab_w1.py BUILD_A BUILD_B [...]   (paths to peersync binaries; the first also
runs the primary). Environment: N keys (default 1 000 000), REPS rounds (default 3).
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from common import cpu_seconds  # noqa: E402


class Args:
    quick, only, keep_data, runs = False, "W1", False, 1
    tmp = bench.ROOT / "target" / "ab-w1-tmp"
    out = bench.ROOT / "target" / "ab-w1-out"


def main() -> None:
    builds = sys.argv[1:]
    if not builds:
        sys.exit(__doc__)
    n, reps = int(os.environ.get("N", 1_000_000)), int(os.environ.get("REPS", 3))
    args = Args()
    args.bin = builds[0]
    args.tmp.mkdir(parents=True, exist_ok=True)
    ctx = bench.Ctx(args)
    perf = shutil.which("perf")
    results = {b: [] for b in builds}
    try:
        primary = bench.Node(ctx, "ab-primary", 1).start()
        bench.ps_load([primary.api], "w1", n, "v100", threads_per_port=3)
        target = primary.vv()
        extra = None
        if os.environ.get("SNAPSHOT") == "1":
            snap = primary.http.json("POST", "/v1/snapshots")
            print(f"primary snapshot: {snap['entries']:,} entries, {snap['bytes'] / 2**20:.1f} MiB", flush=True)
            extra = ["--snapshot-min-saving-ops", str(min(100_000, n // 2))]
        for _ in range(reps):
            for build in builds:
                ctx.bin = build
                replica = bench.Node(ctx, "ab-replica", 2, role="replica", bootstrap=primary.addr, extra=extra)
                replica.prepare()
                t0 = time.monotonic()
                replica.spawn()
                stat = None
                if perf:
                    stat = subprocess.Popen([perf, "stat", "-x,", "-e", "instructions,cycles", "-p",
                                             str(replica.proc.pid), "-o", str(args.tmp / "perf-stat.txt")])
                bench.wait_until(lambda: (s := bench.try_status(replica.http)) and s["state"] == "active"
                                 and s["version_vector"] == target, 600, "replica caught up", interval=0.01,
                                 proc=replica.proc)
                elapsed = time.monotonic() - t0
                cpu = cpu_seconds(replica.proc.pid)
                counts = {}
                if stat:
                    stat.send_signal(signal.SIGINT)
                    stat.wait()
                    for line in (args.tmp / "perf-stat.txt").read_text().splitlines():
                        parts = line.split(",")
                        if len(parts) > 3 and parts[0].replace(".", "").isdigit():
                            counts[parts[2]] = float(parts[0]) / 1e9
                results[build].append(elapsed)
                print(f"{build}: active in {elapsed:.2f} s, replica {cpu:.2f} CPU-s, "
                      f"{counts.get('instructions', 0):.2f} G instructions, {counts.get('cycles', 0):.2f} G cycles",
                      flush=True)
                replica.stop()
        for build, times in results.items():
            print(f"{build}: median {sorted(times)[len(times) // 2]:.2f} s of {[round(t, 2) for t in times]}")
    finally:
        ctx.procs.stop_all()


if __name__ == "__main__":
    main()
