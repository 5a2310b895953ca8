"""``aem bench idle``: the article's Figure 6 — response time as idle connections pile up.

100 active keep-alive connections (wrk, ``GET /hello``) while a helper process
holds 0, 1k, 5k, 10k and 20k idle open connections to the same server
(``--quick``: 0 and 500).  For each server and level: wrk's p50 and p99
latency, the request rate and the server's CPU time per request (utime+stime
of its process over the round ÷ requests: less at the mercy of other jobs on
a shared machine than a p99).  The plot shows response time against the
number of open connections, as in the article.

Servers: aem (AEMhttpd), a ``select()`` server and a ``poll()`` server (pure
Python loops over the whole descriptor set, written here, parsing with
httptools like the others), asyncio and uvloop (``asyncio.Protocol`` +
httptools, from :mod:`aem.bench.http`), nginx (one worker, epoll), and the raw
floor: the minimal C epoll server of :mod:`aem.bench.http` (one ``recv`` and one
``send`` per read, nothing else) — what the kernel and the client cost at each
level, measured in the same run.
``select()`` cannot watch a descriptor numbered ``FD_SETSIZE`` (1024) or
more: its levels past ~1000 connections are marked as not reachable.

Every server runs on CPU 0 with idle timeouts longer than the run; wrk and the
helper run on CPU 1.  ``RLIMIT_NOFILE`` is raised for the servers and the
helper (as root, past the hard limit; otherwise levels that need more
descriptors than allowed are marked as not reachable).
"""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._harness import Context, pin_to_cpu
from .http import (
    CLIENT_CPU,
    HELLO,
    HELLO_PATH,
    Server,
    _pythonpath,
    finite_median,
    have_wrk,
    make_root,
    make_servers,
    run_wrk,
    start_servers,
)

LEVELS = (0, 1000, 5000, 10000, 20000)
QUICK_LEVELS = (0, 500)
ACTIVE = 100
KINDS = ("aem", "select", "poll", "asyncio", "uvloop", "nginx", "floor")
FD_SETSIZE = 1024
IDLE_TIMEOUT = 3600.0


# -- the select() and poll() servers ------------------------------------------------------------

def _loop_server(kind: str, port: int) -> None:
    """A single-threaded server on ``select.select`` or ``select.poll`` (hello only)."""
    from email.utils import formatdate

    import httptools

    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(65535)
    ls.setblocking(False)
    conns: dict[int, Any] = {}
    date = [0, b""]

    class Conn:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock
            self.out: list[bytes] = []
            self.keep = True
            self.parser = httptools.HttpRequestParser(self)

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_header(self, name: bytes, value: bytes) -> None:
            pass

        def on_message_complete(self) -> None:
            now = int(time.time())
            if now != date[0]:
                date[0] = now
                date[1] = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
            keep = self.parser.should_keep_alive()
            self.out.append(b"HTTP/1.1 200 OK\r\nServer: bench\r\n%sContent-Type: text/plain; "
                            b"charset=utf-8\r\nContent-Length: %d\r\n%s\r\n%s" % (
                                date[1], len(HELLO), b"" if keep else b"Connection: close\r\n",
                                HELLO))
            self.keep = self.keep and keep

    poller = select.poll() if kind == "poll" else None
    if poller is not None:
        poller.register(ls.fileno(), select.POLLIN)

    def close(fd: int) -> None:
        c = conns.pop(fd)
        if poller is not None:
            poller.unregister(fd)
        c.sock.close()

    def on_readable(fd: int) -> None:
        if fd == ls.fileno():
            for _ in range(64):
                try:
                    s, _ = ls.accept()
                except BlockingIOError:
                    return
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE):
                        return
                    raise
                if kind == "select" and s.fileno() >= FD_SETSIZE:
                    s.close()  # select() cannot watch it
                    continue
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[s.fileno()] = Conn(s)
                if poller is not None:
                    poller.register(s.fileno(), select.POLLIN)
            return
        c = conns.get(fd)
        if c is None:
            return
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            close(fd)
            return
        try:
            c.parser.feed_data(data)
        except httptools.HttpParserError:
            close(fd)
            return
        if c.out:
            try:
                c.sock.sendall(b"".join(c.out))
            except OSError:
                close(fd)
                return
            c.out.clear()
            if not c.keep:
                close(fd)

    while True:
        if poller is not None:
            ready = [fd for fd, _ in poller.poll()]
        else:
            ready, _, _ = select.select([ls.fileno(), *conns], [], [])
        for fd in ready:
            on_readable(fd)


# -- holding idle connections ---------------------------------------------------------------------

def _raise_limit(n: int) -> int:
    """Raise RLIMIT_NOFILE to at least ``n`` if allowed; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, n)
    for new in ((want, max(hard, want)), (min(want, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, new)
            return new[0]
        except (ValueError, OSError):
            continue
    return soft


def _hold(port: int) -> None:
    """The helper: reads target counts on stdin, keeps that many idle connections open."""
    pin_to_cpu(CLIENT_CPU)
    _raise_limit(1 << 17)
    held: list[socket.socket] = []
    for line in sys.stdin:
        want = int(line)
        while len(held) > want:
            s = held.pop()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # a reset: no TIME_WAIT left behind
        error = ""
        pending: list[socket.socket] = []
        while len(held) + len(pending) < want and not error:
            try:
                s = socket.socket()
            except OSError as e:
                error = e.strerror or str(e)
                break
            s.setblocking(False)
            try:
                s.connect_ex(("127.0.0.1", port))
            except OSError as e:
                s.close()
                error = e.strerror or str(e)
                break
            pending.append(s)
            if len(pending) >= 256:
                error = _settle(pending, held)
        if pending and not error:
            error = _settle(pending, held)
        print(f"{len(held)} {error}".strip(), flush=True)


def _settle(pending: list[socket.socket], held: list[socket.socket]) -> str:
    """Wait for the pending connects to complete; move them to ``held``."""
    poller = select.poll()
    by_fd = {s.fileno(): s for s in pending}
    for fd in by_fd:
        poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + 10
    error = ""
    while by_fd and time.monotonic() < deadline:
        for fd, _ in poller.poll(500):
            sock = by_fd.pop(fd)
            poller.unregister(fd)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                sock.close()
                error = os.strerror(err)
            else:
                held.append(sock)
    for sock in by_fd.values():
        sock.close()
    pending.clear()
    return error


PER_HELPER = 9000  # idle connections per helper process (each has its own RLIMIT_NOFILE)


class _Holders:
    """Helper processes that together hold ``n`` idle connections to one port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.helpers: list[_Holder] = []

    def hold(self, n: int) -> tuple[int, str]:
        need = -(-n // PER_HELPER)
        while len(self.helpers) < need:
            self.helpers.append(_Holder(self.port))
        total, errors = 0, []
        for i, h in enumerate(self.helpers):
            share = min(PER_HELPER, max(0, n - i * PER_HELPER))
            got, err = h.hold(share)
            total += got
            if err:
                errors.append(err)
        return total, "; ".join(errors)

    def stop(self) -> None:
        for h in self.helpers:
            h.hold(0)
            h.stop()


class _Holder:
    def __init__(self, port: int) -> None:
        env = dict(os.environ, PYTHONPATH=_pythonpath())
        self.proc = subprocess.Popen([sys.executable, "-m", "aem.bench.idle", "hold", str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)

    def hold(self, n: int) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().split(" ", 1)
        return int(reply[0] or 0), reply[1].strip() if len(reply) > 1 else ""

    def stop(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def _open_fds(server: Server) -> int:
    n = 0
    for pid in server.pids():
        try:
            n += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return n


def _wait_accepted(server: Server, base_fds: int, n: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _open_fds(server) >= base_fds + n * 0.98:
            return True
        time.sleep(0.1)
    return False


# -- the suite -------------------------------------------------------------------------------

def run(ctx: Context) -> None:
    """The ``idle`` suite (see the module doc)."""
    if not have_wrk():
        ctx.note("wrk is not installed (scripts/install-system-deps.sh): idle suite skipped")
        return
    wanted = QUICK_LEVELS if ctx.quick else LEVELS
    seconds = 1.0 if ctx.quick else 3.0
    rounds = 1 if ctx.quick else 3
    limit = _raise_limit(max(wanted) + 4096)
    room = (limit - ACTIVE - 400) // 500 * 500  # what one server process can hold here
    levels = tuple(dict.fromkeys(min(level, room) for level in wanted))
    if levels != wanted:
        ctx.note(f"RLIMIT_NOFILE is {limit} per process here (the hard limit cannot be raised): "
                 f"the top level is {levels[-1]} idle connections instead of {wanted[-1]}")
    with tempfile.TemporaryDirectory(prefix="aem-bench-idle-") as td:
        tmp = Path(td)
        root = make_root(tmp)
        servers = make_servers(tmp, root, KINDS, idle_timeout=IDLE_TIMEOUT)
        started: list[Server] = []
        try:
            started = start_servers(ctx, servers, tmp)
            _measure(ctx, started, levels, seconds, rounds)
        finally:
            for s in servers:
                s.stop()
    _summarise(ctx, levels)
    _plot(ctx, levels)


def _measure(ctx: Context, servers: list[Server], levels: Sequence[int], seconds: float,
             rounds: int) -> None:
    for level in levels:
        for s in servers:
            variant = s.name
            case = f"{level} idle"
            if s.name == "select" and level + ACTIVE >= FD_SETSIZE - 24:
                ctx.note(f"select: {level} idle + {ACTIVE} active connections exceed FD_SETSIZE "
                         f"({FD_SETSIZE}): not reachable")
                continue
            holder = _Holders(s.port)
            try:
                base = _open_fds(s)
                held, err = holder.hold(level)
                if held < level or not _wait_accepted(s, base, level):
                    ctx.note(f"{s.name}: could not hold {level} idle connections "
                             f"({held} opened{'; ' + err if err else ''}): level skipped")
                    continue
                p50, p99, rps, cpu, errors = [], [], [], [], 0
                for _ in range(rounds):
                    c0 = s.cpu_seconds()
                    res = run_wrk(s.port, HELLO_PATH, seconds, ACTIVE)
                    cpu.append((s.cpu_seconds() - c0) / max(1, res.requests) * 1e6)
                    p50.append(res.p50_us)
                    p99.append(res.p99_us)
                    rps.append(res.rps)
                    errors += res.errors
                note = f"{errors} errors" if errors else ""
                for metric, vals in (("p50 latency", p50), ("p99 latency", p99)):
                    med = finite_median(vals)
                    if med is not None:
                        ctx.record(case, variant, metric, med, "µs", "lower",
                                   [v for v in vals if v == v], note)
                ctx.record(case, variant, "req/s", statistics.median(rps), "req/s", "higher", rps)
                ctx.record(case, variant, "server CPU/req", statistics.median(cpu), "µs", "lower", cpu)
                if s.proc is not None and s.proc.poll() is not None:
                    ctx.note(f"{s.name} exited at {level} idle connections")
            finally:
                holder.stop()


def _summarise(ctx: Context, levels: Sequence[int]) -> None:
    top = max(levels)
    for variant in dict.fromkeys(r.variant for r in ctx.rows):
        def value(level: int, metric: str, variant: str = variant) -> float | None:
            vals = [r.value for r in ctx.rows if r.variant == variant and r.metric == metric
                    and r.case == f"{level} idle"]
            return vals[0] if vals else None
        first, last = value(0, "p99 latency"), value(top, "p99 latency")
        cpu0, cpu1 = value(0, "server CPU/req"), value(top, "server CPU/req")
        if first and last:
            ctx.note(f"{variant}: p99 at {top} idle = {last / first:.2f}x p99 at 0 idle"
                     + (" (target <= 1.2x)" if variant == "aem" else "")
                     + (f"; server CPU/req {cpu1 / cpu0:.2f}x" if cpu0 and cpu1 else ""))


def _plot(ctx: Context, levels: Sequence[int]) -> None:
    rows = [r for r in ctx.rows if r.metric in ("p50 latency", "p99 latency")]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    for ax, metric in zip(axes, ("p50 latency", "p99 latency"), strict=True):
        for variant in dict.fromkeys(r.variant for r in rows):
            pts = sorted((int(r.case.split()[0]) + ACTIVE, r.value / 1000.0) for r in rows
                         if r.variant == variant and r.metric == metric)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linewidth=2.5 if variant == "aem" else 1.2, label=variant)
        ax.axvline(FD_SETSIZE, color="grey", linestyle=":", linewidth=1)
        ax.text(FD_SETSIZE, ax.get_ylim()[1] * 0.95, " FD_SETSIZE", fontsize=7, color="grey",
                va="top")
        ax.set_xscale("symlog", linthresh=1000)
        ax.set_xlabel("open connections (idle + 100 active)")
        ax.set_ylabel(f"response time, {metric.split()[0]} (ms)")
        ax.set_title(f"{metric} of the active connections", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("aem bench idle — response time vs open connections (the article's Figure 6)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(ctx.plot_path("response-time"), dpi=110)
    plt.close(fig)


def main(argv: Sequence[str]) -> int:
    """``python -m aem.bench.idle serve select|poll PORT ROOT`` or ``hold PORT``."""
    if len(argv) >= 3 and argv[0] == "serve" and argv[1] in ("select", "poll"):
        _loop_server(argv[1], int(argv[2]))
        return 0
    if len(argv) == 2 and argv[0] == "hold":
        _hold(int(argv[1]))
        return 0
    print("usage: python -m aem.bench.idle serve select|poll PORT ROOT | hold PORT",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
