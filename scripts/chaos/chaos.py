"""Chaos run with real processes: 5 peersync nodes (3 primaries, 2 replicas), each in its own network
namespace on a bridge, under continuous register writes, counter increments and lease acquisitions,
while faults come every few seconds: kill -9 and restart, SIGSTOP/SIGCONT, and partitions (a node's
link to the bridge taken down). After the faults heal, a checker verifies what the clients were told.

Run it through scripts/chaos.sh (root: it creates and removes network namespaces and a bridge).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

BRIDGE, NET = "pschaos0", "10.77.0"
API_PORT, P2P_PORT = 7700, 4001
NODE_FLAGS = ["--no-mdns", "--gossip-heartbeat-ms", "200", "--discovery-interval-ms", "1000",
              "--digest-min-ms", "100", "--digest-max-ms", "1000"]


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------- network namespaces


class Net:
    """A bridge in the root namespace (10.77.0.254) and one namespace per node (10.77.0.i)."""

    def __init__(self, n: int):
        self.n = n

    def ns(self, i: int) -> str:
        return f"pschaos{i}"

    def up(self) -> None:
        self.down()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{NET}.254/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i in range(1, self.n + 1):
            ns, host = self.ns(i), f"psc{i}h"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", host, "master", BRIDGE)
            sh("ip", "link", "set", host, "up")
            sh("ip", "-n", ns, "addr", "add", f"{NET}.{i}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def cut(self, i: int) -> None:
        sh("ip", "link", "set", f"psc{i}h", "down")

    def heal(self, i: int) -> None:
        sh("ip", "link", "set", f"psc{i}h", "up")

    def down(self) -> None:
        for i in range(1, self.n + 1):
            sh("ip", "netns", "del", self.ns(i), check=False)
        sh("ip", "link", "del", BRIDGE, check=False)


# ---------------------------------------------------------------- nodes


class Node:
    def __init__(self, args, i: int, role: str):
        self.i, self.role, self.bin = i, role, args.bin
        self.dir = args.dir / f"node{i}"
        self.ip = f"{NET}.{i}"
        self.proc: subprocess.Popen | None = None
        self.started_at_ms = 0
        self.stopped = False
        self.peer_id = sh(self.bin, "id", "--data-dir", str(self.dir)).stdout.strip()
        self.bootstrap: list[str] = []
        self.unexpected_exits: list[int] = []

    def addr(self) -> str:
        return f"/ip4/{self.ip}/tcp/{P2P_PORT}/p2p/{self.peer_id}"

    def start(self) -> None:
        argv = ["ip", "netns", "exec", f"pschaos{self.i}", self.bin, "node", "--data-dir", str(self.dir),
                "--listen", f"/ip4/{self.ip}/tcp/{P2P_PORT}", "--api", f"{self.ip}:{API_PORT}",
                "--role", self.role, *NODE_FLAGS]
        for b in self.bootstrap:
            argv += ["--bootstrap", b]
        logf = open(self.dir.parent / f"node{self.i}.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=logf, stderr=logf)
        self.started_at_ms = now_ms()
        self.stopped = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
        """One request on a fresh connection (a node may have been killed since the last)."""
        conn = http.client.HTTPConnection(self.ip, API_PORT, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.read()
        except http.client.HTTPException as e:
            raise OSError(f"node{self.i}: {e}") from e
        finally:
            conn.close()

    def status(self) -> dict | None:
        try:
            st, data = self.request("GET", "/v1/status")
            return json.loads(data) if st == 200 else None
        except OSError:
            return None


# ---------------------------------------------------------------- clients


class Log:
    """What clients were told, by kind; shared by every client thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.writes: dict[str, str] = {}  # key -> value, acknowledged (200)
        self.write_at: dict[str, int] = {}  # key -> ms when acknowledged
        self.writes_indeterminate = 0
        self.counter_acked = 0
        self.counter_indeterminate = 0
        self.grants: list[dict] = []  # lease grants answered 200
        self.lease_refused = 0  # 409 held by another, and 503 no_quorum
        self.lease_no_quorum = 0  # 503 no_quorum: the primaries' Raft group could not be reached
        self.lease_indeterminate = 0
        self.stale_reads: list[str] = []
        self.reads_checked = 0


def error_code(data: bytes) -> str | None:
    """The `error` of a JSON error answer, or None."""
    try:
        return json.loads(data).get("error")
    except (ValueError, AttributeError):
        return None


def client(c: int, primaries: list[Node], log_: Log, stop: threading.Event, seed: int) -> None:
    rnd = random.Random(seed)
    n = 0
    while not stop.is_set():
        node = primaries[c % len(primaries)] if rnd.random() < 0.8 else rnd.choice(primaries)
        n += 1
        kind = rnd.random()
        try:
            if kind < 0.6:
                key, value = f"c{c}-{n}", f"v{c}-{n}"
                st, _ = node.request("PUT", f"/v1/registers/chaos/{key}", value.encode())
                with log_.lock:
                    if st == 200:
                        log_.writes[key], log_.write_at[key] = value, now_ms()
                    elif st >= 500 or st == 0:
                        log_.writes_indeterminate += 1
            elif kind < 0.9:
                st, _ = node.request("POST", "/v1/counters/chaos/total", b'{"delta": 1}')
                with log_.lock:
                    if st == 200:
                        log_.counter_acked += 1
                    elif st >= 500:
                        log_.counter_indeterminate += 1
            else:
                shard = f"shard{rnd.randrange(3)}"
                holder = f"client{c}"
                asked = now_ms()
                # Longer than the node's lease timeout (5 s): a primary without a quorum answers
                # 503 no_quorum by then, which is a refusal, not an indeterminate outcome.
                st, data = node.request("POST", f"/v1/leases/chaos/{shard}/acquire",
                                        json.dumps({"holder": holder, "ttl_ms": 2000}).encode(), timeout=7.0)
                with log_.lock:
                    if st == 200:
                        g = json.loads(data)
                        log_.grants.append(dict(key=shard, holder=holder, token=g["token"], asked_ms=asked,
                                                answered_ms=now_ms(), expires_at_ms=g["expires_at_ms"], node=node.i))
                    elif st == 409:
                        log_.lease_refused += 1
                    elif st == 503 and error_code(data) == "no_quorum":
                        # No quorum of primaries took it: not granted.
                        log_.lease_refused += 1
                        log_.lease_no_quorum += 1
                    else:
                        log_.lease_indeterminate += 1
        except (OSError, ValueError, KeyError):
            with log_.lock:
                if kind < 0.6:
                    log_.writes_indeterminate += 1
                elif kind < 0.9:
                    log_.counter_indeterminate += 1
                else:
                    log_.lease_indeterminate += 1
            time.sleep(0.05)


def stale_check(node: Node, log_: Log, rnd: random.Random, deadline_s: float = 60) -> None:
    """After a restart: once the node says it is active, keys acknowledged before it started must
    not read as missing there."""
    end = time.time() + deadline_s
    while time.time() < end:
        s = node.status()
        if s and s.get("state") == "active":
            break
        time.sleep(0.1)
    else:
        return
    with log_.lock:
        before = [k for k, at in log_.write_at.items() if at < node.started_at_ms]
    for key in rnd.sample(before, min(50, len(before))):
        try:
            st, _ = node.request("GET", f"/v1/registers/chaos/{key}")
        except OSError:
            continue
        with log_.lock:
            log_.reads_checked += 1
            if st == 404:
                log_.stale_reads.append(f"node{node.i}: {key} (acknowledged before its start) read 404 while active")


# ---------------------------------------------------------------- faults


def faults(args, net: Net, nodes: list[Node], log_: Log, stop: threading.Event, counts: dict, rnd: random.Random):
    while not stop.wait(args.fault_every * rnd.uniform(0.5, 1.5)):
        kind = rnd.choice(["kill", "pause", "partition"])
        counts[kind] += 1
        if kind == "kill":
            v = rnd.choice(nodes)
            log(f"fault: kill -9 node{v.i}")
            v.kill9()
            time.sleep(rnd.uniform(0.5, 3))
            v.start()
            threading.Thread(target=stale_check, args=(v, log_, random.Random(rnd.random())), daemon=True).start()
        elif kind == "pause":
            v = rnd.choice(nodes)
            log(f"fault: SIGSTOP node{v.i}")
            v.signal(signal.SIGSTOP)
            time.sleep(rnd.uniform(1, 4))
            v.signal(signal.SIGCONT)
        else:
            vs = rnd.sample(nodes, rnd.choice([1, 2]))
            log(f"fault: partition {', '.join(f'node{v.i}' for v in vs)} from the rest")
            for v in vs:
                net.cut(v.i)
            time.sleep(rnd.uniform(2, 6))
            for v in vs:
                net.heal(v.i)
        counts["last_fault_end"] = time.time()


# ---------------------------------------------------------------- checks


def dump(node: Node) -> dict[str, str]:
    out, after = {}, None
    while True:
        q = "limit=1000" + (f"&after={after}" if after else "")
        st, data = node.request("GET", f"/v1/registers/chaos?{q}")
        if st != 200:
            raise RuntimeError(f"node{node.i} listing: {st} {data[:200]!r}")
        page = json.loads(data)
        for e in page["entries"]:
            out[e["key"]] = e.get("value")
        after = page.get("next_after")
        if not after:
            return out


def lease_violations(grants: list[dict]) -> list[str]:
    """Per key: no token granted to two holders; no grant to one holder answered before another
    holder's earlier grant expired (same host, so one clock); and tokens never go back: a grant's
    token is at least every token granted before it (answered before it was asked, so committed
    before it), and equal only for the same holder (a renewal, or an acquire by the holder, keeps
    its token), as fencing tokens must. Which grant came before another is judged by answer and
    ask times, never by answer order alone: the answer to a grant committed earlier can arrive
    later (its node was paused), and then sits between two grants of one lease to one holder."""
    bad = []
    by_key: dict[str, list[dict]] = {}
    for g in grants:
        by_key.setdefault(g["key"], []).append(g)
    for key, gs in by_key.items():
        tokens: dict[int, set] = {}
        for g in gs:
            tokens.setdefault(g["token"], set()).add(g["holder"])
        for t, holders in sorted(tokens.items()):
            if len(holders) > 1:
                bad.append(f"{key}: token {t} granted to {sorted(holders)}")
        gs = sorted(gs, key=lambda g: g["answered_ms"])
        for i, b in enumerate(gs):
            for a in gs[:i]:
                if a["holder"] != b["holder"] and a["asked_ms"] <= b["asked_ms"] and b["answered_ms"] < a["expires_at_ms"]:
                    bad.append(f"{key}: {b['holder']} granted token {b['token']} while {a['holder']} held "
                               f"token {a['token']} until {a['expires_at_ms']}")
                    break
        for i, b in enumerate(gs):
            for a in gs[:i]:
                if a["answered_ms"] < b["asked_ms"] and (
                        a["token"] > b["token"] or (a["token"] == b["token"] and a["holder"] != b["holder"])):
                    bad.append(f"{key}: {b['holder']} granted token {b['token']} (asked {b['asked_ms']}, answered "
                               f"{b['answered_ms']}), below token {a['token']} granted earlier to {a['holder']} "
                               f"(answered {a['answered_ms']})")
                    break
    return list(dict.fromkeys(bad))


def check_lease_checker() -> None:
    """The lease checker on known histories, so that it can neither pass a broken history nor fail
    a sound one unnoticed. Times in ms."""
    def g(holder: str, token: int, asked: int, answered: int, expires: int) -> dict:
        return dict(key="k", holder=holder, token=token, asked_ms=asked, answered_ms=answered, expires_at_ms=expires)
    # b's grant (token 5) was committed first but answered late, between two grants of token 9 to a.
    late_answer = [g("a", 9, 100, 110, 300), g("b", 5, 0, 400, 50), g("a", 9, 410, 420, 600)]
    assert lease_violations(late_answer) == [], lease_violations(late_answer)
    back = [g("a", 9, 100, 110, 150), g("b", 5, 200, 210, 400)]
    assert len(lease_violations(back)) == 1, lease_violations(back)
    reused = [g("a", 9, 100, 110, 150), g("b", 9, 200, 210, 400)]
    assert lease_violations(reused), lease_violations(reused)
    overlap = [g("a", 9, 100, 110, 500), g("b", 12, 200, 210, 700)]
    assert lease_violations(overlap), lease_violations(overlap)


def main() -> int:
    check_lease_checker()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--fault-every", type=float, default=6)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--bin", required=True)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--no-strict-leases", dest="strict_leases", action="store_false",
                    help="count and print lease violations without failing the run (by default a violation "
                         "fails it: leases run on a Raft quorum of the primaries, so they are exclusive and "
                         "their tokens strictly increase)")
    ap.add_argument("--strict-leases", dest="strict_leases", action="store_true",
                    help="the default; accepted for compatibility")
    ap.set_defaults(strict_leases=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    log(f"seed {args.seed}, {args.duration:.0f} s, a fault every ~{args.fault_every} s")
    roles = ["primary", "primary", "primary", "replica", "replica"]
    net = Net(len(roles))
    net.up()
    nodes: list[Node] = []
    stop = threading.Event()
    log_ = Log()
    counts = {"kill": 0, "pause": 0, "partition": 0, "last_fault_end": 0.0}
    threads: list[threading.Thread] = []
    try:
        args.dir.mkdir(parents=True, exist_ok=True)
        nodes = [Node(args, i + 1, r) for i, r in enumerate(roles)]
        for nd in nodes:
            nd.bootstrap = [o.addr() for o in nodes if o is not nd]
            nd.start()
        end = time.time() + 60
        while not all((s := nd.status()) and s.get("state") == "active" for nd in nodes):
            if time.time() > end:
                raise RuntimeError("the cluster did not become active within 60 s")
            time.sleep(0.2)
        log("cluster active; clients and faults start")
        primaries = [nd for nd in nodes if nd.role == "primary"]
        threads = [threading.Thread(target=client, args=(c, primaries, log_, stop, rnd.random()), daemon=True)
                   for c in range(3)]
        threads.append(threading.Thread(target=faults, args=(args, net, nodes, log_, stop, counts, rnd), daemon=True))
        t0 = time.time()
        for t in threads:
            t.start()
        while time.time() - t0 < args.duration:
            time.sleep(1)
            for nd in nodes:
                if not nd.alive() and not nd.stopped and nd.proc is not None and nd.proc.returncode not in (None, -9):
                    nd.unexpected_exits.append(nd.proc.returncode)
                    log(f"node{nd.i} exited on its own with {nd.proc.returncode}; restarting it")
                    nd.start()
        stop.set()
        for t in threads:
            t.join(timeout=30)
        # Heal everything.
        for nd in nodes:
            net.heal(nd.i)
            nd.signal(signal.SIGCONT)
            if not nd.alive():
                nd.start()
        # Convergence is timed from the end of the last fault (the run's end can fall in a quiet
        # stretch between faults).
        healed = time.time()
        last_fault_end = counts.pop("last_fault_end")
        log(f"faults over ({time.time() - last_fault_end:.2f} s after the last one ended); waiting for convergence")
        converge_s = None
        while time.time() - healed < 180:
            ss = [nd.status() for nd in nodes]
            if all(ss) and all(s["state"] == "active" for s in ss) and \
                    len({json.dumps(s["version_vector"], sort_keys=True) for s in ss}) == 1 and \
                    len({s["state_root"] for s in ss}) == 1:
                converge_s = time.time() - last_fault_end
                break
            time.sleep(0.1)
        problems: list[str] = []
        if converge_s is None:
            problems.append("the nodes did not converge (version vector and state root) within 180 s of healing")
        else:
            log(f"converged {converge_s:.2f} s after the last fault ended")
        # Every acknowledged write, with its value, on every node.
        missing = 0
        for nd in nodes:
            have = dump(nd)
            for k, v in log_.writes.items():
                if have.get(k) != v:
                    missing += 1
                    if missing <= 10:
                        problems.append(f"node{nd.i}: acknowledged {k}={v} reads {have.get(k)!r}")
        if missing > 10:
            problems.append(f"... {missing} acknowledged writes missing or wrong in all")
        # Counters: the acknowledged increments plus some of the indeterminate ones.
        for nd in nodes:
            st, data = nd.request("GET", "/v1/counters/chaos/total")
            value = json.loads(data)["value"] if st == 200 else None
            lo, hi = log_.counter_acked, log_.counter_acked + log_.counter_indeterminate
            if value is None or not lo <= value <= hi:
                problems.append(f"node{nd.i}: counter {value}, expected {lo}..{hi}")
        crashed = [f"node{nd.i} exited on its own ({nd.unexpected_exits})" for nd in nodes if nd.unexpected_exits]
        for nd in nodes:
            text = (args.dir / f"node{nd.i}.log").read_text(errors="replace")
            if "panicked" in text:
                crashed.append(f"node{nd.i} panicked (see {args.dir}/node{nd.i}.log)")
        problems += crashed + log_.stale_reads
        leases = lease_violations(log_.grants)
        if args.strict_leases:
            problems += leases
        summary = dict(
            seed=args.seed, duration_s=args.duration, faults=counts, converge_s=converge_s,
            acknowledged=dict(writes=len(log_.writes), counter_increments=log_.counter_acked,
                              lease_grants=len(log_.grants)),
            indeterminate=dict(writes=log_.writes_indeterminate, counter_increments=log_.counter_indeterminate,
                               leases=log_.lease_indeterminate),
            lease_refused=log_.lease_refused, lease_no_quorum=log_.lease_no_quorum,
            stale_reads_checked=log_.reads_checked,
            lease_violations=len(leases), lease_violation_examples=leases[:10], problems=problems)
        print(json.dumps(summary, indent=2))
        if args.out:
            args.out.write_text(json.dumps(summary, indent=2) + "\n")
        if leases and not args.strict_leases:
            log(f"{len(leases)} lease violations (not counted as failures: --no-strict-leases)")
        log("PASS" if not problems else f"FAIL: {len(problems)} problems")
        return 1 if problems else 0
    finally:
        stop.set()
        for nd in nodes:
            nd.signal(signal.SIGCONT)
            if nd.alive():
                nd.proc.terminate()
                try:
                    nd.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    nd.kill9()
        net.down()


if __name__ == "__main__":
    sys.exit(main())
