"""``aem bench idle``: the article's Figure 6 — response time as idle connections pile up.

100 active keep-alive connections (wrk, ``GET /hello``) while helper processes
hold 0, 1k, 5k, 10k and 20k idle open connections to the same server
(``--quick``: 0 and 500).  For each server and level: wrk's p50 and p99
latency at full rate (wrk as fast as it can: both CPUs saturated), the request
rate and the server's CPU time per request (utime+stime of its process over
the run ÷ requests: less at the mercy of other jobs on a shared machine than a
p99); then, with the same idle connections, a paced run (each connection waits
``PACE_MS`` after each response — wrk's ``delay()`` — so at most 50,000 req/s,
CPUs not saturated): its p50, p99 and rate.  The plot shows response time
against the number of open connections, as in the article.

How the runs are ordered (see :func:`_measure`): a warm-up run per server, then
rounds; each round walks the levels up, the next one down, and at each level
the servers in turn, in the other order at the next level.  Each (server,
level) gets one run of each kind per round; the tables show the median of the
rounds, the notes the same round's p99 ratio (top level ÷ 0) round by round.
Before each run the server's open descriptors must be steady (the accepts and
whatever follows them are over); during each run the suite counts the CPU time
every other process on the machine used (``/proc/stat`` less the server, wrk,
the holders and itself), runs again once when it passed ``OTHER_LOAD`` % of a
CPU, and reports it, and the holders' own CPU time (they should sleep).

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
helpers run on CPU 1.  ``RLIMIT_NOFILE`` is raised for the servers and the
helpers (as root, past the hard limit; otherwise levels that need more
descriptors than allowed are marked as not reachable).

Where the time goes in one run: ``perf record -a -e`` :data:`TRACE_EVENTS`
during it, then ``python -m aem.bench.idle trace PERF_DATA SERVER_PID``
(:func:`trace_summary`): the server's engine turns in on-CPU time, and who
preempted the server and wrk.
"""

from __future__ import annotations

import errno
import json
import os
import re
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
    proc_cpu,
    run_wrk,
    start_servers,
)

LEVELS = (0, 1000, 5000, 10000, 20000)
QUICK_LEVELS = (0, 500)
ACTIVE = 100
KINDS = ("aem", "select", "poll", "asyncio", "uvloop", "nginx", "floor")
FD_SETSIZE = 1024
IDLE_TIMEOUT = 3600.0
SETTLE = 0.3        # seconds a server's open descriptors stay unchanged before a run starts
OTHER_LOAD = 10.0   # % of a CPU other processes may take during a run before it is run again
PACE_MS = 2         # paced runs: each connection waits this long after each response (wrk's delay())
_TICK = os.sysconf("SC_CLK_TCK")


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


def _hold() -> None:
    """The helper: reads ``PORT COUNT`` lines on stdin and keeps that many idle connections
    open to that port (closing those to any other port first); answers ``HELD [ERROR]``."""
    pin_to_cpu(CLIENT_CPU)
    _raise_limit(1 << 17)
    held: list[socket.socket] = []
    port = 0
    for line in sys.stdin:
        new_port, want = (int(x) for x in line.split())
        if new_port != port:
            _drop(held, 0)
            port = new_port
        _drop(held, want)
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


def _drop(held: list[socket.socket], keep: int) -> None:
    """Close held connections until ``keep`` are left."""
    while len(held) > keep:
        s = held.pop()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # a reset: no TIME_WAIT left behind


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
    """Helper processes (on the client's CPU) that together hold ``n`` idle connections to
    one server's port; started once, reused for every server and level."""

    def __init__(self) -> None:
        self.helpers: list[_Holder] = []

    def hold(self, port: int, n: int) -> tuple[int, str]:
        """Hold ``n`` idle connections to ``port`` (and none to any other port)."""
        need = -(-n // PER_HELPER)
        while len(self.helpers) < need:
            self.helpers.append(_Holder())
        total, errors = 0, []
        for i, h in enumerate(self.helpers):
            share = min(PER_HELPER, max(0, n - i * PER_HELPER))
            got, err = h.hold(port, share)
            total += got
            if err:
                errors.append(err)
        return total, "; ".join(errors)

    def cpu_seconds(self) -> float:
        """utime+stime of the helpers so far (they should sleep while wrk runs)."""
        return sum(proc_cpu(h.proc.pid) for h in self.helpers)

    def stop(self) -> None:
        for h in self.helpers:
            h.stop()
        self.helpers.clear()


class _Holder:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=_pythonpath())
        self.proc = subprocess.Popen([sys.executable, "-m", "aem.bench.idle", "hold"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)

    def hold(self, port: int, n: int) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(f"{port} {n}\n")
            self.proc.stdin.flush()
        except OSError as e:
            return 0, f"the helper is gone ({e})"
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


def _wait_held(server: Server, base_fds: int, n: int, timeout: float = 30.0) -> bool:
    """Wait until ``server`` has (about) ``n`` connections open besides its ``base_fds`` and
    has stopped accepting or closing them (its count steady for a moment): the burst of
    accepts, and whatever the server does after it, is over before wrk starts."""
    deadline = time.monotonic() + timeout
    slack = max(16, n // 50)
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_open = _open_fds(server) - base_fds
        if now_open != last:
            last, since = now_open, time.monotonic()
        elif n - slack <= now_open <= n + slack and time.monotonic() - since >= SETTLE:
            return True
        time.sleep(0.05)
    return False


def _busy_seconds() -> float:
    """CPU time every process on the machine spent in user and system mode so far
    (``/proc/stat``; interrupt and softirq time, which no process is charged, left out)."""
    with open("/proc/stat") as f:
        v = f.readline().split()
    return (int(v[1]) + int(v[2]) + int(v[3])) / _TICK


def _own_seconds() -> float:
    """utime+stime of this process and its reaped children (wrk) so far."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _one_round(s: Server, holders: _Holders, seconds: float,
               script: Path | None = None) -> dict[str, float]:
    """One wrk run against ``s``: its figures, and what else ran on the machine meanwhile
    (``other``: % of one CPU used by processes other than the server, wrk, the holders and
    this one; ``holders_ms``: the holders' CPU time, which should be ~0)."""
    busy0, own0, srv0, hold0 = _busy_seconds(), _own_seconds(), s.cpu_seconds(), holders.cpu_seconds()
    t0 = time.monotonic()
    res = run_wrk(s.port, HELLO_PATH, seconds, ACTIVE, script)
    wall = time.monotonic() - t0
    srv, hold = s.cpu_seconds() - srv0, holders.cpu_seconds() - hold0
    other = _busy_seconds() - busy0 - (_own_seconds() - own0) - srv - hold
    return {"p50": res.p50_us, "p99": res.p99_us, "rps": res.rps,
            "cpu": srv / max(1, res.requests) * 1e6, "errors": res.errors,
            "other": max(0.0, other) / wall * 100, "holders_ms": hold * 1e3}


def _visit(s: Server, holders: _Holders, base_fds: int, level: int, seconds: float,
           paced: Path | None) -> dict[str, float] | str:
    """Hold ``level`` idle connections to ``s`` and measure one round (again, once, when other
    processes took more than OTHER_LOAD % of a CPU meanwhile: the quieter one is kept); then,
    with ``paced`` (wrk's Lua script), one paced round (``paced_*``).
    Returns the round's figures, or why the level cannot be measured."""
    held, err = holders.hold(s.port, level)
    if held < level or not _wait_held(s, base_fds, level):
        return f"{held} opened{'; ' + err if err else ''}"
    got = _one_round(s, holders, seconds)
    if got["other"] > OTHER_LOAD:
        again = _one_round(s, holders, seconds)
        got = min(got, again, key=lambda r: r["other"])
        got["retried"] = 1
    if paced is not None:
        slow = _one_round(s, holders, seconds, paced)
        got.update({f"paced_{k}": v for k, v in slow.items()})
    return got


# -- the suite -------------------------------------------------------------------------------

def run(ctx: Context) -> None:
    """The ``idle`` suite (see the module doc)."""
    if not have_wrk():
        ctx.note("wrk is not installed (scripts/install-system-deps.sh): idle suite skipped")
        return
    wanted = QUICK_LEVELS if ctx.quick else LEVELS
    seconds = 1.0 if ctx.quick else 2.0
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
        paced = tmp / "paced.lua"
        paced.write_text(f"function delay()\n  return {PACE_MS}\nend\n")
        holders = _Holders()
        try:
            started = start_servers(ctx, servers, tmp)
            samples = _measure(ctx, started, holders, levels, seconds, rounds, paced)
        finally:
            holders.stop()
            for s in servers:
                s.stop()
    _record(ctx, samples, levels)
    _summarise(ctx, samples, levels)
    _plot(ctx, levels)


Samples = dict[tuple[str, int], list[dict[str, float]]]


def _measure(ctx: Context, servers: list[Server], holders: _Holders, levels: Sequence[int],
             seconds: float, rounds: int, paced: Path | None = None) -> Samples:
    """Rounds of one wrk run per (level, server), interleaved: each round walks the levels
    up, the next one down, and at each level the servers in turn, in the other order at the
    next level (A B C, C B A, ...), so that no server or level always comes first or last,
    or right after the same neighbour."""
    base: dict[str, int] = {}
    for s in servers:  # warm-up (not kept); then what the server has open when idle
        run_wrk(s.port, HELLO_PATH, 1.0, ACTIVE)
        _settle_fds(s)
        base[s.name] = _open_fds(s)
    samples: Samples = {}
    out: set[tuple[str, int]] = set()
    turn = 0
    for r in range(rounds):
        for level in (levels if r % 2 == 0 else levels[::-1]):
            turn += 1
            for s in (servers if turn % 2 else servers[::-1]):
                if (s.name, level) in out:
                    continue
                if s.name == "select" and level + ACTIVE >= FD_SETSIZE - 24:
                    ctx.note(f"select: {level} idle + {ACTIVE} active connections exceed "
                             f"FD_SETSIZE ({FD_SETSIZE}): not reachable")
                    out.add((s.name, level))
                    continue
                ctx.step(f"{level} idle: {s.name}, round {r + 1}/{rounds}")
                got = _visit(s, holders, base[s.name], level, seconds, paced)
                if isinstance(got, str):
                    ctx.note(f"{s.name}: could not hold {level} idle connections ({got}): "
                             f"level skipped")
                    out.add((s.name, level))
                    samples.pop((s.name, level), None)
                    continue
                samples.setdefault((s.name, level), []).append(got)
                if s.proc is not None and s.proc.poll() is not None:
                    ctx.note(f"{s.name} exited at {level} idle connections")
                    out.update((s.name, lv) for lv in levels)
    return samples


def _settle_fds(s: Server, timeout: float = 10.0) -> None:
    """Wait until the server's open descriptors stop changing (wrk's connections closed)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = _open_fds(s)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= SETTLE:
            return
        time.sleep(0.05)


def _record(ctx: Context, samples: Samples, levels: Sequence[int]) -> None:
    for level in levels:
        for (name, lv), rows in samples.items():
            if lv != level:
                continue
            case = f"{level} idle"
            errors = sum(int(r["errors"]) for r in rows)
            other = [r["other"] for r in rows]
            note = (f"other processes: median {statistics.median(other):.0f}% of a CPU "
                    f"(max {max(other):.0f}%)" + (f"; {errors} errors" if errors else ""))
            for metric, key in (("p50 latency", "p50"), ("p99 latency", "p99"),
                                ("p50 latency, paced", "paced_p50"),
                                ("p99 latency, paced", "paced_p99")):
                vals = [r[key] for r in rows if key in r]
                if not vals:
                    continue
                med = finite_median(vals)
                if med is not None:
                    ctx.record(case, name, metric, med, "µs", "lower",
                               [v for v in vals if v == v], note)
            rps = [r["rps"] for r in rows]
            cpu = [r["cpu"] for r in rows]
            ctx.record(case, name, "req/s", statistics.median(rps), "req/s", "higher", rps)
            ctx.record(case, name, "server CPU/req", statistics.median(cpu), "µs", "lower", cpu)
            paced_rps = [r["paced_rps"] for r in rows if "paced_rps" in r]
            if paced_rps:
                ctx.record(case, name, "req/s, paced", statistics.median(paced_rps), "req/s",
                           "higher", paced_rps)


def _paced_rate() -> str:
    """The paced runs' rate at most: each connection waits PACE_MS between requests."""
    return f"{ACTIVE * 1000 // PACE_MS:,}"


def _summarise(ctx: Context, samples: Samples, levels: Sequence[int]) -> None:
    top = max(levels)
    floor_top = finite_median([r["p99"] for r in samples.get(("floor", top), [])])
    for name in dict.fromkeys(n for n, _ in samples):
        first, last = samples.get((name, 0), []), samples.get((name, top), [])
        p0 = finite_median([r["p99"] for r in first])
        p1 = finite_median([r["p99"] for r in last])
        if not p0 or not p1:
            continue
        # the same ratio within each round (its two runs a few seconds apart): the spread
        per_round = sorted(b["p99"] / a["p99"] for a, b in zip(first, last, strict=False)
                           if a["p99"] == a["p99"] and b["p99"] == b["p99"] and a["p99"] > 0)
        cpu0 = statistics.median(r["cpu"] for r in first)
        cpu1 = statistics.median(r["cpu"] for r in last)
        text = (f"{name}: p99 at {top} idle = {p1 / p0:.2f}x p99 at 0 idle"
                + (" (target <= 1.2x)" if name == "aem" else ""))
        if len(per_round) > 1:
            text += f"; round by round {per_round[0]:.2f}x to {per_round[-1]:.2f}x"
        text += f"; server CPU/req {cpu1 / cpu0:.2f}x"
        q0 = finite_median([r["paced_p99"] for r in first if "paced_p99" in r])
        q1 = finite_median([r["paced_p99"] for r in last if "paced_p99" in r])
        if q0 and q1:
            text += f"; paced (~{_paced_rate()} req/s): p99 {q1 / q0:.2f}x"
        if name != "floor" and floor_top:
            text += f"; p99 at {top} idle = {p1 / floor_top:.2f}x the floor's"
        ctx.note(text)
    rows = [r for rs in samples.values() for r in rs]
    if rows:
        other = [r["other"] for r in rows]
        retried = sum(1 for r in rows if r.get("retried"))
        ctx.note(f"other processes on the machine used a median {statistics.median(other):.0f}% "
                 f"of a CPU during the runs (max {max(other):.0f}%; {retried} of {len(rows)} "
                 f"runs over {OTHER_LOAD:.0f}% were measured again once, the quieter kept); "
                 f"the idle connections' holders used at most "
                 f"{max(r['holders_ms'] for r in rows):.0f} ms of CPU during a run")


def _plot(ctx: Context, levels: Sequence[int]) -> None:
    panels = ("p50 latency", "p99 latency", "p99 latency, paced")
    rows = [r for r in ctx.rows if r.metric in panels]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), sharex=True)
    for ax, metric in zip(axes, panels, strict=True):
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
        ax.set_title(f"{metric.split(',')[0]} of the active connections, "
                     + (f"paced (≤ {_paced_rate()} req/s)" if "paced" in metric else "at full rate"),
                     fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("aem bench idle — response time vs open connections (the article's Figure 6)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(ctx.plot_path("response-time"), dpi=110)
    plt.close(fig)


# -- where the time goes: a perf trace of one run ---------------------------------------------

TRACE_EVENTS = "syscalls:sys_enter_epoll_wait,syscalls:sys_exit_epoll_wait,sched:sched_switch"
_SWITCH = re.compile(r"prev_comm=(.*) prev_pid=(\d+) .*prev_state=(\S+) ==> "
                     r"next_comm=(.*) next_pid=(\d+)")
_LINE = re.compile(r"\s*(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)")


def trace_summary(perf_data: str, server_pid: int, client: str = "wrk") -> dict[str, Any]:
    """What a ``perf record -a -e TRACE_EVENTS`` of one run shows about the server (an epoll
    loop, process ``server_pid``) and the client (by command name):

    * ``turns_us``: the server's engine turns — from one ``epoll_wait`` returning to the
      next call — in on-CPU time (time it was preempted in the middle taken out), and
      ``events``: what each ``epoll_wait`` returned (percentiles p50, p99, max);
    * ``preempted``: for the server and the client, each time it was switched out while
      still runnable, until it ran again: count, total ms, longest µs, and those ms by the
      task that took its CPU (the first one, when several ran meanwhile);
    * ``idle_ms``: each CPU's idle time.
    """
    out = subprocess.run(["perf", "script", "-i", perf_data, "-F", "tid,cpu,time,event,trace"],
                         capture_output=True, text=True, check=True).stdout
    return parse_trace(out, server_pid, client)


def parse_trace(text: str, server_pid: int, client: str = "wrk") -> dict[str, Any]:
    """:func:`trace_summary` of ``perf script -F tid,cpu,time,event,trace`` output."""
    pid = str(server_pid)
    watched: dict[str, str] = {pid: "server"}
    pre: dict[str, list[float]] = {"server": [], "client": []}
    by: dict[str, dict[str, float]] = {"server": {}, "client": {}}
    off: dict[str, tuple[float, str]] = {}   # tid -> (when it was preempted, by whom)
    running: dict[int, tuple[str, str, float]] = {}   # cpu -> (tid, comm, since)
    idle: dict[int, float] = {}
    turns: list[float] = []
    events: list[float] = []
    turn_cpu, in_turn, server_on, prev_t = 0.0, False, True, None
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        tid, cpu, t, ev, rest = m.group(1), int(m.group(2)), float(m.group(3)), m.group(4), m.group(5)
        if in_turn and server_on and prev_t is not None:
            turn_cpu += t - prev_t
        prev_t = t
        if ev == "sched:sched_switch":
            sw = _SWITCH.search(rest)
            if sw is None:
                continue
            pcomm, ppid, pstate, ncomm, npid = sw.groups()
            for comm, p in ((pcomm, ppid), (ncomm, npid)):
                if comm == client:
                    watched[p] = "client"
            was = running.get(cpu)
            if was is not None and was[0] == "0":
                idle[cpu] = idle.get(cpu, 0.0) + t - was[2]
            running[cpu] = (npid, ncomm, t)
            if ppid == pid:
                server_on = False
            if npid == pid:
                server_on = True
            if ppid in watched and pstate.startswith("R"):
                off[ppid] = (t, ncomm)
            if npid in off:  # back on its CPU: the wait goes to the task that took it
                since, taker = off.pop(npid)
                who = watched[npid]
                pre[who].append((t - since) * 1e6)
                by[who][taker] = by[who].get(taker, 0.0) + t - since
            continue
        if tid != pid:
            continue
        if ev.startswith("syscalls:sys_enter_epoll") and in_turn:
            turns.append(turn_cpu * 1e6)
            in_turn = False
        elif ev.startswith("syscalls:sys_exit_epoll"):
            in_turn, turn_cpu = True, 0.0
            try:
                events.append(float(int(rest.strip(), 16)))
            except ValueError:
                pass

    def pct(v: list[float]) -> dict[str, float]:
        v = sorted(v)
        if not v:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}
        return {"p50": v[len(v) // 2], "p99": v[min(len(v) - 1, len(v) * 99 // 100)],
                "max": v[-1]}

    return {
        "turns_us": pct(turns) | {"n": float(len(turns))},
        "events": pct(events),
        "preempted": {k: {"n": len(v), "total_ms": sum(v) / 1e3, "max_us": max(v, default=0.0),
                          "by_ms": {c: round(ms * 1e3, 1) for c, ms in
                                    sorted(by[k].items(), key=lambda kv: -kv[1])[:5]}}
                      for k, v in pre.items()},
        "idle_ms": {c: round(ms * 1e3, 1) for c, ms in sorted(idle.items())},
    }


def main(argv: Sequence[str]) -> int:
    """``python -m aem.bench.idle serve select|poll PORT ROOT``, ``hold``, or
    ``trace PERF_DATA SERVER_PID`` (:func:`trace_summary`, as JSON)."""
    if len(argv) >= 3 and argv[0] == "serve" and argv[1] in ("select", "poll"):
        _loop_server(argv[1], int(argv[2]))
        return 0
    if argv == ["hold"]:
        _hold()
        return 0
    if len(argv) == 3 and argv[0] == "trace":
        print(json.dumps(trace_summary(argv[1], int(argv[2])), indent=1))
        return 0
    print("usage: python -m aem.bench.idle serve select|poll PORT ROOT | hold | "
          "trace PERF_DATA SERVER_PID",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
