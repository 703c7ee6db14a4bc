"""peersync side by side with its anchors (Redis 7 replication, iperf3 over loopback, an etcd cluster).

Run through scripts/bench.sh, which builds the release binary and installs redis-server, iperf3, etcd and
matplotlib first. Python standard library only. See scripts/bench/README.md for the methods.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    AHttp,
    AResp,
    Http,
    cpu_seconds,
    Procs,
    RedisError,
    Resp,
    log,
    median,
    metric,
    now,
    percentile,
    resp_command,
    rmtree,
    rss_mib,
    writer_seconds,
    try_resp,
    try_status,
    values_100,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]

# Ports: peersync API 181xx, peersync p2p 182xx, redis 183xx, iperf3 18400, etcd client 185xx and peer 195xx
# (defaults are 7700/4001/6379/5201/2379/2380).
PS_API, PS_P2P, REDIS_PORT, IPERF_PORT = 18100, 18200, 18300, 18400
SENDME_PORT = 18450
ETCD_CLIENT, ETCD_PEER = 18500, 19500

# Flags of every peersync node: cluster.sh's local-cluster tuning, and no periodic snapshot during a
# measurement (W1-W4 measure op-log replication; W5 makes its snapshot explicitly).
PS_FLAGS = ["--no-mdns", "--gossip-heartbeat-ms", "200", "--discovery-interval-ms", "1000",
            "--snapshot-interval-ms", "86400000"]
REDIS_FLAGS = ["--bind", "127.0.0.1", "--protected-mode", "no", "--save", "", "--appendonly", "no",
               "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
               "--repl-backlog-size", "256mb", "--daemonize", "no", "--logfile", ""]

SIZES = {
    "full": dict(w1_keys=1_000_000, w2_writes=100_000, w3_writes=10_000, w4_ops=300_000, w5_bytes=1 << 30,
                 w6_writes=2_000, w8_acquires=2_000, runs=3),
    "quick": dict(w1_keys=50_000, w2_writes=10_000, w3_writes=2_000, w4_ops=30_000, w5_bytes=64 << 20,
                  w6_writes=1_200, w8_acquires=300, runs=1),
}

# A node refuses a write that would leave less than --disk-reserve-mb free on its filesystem (507
# disk_full); the default is 64 MiB (DEFAULT_DISK_RESERVE in src/store/disk.rs, `peersync node --help`).
PS_DISK_RESERVE = 64 << 20
# W5's data set is on disk ~6 times at once (the primary's op log, state and snapshot chunks; the replica's
# chunks, staging tables and state), and redb's pages add about half again (the full run's primary:
# state.redb 3.35 GB for 1 GiB of values and their log): a generous estimate.
W5_DISK_COPIES = 9


class Skip(Exception):
    """A workload that cannot run on this machine: reported and kept in the JSON, not a failure."""


class Ctx:
    def __init__(self, args):
        self.args = args
        self.tmp: Path = args.tmp
        self.bin: str = args.bin
        self.procs = Procs(self.tmp)
        self.size = dict(SIZES["quick" if args.quick else "full"])
        if args.runs:
            self.size["runs"] = args.runs
        self.rows: list[dict] = []
        self.extra: dict = {}

    def row(self, workload, metric_name, unit, better, ps_runs, anchor_name, anchor_runs, method, **details):
        ps_m, an_m = median(ps_runs), median(anchor_runs)
        ratio = (ps_m / an_m) if (ps_m is not None and an_m) else None
        r = dict(workload=workload, metric=metric_name, unit=unit, better=better,
                 peersync=dict(median=ps_m, runs=ps_runs), anchor=dict(name=anchor_name, median=an_m, runs=anchor_runs),
                 ratio=ratio, method=method, details=details)
        self.rows.append(r)
        log(f"{workload} {metric_name}: peersync {fmt(ps_m)} {unit}, {anchor_name} {fmt(an_m)} {unit}, "
            f"ratio {fmt(ratio)}")
        return r


def fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


class CpuMeter:
    """CPU time (user + system) each process spends from now on; `fresh` ones start at zero (started
    inside the window). `per_op_us` divides each process's share by the ops of the window, and
    `writer_per_op_us` a peersync node's writer thread's share."""

    def __init__(self, procs: list, fresh: list | None = None):
        self.start = {p.pid: cpu_seconds(p.pid) for p in procs}
        self.start.update({p.pid: 0.0 for p in fresh or []})
        self.writer = {p.pid: writer_seconds(p.pid) for p in procs}
        self.writer.update({p.pid: 0.0 for p in fresh or []})

    def add_fresh(self, proc) -> None:
        self.start[proc.pid] = 0.0
        self.writer[proc.pid] = 0.0

    def per_op_us(self, ops: int) -> list[float]:
        return [round((cpu_seconds(pid) - c) * 1e6 / max(ops, 1), 2) for pid, c in self.start.items()]

    def utilisation(self, elapsed_s: float) -> list[float]:
        """Each process's CPU time over `elapsed_s` of wall time (1.0 = one core)."""
        return [round((cpu_seconds(pid) - c) / elapsed_s, 3) for pid, c in self.start.items()]

    def writer_per_op_us(self, ops: int) -> list[float | None]:
        out = []
        for pid, c in self.writer.items():
            now_s = writer_seconds(pid)
            out.append(None if now_s is None or c is None else round((now_s - c) * 1e6 / max(ops, 1), 2))
        return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


CPU_METHOD = ("CPU-µs per op per node: user + system CPU time (/proc/PID/stat) each server process spent over the "
              "measured window, divided by the ops of the window, averaged over the nodes taking part (per node in "
              "the details); load generators are not counted. ")


WRITER_METHOD = ("peersync_writer_per_node: the same for each node's writer thread alone (`peersync-writer`, "
                 "which applies and commits every op, /proc/PID/task/TID/stat), the part no other core can take. ")


def cpu_row(ctx: Ctx, workload: str, what: str, ps_runs: list[list[float]], anchor: str,
            r_runs: list[list[float]], method: str, ps_writer: list[list[float | None]] | None = None) -> None:
    extra = {"peersync_writer_per_node": ps_writer} if ps_writer else {}
    if ps_writer:
        log(f"{workload} peersync writer thread CPU-µs per op per node: {ps_writer}")
    ctx.row(workload, f"CPU per op per node, {what}", "µs", "lower", [mean(r) for r in ps_runs], anchor,
            [mean(r) for r in r_runs], CPU_METHOD + (WRITER_METHOD if ps_writer else "") + method,
            peersync_per_node=ps_runs, redis_per_node=r_runs, **extra)


# ---------------------------------------------------------------- peersync nodes


class Node:
    def __init__(self, ctx: Ctx, name: str, idx: int, role: str = "primary", bootstrap: str | None = None,
                 extra: list[str] | None = None):
        self.ctx, self.name, self.role = ctx, name, role
        self.api, self.p2p = PS_API + idx, PS_P2P + idx
        self.dir = ctx.tmp / name
        self.bootstrap, self.extra = bootstrap, extra or []
        self.proc: subprocess.Popen | None = None
        self.http = Http(self.api)
        self.peer_id = None

    def prepare(self) -> None:
        rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.peer_id = subprocess.run([self.ctx.bin, "id", "--data-dir", str(self.dir)], check=True,
                                      capture_output=True, text=True).stdout.strip()

    def spawn(self) -> None:
        argv = [self.ctx.bin, "node", "--data-dir", str(self.dir), "--api", f"127.0.0.1:{self.api}",
                "--listen", f"/ip4/127.0.0.1/tcp/{self.p2p}", "--role", self.role, *PS_FLAGS, *self.extra]
        if self.bootstrap:
            argv += ["--bootstrap", self.bootstrap]
        self.proc = self.ctx.procs.spawn(f"peersync-{self.name}", argv, self.ctx.tmp / f"{self.name}.log",
                                         self.ctx.tmp / f"{self.name}.out")

    def start(self, wait_active: bool = True) -> "Node":
        self.prepare()
        self.spawn()
        wait_until(lambda: try_status(self.http), 30, f"{self.name} API", proc=self.proc)
        if wait_active:
            self.wait_active()
        return self

    def wait_active(self, timeout: float = 120) -> None:
        wait_until(lambda: (s := try_status(self.http)) and s["state"] == "active", timeout,
                   f"{self.name} active", interval=0.02, proc=self.proc)

    @property
    def addr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.p2p}/p2p/{self.peer_id}"

    def status(self) -> dict:
        return self.http.json("GET", "/v1/status")

    def vv(self) -> dict:
        return self.status()["version_vector"]

    def rss(self) -> float:
        return rss_mib(self.proc.pid)

    def stop(self, remove: bool = True) -> None:
        self.http.close()
        if self.proc is not None:
            self.ctx.procs.stop(self.proc)
        if remove and not self.ctx.args.keep_data:
            rmtree(self.dir)


def ps_body(start: int, n: int, kind: str, batch: int, seed: int, key_prefix: str) -> bytes:
    """The JSON body of the batch write of keys start..start+batch (at most n) of a ps_load."""
    rng = random.Random(seed * 1_000_003 + start)
    cnt = min(batch, n - start)
    if kind == "v100":
        vals = values_100(rng, cnt)
        items = [f'{{"key":"{key_prefix}{start + i:08d}","value":"{vals[i]}"}}' for i in range(cnt)]
    else:
        items = [f'{{"key":"{key_prefix}{start + i:08d}","value_base64":"{base64.b64encode(rng.randbytes(1024)).decode()}"}}'
                 for i in range(cnt)]
    return ('{"entries":[' + ",".join(items) + "]}").encode()


def ps_bodies(n: int, kind: str, batch: int = 1000, seed: int = 1, key_prefix: str = "k") -> dict[int, bytes]:
    """Every body a ps_load with the same arguments sends, built ahead (so that building them is not timed)."""
    return {start: ps_body(start, n, kind, batch, seed, key_prefix) for start in range(0, n, batch)}


def ps_load(ports: list[int], reg: str, n: int, kind: str, batch: int = 1000, threads_per_port: int = 2,
            seed: int = 1, key_prefix: str = "k", bodies: dict[int, bytes] | None = None) -> float:
    """Writes n keys with HTTP batch writes of `batch` entries, spread over `ports`, several requests in
    flight per port; returns the elapsed seconds. kind: "v100" (100-byte values) or "v1k" (1 KiB of
    random bytes, sent as value_base64). `bodies`: from ps_bodies with the same arguments, or None to
    build each body just before sending it."""
    batches = list(range(0, n, batch))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def body(start: int) -> bytes:
        return bodies[start] if bodies is not None else ps_body(start, n, kind, batch, seed, key_prefix)

    def worker(port: int, mine: list[int]) -> None:
        h = Http(port)
        try:
            for start in mine:
                if errors:
                    return
                h.json("POST", f"/v1/registers/{reg}", body(start))
        except BaseException as e:  # noqa: BLE001
            with lock:
                errors.append(e)
        finally:
            h.close()

    slots = [(p, t) for p in ports for t in range(threads_per_port)]
    work = {s: [] for s in slots}
    for i, start in enumerate(batches):
        work[slots[i % len(slots)]].append(start)
    t0 = now()
    ts = [threading.Thread(target=worker, args=(p, work[(p, t)])) for (p, t) in slots]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return now() - t0


def wait_peers(nodes: list[Node]) -> None:
    """Waits until every node of a chain-bootstrapped cluster knows all the others (discovery), or 30 s."""
    try:
        wait_until(lambda: all(len(nd.status()["peers"]) >= len(nodes) - 1 for nd in nodes), 30,
                   "every node connected to every other", interval=0.1)
    except TimeoutError:
        log(f"warning: peers per node after 30 s: {[len(nd.status()['peers']) for nd in nodes]}")


def vv_total(vv: dict) -> int:
    return sum(vv.values())


# ---------------------------------------------------------------- redis servers


class Redis:
    def __init__(self, ctx: Ctx, name: str, idx: int, replicaof: int | None = None, extra: list[str] | None = None):
        self.ctx, self.name, self.port = ctx, name, REDIS_PORT + idx
        self.dir = ctx.tmp / name
        self.replicaof, self.extra = replicaof, extra or []
        self.proc = None
        self.conn: Resp | None = None

    def prepare(self) -> None:
        rmtree(self.dir)
        self.dir.mkdir(parents=True)

    def spawn(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--dir", str(self.dir), *REDIS_FLAGS, *self.extra]
        if self.replicaof:
            argv += ["--replicaof", "127.0.0.1", str(self.replicaof)]
        self.proc = self.ctx.procs.spawn(f"redis-{self.name}", argv, self.ctx.tmp / f"{self.name}.err",
                                         self.ctx.tmp / f"{self.name}.log")

    def connect(self, timeout: float = 30) -> Resp:
        if self.conn is None:
            self.conn = wait_until(lambda: try_resp(self.port), timeout, f"{self.name} up", proc=self.proc)
        return self.conn

    def start(self) -> "Redis":
        self.prepare()
        self.spawn()
        self.connect()
        return self

    def info(self) -> dict:
        return self.connect().info("replication")

    def linked(self) -> bool:
        i = self.info()
        return i.get("master_link_status") == "up" and i.get("master_sync_in_progress") == "0"

    def rss(self) -> float:
        return rss_mib(self.proc.pid)

    def stop(self) -> None:
        if self.conn:
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            self.ctx.procs.stop(self.proc)
        if not self.ctx.args.keep_data:
            rmtree(self.dir)


def redis_load(ctx: Ctx, port: int, n: int, seed: int = 1) -> float:
    """Loads n SETs of 100-byte values with `redis-cli --pipe`; returns the elapsed seconds."""
    path = ctx.tmp / "redis-load.resp"
    with open(path, "wb") as f:
        for start in range(0, n, 1000):
            rng = random.Random(seed * 1_000_003 + start)
            cnt = min(1000, n - start)
            vals = values_100(rng, cnt)
            f.write(b"".join(b"*3\r\n$3\r\nSET\r\n$9\r\nk%08d\r\n$100\r\n%s\r\n" % (start + i, vals[i].encode())
                             for i in range(cnt)))
    t0 = now()
    with open(path, "rb") as f:
        out = subprocess.run(["redis-cli", "-p", str(port), "--pipe"], stdin=f, capture_output=True, text=True)
    dt = now() - t0
    path.unlink()
    if out.returncode != 0 or "errors: 0" not in out.stdout:
        raise RuntimeError(f"redis-cli --pipe failed: {out.stdout} {out.stderr}")
    return dt


def redis_settle(prim: "Redis", reps: list["Redis"]) -> None:
    """A probe write reaches every replica: they are online and streaming (a diskless-synced replica is put
    online only after its first ACK, so the first writes after the sync can wait for it)."""
    prim.connect().cmd("SET", "bench:probe", "1")
    off = int(prim.info()["master_repl_offset"])
    wait_until(lambda: all(int(r.info().get("slave_repl_offset", -1)) >= off for r in reps), 60,
               "redis replicas streaming", interval=0.01)


def ps_settle(nodes: list["Node"]) -> None:
    """A probe write on each node reaches every node."""
    for nd in nodes:
        nd.http.json("PUT", "/v1/registers/bench/probe", nd.name.encode())
    target = nodes[0].vv()
    for nd in nodes:
        target = {**target, **{k: max(v, target.get(k, 0)) for k, v in nd.vv().items()}}
    wait_until(lambda: all(nd.vv() == target for nd in nodes), 60, "peersync probe writes everywhere",
               interval=0.01)


def redis_benchmark_set(port: int, n: int, clients: int, pipeline: int, keyspace: int) -> tuple[list[str], float]:
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set", "-n", str(n), "-d", "100",
            "-r", str(keyspace), "-c", str(clients), "-P", str(pipeline), "--csv"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = None
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] == "SET":
            rps = float(cells[1])
    return argv, rps


# ---------------------------------------------------------------- W1 + W7: initial sync of N keys, RSS


def w1(ctx: Ctx) -> None:
    n, runs = ctx.size["w1_keys"], ctx.size["runs"] if "W1" in ctx.args.only else 0
    log(f"W1: initial sync of {n} keys of 100 B ({runs} runs each)")
    prim = Node(ctx, "w1-primary", 1).start()
    rprim = Redis(ctx, "w1-redis-primary", 1).start()
    time.sleep(2)
    rss_idle_ps, rss_idle_r = prim.rss(), rprim.rss()
    load_ps = ps_load([prim.api], "w1", n, "v100", threads_per_port=3)
    load_r = redis_load(ctx, rprim.port, n)
    log(f"W1: loaded peersync in {load_ps:.1f} s ({n / load_ps:,.0f} ops/s), redis in {load_r:.1f} s")
    target_vv = prim.vv()
    assert vv_total(target_vv) >= n, target_vv
    assert rprim.connect().cmd("DBSIZE") == n
    def join(what: str, extra: list[str] | None = None) -> tuple[float, Node, tuple[list, list]]:
        """Starts a new replica of the primary and waits until it is active with the primary's version
        vector; returns the time that took, the replica, still running, and the CPU-µs per op of the
        primary and the replica over the join, whole and of their writer threads."""
        rep = Node(ctx, "w1-replica", 2, role="replica", bootstrap=prim.addr, extra=extra)
        rep.prepare()
        cpu = CpuMeter([prim.proc])
        t0 = now()
        rep.spawn()
        cpu.add_fresh(rep.proc)
        wait_until(lambda: (s := try_status(rep.http)) and s["state"] == "active" and s["version_vector"] == target_vv,
                   1800, what, interval=0.01, proc=rep.proc)
        return now() - t0, rep, (cpu.per_op_us(n), cpu.writer_per_op_us(n))

    ps_t, r_t, ps_rep_rss, r_rep_rss, ps_cpu, r_cpu, ps_writer = [], [], [], [], [], [], []
    for run in range(runs):
        elapsed, rep, (cpu, writer) = join("W1 peersync replica caught up")
        ps_t.append(elapsed)
        ps_cpu.append(cpu)
        ps_writer.append(writer)
        ps_rep_rss.append(rep.rss())
        log(f"W1 run {run + 1}: peersync replica active with the primary's version vector after {ps_t[-1]:.2f} s")
        rep.stop()

        rrep = Redis(ctx, "w1-redis-replica", 2, replicaof=rprim.port)
        rrep.prepare()
        cpu = CpuMeter([rprim.proc])
        t0 = now()
        rrep.spawn()
        cpu.add_fresh(rrep.proc)

        def redis_synced():
            try:
                return rrep.linked() and rrep.connect().cmd("DBSIZE") == n
            except (RedisError, OSError):
                return False
        wait_until(redis_synced, 1800, "W1 redis replica synced", interval=0.01, proc=rrep.proc)
        r_t.append(now() - t0)
        r_cpu.append(cpu.per_op_us(n))
        r_rep_rss.append(rrep.rss())
        log(f"W1 run {run + 1}: redis replica synced after {r_t[-1]:.2f} s")
        rrep.stop()
    # The same join when the primary holds a snapshot (as it does a minute after a load like this, by
    # its periodic snapshots): the replica weighs it against replay and installs it, then replays the rest.
    snap_t = []
    if runs:
        snap = prim.http.json("POST", "/v1/snapshots")
        log(f"W1: primary snapshot of {snap['entries']:,} entries, {snap['bytes'] / 2**20:.1f} MiB")
    # The default minimum saving (100 000 ops) is the full run's; --quick loads fewer keys.
    min_saving = ["--snapshot-min-saving-ops", str(min(100_000, n // 2))]
    for run in range(runs):
        elapsed, rep, _ = join("W1 peersync replica caught up from a snapshot", min_saving)
        snap_t.append(elapsed)
        wait_until(lambda: (metric(rep.http, "peersync_snapshots_installed_total") or 0) >= 1, 10,
                   "W1 replica took the snapshot path", proc=rep.proc)
        log(f"W1 run {run + 1}: peersync replica active from the primary's snapshot after {snap_t[-1]:.2f} s")
        rep.stop()
    if runs:
        ctx.row("W1", f"initial sync, {n:,} keys x 100 B, primary holding a snapshot", "s", "lower", snap_t,
                "redis 7 replica", r_t,
                "as W1, after POST /v1/snapshots on the primary: the replica installs the snapshot (it spares more "
                "replay than it costs) and replays what follows; the Redis runs are the W1 ones (Redis always "
                "ships a fresh RDB)", snapshot=snap)
    time.sleep(1)
    rss_loaded_ps, rss_loaded_r = prim.rss(), rprim.rss()
    disk = sum(f.stat().st_size for f in prim.dir.rglob("*") if f.is_file()) / 2**20
    prim.stop()
    rprim.stop()
    if runs:
        ctx.row("W1", f"initial sync, {n:,} keys x 100 B", "s", "lower", ps_t, "redis 7 replica", r_t,
                "replica process start -> peersync: /v1/status state=active and version vector == primary's; "
                "redis: master_link_status:up, master_sync_in_progress:0, DBSIZE == N (polled every 10 ms). "
                "Redis primary: repl-diskless-sync yes, delay 0; replica loads the RDB from disk (default).",
                load_s_peersync=load_ps, load_s_redis=load_r, replica_rss_mib_peersync=ps_rep_rss,
                replica_rss_mib_redis=r_rep_rss, primary_disk_mib_peersync=disk)
        cpu_row(ctx, "W1", "initial sync", ps_cpu, "redis 7 replica", r_cpu,
                "Window: replica start -> synced (as W1's time); nodes: [primary, replica]; ops: the N keys.",
                ps_writer)
    ctx.row("W7", "RSS idle (empty node)", "MiB", "lower", [rss_idle_ps], "redis-server", [rss_idle_r],
            "VmRSS of the node process 2 s after start, no data")
    ctx.row("W7", f"RSS holding {n:,} keys x 100 B", "MiB", "lower", [rss_loaded_ps], "redis-server",
            [rss_loaded_r], "VmRSS of the W1 primary after loading and serving the W1 replicas",
            replica_rss_mib_peersync=ps_rep_rss, replica_rss_mib_redis=r_rep_rss)


# ---------------------------------------------------------------- W2: catch-up after missed writes


def w2(ctx: Ctx) -> None:
    n, runs = ctx.size["w2_writes"], ctx.size["runs"]
    log(f"W2: catch-up after {n} missed writes ({runs} runs each)")
    ps_t, r_t, ps_write, r_write, ps_cpu, r_cpu, ps_writer = [], [], [], [], [], [], []
    for run in range(runs):
        prim = Node(ctx, "w2-primary", 1).start()
        rep = Node(ctx, "w2-replica", 2, role="replica", bootstrap=prim.addr).start()
        ps_settle([prim])
        wait_until(lambda: rep.vv() == prim.vv(), 60, "W2 replica sees the first write")
        time.sleep(1)
        ctx.procs.sigstop(rep.proc)
        ps_write.append(ps_load([prim.api], "w2", n, "v100", threads_per_port=2, seed=run + 7))
        target = prim.vv()
        cpu = CpuMeter([prim.proc, rep.proc])
        t0 = now()
        ctx.procs.sigcont(rep.proc)
        wait_until(lambda: (s := try_status(rep.http)) and s["version_vector"] == target, 600,
                   "W2 peersync replica caught up", interval=0.01, proc=rep.proc)
        ps_t.append(now() - t0)
        ps_cpu.append(cpu.per_op_us(n))
        ps_writer.append(cpu.writer_per_op_us(n))
        log(f"W2 run {run + 1}: peersync replica caught up {n} ops {ps_t[-1]:.3f} s after SIGCONT "
            f"(writes took {ps_write[-1]:.2f} s)")
        rep.stop()
        prim.stop()

        rprim = Redis(ctx, "w2-redis-primary", 1).start()
        rrep = Redis(ctx, "w2-redis-replica", 2, replicaof=rprim.port).start()
        wait_until(rrep.linked, 60, "W2 redis replica linked")
        redis_settle(rprim, [rrep])
        time.sleep(1)
        ctx.procs.sigstop(rrep.proc)
        t0 = now()
        redis_benchmark_set(rprim.port, n, clients=8, pipeline=16, keyspace=100_000_000)
        r_write.append(now() - t0)
        target_off = int(rprim.info()["master_repl_offset"])
        cpu = CpuMeter([rprim.proc, rrep.proc])
        t0 = now()
        ctx.procs.sigcont(rrep.proc)
        wait_until(lambda: int(rrep.info().get("slave_repl_offset", -1)) >= target_off, 600,
                   "W2 redis replica caught up", interval=0.01, proc=rrep.proc)
        r_t.append(now() - t0)
        r_cpu.append(cpu.per_op_us(n))
        log(f"W2 run {run + 1}: redis replica caught up {r_t[-1]:.3f} s after SIGCONT")
        rrep.stop()
        rprim.stop()
    ctx.row("W2", f"catch-up after {n:,} missed writes", "s", "lower", ps_t, "redis 7 replica", r_t,
            "replica SIGSTOPped, N writes of 100 B land on the primary (peersync: HTTP batches of 1000; redis: "
            "redis-benchmark -t set -P 16 -c 8), SIGCONT -> peersync: replica version vector == primary's; redis: "
            "replica slave_repl_offset >= primary master_repl_offset (polled every 10 ms)",
            write_s_peersync=ps_write, write_s_redis=r_write)
    cpu_row(ctx, "W2", "catch-up", ps_cpu, "redis 7 replica", r_cpu,
            "Window: SIGCONT -> caught up (as W2's time); nodes: [primary, replica]; ops: the N missed writes.",
            ps_writer)


# ---------------------------------------------------------------- W3: propagation latency


READ_WINDOW = 16      # long-polls in flight per node (seqs pre-issued ahead of the writer)
WRITE_CONNS = 16


async def paced(count, rate, put):
    """Starts put(0..count) at `rate` per second on a fixed schedule (no drift), waits for all of
    them, and returns how long sending took. Both sides of W3 use it, so they are paced alike."""
    t0 = now()
    puts = []
    for k in range(count):
        delay = t0 + k / rate - now()
        if delay > 0:
            await asyncio.sleep(delay)
        puts.append(asyncio.create_task(put(k)))
    await asyncio.gather(*puts)
    return now() - t0


def latency_summary(sent: dict, acked: dict, done: list[dict], rtts: list[float], achieved_rate: float) -> dict:
    """Propagation figures of one W3 run, in ms. `sent`/`acked`: write id -> when its PUT/SET was sent
    and answered; `done`: per node, write id -> when that node showed it; `rtts`: the readers' own
    round trips (their overhead)."""
    lat = [max(d[w] for d in done) - sent[w] for w in sent]
    put_lat = [acked[w] - sent[w] for w in sent]
    per_node = [[d[w] - sent[w] for w in sent] for d in done]
    return dict(p50=percentile(lat, 50) * 1e3, p99=percentile(lat, 99) * 1e3, max=max(lat) * 1e3,
                achieved_rate=achieved_rate, put_ack_p50_ms=percentile(put_lat, 50) * 1e3,
                put_ack_p99_ms=percentile(put_lat, 99) * 1e3,
                per_node_p50_ms=[round(percentile(n, 50) * 1e3, 3) for n in per_node],
                per_node_p99_ms=[round(percentile(n, 99) * 1e3, 3) for n in per_node],
                reader_overhead_p50_ms=percentile(rtts, 50) * 1e3, reader_overhead_p99_ms=percentile(rtts, 99) * 1e3)


async def ps_latency(ctx: Ctx, nodes: list[Node], count: int, rate: int) -> dict:
    origin = nodes[0].peer_id
    first = nodes[0].http.json("PUT", "/v1/registers/w3/probe", b"p")
    for nd in nodes:
        st, body = nd.http.request("GET", f"/v1/registers/w3/probe?after={first['token']}&timeout_ms=30000")
        if st != 200:
            raise RuntimeError(f"{nd.name} did not apply the first W3 write: {st} {body[:200]!r}")
    base = first["seq"]
    # Reader overhead: a long-poll whose token is already applied, on node 1 (no write in flight).
    probe = await AHttp(nodes[0].api).open()
    rtts = []
    for _ in range(300):
        t = now()
        probe.send("GET", f"/v1/registers/w3/probe?after={first['token']}&timeout_ms=30000")
        st, _ = await probe.response()
        rtts.append(now() - t)
    await probe.close()

    done = [dict() for _ in nodes]
    sent: dict[int, float] = {}
    acked: dict[int, float] = {}
    last = base + count
    nxt = [base + 1 for _ in nodes]

    async def poller(i: int, nd: Node):
        c = await AHttp(nd.api).open()
        while nxt[i] <= last:
            s = nxt[i]
            nxt[i] += 1
            c.send("GET", f"/v1/registers/w3/probe?after={origin}:{s}&timeout_ms=60000")
            st, body = await c.response()
            if st != 200:
                raise RuntimeError(f"reader {nd.name} seq {s}: {st} {body[:200]!r}")
            done[i][s] = now()
        await c.close()

    async def follower(i: int, nd: Node):
        c = await AHttp(nd.api).open()
        c.send("GET", f"/v1/progress?origin={origin}")
        if (st := await c.stream_head()) != 200:
            raise RuntimeError(f"progress stream of {nd.name}: HTTP {st}")
        seen, buf = base, b""
        while seen < last:
            data = await c.chunk()
            if not data:
                raise RuntimeError(f"progress stream of {nd.name} ended at seq {seen}")
            t = now()
            *lines, buf = (buf + data).split(b"\n")
            for line in lines:
                seq = json.loads(line)["seq"]
                for s in range(seen + 1, seq + 1):
                    done[i][s] = t
                seen = max(seen, seq)
        await c.close()

    free: asyncio.Queue = asyncio.Queue()
    for _ in range(WRITE_CONNS):
        free.put_nowait(await AHttp(nodes[0].api).open())

    async def put(k: int):
        c = await free.get()
        t = now()
        c.send("PUT", f"/v1/registers/w3/k{k}", b"%d" % k)
        st, body = await c.response()
        ta = now()
        free.put_nowait(c)
        if st != 200:
            raise RuntimeError(f"PUT {k}: {st} {body[:200]!r}")
        seq = json.loads(body)["seq"]
        sent[seq], acked[seq] = t, ta

    if ctx.args.w3_reader == "stream":
        readers = [asyncio.create_task(follower(i, nd)) for i, nd in enumerate(nodes)]
    else:
        readers = [asyncio.create_task(poller(i, nd)) for i, nd in enumerate(nodes) for _ in range(READ_WINDOW)]
    await asyncio.sleep(0.2)
    send_span = await paced(count, rate, put)
    await asyncio.wait_for(asyncio.gather(*readers), 120)
    while not free.empty():
        await (free.get_nowait()).close()
    if sorted(sent) != list(range(base + 1, last + 1)):
        raise RuntimeError("another writer interleaved with the latency writes")
    return latency_summary(sent, acked, done, rtts, count / send_span)


async def redis_latency(ctx: Ctx, servers: list[Redis], count: int, rate: int) -> dict:
    done = [dict() for _ in servers]
    subs = []
    for srv in servers:
        c = await AResp(srv.port).open()
        c.send("PSUBSCRIBE", "__keyspace@0__:w3:*")
        await c.read()
        subs.append(c)

    async def reader(i: int, c: AResp):
        got = 0
        while got < count:
            msg = await c.read()
            if msg[0] == b"pmessage" and msg[3] == b"set":
                k = int(msg[2].rsplit(b":", 1)[1])
                done[i][k] = now()
                got += 1
        await c.close()

    # Reader overhead: a PING round trip on a plain connection to a replica.
    probe = await AResp(servers[-1].port).open()
    rtts = []
    for _ in range(300):
        t = now()
        probe.send("PING")
        await probe.read()
        rtts.append(now() - t)

    free: asyncio.Queue = asyncio.Queue()
    for _ in range(WRITE_CONNS):
        free.put_nowait(await AResp(servers[0].port).open())
    sent, acked = {}, {}

    async def put(k: int):
        c = await free.get()
        t = now()
        c.send("SET", f"w3:{k}", b"%d" % k)
        await c.read()
        acked[k] = now()
        sent[k] = t
        free.put_nowait(c)

    readers = [asyncio.create_task(reader(i, c)) for i, c in enumerate(subs)]
    await asyncio.sleep(0.2)
    send_span = await paced(count, rate, put)
    await asyncio.wait_for(asyncio.gather(*readers), 120)
    while not free.empty():
        await (free.get_nowait()).close()
    await probe.close()
    return latency_summary(sent, acked, done, rtts, count / send_span)


def w3(ctx: Ctx) -> None:
    count, runs, rate, nn = ctx.size["w3_writes"], ctx.size["runs"], 1000, 5
    log(f"W3: propagation latency, {nn} nodes, {count} writes at {rate}/s ({runs} runs each)")
    ps_res, r_res = [], []
    for run in range(runs):
        nodes: list[Node] = []
        for i in range(nn):
            nodes.append(Node(ctx, f"w3-node{i + 1}", 1 + i, bootstrap=nodes[-1].addr if nodes else None).start())
        wait_peers(nodes)
        time.sleep(2)  # let gossipsub form its mesh (a few 200 ms heartbeats)
        ps_settle(nodes)
        cpu, t = CpuMeter([nd.proc for nd in nodes]), now()
        unsent0 = [metric(nd.http, "peersync_gossip_unsent_total") or 0 for nd in nodes]
        res = asyncio.run(ps_latency(ctx, nodes, count, rate))
        res["gossip_unsent"] = [int((metric(nd.http, "peersync_gossip_unsent_total") or 0) - u)
                                for nd, u in zip(nodes, unsent0)]
        res["node_cpu_util"] = cpu.utilisation(now() - t)
        res["cpu_us_per_op"] = cpu.per_op_us(count)
        res["writer_us_per_op"] = cpu.writer_per_op_us(count)
        res["peers_per_node"] = [len(nd.status()["peers"]) for nd in nodes]
        ps_res.append(res)
        log(f"W3 run {run + 1}: peersync p50 {res['p50']:.2f} ms p99 {res['p99']:.2f} ms max {res['max']:.1f} ms "
            f"(rate {res['achieved_rate']:.0f}/s, PUT ack p50 {res['put_ack_p50_ms']:.2f} ms, "
            f"gossip messages unsent to slow peers {res['gossip_unsent']}, "
            f"reader overhead p50 {res['reader_overhead_p50_ms']:.3f} ms)")
        for nd in nodes:
            nd.stop()

        servers = [Redis(ctx, "w3-redis-primary", 1, extra=["--notify-keyspace-events", "K$"]).start()]
        for i in range(1, nn):
            servers.append(Redis(ctx, f"w3-redis-replica{i}", 1 + i, replicaof=servers[0].port,
                                 extra=["--notify-keyspace-events", "K$"]).start())
        wait_until(lambda: all(s.linked() for s in servers[1:]), 60, "W3 redis replicas linked")
        redis_settle(servers[0], servers[1:])
        time.sleep(0.5)
        cpu, t = CpuMeter([sv.proc for sv in servers]), now()
        res = asyncio.run(redis_latency(ctx, servers, count, rate))
        res["node_cpu_util"] = cpu.utilisation(now() - t)
        res["cpu_us_per_op"] = cpu.per_op_us(count)
        r_res.append(res)
        log(f"W3 run {run + 1}: redis p50 {res['p50']:.2f} ms p99 {res['p99']:.2f} ms max {res['max']:.1f} ms "
            f"(rate {res['achieved_rate']:.0f}/s)")
        for s in servers:
            s.stop()
    if ctx.args.w3_reader == "stream":
        ps_reader = ("per node one streamed GET /v1/progress?origin=ORIGIN (a JSON line each time the origin's "
                     "applied seq advances), arrival time of the line that covers a write recorded")
    else:
        ps_reader = ("per node 16 keep-alive long-polls GET /v1/registers/w3/probe?after=ORIGIN:SEQ issued ahead "
                     "of the writes (seqs are sequential per origin), completion time recorded")
    method = ("one writer at 1000/s on node 1 (asyncio, 16 keep-alive connections); visible-on-all time = latest of the "
              f"5 nodes' notification times minus the write's send time. peersync: {ps_reader}; redis: primary + 4 "
              "replicas attached to it, a PSUBSCRIBE __keyspace@0__:w3:* connection per server "
              "(notify-keyspace-events K$), message receive time recorded. Overhead: reader_overhead = HTTP round "
              "trip of an already-satisfied long-poll (peersync) / PING round trip (redis); latency includes node "
              "1's own commit (fsync for peersync).")
    ctx.row("W3", f"propagation p50, {nn} nodes, 1k writes/s", "ms", "lower", [r["p50"] for r in ps_res],
            "redis 7, 1 primary + 4 replicas", [r["p50"] for r in r_res], method, peersync_runs=ps_res,
            redis_runs=r_res)
    ctx.row("W3", f"propagation p99, {nn} nodes, 1k writes/s", "ms", "lower", [r["p99"] for r in ps_res],
            "redis 7, 1 primary + 4 replicas", [r["p99"] for r in r_res], method)
    cpu_row(ctx, "W3", f"{nn} nodes, 1k single writes/s", [r["cpu_us_per_op"] for r in ps_res],
            "redis 7, 1 primary + 4 replicas", [r["cpu_us_per_op"] for r in r_res],
            "Window: the paced writes and their propagation (as W3's); nodes: all 5, the writer's node first.",
            [r["writer_us_per_op"] for r in ps_res])


# ---------------------------------------------------------------- W4: replicated write throughput


def w4(ctx: Ctx) -> None:
    n, runs = ctx.size["w4_ops"], ctx.size["runs"]
    log(f"W4: replicated write throughput, 3 nodes, {n} ops of 100 B ({runs} runs each)")
    ps_ops, r_ops, ps_detail, r_detail, ps_cpu, r_cpu, ps_writer = [], [], [], [], [], [], []
    bench_flags = None
    for run in range(runs):
        nodes: list[Node] = []
        for i in range(3):
            nodes.append(Node(ctx, f"w4-node{i + 1}", 1 + i, bootstrap=nodes[-1].addr if nodes else None).start())
        wait_peers(nodes)
        time.sleep(2)
        ps_settle(nodes)
        base = vv_total(nodes[0].vv())
        per = n // 3
        results: list = [None] * 3
        bodies = [ps_bodies(per, "v100", seed=100 * run + i, key_prefix=f"n{i}-") for i in range(3)]
        cpu = CpuMeter([nd.proc for nd in nodes])
        t0 = now()

        def write(i: int):
            results[i] = ps_load([nodes[i].api], "w4", per, "v100", threads_per_port=2, seed=100 * run + i,
                                 key_prefix=f"n{i}-", bodies=bodies[i])
        ts = [threading.Thread(target=write, args=(i,)) for i in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if None in results:
            raise RuntimeError("a W4 writer failed")
        t_write = now() - t0
        want = base + 3 * per

        def converged():
            vvs = [try_status(nd.http) for nd in nodes]
            return all(v and vv_total(v["version_vector"]) == want for v in vvs) and \
                vvs[0]["version_vector"] == vvs[1]["version_vector"] == vvs[2]["version_vector"]
        wait_until(converged, 600, "W4 peersync converged", interval=0.01)
        dt = now() - t0
        ps_cpu.append(cpu.per_op_us(3 * per))
        ps_writer.append(cpu.writer_per_op_us(3 * per))
        ps_ops.append(3 * per / dt)
        ps_detail.append(dict(write_s=t_write, converged_s=dt))
        log(f"W4 run {run + 1}: peersync {3 * per / dt:,.0f} ops/s (written in {t_write:.2f} s, converged {dt:.2f} s)")
        for nd in nodes:
            nd.stop()

        prim = Redis(ctx, "w4-redis-primary", 1).start()
        reps = [Redis(ctx, f"w4-redis-replica{i}", 1 + i, replicaof=prim.port).start() for i in (1, 2)]
        wait_until(lambda: all(r.linked() for r in reps), 60, "W4 redis replicas linked")
        redis_settle(prim, reps)
        time.sleep(0.5)
        cpu = CpuMeter([prim.proc, *[r.proc for r in reps]])
        t0 = now()
        bench_flags, rps = redis_benchmark_set(prim.port, 3 * per, clients=50, pipeline=16, keyspace=100_000_000)
        t_write = now() - t0
        off = int(prim.info()["master_repl_offset"])
        wait_until(lambda: all(int(r.info()["slave_repl_offset"]) >= off for r in reps), 600,
                   "W4 redis replicas caught up", interval=0.005)
        dt = now() - t0
        r_cpu.append(cpu.per_op_us(3 * per))
        r_ops.append(3 * per / dt)
        r_detail.append(dict(write_s=t_write, converged_s=dt, redis_benchmark_rps=rps))
        log(f"W4 run {run + 1}: redis {3 * per / dt:,.0f} ops/s (redis-benchmark {rps:,.0f} rps, caught up {dt:.2f} s)")
        for r in reps:
            r.stop()
        prim.stop()
    ctx.row("W4", f"replicated writes, 3 nodes, {3 * (n // 3):,} x 100 B", "ops/s", "higher", ps_ops,
            "redis 7, 1 primary + 2 replicas", r_ops,
            "ops / (first write sent -> all 3 nodes converged). peersync: 3 primaries, each gets N/3 ops as HTTP "
            "batches of 1000 from 2 concurrent connections (bodies built before the clock starts), converged = equal version vectors summing to all "
            "ops; redis: " + " ".join(bench_flags or []) + " against the primary, converged = both replicas' "
            "slave_repl_offset >= primary offset. Redis keeps data in memory only (save '', appendonly no); "
            "peersync fsyncs each group commit.", peersync_runs=ps_detail, redis_runs=r_detail)
    cpu_row(ctx, "W4", "replicated writes, 3 nodes", ps_cpu, "redis 7, 1 primary + 2 replicas", r_cpu,
            "Window: first write sent -> converged (as W4's); nodes: all 3 (peersync: 3 primaries each taking a "
            "third of the writes; redis: the primary first).", ps_writer)


# ---------------------------------------------------------------- W6: acknowledged writes vs WAIT


def w6(ctx: Ctx) -> None:
    n, runs = ctx.size["w6_writes"], ctx.size["runs"]
    log(f"W6: acknowledged write latency, 1 primary + 2 replicas, {n} sequential writes per mode ({runs} runs each)")
    modes = [("1", 1), ("all", 2)]
    ps: dict[str, list] = {m: [] for m, _ in modes}
    rd: dict[str, list] = {m: [] for m, _ in modes}
    for run in range(runs):
        prim = Node(ctx, "w6-primary", 1).start()
        reps = [Node(ctx, f"w6-replica{i}", 1 + i, role="replica", bootstrap=prim.addr).start() for i in (1, 2)]
        nodes = [prim, *reps]
        wait_peers(nodes)
        time.sleep(1)
        for mode, _ in modes:
            lat = []
            for i in range(n):
                t = now()
                status, data = prim.http.request("PUT", f"/v1/registers/w6/{mode}-{i}?ack={mode}&timeout_ms=5000",
                                                 b"x" * 100)
                lat.append((now() - t) * 1000)
                if status != 200:
                    raise RuntimeError(f"W6 ack={mode}: {status} {data[:200]!r}")
            ps[mode].append(dict(p50=percentile(lat, 50), p99=percentile(lat, 99)))
            log(f"W6 run {run + 1}: peersync ack={mode} p50 {percentile(lat, 50):.2f} ms p99 {percentile(lat, 99):.2f} ms")
        for nd in nodes:
            nd.stop()

        rprim = Redis(ctx, "w6-redis-primary", 1).start()
        rreps = [Redis(ctx, f"w6-redis-replica{i}", 1 + i, replicaof=rprim.port).start() for i in (1, 2)]
        wait_until(lambda: all(r.linked() for r in rreps), 60, "W6 redis replicas linked")
        c = rprim.connect()
        for mode, k in modes:
            lat = []
            for i in range(n):
                t = now()
                # SET and WAIT pipelined: one round trip, as the HTTP request is.
                c.sock.sendall(resp_command(("SET", f"{mode}-{i}", "x" * 100)) + resp_command(("WAIT", str(k), "5000")))
                c.read()
                got = c.read()
                lat.append((now() - t) * 1000)
                if int(got) < k:
                    raise RuntimeError(f"W6 redis WAIT {k} answered {got}")
            rd[mode].append(dict(p50=percentile(lat, 50), p99=percentile(lat, 99)))
            log(f"W6 run {run + 1}: redis WAIT {k} p50 {percentile(lat, 50):.2f} ms p99 {percentile(lat, 99):.2f} ms")
        c.close()
        for r in rreps:
            r.stop()
        rprim.stop()
    method = ("one client, sequential 100 B writes to the primary, each answered once the replicas applied it. "
              "peersync: PUT ?ack=1|all&timeout_ms=5000 on a primary with 2 replicas bootstrapped to it "
              "(acknowledged = committed to redb on the replica); redis: SET + WAIT 1|2 5000 pipelined on a primary "
              "with 2 replicas (acknowledged = received by the replica, in memory only)")
    for mode, k in modes:
        for q in ("p50", "p99"):
            ctx.row("W6", f"write with ack={mode} {q}", "ms", "lower", [r[q] for r in ps[mode]],
                    f"redis 7 SET + WAIT {k}", [r[q] for r in rd[mode]], method)


# ---------------------------------------------------------------- W5: snapshot transfer vs iperf3


def iperf3(ctx: Ctx, seconds: int) -> float:
    """One TCP stream over loopback for `seconds`; returns the received MiB/s."""
    errors = []
    for attempt in range(5):
        out_path = ctx.tmp / f"iperf3-server-{len(list(ctx.tmp.glob('iperf3-server-*.out')))}.out"
        srv = ctx.procs.spawn("iperf3-server", ["iperf3", "-s", "--forceflush", "-B", "127.0.0.1", "-p", str(IPERF_PORT)],
                              ctx.tmp / "iperf3-server.log", out_path)
        try:
            wait_until(lambda: "Server listening" in out_path.read_text(), 10, "iperf3 server listening",
                       proc=srv)
            r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
                               capture_output=True, text=True)
            (ctx.tmp / f"iperf3-client-{attempt}.json").write_text(r.stdout + r.stderr)
            try:
                out = json.loads(r.stdout)
            except ValueError:
                out = {"error": r.stdout[:200] + r.stderr[:200]}
            if "sum_received" in out.get("end", {}):
                return out["end"]["sum_received"]["bits_per_second"] / 8 / 2**20
            errors.append(f"rc {r.returncode}: {out.get('error')}")
            log(f"iperf3 attempt {attempt + 1} failed: {errors[-1]}")
        finally:
            ctx.procs.stop(srv)
        time.sleep(0.5)
    raise RuntimeError(f"iperf3 failed: {errors}")


def sendme_bin() -> str | None:
    """iroh's sendme, W5's second anchor: $SENDME, else what scripts/bench.sh installs under target/,
    else one on the PATH."""
    for c in (os.environ.get("SENDME"), str(ROOT / "target" / "sendme" / "bin" / "sendme"), shutil.which("sendme")):
        if c and os.access(c, os.X_OK):
            return c
    return None


def sendme_transfer(ctx: Ctx, sendme: str, path: Path) -> float:
    """Sends `path` with `sendme send` (relays off, loopback address in the ticket) and times `sendme
    receive` into an empty directory, from its start to its exit (the received file written out).
    The sender imports (hashes) the file before it prints the ticket, untimed, as peersync's snapshot
    is made before a replica joins. Returns MiB/s."""
    out = ctx.tmp / "sendme-send.out"
    out.unlink(missing_ok=True)
    snd = ctx.procs.spawn("sendme-send", [sendme, "send", "--relay", "disabled", "--ticket-type", "addresses",
                                          "--magic-ipv4-addr", f"127.0.0.1:{SENDME_PORT}", "--no-progress",
                                          path.name], ctx.tmp / "sendme-send.log", out, cwd=path.parent)
    try:
        ticket = None

        def ready():
            nonlocal ticket
            found = [w for w in out.read_text().split() if w.startswith("blob")] if out.exists() else []
            ticket = found[0] if found else None
            return ticket is not None
        wait_until(ready, 600, "sendme ticket", interval=0.05, proc=snd)
        into = ctx.tmp / "sendme-recv"
        rmtree(into)
        into.mkdir(parents=True)
        t = now()
        r = subprocess.run([sendme, "receive", "--relay", "disabled", "--no-progress", ticket], cwd=into,
                           capture_output=True, text=True, timeout=600)
        dt = now() - t
        got = into / path.name
        if r.returncode != 0 or not got.exists() or got.stat().st_size != path.stat().st_size:
            raise RuntimeError(f"sendme receive failed (rc {r.returncode}): {r.stderr[-300:]}")
        rmtree(into)
        return path.stat().st_size / 2**20 / dt
    finally:
        ctx.procs.stop(snd)


def mount_point(path: Path) -> str:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return str(path)


def w5(ctx: Ctx) -> None:
    total, runs = ctx.size["w5_bytes"], ctx.size["runs"]
    n = total // 1024
    log(f"W5: snapshot transfer, {n} keys x 1 KiB ({total / 2**20:.0f} MiB) ({runs} runs each)")
    # Enough room, or the node's own disk guard answers 507 disk_full midway: skip rather than fail.
    free, need = shutil.disk_usage(ctx.tmp).free, total * W5_DISK_COPIES + PS_DISK_RESERVE
    if free < need:
        raise Skip(f"{free / 2**20:,.0f} MiB free on {mount_point(ctx.tmp)}, needs {need / 2**20:,.0f} MiB "
                   f"({total / 2**20:,.0f} MiB data set x {W5_DISK_COPIES} copies + {PS_DISK_RESERVE >> 20} MiB "
                   f"node disk reserve)")
    prim = Node(ctx, "w5-primary", 1, extra=["--log-retention-ops", "1", "--log-retention-bytes", "1"]).start()
    load = ps_load([prim.api], "w5", n, "v1k", threads_per_port=3)
    log(f"W5: loaded {n} keys in {load:.1f} s")
    t = now()
    snap = prim.http.json("POST", "/v1/snapshots")
    snap_s = now() - t
    log(f"W5: snapshot made in {snap_s:.1f} s: {snap['bytes'] / 2**20:.1f} MiB in {snap['chunks']} chunks, "
        f"{snap['ops_compacted']} ops compacted")
    target_vv = prim.vv()
    mibs, t_snap, t_active, ip, t_all_chunks, cpu_s = [], [], [], [], [], []
    for run in range(runs):
        rep = Node(ctx, "w5-replica", 2, role="replica", bootstrap=prim.addr)
        rep.prepare()
        t0 = now()
        rep.spawn()
        cpu = CpuMeter([prim.proc], fresh=[rep.proc])
        t_chunks = None

        def installed():
            nonlocal t_chunks
            st = try_status(rep.http)
            pull = (st or {}).get("sync", {}).get("snapshot") or {}
            if t_chunks is None and pull.get("chunks_total") and pull.get("chunks_have", 0) >= pull["chunks_total"]:
                t_chunks = now() - t0
            return (metric(rep.http, "peersync_snapshots_installed_total") or 0) >= 1
        wait_until(installed, 1800, "W5 snapshot installed on the replica", interval=0.01, proc=rep.proc)
        ts = now() - t0
        # CPU-seconds of [primary, replica] from the replica's start to the install.
        cpu_s.append([round(us / 1e6, 2) for us in cpu.per_op_us(1)])
        t_all_chunks.append(t_chunks)
        wait_until(lambda: (s := try_status(rep.http)) and s["state"] == "active" and s["version_vector"] == target_vv,
                   600, "W5 replica active", interval=0.01, proc=rep.proc)
        ta = now() - t0
        t_snap.append(ts)
        t_active.append(ta)
        mibs.append(snap["bytes"] / 2**20 / ts)
        log(f"W5 run {run + 1}: snapshot installed after {ts:.2f} s ({mibs[-1]:.1f} MiB/s; all chunks held after "
            f"{fmt(t_chunks)} s), active after {ta:.2f} s; CPU-s until installed: primary {cpu_s[-1][0]}, "
            f"replica {cpu_s[-1][1]}")
        rep.stop()
        ip.append(iperf3(ctx, 2 if ctx.args.quick else 5))
        log(f"W5 run {run + 1}: iperf3 loopback {ip[-1]:,.0f} MiB/s")
    prim.stop()
    sendme, sm = sendme_bin(), []
    if sendme:
        data = ctx.tmp / "sendme-data" / "w5.bin"
        data.parent.mkdir(parents=True, exist_ok=True)
        with open(data, "wb") as f:
            for _ in range(total // (1 << 20)):
                f.write(os.urandom(1 << 20))
        for run in range(runs):
            sm.append(sendme_transfer(ctx, sendme, data))
            log(f"W5 run {run + 1}: sendme {total / 2**20:,.0f} MiB file over loopback {sm[-1]:,.1f} MiB/s")
        rmtree(data.parent)
    else:
        log("W5: no sendme (scripts/bench.sh installs it for a full run, or set SENDME): its row is skipped")
    method = ("primary started with --log-retention-ops 1 --log-retention-bytes 1, loaded with random 1 KiB values "
              "(HTTP batches of 1000, value_base64), POST /v1/snapshots (compacts the log), then a new replica "
              "bootstraps to it; MiB/s = snapshot 'bytes' / (replica start -> peersync_snapshots_installed_total "
              "= 1, /metrics polled every 10 ms). Ceiling: iperf3 -c 127.0.0.1 (one TCP stream, "
              f"{2 if ctx.args.quick else 5} s); the ratio is the fraction of it reached.")
    ctx.row("W5", f"snapshot transfer, {snap['bytes'] / 2**20:,.0f} MiB", "MiB/s", "higher", mibs,
            "iperf3 loopback", ip, method, snapshot=snap, snapshot_create_s=snap_s, load_s=load,
            time_to_installed_s=t_snap, time_to_active_s=t_active,
            time_to_all_chunks_held_s=t_all_chunks, cpu_s_primary_replica_until_installed=cpu_s,
            note_chunks="time when /v1/status sync.snapshot showed chunks_have == chunks_total (polled every "
                        "10 ms; None if not seen): transfer + verify + store; the rest until installed is the install")
    ctx.row("W5", "snapshot path: replica start -> active", "s", "lower", t_active, "-", [], method)
    if sm:
        version = subprocess.run([sendme, "--version"], capture_output=True, text=True).stdout.strip()
        ctx.row("W5", f"snapshot transfer vs a {total / 2**20:,.0f} MiB file", "MiB/s", "higher", mibs,
                version or "sendme", sm,
                method + " sendme: a file of random bytes of the same size, `sendme send --relay disabled "
                "--ticket-type addresses` (the file imported before the ticket is printed, untimed), then "
                "`sendme receive --relay disabled` into an empty directory, timed from its start to its exit.")


# ---------------------------------------------------------------- W8: lease acquire latency vs etcd


LEASE_BODY = b'{"holder":"h","ttl_ms":10000}'
W8_WHO = ("node 1", "node 2")


def error_code(data: bytes) -> str | None:
    try:
        return json.loads(data).get("error")
    except (ValueError, AttributeError):
        return None


def ps_acquire(nd: Node, key: str) -> tuple[int, bytes]:
    return nd.http.request("POST", f"/v1/leases/bench/{key}/acquire", LEASE_BODY)


def ps_lease_ready(nd: Node, key: str, timeout: float = 30) -> dict:
    """Acquires `key` on `nd`, retrying a 503 (no_quorum until the primaries' Raft group has a leader) for up
    to `timeout` s; returns how long that took and the 503s answered first, by error code."""
    t0, refused = now(), {}
    while True:
        st, data = ps_acquire(nd, key)
        if st == 200:
            return dict(wait_s=round(now() - t0, 3), refused_503=refused)
        if st != 503:
            raise RuntimeError(f"W8 first acquire on {nd.name}: {st} {data[:200]!r}")
        code = error_code(data) or "?"
        refused[code] = refused.get(code, 0) + 1
        if now() - t0 > timeout:
            raise TimeoutError(f"W8: {nd.name} granted no lease within {timeout:.0f} s ({refused}, last answer "
                               f"{data[:200]!r})")
        time.sleep(0.05)


def sequential_ms(n: int, one) -> dict:
    """Runs one(i) for i in 0..n, one after another; p50/p99 of their durations in ms."""
    lat = []
    for i in range(n):
        t = now()
        one(i)
        lat.append((now() - t) * 1000)
    return dict(p50=percentile(lat, 50), p99=percentile(lat, 99))


class Etcd:
    """One member of a 3-member etcd cluster on 127.0.0.1, with etcd's defaults otherwise (fsync on)."""

    def __init__(self, ctx: Ctx, name: str, idx: int, cluster: str):
        self.ctx, self.name, self.cluster = ctx, name, cluster
        self.client, self.peer = ETCD_CLIENT + idx, ETCD_PEER + idx
        self.dir = ctx.tmp / name
        self.http = Http(self.client, timeout=30)
        self.proc = None

    def start(self) -> "Etcd":
        rmtree(self.dir)
        client, peer = f"http://127.0.0.1:{self.client}", f"http://127.0.0.1:{self.peer}"
        argv = ["etcd", "--name", self.name, "--data-dir", str(self.dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", self.cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", "bench-w8", "--logger", "zap", "--log-outputs", "stderr"]
        self.proc = self.ctx.procs.spawn(f"etcd-{self.name}", argv, self.ctx.tmp / f"{self.name}.log")
        return self

    def healthy(self) -> bool:
        try:
            st, data = self.http.request("GET", "/health")
            return st == 200 and json.loads(data).get("health") == "true"
        except (OSError, ValueError):
            return False

    def acquire(self, key: str) -> None:
        """A lease grant, then a put attached to it (etcd's lock with a TTL): two Raft commits."""
        lease = self.http.json("POST", "/v3/lease/grant", b'{"TTL":10}')
        put = {"key": base64.b64encode(key.encode()).decode(), "value": "aA==", "lease": lease["ID"]}
        self.http.json("POST", "/v3/kv/put", json.dumps(put).encode())

    def try_acquire(self, key: str) -> bool:
        try:
            self.acquire(key)
            return True
        except (OSError, RuntimeError, ValueError, KeyError):
            return False

    def is_leader(self) -> bool:
        st = self.http.json("POST", "/v3/maintenance/status", b"{}")
        return st["leader"] == st["header"]["member_id"]

    def stop(self) -> None:
        self.http.close()
        if self.proc is not None:
            self.ctx.procs.stop(self.proc)
        if not self.ctx.args.keep_data:
            rmtree(self.dir)


def etcd_version() -> str:
    out = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split()
    return out[2] if out[:2] == ["etcd", "Version:"] else "?"


def w8(ctx: Ctx) -> None:
    n, runs = ctx.size["w8_acquires"], ctx.size["runs"]
    use_etcd = shutil.which("etcd") is not None
    anchor = f"etcd {etcd_version()}, 3 members" if use_etcd else "redis 7 SET NX PX + WAIT 2"
    log(f"W8: lease acquire latency, 3 primaries, {n} sequential acquires on node 1 then node 2, vs {anchor} "
        f"({runs} runs each)")
    ps: dict[str, list] = {w: [] for w in W8_WHO}
    an: dict[str, list] = {w: [] for w in W8_WHO}
    ps_ready, etcd_leaders = [], []
    for run in range(runs):
        nodes = [Node(ctx, f"w8-node{i}", i) for i in (1, 2, 3)]
        for nd in nodes:
            nd.prepare()
        for nd in nodes:
            nd.extra = [a for o in nodes if o is not nd for a in ("--bootstrap", o.addr)]
            nd.spawn()
        for nd in nodes:
            wait_until(lambda: try_status(nd.http), 30, f"{nd.name} API", proc=nd.proc)
        for nd in nodes:
            nd.wait_active(60)
        ps_ready.append({nd.name: ps_lease_ready(nd, f"ready-{nd.name}") for nd in nodes[:2]})
        log(f"W8 run {run + 1}: first acquire granted (503s retried first): {ps_ready[-1]}")
        for w, nd in zip(W8_WHO, nodes):
            def acquire(i: int) -> None:
                st, data = ps_acquire(nd, f"r{run}-{nd.name}-{i}")
                if st != 200:
                    raise RuntimeError(f"W8 acquire {i} on {nd.name}: {st} {data[:200]!r}")
            ps[w].append(sequential_ms(n, acquire))
            log(f"W8 run {run + 1}: peersync {w} p50 {ps[w][-1]['p50']:.2f} ms p99 {ps[w][-1]['p99']:.2f} ms")
        for nd in nodes:
            nd.stop()

        if use_etcd:
            cluster = ",".join(f"w8-etcd{i}=http://127.0.0.1:{ETCD_PEER + i}" for i in (1, 2, 3))
            members = [Etcd(ctx, f"w8-etcd{i}", i, cluster).start() for i in (1, 2, 3)]
            for e in members:
                wait_until(e.healthy, 60, f"{e.name} healthy", interval=0.05, proc=e.proc)
            for e in members[:2]:
                wait_until(lambda: e.try_acquire(f"ready-{e.name}"), 30, f"{e.name} first lease", interval=0.05)
            etcd_leaders.append([e.name for e in members if e.is_leader()])
            for w, e in zip(W8_WHO, members):
                an[w].append(sequential_ms(n, lambda i: e.acquire(f"bench/r{run}-{e.name}-{i}")))
                log(f"W8 run {run + 1}: etcd member {w[-1]} p50 {an[w][-1]['p50']:.2f} ms "
                    f"p99 {an[w][-1]['p99']:.2f} ms (leader {etcd_leaders[-1]})")
            for e in members:
                e.stop()
        else:
            prim = Redis(ctx, "w8-redis-primary", 1).start()
            reps = [Redis(ctx, f"w8-redis-replica{i}", 1 + i, replicaof=prim.port).start() for i in (1, 2)]
            wait_until(lambda: all(r.linked() for r in reps), 60, "W8 redis replicas linked")
            redis_settle(prim, reps)
            c = prim.connect()
            for w in W8_WHO:
                def acquire(i: int) -> None:
                    # SET NX and WAIT pipelined: one round trip, as the HTTP request is.
                    c.sock.sendall(resp_command(("SET", f"bench:{w[-1]}-{i}", "h", "NX", "PX", "10000"))
                                   + resp_command(("WAIT", "2", "1000")))
                    ok, got = c.read(), c.read()
                    if ok != "OK" or int(got) < 2:
                        raise RuntimeError(f"W8 redis SET NX answered {ok!r}, WAIT 2 answered {got!r}")
                an[w].append(sequential_ms(n, acquire))
                log(f"W8 run {run + 1}: redis ({w}) p50 {an[w][-1]['p50']:.2f} ms p99 {an[w][-1]['p99']:.2f} ms")
            for r in reps:
                r.stop()
            prim.stop()
    method = ("one client, N sequential lease acquires on distinct keys over one keep-alive connection, to node 1 "
              "then node 2. peersync: 3 primaries, each bootstrapped to the other two, all active, then one "
              "acquire on node 1 and one on node 2 retried while they answer 503 (no_quorum: the primaries' Raft "
              "group has no leader yet; up to 30 s); POST /v1/leases/bench/KEY/acquire "
              '{"holder":"h","ttl_ms":10000}. ')
    if use_etcd:
        method += ("etcd: 3 members on 127.0.0.1 with fsync (etcd's default), node 1/2 = member 1/2 (leader or "
                   "follower as elected); one acquire = POST /v3/lease/grant {\"TTL\":10} then POST /v3/kv/put "
                   "of the key attached to that lease, through the HTTP/JSON gateway (two Raft commits).")
    else:
        method += ("redis (etcd not installed): SET KEY h NX PX 10000 + WAIT 2 1000 pipelined on a primary with 2 "
                   "replicas, both rows against the primary (acknowledged = received by both replicas, in memory "
                   "only).")
    for w in W8_WHO:
        for q in ("p50", "p99"):
            details = dict(first_acquire=ps_ready, etcd_leader=etcd_leaders) if (w, q) == (W8_WHO[0], "p50") else {}
            ctx.row("W8", f"lease acquire {q}, 3 primaries, {w}", "ms", "lower", [r[q] for r in ps[w]], anchor,
                    [r[q] for r in an[w]], method, **details)


# ---------------------------------------------------------------- output


def table(rows: list[dict]) -> str:
    head = ["workload", "metric", "unit", "peersync", "anchor", "anchor median", "peersync/anchor", "better", "runs"]
    lines = [head]
    for r in rows:
        lines.append([r["workload"], r["metric"], r["unit"], fmt(r["peersync"]["median"]), r["anchor"]["name"],
                      fmt(r["anchor"]["median"]), fmt(r["ratio"]), r["better"],
                      f"{len(r['peersync']['runs'])}/{len(r['anchor']['runs'])}"])
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    out = []
    for j, l in enumerate(lines):
        out.append("  ".join(str(c).ljust(widths[i]) if i < 3 or i == 4 else str(c).rjust(widths[i])
                             for i, c in enumerate(l)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def versions(ctx: Ctx) -> dict:
    def run(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return None
    return dict(peersync_commit=run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
                peersync_dirty=bool(run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "Cargo.toml"])),
                redis=run(["redis-server", "--version"]), iperf3=run(["iperf3", "--version"]),
                etcd=run(["etcd", "--version"]),
                kernel=platform.release(), cpus=os.cpu_count(), python=platform.python_version())


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5, "W6": w6, "W8": w8}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 run each (smoke run)")
    ap.add_argument("--runs", type=int, default=0, help="runs per system and workload (default 3, 1 with --quick)")
    ap.add_argument("--only", default="W1,W2,W3,W4,W5,W6,W7,W8", help="comma-separated workloads (W7 comes with W1)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    ap.add_argument("--tmp", type=Path, default=ROOT / "target" / "bench-tmp")
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "peersync"))
    ap.add_argument("--w3-reader", choices=["stream", "longpoll"], default="stream",
                    help="how W3 sees a write on each node: one GET /v1/progress stream per node (default), or "
                         "16 long-polls GET ...?after=TOKEN per node (the method before 2026-12-07)")
    ap.add_argument("--keep-data", action="store_true", help="keep node data directories under --tmp")
    args = ap.parse_args()
    args.only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    unknown = args.only - set(WORKLOADS) - {"W7"}
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}")
    # Fresh temporary directory, but keep the logs of a previous run out of the way rather than mixing them.
    rmtree(args.tmp)
    args.tmp.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    started = time.time()
    t0 = now()
    timings = {}
    failures: dict[str, str] = {}
    skipped: dict[str, str] = {}
    try:
        for name, fn in WORKLOADS.items():
            if name in args.only or (name == "W1" and "W7" in args.only):
                t = now()
                try:
                    fn(ctx)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Skip as e:
                    skipped[name] = str(e)
                    log(f"{name} SKIPPED: {e}")
                    ctx.procs.stop_all()
                except Exception as e:  # noqa: BLE001 - report it, stop its processes, go on
                    import traceback
                    traceback.print_exc()
                    failures[name] = f"{type(e).__name__}: {e}"
                    log(f"{name} FAILED: {failures[name]} (logs in {args.tmp})")
                    ctx.procs.stop_all()
                timings[name] = now() - t
                log(f"{name} done in {timings[name]:.0f} s")
    finally:
        ctx.procs.stop_all()
    elapsed = now() - t0
    result = dict(
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)), elapsed_s=elapsed,
        workload_s=timings, mode="quick" if args.quick else "full", runs=ctx.size["runs"], sizes=ctx.size,
        versions=versions(ctx), peersync_flags=PS_FLAGS, redis_flags=REDIS_FLAGS, rows=ctx.rows, failures=failures,
        skipped=skipped,
        notes=["medians over alternating runs (peersync, anchor, peersync, ...); ratio = peersync median / anchor "
               "median; 'better' says which direction is good for the metric",
               "all processes on one 2-core machine over 127.0.0.1; load generators share the cores"])
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"peersync vs anchors ({result['mode']}, {ctx.size['runs']} run(s) each, medians; "
          f"{elapsed:.0f} s in total)")
    print(table(ctx.rows))
    for name, why in skipped.items():
        print(f"{name} SKIPPED: {why}")
    for name, err in failures.items():
        print(f"{name} FAILED: {err}")
    print(f"\nJSON: {args.out / 'bench.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
