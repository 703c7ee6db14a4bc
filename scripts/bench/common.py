"""Shared helpers of the side-by-side benchmark: processes, HTTP and RESP clients, statistics.

Python standard library only. Every process started here is recorded (pid and a pid file under the
temporary directory) and stopped by its pid on exit; nothing is ever stopped by name.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

now = time.perf_counter


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


class Procs:
    """The processes this benchmark started, stopped by pid (never by name)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.pid_dir = tmp / "pids"
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.live: dict[int, tuple[subprocess.Popen, str]] = {}
        self.stopped_by_us: set[int] = set()

    def spawn(self, name: str, argv: list[str], log_path: Path, stdout_path: Path | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        err = open(log_path, "ab")
        out = open(stdout_path, "ab") if stdout_path else subprocess.DEVNULL
        p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
                             cwd=cwd)
        err.close()
        if stdout_path:
            out.close()
        self.live[p.pid] = (p, name)
        (self.pid_dir / f"{p.pid}.pid").write_text(f"{p.pid} {name}\n")
        return p

    def sigstop(self, p: subprocess.Popen) -> None:
        os.kill(p.pid, signal.SIGSTOP)
        self.stopped_by_us.add(p.pid)

    def sigcont(self, p: subprocess.Popen) -> None:
        os.kill(p.pid, signal.SIGCONT)
        self.stopped_by_us.discard(p.pid)

    def stop(self, p: subprocess.Popen, timeout: float = 15.0) -> None:
        if p.pid not in self.live:
            return
        if p.poll() is None:
            try:
                if p.pid in self.stopped_by_us:
                    os.kill(p.pid, signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"pid {p.pid} ({self.live[p.pid][1]}) did not stop in {timeout:.0f} s; killing it")
                p.kill()
                p.wait()
            except ProcessLookupError:
                pass
        self.stopped_by_us.discard(p.pid)
        del self.live[p.pid]
        try:
            (self.pid_dir / f"{p.pid}.pid").unlink()
        except FileNotFoundError:
            pass

    def stop_all(self) -> None:
        for p, _ in list(self.live.values()):
            self.stop(p)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def wait_until(pred, timeout: float, what: str, interval: float = 0.01, proc: subprocess.Popen | None = None):
    deadline = now() + timeout
    while True:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process {proc.pid} exited with {proc.returncode}")
        if now() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- values


def values_100(rng: random.Random, n: int) -> list[str]:
    """n printable values of exactly 100 bytes (base64 of random bytes: not compressible to nothing)."""
    raw = base64.b64encode(rng.randbytes(75 * n)).decode()
    return [raw[i * 100 : (i + 1) * 100] for i in range(n)]


# ---------------------------------------------------------------- HTTP (peersync)


class Http:
    """A keep-alive HTTP/1.1 connection to one node, reconnecting on errors."""

    def __init__(self, port: int, timeout: float = 600.0):
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                self.conn.request(method, path, body=body, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                return r.status, data
            except (ConnectionError, http.client.HTTPException, socket.timeout, OSError):
                self.close()
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: bytes | None = None, ok=(200,)) -> dict:
        status, data = self.request(method, path, body)
        if status not in ok:
            raise RuntimeError(f"{method} :{self.port}{path} -> {status} {data[:300]!r}")
        return json.loads(data)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def try_status(h: Http) -> dict | None:
    try:
        status, data = h.request("GET", "/v1/status")
        return json.loads(data) if status == 200 else None
    except OSError:
        return None


def metric(h: Http, name: str) -> float | None:
    try:
        status, data = h.request("GET", "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    for line in data.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


# ---------------------------------------------------------------- RESP (Redis)


def resp_command(args) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def resp_head(line: bytes):
    """Parses a reply's first line: ("value", v) for a complete reply, or ("bulk", n) / ("array", n)
    when n bytes or n replies follow (n < 0: a null reply)."""
    if not line:
        raise ConnectionError("redis closed the connection")
    t, rest = line[:1], line[1:-2]
    if t == b"+":
        return "value", rest.decode()
    if t == b"-":
        raise RedisError(rest.decode())
    if t == b":":
        return "value", int(rest)
    if t == b"$":
        return "bulk", int(rest)
    if t == b"*":
        return "array", int(rest)
    raise RuntimeError(f"bad RESP line {line!r}")


# ---------------------------------------------------------------- RESP (Redis), synchronous


class Resp:
    def __init__(self, port: int, timeout: float = 600.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.f = self.sock.makefile("rb")

    def cmd(self, *args):
        self.sock.sendall(resp_command(args))
        return self.read()

    def read(self):
        kind, value = resp_head(self.f.readline())
        if kind == "bulk":
            return None if value < 0 else self.f.read(value + 2)[:-2]
        if kind == "array":
            return None if value < 0 else [self.read() for _ in range(value)]
        return value

    def info(self, section: str = "replication") -> dict[str, str]:
        text = self.cmd("INFO", section).decode()
        out = {}
        for line in text.splitlines():
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                out[k] = v
        return out

    def close(self) -> None:
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass


class RedisError(Exception):
    pass


def try_resp(port: int) -> Resp | None:
    try:
        r = Resp(port, timeout=5)
        r.cmd("PING")
        return r
    except (OSError, RedisError):
        return None


# ---------------------------------------------------------------- asyncio clients (latency workload)


class AHttp:
    """Minimal asyncio HTTP/1.1 keep-alive client (responses carry Content-Length, or are streamed chunked)."""

    def __init__(self, port: int):
        self.port = port
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def open(self) -> "AHttp":
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    def send(self, method: str, path: str, body: bytes = b"") -> None:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
        self.w.write(head.encode() + body)

    async def response(self) -> tuple[int, bytes]:
        head = await self.r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = None
        for line in lines[1:]:
            if line.lower().startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        if length is None:
            raise RuntimeError(f"response without Content-Length: {head!r}")
        body = await self.r.readexactly(length) if length else b""
        return status, body

    async def stream_head(self) -> int:
        """Reads the head of a chunked (streamed) response; returns its status."""
        head = await self.r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        if not any(ln.lower().replace(" ", "") == "transfer-encoding:chunked" for ln in lines[1:]):
            raise RuntimeError(f"not a chunked response: {head!r}")
        return int(lines[0].split(" ", 2)[1])

    async def chunk(self) -> bytes:
        """The next chunk of a chunked response; b"" once it ends."""
        size = int((await self.r.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
        data = await self.r.readexactly(size + 2)
        return data[:-2]

    async def close(self) -> None:
        if self.w is not None:
            self.w.close()
            try:
                await self.w.wait_closed()
            except OSError:
                pass


class AResp:
    def __init__(self, port: int):
        self.port = port

    async def open(self) -> "AResp":
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    def send(self, *args) -> None:
        self.w.write(resp_command(args))

    async def read(self):
        kind, value = resp_head(await self.r.readline())
        if kind == "bulk":
            return None if value < 0 else (await self.r.readexactly(value + 2))[:-2]
        if kind == "array":
            return None if value < 0 else [await self.read() for _ in range(value)]
        return value

    async def close(self) -> None:
        self.w.close()
        try:
            await self.w.wait_closed()
        except OSError:
            pass


# ---------------------------------------------------------------- statistics


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    # nearest rank
    k = max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))
    return s[k]


def stat_cpu_seconds(stat: str) -> float:
    """User + system CPU time in a /proc `stat` line (of a process or of one of its threads)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/PID/stat)."""
    return stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())


def writer_seconds(pid: int) -> float | None:
    """CPU time (user + system) so far of a peersync node's writer thread, the one thread that
    applies and commits every op (and so the ceiling of a node's apply rate); None for a process
    without one."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        if stat.split("(", 1)[1].rsplit(")", 1)[0] == "peersync-writer":
            return stat_cpu_seconds(stat)
    return None
