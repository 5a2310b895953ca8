"""``aem bench apps``: ASGI and WSGI apps on ``aem serve`` beside uvicorn, granian and gunicorn.

The same app code for every server (:mod:`aem.bench._app_targets`):
Starlette for ASGI, Flask for WSGI.  Cases:

* ``asgi hello`` / ``asgi json``, 1 and 2 workers: ``aem serve --interface
  asgi`` vs ``uvicorn --loop uvloop --http httptools`` and ``granian
  --interface asgi``; wrk, 64 keep-alive connections;
* ``wsgi hello``, 1 and 2 workers: ``aem serve --interface wsgi`` (the app
  in capsules) vs ``gunicorn`` sync workers (which close the connection after
  each response: that is how sync workers serve; gunicorn listens on several
  ports and each run goes to the next, so that wrk's new connections do not
  run into the TIME_WAITs of earlier runs, see
  :meth:`aem.bench.http.Server.next_port`);
* ``wsgi fast p99 (N conns) + /slow``, 2 workers: 1 and 4 keep-alive
  connections ask ``/hello`` while one client asks ``/slow`` (sleeps 100 ms),
  a new connection each, in the first half of every second; the p99 of the
  fast requests beside the slow ones and alone, both from the same run (the
  ratio is what the issue's target is about; see :mod:`aem.bench.slowmix`),
  and the *floor*: the same with the slow requests sent to a minimal C server
  that sleeps 100 ms while the fast ones go to aem.  With 1 fast connection a
  worker is always free for it; with 4 the fast load alone needs both
  workers, so the slow handler's worker is missed.  Run twice: *pinned*
  (every process of the server on CPU 0, the load client on CPU 1, as
  BENCHMARKS.md asks) and with the *CPUs shared* (the server and the slow
  requests' thread on either CPU, the fast connections on CPU 1).

Figures: req/s (wrk), server CPU µs per request (utime+stime of the server's
process tree over the run, divided by the requests served), p50/p99.  With 1
worker every server runs on CPU 0 and wrk on CPU 1; with 2 workers the
servers may use both CPUs for throughput (wrk shares them: the figures are
then for the machine as a whole).  Rounds are interleaved after a warm-up, the servers'
order reversed every other round (A B C, C B A, ...); medians: throughput of
5 rounds of 3 s per server, the p99 cases 5 rounds of 8 s (4 s of them
beside the slow client).  aem runs the WSGI
cases with ``--status``, and the notes say how many temporary (burst) workers
it started.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from . import slowmix
from ._harness import Context, aem_pythonpath
from .http import CLIENT_CPU, SERVER_CPU, Server, free_port, have_wrk, run_wrk, start_servers
from .idle import OTHER_LOAD, _busy_seconds, _own_seconds

TARGETS = "aem.bench._app_targets"
CONNECTIONS = 64
WSGI_CONNECTIONS = 16
#: ports gunicorn listens on, used in turn: one is used again only after its TIME_WAITs
#: (60 s) are gone, at the rounds' pace (see Server.next_port)
GUNICORN_PORTS = 12


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
            # sync workers close each connection: a port per run, in turn (Server.next_port)
            ports = [free_port() for _ in range(GUNICORN_PORTS)]
            binds = [arg for p in ports for arg in ("-b", f"127.0.0.1:{p}")]
            out.append(Server("gunicorn", [gu, "-k", "sync", "-w", str(workers), *binds,
                                           "--log-level", "warning", app],
                              ports[0], env, spare_ports=ports[1:]))
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
                res = run_wrk(s.next_port(), path, seconds, conns)
                cpu = s.cpu_seconds() - c0
                if r >= warmup:
                    results[s.name].append((res, cpu))
        for s in servers:
            if results[s.name]:
                _record(ctx, case, s.name, results[s.name])


def _other_percent(busy0: float, own0: float, srv0: float, t0: float, s: Server) -> float:
    """% of a CPU that processes other than this one and the server took since the readings."""
    other = _busy_seconds() - busy0 - (_own_seconds() - own0) - (s.cpu_seconds() - srv0)
    return max(0.0, other) / (time.monotonic() - t0) * 100


def _mix_run(load: str, s: Server, slow_port: int, conns: int, seconds: float, pinned: bool,
             out: Path) -> tuple[slowmix.Mix, float]:
    """One run of the load client on ``s`` (its slow requests to ``slow_port``), run again once
    when other processes took more than ``OTHER_LOAD`` % of a CPU meanwhile (the quieter
    kept).  Returns the run and that %."""
    best: tuple[slowmix.Mix, float] | None = None
    for _ in range(2):
        busy0, own0, srv0, t0 = _busy_seconds(), _own_seconds(), s.cpu_seconds(), time.monotonic()
        mix = slowmix.run_mix(load, s.next_port(), slow_port, conns, seconds, CLIENT_CPU,
                              CLIENT_CPU if pinned else -1, out)
        other = _other_percent(busy0, own0, srv0, t0, s)
        if best is None or other < best[1]:
            best = (mix, other)
        if best[1] <= OTHER_LOAD:
            break
    assert best is not None
    return best


def _p99_with_slow(ctx: Context, servers: list[Server], tools: tuple[str, str], tmp: Path,
                   seconds: float, rounds: int, warmup: int, conns: Sequence[int] = (1, 4),
                   pinned: bool = False) -> None:
    """p99 of ``/hello`` alone and beside one client that keeps ``/slow`` (100 ms) busy, both
    from the same run (:mod:`aem.bench.slowmix`), and the same for the *floor*: aem's fast
    requests while the slow ones go to a minimal C server that sleeps 100 ms.  ``tools``:
    the load client and that server (:func:`aem.bench.slowmix.binaries`).

    ``pinned``: every process of the servers (the caller pins them) and the floor's sleep
    server on CPU 0, the load client and its slow thread on CPU 1, as BENCHMARKS.md asks;
    else the servers, the sleep server and the slow thread may run on either CPU and only
    the fast connections' threads are pinned (to CPU 1).

    Rounds run every server (their order reversed every other round); each run's ratio
    is its own (both p99s come from it); the median of the rounds' ratios is reported,
    with their spread and the number of fast requests each p99 rests on in the notes.  A
    run is made again once when other processes took more than ``OTHER_LOAD`` % of a CPU
    meanwhile (the quieter one is kept)."""
    load, sleep_exe = tools
    aem_server = next((s for s in servers if s.name == "aem"), None)
    sleep_port = free_port()
    pin = ["taskset", "-c", str(SERVER_CPU)] if pinned and (os.cpu_count() or 1) > 1 else []
    sleeper = subprocess.Popen([*pin, sleep_exe, str(sleep_port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    out = tmp / "slowmix.bin"
    try:
        # (name, server, where its slow requests go)
        targets = [(s.name, s, s.port) for s in servers]
        if aem_server is not None:
            targets.append(("floor", aem_server, sleep_port))
        for n in conns:
            case = (f"wsgi fast p99 ({n} conn{'s' if n > 1 else ''}) + /slow, 2 workers, "
                    f"{'pinned' if pinned else 'CPUs shared'}")
            runs: dict[str, list[slowmix.Mix]] = {name: [] for name, _, _ in targets}
            others: list[float] = []
            for r in range(warmup + rounds):
                for name, s, slow_port in (targets if r % 2 == 0 else targets[::-1]):
                    ctx.step(f"{case}: {name}, round {r + 1}/{warmup + rounds}")
                    mix, other = _mix_run(load, s, slow_port, n, seconds, pinned, out)
                    if r >= warmup and mix.ratio == mix.ratio:
                        runs[name].append(mix)
                        others.append(other)
            for name, got in runs.items():
                if not got:
                    continue
                q = [m.ratio for m in got]
                ctx.record(case, name, "p99 alone", statistics.median(m.p99_alone_us for m in got), "µs",
                           "lower", [m.p99_alone_us for m in got])
                ctx.record(case, name, "p99 beside /slow", statistics.median(m.p99_beside_us for m in got),
                           "µs", "lower", [m.p99_beside_us for m in got])
                ctx.record(case, name, "p99 ratio beside/alone", statistics.median(q), "x", "lower", q)
                ctx.note(f"{case}, {name}: p99 ratio beside/alone per round {min(q):.2f}–{max(q):.2f} "
                         f"(median {statistics.median(q):.2f} of {len(q)} rounds); fast requests per run: "
                         f"{min(m.alone for m in got):,}–{max(m.alone for m in got):,} alone, "
                         f"{min(m.beside for m in got):,}–{max(m.beside for m in got):,} beside "
                         f"{min(m.slow for m in got)}–{max(m.slow for m in got)} slow requests")
            if others:
                ctx.note(f"{case}: other processes on the machine took {min(others):.0f}–{max(others):.0f} % "
                         f"of a CPU during a run (median {statistics.median(others):.0f} %; a run is made "
                         f"again once above {OTHER_LOAD:g} %, the quieter kept)")
            burst = _burst_stats(servers)
            if burst:
                ctx.note(f"{case}: aem started {burst['bursts']} temporary (burst) worker(s) so far; "
                         f"{burst['extra']} running at the end, {burst['retired']} retired")
    finally:
        sleeper.kill()
        sleeper.wait()


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
    # the p99 cases: 5 rounds of 8 s (half of it beside the slow client: a p99 needs the requests)
    seconds, p99_seconds = (1.0, 2.0) if ctx.quick else (3.0, 8.0)
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
                        tools = slowmix.binaries(tmp)
                        if tools is None:
                            ctx.note("no C compiler: the p99 cases beside a slow handler were skipped")
                            continue
                        _p99_with_slow(ctx, started, tools, tmp, p99_seconds, p99_rounds, warmup)
                        _set_cpus(started, {SERVER_CPU})
                        _p99_with_slow(ctx, started, tools, tmp, p99_seconds, p99_rounds, warmup,
                                       pinned=True)
            finally:
                for s in servers:
                    s.stop()
    ctx.note("gunicorn sync workers close each connection after its response (wrk reconnects); "
             "aem, uvicorn and granian keep connections alive; gunicorn listens on "
             f"{GUNICORN_PORTS} ports, a run goes to the next one (a port is used again after its "
             "TIME_WAITs are gone: one load client on one port runs into them, see "
             "aem.bench.http.Server.next_port)")
    ctx.note("server CPU/req counts the whole process tree (aem: front, template and capsules)")
