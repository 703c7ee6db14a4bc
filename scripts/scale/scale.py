"""Measurements of scripts/scale.sh over nodes it already started (Python standard library only).

scale.sh starts the nodes and stops them by pid; this script only talks to them (HTTP on 127.0.0.1)
and reads /proc. It never starts or signals a process. Phases: all-active, idle window, writes,
convergence, "at capacity" log lines; then one summary line on stdout (and JSON to $SCALE_JSON).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import json
import os
import re
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
DIGEST_METRIC = "peersync_sync_requests_received_total"
PEERS_METRIC = "peersync_connected_peers"


def env_float(name: str, default: float) -> float:
    v = os.environ.get(name, "")
    return float(v) if v.strip() else default


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "")
    return int(v) if v.strip() else default


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def out(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Node:
    i: int
    pid: int
    api: int
    p2p: int
    peer: str
    log: str
    first_active: float | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- HTTP


def request(node: Node, method: str, path: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", node.api, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"} if body else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def status(node: Node, timeout: float = 10.0) -> dict | None:
    try:
        code, data = request(node, "GET", "/v1/status", timeout=timeout)
        if code != 200:
            return None
        return json.loads(data)
    except (OSError, http.client.HTTPException, ValueError):
        return None


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metrics(node: Node, timeout: float = 10.0) -> dict[tuple[str, frozenset], float] | None:
    """The node's Prometheus text as {(name, labels): value}; None when it does not answer."""
    try:
        code, data = request(node, "GET", "/metrics", timeout=timeout)
    except (OSError, http.client.HTTPException):
        return None
    if code != 200:
        return None
    res: dict[tuple[str, frozenset], float] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        if not line or line.startswith("#"):
            continue
        m = METRIC_LINE.match(line)
        if not m:
            continue
        labels = frozenset(LABEL.findall(m.group(3) or ""))
        try:
            res[(m.group(1), labels)] = float(m.group(4))
        except ValueError:
            pass
    return res


def metric(ms: dict | None, name: str, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include `labels`; None when there is none."""
    if ms is None:
        return None
    want = set(labels.items())
    vals = [v for (n, ls), v in ms.items() if n == name and want <= ls]
    return sum(vals) if vals else None


def on_all(nodes: list[Node], fn, workers: int = 16):
    """fn(node) for every node, in parallel; results in node order."""
    with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(nodes)))) as ex:
        return list(ex.map(fn, nodes))


# ---------------------------------------------------------------- /proc


def alive(node: Node) -> bool:
    try:
        with open(f"/proc/{node.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cpu_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    total = sum(v[:8])
    return total - idle, total


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def tcp_table() -> dict[int, tuple[int, int, str]]:
    """Socket inode -> (local port, remote port, state hex) of every IPv4/IPv6 TCP socket."""
    res = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    p = line.split()
                    lport = int(p[1].rsplit(":", 1)[1], 16)
                    rport = int(p[2].rsplit(":", 1)[1], 16)
                    res[int(p[9])] = (lport, rport, p[3])
        except OSError:
            pass
    return res


def p2p_connections(node: Node, table: dict[int, tuple[int, int, str]]) -> int | None:
    """Established TCP connections held by the node's process, less those of its HTTP API."""
    try:
        fds = os.listdir(f"/proc/{node.pid}/fd")
    except OSError:
        return None
    count = 0
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{node.pid}/fd/{fd}")
        except OSError:
            continue
        if not target.startswith("socket:["):
            continue
        ent = table.get(int(target[8:-1]))
        if ent and ent[2] == "01" and ent[0] != node.api:
            count += 1
    return count


# ---------------------------------------------------------------- statistics


def mmm(vals: list[float | None]) -> dict | None:
    xs = [v for v in vals if v is not None]
    if not xs:
        return None
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "nodes": len(xs)}


def fmt_mmm(s: dict | None, unit: str = "", digits: int = 1, of: str = "nodes") -> str:
    if s is None:
        return "n/a"
    f = f"{{:.{digits}f}}"
    return f"min {f.format(s['min'])}{unit} / median {f.format(s['median'])}{unit} / max {f.format(s['max'])}{unit}" + (
        f" ({s['nodes']} {of})" if of else ""
    )


def vv_covers(vv: dict, want: dict[str, int]) -> bool:
    return all(vv.get(o, 0) >= s for o, s in want.items())


# ---------------------------------------------------------------- phases


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", required=True)
    ap.add_argument("--t-start", type=float, required=True, help="epoch seconds before the first node started")
    ap.add_argument("--t-started", type=float, required=True, help="epoch seconds after the last node's API answered")
    ap.add_argument("--tmp", required=True)
    a = ap.parse_args()

    nodes = []
    with open(a.nodes) as f:
        for line in f:
            i, pid, api, p2p, peer, logp = line.rstrip("\n").split("\t")
            nodes.append(Node(int(i), int(pid), int(api), int(p2p), peer, logp))
    n = len(nodes)
    poll = env_float("SCALE_POLL_SECS", 0.2)
    active_secs = env_float("SCALE_ACTIVE_SECS", 120)
    idle_secs = env_float("SCALE_IDLE_SECS", 20)
    settle_secs = env_float("SCALE_SETTLE_SECS", 0)
    writes = env_int("SCALE_WRITES", 200)
    write_conc = env_int("SCALE_WRITE_CONCURRENCY", 4)
    converge_secs = env_float("SCALE_CONVERGE_SECS", 60)
    commit = os.environ.get("SCALE_COMMIT", "unknown")

    # Wall clock (epoch) only to relate to the shell's start times; intervals use time.time() too so
    # that they share the shell's clock.
    now = time.time
    res: dict = {"n": n, "commit": commit, "settings": {
        "idle_secs": idle_secs, "settle_secs": settle_secs, "writes": writes, "write_concurrency": write_conc,
        "active_secs": active_secs, "converge_secs": converge_secs, "poll_secs": poll,
        "api_ports": [nd.api for nd in nodes], "p2p_ports": [nd.p2p for nd in nodes]}}
    res["start_secs"] = a.t_started - a.t_start
    failures: list[str] = []
    summary: dict[str, str] = {"n": str(n)}

    died = False  # a node exited: nothing more to measure

    def dead_nodes() -> list[int]:
        return [nd.i for nd in nodes if not alive(nd)]

    # ---- phase 1: all active
    out(f"== phase 1: start {n} nodes, wait for all active (deadline {active_secs:.0f} s)")
    out(f"   started {n} nodes in {res['start_secs']:.1f} s (each waited for until its API answered)")
    deadline = a.t_started + active_secs
    pending = list(nodes)
    first_round = None
    while pending and now() < deadline:
        sts = on_all(pending, lambda nd: status(nd, timeout=5))
        t = now()
        if first_round is None:
            first_round = t
        for nd, st in zip(pending, sts):
            if st and st.get("state") == "active":
                nd.first_active = t
        pending = [nd for nd in pending if nd.first_active is None]
        dead = dead_nodes()
        if dead:
            failures.append(f"node(s) {dead} exited")
            died = True
            break
        if pending:
            time.sleep(poll)
    if pending or failures:
        if not failures:
            failures.append(f"{len(pending)} of {n} nodes not active after {active_secs:.0f} s")
        states = on_all(pending, lambda nd: status(nd, timeout=5))
        phases: dict[str, int] = {}
        for st in states:
            ph = (st or {}).get("sync", {}).get("phase", "no answer") if st else "no answer"
            phases[str(ph)] = phases.get(str(ph), 0) + 1
        out(f"   FAIL: {failures[-1]}; phases of those not active: {phases}")
        res["active"] = {"ok": False, "not_active": [nd.i for nd in pending], "phases": phases}
        summary["active_in"] = f"FAIL({n - len(pending)}/{n})"
    else:
        t_all = max(nd.first_active for nd in nodes)
        per = [nd.first_active - a.t_start for nd in nodes]
        at_first = t_all == first_round
        res["active"] = {"ok": True, "all_active_secs": t_all - a.t_start, "after_last_start_secs": t_all - a.t_started,
                         "first_poll_secs": first_round - a.t_start, "all_at_first_poll": at_first,
                         "per_node_first_seen_secs": per}
        out(f"   all {n} active {t_all - a.t_start:.1f} s after the first start "
            f"({t_all - a.t_started:.1f} s after the last node started; per node, first seen active: {fmt_mmm(mmm(per), ' s')})")
        if at_first:
            out("   (all were active at the first poll, made once every node had started: an upper bound)")
        summary["active_in"] = f"{t_all - a.t_start:.1f}s"

    if not res["active"]["ok"] and not died:
        out("   (measuring the next phases anyway)")
    if not died:
        # ---- phase 2: idle window
        if settle_secs > 0:
            out(f"== settle {settle_secs:.0f} s")
            time.sleep(settle_secs)
        out(f"== phase 2: idle window {idle_secs:.0f} s")
        t0 = now()
        host0 = host_cpu()
        ticks0 = [cpu_ticks(nd.pid) for nd in nodes]
        m0 = on_all(nodes, metrics)
        tm0 = now()
        time.sleep(max(0.0, idle_secs - (tm0 - t0)))  # the measurement window itself, not a wait for a condition
        tm1 = now()
        m1 = on_all(nodes, metrics)
        ticks1 = [cpu_ticks(nd.pid) for nd in nodes]
        host1 = host_cpu()
        t1 = now()
        table = tcp_table()
        conns = [p2p_connections(nd, table) for nd in nodes]
        rss = [rss_mib(nd.pid) for nd in nodes]
        sts = on_all(nodes, lambda nd: status(nd, timeout=10))
        peers_conn = [sum(1 for p in st.get("peers", []) if p.get("connected")) if st else None for st in sts]
        peers_known = [len(st.get("peers", [])) if st else None for st in sts]
        cpu = [None if (x is None or y is None) else (y - x) / CLK_TCK / (t1 - t0) * 100 for x, y in zip(ticks0, ticks1)]
        win = tm1 - tm0

        def rate(name: str, **labels: str) -> list[float | None]:
            r = []
            for x, y in zip(m0, m1):
                vx, vy = metric(x, name, **labels), metric(y, name, **labels)
                r.append(None if vx is None or vy is None else (vy - vx) / win)
            return r

        digests = rate(DIGEST_METRIC, kind="digest")
        sync_req_all = rate(DIGEST_METRIC)
        rounds = rate("peersync_sync_rounds_total")
        peers_metric = [metric(y, PEERS_METRIC) for y in m1]
        idle = {
            "window_secs": t1 - t0,
            "cpu_pct": mmm(cpu), "rss_mib": mmm(rss), "tcp_conns": mmm(conns),
            "peers_connected": mmm(peers_conn), "peers_known": mmm(peers_known),
            "peers_metric": mmm(peers_metric),
            "digests_per_s": mmm(digests), "sync_requests_per_s": mmm(sync_req_all),
            "sync_rounds_per_s": mmm(rounds),
            "cpu_pct_total": sum(c for c in cpu if c is not None),
            # Whole machine during the window, % of one core (nodes, this script and anything else).
            "host_busy_pct": (host1[0] - host0[0]) / CLK_TCK / (t1 - t0) * 100,
            "cores": os.cpu_count(),
            "per_node": {"cpu_pct": cpu, "rss_mib": rss, "tcp_conns": conns, "peers_connected": peers_conn,
                         "digests_per_s": digests, "sync_rounds_per_s": rounds},
        }
        res["idle"] = idle
        out(f"   cpu (% of one core)   {fmt_mmm(idle['cpu_pct'], '%', 2)}; all nodes together {idle['cpu_pct_total']:.1f}%; "
            f"whole machine {idle['host_busy_pct']:.0f}% of {idle['cores']} cores x 100%")
        out(f"   rss                   {fmt_mmm(idle['rss_mib'], ' MiB')}")
        out(f"   tcp conns (p2p)       {fmt_mmm(idle['tcp_conns'], '', 0)}")
        out(f"   peers connected       {fmt_mmm(idle['peers_connected'], '', 0)} (status; known {fmt_mmm(idle['peers_known'], '', 0)})")
        if idle["peers_metric"] is not None:
            out(f"   {PEERS_METRIC} {fmt_mmm(idle['peers_metric'], '', 0)}")
        out(f"   digests received /s   {fmt_mmm(idle['digests_per_s'], '', 2)}"
            + ("" if idle["digests_per_s"] else f" ({DIGEST_METRIC}{{kind=\"digest\"}} not exported)"))
        if idle["sync_requests_per_s"] is not None:
            out(f"   sync requests /s      {fmt_mmm(idle['sync_requests_per_s'], '', 2)} (all kinds)")
        out(f"   sync rounds /s        {fmt_mmm(idle['sync_rounds_per_s'], '', 2)} (peersync_sync_rounds_total)")
        summary["idle_cpu_median"] = f"{idle['cpu_pct']['median']:.2f}%" if idle["cpu_pct"] else "n/a"
        summary["rss_median"] = f"{idle['rss_mib']['median']:.1f}MiB" if idle["rss_mib"] else "n/a"
        summary["conns_median"] = f"{idle['tcp_conns']['median']:g}" if idle["tcp_conns"] else "n/a"
        summary["digests_per_s_median"] = f"{idle['digests_per_s']['median']:.2f}" if idle["digests_per_s"] else "n/a"
        dead = dead_nodes()
        if dead:
            failures.append(f"node(s) {dead} exited during the idle window")
            died = True

    if not died:
        # ---- phase 3: writes
        out(f"== phase 3: {writes} single writes, round robin over {n} nodes ({write_conc} in flight)")
        want: dict[str, int] = {}
        lat: list[float] = []
        errors: list[str] = []

        def write(k: int):
            nd = nodes[k % n]
            body = f"v{k}".encode()
            t_send = now()
            stop = t_send + 30
            last = ""
            while True:
                try:
                    code, data = request(nd, "PUT", f"/v1/registers/scale/k{k}", body=body, timeout=30)
                    if code == 200:
                        r = json.loads(data)
                        return (r["origin"], int(r["seq"]), t_send, now(), None)
                    last = f"HTTP {code} {data[:200]!r}"
                    if code < 500:
                        break
                except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                    last = repr(e)
                if now() >= stop:
                    break
                time.sleep(poll)
            return (None, None, t_send, now(), f"k{k} on node{nd.i}: {last}")

        t_w0 = now()
        busy_ticks0 = [cpu_ticks(nd.pid) for nd in nodes]
        with cf.ThreadPoolExecutor(max_workers=max(1, write_conc)) as ex:
            results = list(ex.map(write, range(writes)))
        acked = [r[3] for r in results if r[4] is None]
        t_last_ack = max(acked) if acked else now()
        for origin, seq, ts, ta, err in results:
            if err:
                errors.append(err)
                continue
            want[origin] = max(want.get(origin, 0), seq)
            lat.append((ta - ts) * 1000)
        res["writes"] = {"ok": len(lat), "failed": len(errors), "errors": errors[:20],
                         "secs": t_last_ack - t_w0, "latency_ms": mmm(lat), "origins": len(want)}
        out(f"   {len(lat)} acknowledged, {len(errors)} failed, in {t_last_ack - t_w0:.2f} s; "
            f"ack latency {fmt_mmm(mmm(lat), ' ms', of='')}")
        for e in errors[:5]:
            out(f"   failed: {e}")
        if errors:
            failures.append(f"{len(errors)} writes failed")

        # ---- phase 4: convergence
        out(f"== phase 4: convergence (deadline {converge_secs:.0f} s after the last ack)")
        deadline = t_last_ack + converge_secs
        rounds_n = 0
        converged_at = None
        last_sts: list[dict | None] = []
        while True:
            tr0 = now()
            last_sts = on_all(nodes, lambda nd: status(nd, timeout=10))
            tr1 = now()
            rounds_n += 1
            roots = {st["state_root"] for st in last_sts if st}
            vvs = {json.dumps(st["version_vector"], sort_keys=True) for st in last_sts if st}
            if (all(last_sts) and len(roots) == 1 and len(vvs) == 1
                    and vv_covers(last_sts[0]["version_vector"], want)):
                converged_at = (tr0, tr1)
                break
            if tr1 >= deadline:
                break
            dead = dead_nodes()
            if dead:
                failures.append(f"node(s) {dead} exited during convergence")
                break
            time.sleep(poll)
        busy_ticks1 = [cpu_ticks(nd.pid) for nd in nodes]
        t_b1 = now()
        busy = [None if (x is None or y is None) else (y - x) / CLK_TCK / (t_b1 - t_w0) * 100
                for x, y in zip(busy_ticks0, busy_ticks1)]
        res["busy"] = {"secs": t_b1 - t_w0, "cpu_pct": mmm(busy), "cpu_pct_total": sum(b for b in busy if b is not None),
                       "per_node_cpu_pct": busy}
        if converged_at:
            after = converged_at[1] - t_last_ack
            res["converge"] = {"ok": True, "after_last_write_secs": after, "round_secs": converged_at[1] - converged_at[0],
                               "rounds": rounds_n}
            out(f"   converged {after:.2f} s after the last write's ack (the deciding poll round took "
                f"{converged_at[1] - converged_at[0]:.2f} s; {rounds_n} rounds)")
            summary["converge_after_last_write"] = f"{after:.2f}s"
        else:
            ok_sts = [st for st in last_sts if st]
            root_counts: dict[str, int] = {}
            for st in ok_sts:
                root_counts[st["state_root"]] = root_counts.get(st["state_root"], 0) + 1
            vvs = {json.dumps(st["version_vector"], sort_keys=True) for st in ok_sts}
            missing = [sum(max(0, s - st["version_vector"].get(o, 0)) for o, s in want.items()) for st in ok_sts]
            lacking = sum(1 for m in missing if m > 0)
            phases: dict[str, int] = {}
            for st in ok_sts:
                ph = str(st.get("sync", {}).get("phase", "?"))
                phases[ph] = phases.get(ph, 0) + 1
            res["converge"] = {"ok": False, "distinct_roots": len(root_counts), "root_sizes": sorted(root_counts.values(), reverse=True),
                               "distinct_vvs": len(vvs), "not_answering": n - len(ok_sts),
                               "nodes_missing_writes": lacking, "missing_writes": mmm(missing), "phases": phases}
            out(f"   FAIL: not converged {converge_secs:.0f} s after the last write: {len(root_counts)} distinct state roots "
                f"(nodes per root {sorted(root_counts.values(), reverse=True)}), {len(vvs)} distinct version vectors, "
                f"{lacking} nodes missing some of the writes (missing per node {fmt_mmm(mmm(missing), '', 0)}), "
                f"{n - len(ok_sts)} not answering; phases {phases}")
            silent = f",no_answer={n - len(ok_sts)}" if len(ok_sts) < n else ""
            summary["converge_after_last_write"] = f"FAIL(>{converge_secs:.0f}s,distinct_roots={len(root_counts)}{silent})"
            failures.append("not converged")

        out(f"   node cpu from the first write to the end of this phase ({t_b1 - t_w0:.1f} s): "
            f"{fmt_mmm(res['busy']['cpu_pct'], '%')}; all nodes together {res['busy']['cpu_pct_total']:.0f}%")

    # ---- phase 5: dropped streams (always)
    out("== phase 5: 'at capacity' in the node logs")
    per_node_drops = []
    by_target: dict[str, int] = {}
    for nd in nodes:
        c = 0
        try:
            with open(nd.log, errors="replace") as f:
                for line in f:
                    if "at capacity" in line:
                        c += 1
                        m = re.search(r"(\S+::\S+):", line)
                        tgt = m.group(1) if m else "?"
                        by_target[tgt] = by_target.get(tgt, 0) + 1
        except OSError:
            pass
        per_node_drops.append(c)
    total_drops = sum(per_node_drops)
    res["dropped_streams"] = {"total": total_drops, "nodes_with_any": sum(1 for c in per_node_drops if c),
                              "by_target": by_target, "per_node": per_node_drops}
    out(f"   {total_drops} lines on {res['dropped_streams']['nodes_with_any']} of {n} nodes"
        + (f"; by target {by_target}" if by_target else ""))
    summary["dropped_streams"] = str(total_drops)

    summary["result"] = "FAIL" if failures else "PASS"
    order = ["n", "active_in", "converge_after_last_write", "idle_cpu_median", "rss_median", "conns_median",
             "digests_per_s_median", "dropped_streams", "result"]
    line = " ".join(f"{k}={summary.get(k, 'n/a')}" for k in order) + f" commit={commit}"
    res["summary"] = line
    res["summary_fields"] = summary
    res["failures"] = failures
    out("== summary")
    if failures:
        out(f"   failures: {'; '.join(failures)}")
    out(line)
    jpath = os.environ.get("SCALE_JSON", "")
    if jpath:
        with open(jpath, "w") as f:
            json.dump(res, f, indent=1)
        log(f"wrote {jpath}")
    return 1 if failures else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
