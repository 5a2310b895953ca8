"""``aem bench apps``: ASGI and WSGI apps on ``aem serve`` beside uvicorn, granian and gunicorn.

The same app code for every server (:mod:`aem.bench._app_targets`):
Starlette for ASGI, Flask for WSGI.  Cases:

* ``asgi hello`` / ``asgi json``, 1 and 2 workers: ``aem serve --interface
  asgi`` vs ``uvicorn --loop uvloop --http httptools`` and ``granian
  --interface asgi``; wrk, 64 keep-alive connections;
* ``wsgi hello``, 1 and 2 workers: ``aem serve --interface wsgi`` (the app
  in capsules) vs ``gunicorn`` sync workers (which close the connection after
  each response: that is how sync workers serve);
* ``wsgi fast p99 (N conns) + /slow``, 2 workers: wrk on ``/hello`` with 1
  and with 4 connections while one client keeps asking ``/slow`` (sleeps
  100 ms) one request after another (a new connection each); the p99 of the fast requests with the
  slow client and without it (the ratio is what the issue's target is
  about; taken round by round, see :func:`_p99_with_slow`).  With 1 fast
  connection a worker is always free for it; with 4 the fast load alone
  needs both workers, so the slow handler's worker is missed.  Run twice:
  *pinned* (every process of the server on CPU 0, wrk and the slow client
  on CPU 1, as BENCHMARKS.md asks) and with the *CPUs shared* (the server
  and the slow client on either CPU, wrk on CPU 1: there the slow client,
  the front and the workers also run on wrk's CPU and delay wrk itself).

Figures: req/s (wrk), server CPU µs per request (utime+stime of the server's
process tree over the run, divided by the requests served), p50/p99.  With 1
worker every server runs on CPU 0 and wrk on CPU 1; with 2 workers the
servers may use both CPUs for throughput (wrk shares them: the figures are
then for the machine as a whole).  Rounds are interleaved after a warm-up, the servers'
order reversed every other round (A B C, C B A, ...); medians: throughput of
5 rounds of 3 s per server, the p99 cases 5 rounds of 4 s without and 4 s
with the slow client.  aem runs the WSGI
cases with ``--status``, and the notes say how many temporary (burst) workers
it started.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ._harness import Context, aem_pythonpath
from .http import CLIENT_CPU, SERVER_CPU, Server, free_port, have_wrk, run_wrk, start_servers
from .idle import OTHER_LOAD, _busy_seconds, _own_seconds

TARGETS = "aem.bench._app_targets"
CONNECTIONS = 64
WSGI_CONNECTIONS = 16


def _exe(name: str) -> str | None:
    found = shutil.which(name)
    if found is None:
        cand = Path(sys.executable).with_name(name)
        found = str(cand) if cand.exists() else None
    return found


def _servers(interface: str, workers: int) -> list[Server]:
    py = sys.executable
    app = f"{TARGETS}:{interface}_app"
    env = {"PYTHONPATH": aem_pythonpath()}
    out: list[Server] = []
    port = free_port()
    out.append(Server("aem", [py, "-m", "aem.cli", "serve", app, "--interface", interface,
                              "--workers", str(workers), "--port", str(port), "--no-access-log",
                              "--log-level", "warning"] + (["--status"] if interface == "wsgi" else []),
                      port, env))
    if interface == "asgi":
        uv = _exe("uvicorn")
        if uv is not None:
            port = free_port()
            out.append(Server("uvicorn", [uv, app, "--loop", "uvloop", "--http", "httptools",
                                          "--workers", str(workers), "--port", str(port),
                                          "--no-access-log", "--log-level", "warning"], port, env))
        gr = _exe("granian")
        if gr is not None:
            port = free_port()
            out.append(Server("granian", [gr, "--interface", "asgi", "--workers", str(workers),
                                          "--port", str(port), "--no-ws", "--log-level", "warning",
                                          app], port, env))
    else:
        gu = _exe("gunicorn")
        if gu is not None:
            port = free_port()
            out.append(Server("gunicorn", [gu, "-k", "sync", "-w", str(workers), "-b",
                                           f"127.0.0.1:{port}", "--log-level", "warning", app],
                              port, env))
    return out


def _set_cpus(servers: Sequence[Server], cpus: set[int]) -> None:
    """Let every thread of every process of each server run on ``cpus`` (processes it forks
    later inherit that)."""
    cpus &= set(range(os.cpu_count() or 1))
    if not cpus:
        return
    for s in servers:
        for pid in s.pids():
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                try:
                    os.sched_setaffinity(tid, cpus)
                except OSError:
                    pass


def _record(ctx: Context, case: str, name: str, runs: list[tuple[object, float]]) -> None:
    rps = [r.rps for r, _ in runs]  # type: ignore[attr-defined]
    cpu_us = [cpu * 1e6 / r.requests if r.requests else float("nan")  # type: ignore[attr-defined]
              for r, cpu in runs]
    errors = sum(r.errors for r, _ in runs)  # type: ignore[attr-defined]
    ctx.record(case, name, "req/s", statistics.median(rps), "req/s", "higher", rps,
               f"{errors} errors/non-2xx" if errors else "")
    ctx.record(case, name, "server CPU/req", statistics.median(cpu_us), "µs", "lower", cpu_us)
    for metric, attr in (("p50 latency", "p50_us"), ("p99 latency", "p99_us")):
        vals = [getattr(r, attr) for r, _ in runs if getattr(r, attr) == getattr(r, attr)]
        if vals:
            ctx.record(case, name, metric, statistics.median(vals), "µs", "lower", vals)


def _throughput(ctx: Context, servers: list[Server], cases: Sequence[tuple[str, str]], conns: int,
                seconds: float, rounds: int, warmup: int) -> None:
    for case, path in cases:
        results: dict[str, list[tuple[object, float]]] = {s.name: [] for s in servers}
        for r in range(warmup + rounds):
            for s in (servers if r % 2 == 0 else servers[::-1]):   # A B C, C B A, ...
                ctx.step(f"{case}: {s.name}, round {r + 1}/{warmup + rounds}")
                c0 = s.cpu_seconds()
                res = run_wrk(s.port, path, seconds, conns)
                cpu = s.cpu_seconds() - c0
                if r >= warmup:
                    results[s.name].append((res, cpu))
        for s in servers:
            if results[s.name]:
                _record(ctx, case, s.name, results[s.name])


_SLOW_REQUEST = b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def _slow_client(port: int, stop: threading.Event, cpu: int | None = None) -> None:
    """Ask ``/slow`` again and again, a new connection each time, until ``stop``; on CPU
    ``cpu`` only when given (this thread alone).

    A bare socket (send, read to the end): the client's own CPU is ~0.05 ms a
    request, where ``urllib`` took ~0.6 ms on the same two CPUs as the server
    and wrk, at the moment the slow answer arrives (measured in session 15:
    the ratio read 1.31 with urllib and 1.08 with this client, aem, 1 fast
    connection, 3 rounds each)."""
    if cpu is not None and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})   # 0: the calling thread
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(_SLOW_REQUEST)
                while s.recv(65536):
                    pass
        except OSError:
            time.sleep(0.01)


def _fast_run(s: Server, seconds: float, conns: int, slow: bool,
              pinned: bool = False) -> tuple[float, int, float]:
    """wrk on ``/hello``, with one client on ``/slow`` beside it or not (on wrk's CPU when
    ``pinned``): (p99 µs, requests, % of a CPU that other processes on the machine took
    meanwhile)."""
    busy0, own0, srv0 = _busy_seconds(), _own_seconds(), s.cpu_seconds()
    t0 = time.monotonic()
    stop = threading.Event()
    t = threading.Thread(target=_slow_client, args=(s.port, stop, CLIENT_CPU if pinned else None)) \
        if slow else None
    if t is not None:
        t.start()
    try:
        res = run_wrk(s.port, "/hello", seconds, conns)
    finally:
        stop.set()
        if t is not None:
            t.join(15)
    wall = time.monotonic() - t0
    other = _busy_seconds() - busy0 - (_own_seconds() - own0) - (s.cpu_seconds() - srv0)
    return res.p99_us, res.requests, max(0.0, other) / wall * 100


def _fast_pair(s: Server, seconds: float, conns: int, slow_first: bool,
               pinned: bool = False) -> tuple[float, float, int, float]:
    """Both runs of a round for ``s`` (without and with the slow client, in the order asked),
    again once when other processes took more than ``OTHER_LOAD`` % of a CPU during either:
    the quieter pair is kept.  Returns (p99 alone, p99 with /slow, fewest requests, other %)."""
    best: tuple[float, float, int, float] | None = None
    for _ in range(2):
        got = {slow: _fast_run(s, seconds, conns, slow, pinned)
               for slow in ((True, False) if slow_first else (False, True))}
        (p_a, n_a, o_a), (p_m, n_m, o_m) = got[False], got[True]
        pair = (p_a, p_m, min(n_a, n_m), max(o_a, o_m))
        if best is None or pair[3] < best[3]:
            best = pair
        if best[3] <= OTHER_LOAD:
            break
    assert best is not None
    return best


def _p99_with_slow(ctx: Context, servers: list[Server], seconds: float, rounds: int,
                   warmup: int, conns: Sequence[int] = (1, 4), pinned: bool = False) -> None:
    """p99 of ``/hello`` alone and while one client keeps ``/slow`` (100 ms) busy, interleaved.

    ``pinned``: every process of the servers on CPU 0 and both clients (wrk and the
    slow one) on CPU 1, as BENCHMARKS.md asks (the caller pins the servers); else the
    servers and the slow client may run on either CPU and only wrk is pinned.

    Each round runs every server (their order reversed every other round) and,
    for each, both runs back to back, the one without the slow client first in
    even rounds and second in odd ones; the ratio is taken per round (the two
    runs of the same server, seconds apart) and its median reported, with the
    spread and the number of fast requests each p99 rests on in the notes.  A
    round's pair of runs is run again once when other processes took more than
    ``OTHER_LOAD`` % of a CPU meanwhile (the quieter pair is kept)."""
    for n in conns:
        case = (f"wsgi fast p99 ({n} conn{'s' if n > 1 else ''}) + /slow, 2 workers, "
                f"{'pinned' if pinned else 'CPUs shared'}")
        alone: dict[str, list[float]] = {s.name: [] for s in servers}
        mixed: dict[str, list[float]] = {s.name: [] for s in servers}
        ratio: dict[str, list[float]] = {s.name: [] for s in servers}
        counts: list[int] = []
        others: list[float] = []
        for r in range(warmup + rounds):
            for s in (servers if r % 2 == 0 else servers[::-1]):
                ctx.step(f"{case}: {s.name}, round {r + 1}/{warmup + rounds}")
                p_a, p_m, count, other = _fast_pair(s, seconds, n, r % 2 == 1, pinned)
                if r >= warmup and p_a == p_a and p_m == p_m:
                    alone[s.name].append(p_a)
                    mixed[s.name].append(p_m)
                    ratio[s.name].append(p_m / p_a)
                    counts.append(count)
                    others.append(other)
        for s in servers:
            a, m, q = alone[s.name], mixed[s.name], ratio[s.name]
            if not q:
                continue
            ctx.record(case, s.name, "p99 alone", statistics.median(a), "µs", "lower", a)
            ctx.record(case, s.name, "p99 with /slow", statistics.median(m), "µs", "lower", m)
            ctx.record(case, s.name, "p99 ratio slow/alone", statistics.median(q), "x", "lower", q)
            ctx.note(f"{case}, {s.name}: p99 ratio slow/alone per round {min(q):.2f}–{max(q):.2f} "
                     f"(median {statistics.median(q):.2f} of {len(q)} rounds; ratio of the medians "
                     f"{statistics.median(m) / statistics.median(a):.2f})")
        if counts:
            ctx.note(f"{case}: each p99 is of {min(counts):,} or more fast requests (one run of "
                     f"{seconds:g} s; {max(counts):,} at most): it rests on the slowest 1% of them, "
                     f"{min(counts) // 100:,} or more; other processes on the machine took "
                     f"{min(others):.0f}–{max(others):.0f} % of a CPU during a round's runs "
                     f"(median {statistics.median(others):.0f} %; a round is run again once "
                     f"above {OTHER_LOAD:g} %, the quieter kept)")
        burst = _burst_stats(servers)
        if burst:
            ctx.note(f"{case}: aem started {burst['bursts']} temporary (burst) worker(s) so far; "
                     f"{burst['extra']} running at the end, {burst['retired']} retired")


def _burst_stats(servers: Sequence[Server]) -> dict[str, int] | None:
    """aem's WSGI worker counters (its status page), or None."""
    for s in servers:
        if s.name == "aem":
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/_aem/status?format=json",
                                            timeout=5) as r:
                    caps: dict[str, int] = json.loads(r.read())["capsules"]
                    return caps
            except (OSError, ValueError, KeyError):
                return None
    return None


def run(ctx: Context) -> None:
    """The ``apps`` suite (see the module doc)."""
    if not have_wrk():
        ctx.note("wrk is not installed (scripts/install-system-deps.sh): apps suite skipped")
        return
    for mod in ("starlette", "flask"):
        try:
            __import__(mod)
        except ImportError:
            ctx.note(f"{mod} is not installed (pip install 'aem[bench]'): apps suite skipped")
            return
    # throughput: short rounds, many of them, interleaved (each server's median of 5 x 3 s);
    # the p99 cases: 5 rounds of 4 s + 4 s (a p99 needs the requests)
    seconds, p99_seconds = (1.0, 1.0) if ctx.quick else (3.0, 4.0)
    rounds, warmup = (1, 0) if ctx.quick else (5, 1)
    p99_rounds = 1 if ctx.quick else 5
    groups: list[tuple[str, int]] = [("asgi", 1), ("wsgi", 1)] if ctx.quick else [
        ("asgi", 1), ("asgi", 2), ("wsgi", 1), ("wsgi", 2)]
    with tempfile.TemporaryDirectory(prefix="aem-bench-apps-") as td:
        tmp = Path(td)
        for interface, workers in groups:
            servers = _servers(interface, workers)
            try:
                started = start_servers(ctx, servers, tmp)
                if workers > 1:
                    time.sleep(1.0)    # every worker up
                    _set_cpus(started, set(range(os.cpu_count() or 1)))
                suffix = f", {workers} worker{'s' if workers > 1 else ''}"
                if interface == "asgi":
                    cases = [("asgi hello" + suffix, "/hello"), ("asgi json" + suffix, "/json")]
                    _throughput(ctx, started, cases, CONNECTIONS, seconds, rounds, warmup)
                else:
                    _throughput(ctx, started, [("wsgi hello" + suffix, "/hello")], WSGI_CONNECTIONS,
                                seconds, rounds, warmup)
                    if workers == 2:
                        _p99_with_slow(ctx, started, p99_seconds, p99_rounds, warmup)
                        _set_cpus(started, {SERVER_CPU})
                        _p99_with_slow(ctx, started, p99_seconds, p99_rounds, warmup, pinned=True)
            finally:
                for s in servers:
                    s.stop()
    ctx.note("gunicorn sync workers close each connection after its response (wrk reconnects); "
             "aem, uvicorn and granian keep connections alive")
    ctx.note("server CPU/req counts the whole process tree (aem: front, template and capsules)")
