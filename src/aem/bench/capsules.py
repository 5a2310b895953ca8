"""``aem bench capsules``: from an event to its handler running in another process.

Latency is measured from the occurrence (``UserEvent.fire()``, or the
anchor's submit call) to the first line of the handler running in another
process (both read ``CLOCK_MONOTONIC``), for:

* aem ``EVF_CAPSULE`` (a pool of pre-forked capsules), ``EVF_CAPSULE |
  EVF_KEEPALIVE`` (one attached capsule) and ``EVF_FORK`` (fork per event);
* ``os.fork()`` per event; ``ProcessPoolExecutor.submit`` (fork and
  forkserver contexts); ``multiprocessing.Pool.apply_async``; and a bare
  pre-forked child answering on a socketpair — the floor of any hand-off.

The whole set is measured with the parent's RSS at 10 MB, 500 MB and 2 GB
(a touched ballast allocated before the pools and executors are made), to
show what grows with the parent's memory (fork) and what does not.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import aem

from ._harness import Context, distribution
from ._plot import lines

# -- the handlers (module-level: importable in every process) ------------------------------------


def capsule_probe(ev: Any) -> None:
    """First line stamps the clock; the latency goes back through a UserEvent."""
    t1 = time.monotonic_ns()
    t0, results = ev.payload
    results.fire(t1 - t0)


def pool_probe(t0: int) -> int:
    """For executors: the latency is the return value."""
    return time.monotonic_ns() - t0


# -- measurements: each returns latencies in µs ----------------------------------------------------


def _aem_variant(flags: int, n: int, pool: aem.CapsulePool | None) -> list[float]:
    eng = aem.current()
    results = aem.UserEvent()
    got: list[float] = []
    r_eid = eng.register(results, lambda ev: got.append(ev.payload / 1000.0))
    ue = aem.UserEvent()
    eid = eng.register(ue, capsule_probe, flags=flags, pool=pool)
    done = aem.UserEvent()  # not used: keeps the registration count above zero
    d_eid = eng.register(done, print)
    try:
        for i in range(n):
            want = i + 1
            ue.fire((time.monotonic_ns(), results))
            deadline = time.monotonic() + 30
            while len(got) < want and time.monotonic() < deadline:
                eng.run(timeout=0.05)
    finally:
        eng.unregister(eid)
        eng.unregister(r_eid)
        eng.unregister(d_eid)
        eng.run(timeout=0.05)
    return got


def _os_fork(n: int) -> list[float]:
    out = []
    for _ in range(n):
        r, w = os.pipe()
        t0 = time.monotonic_ns()
        pid = os.fork()
        if pid == 0:
            t1 = time.monotonic_ns()
            os.write(w, (t1 - t0).to_bytes(8, "little"))
            os._exit(0)
        os.close(w)
        data = os.read(r, 8)
        os.close(r)
        os.waitpid(pid, 0)
        out.append(int.from_bytes(data, "little") / 1000.0)
    return out


def _executor(ex: cf.Executor, n: int) -> list[float]:
    ex.submit(pool_probe, time.monotonic_ns()).result()  # workers up
    return [ex.submit(pool_probe, time.monotonic_ns()).result() / 1000.0 for _ in range(n)]


def _mp_pool(pool: Any, n: int) -> list[float]:
    pool.apply_async(pool_probe, (time.monotonic_ns(),)).get()
    return [pool.apply_async(pool_probe, (time.monotonic_ns(),)).get() / 1000.0 for _ in range(n)]


class _Prefork:
    """A bare pre-forked child answering on a socketpair: the floor of a hand-off."""

    def __init__(self) -> None:
        self.a, b = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:
            self.a.close()
            while True:
                data = b.recv(8)
                if not data:
                    os._exit(0)
                t1 = time.monotonic_ns()
                b.sendall((t1 - int.from_bytes(data, "little")).to_bytes(8, "little"))
        b.close()

    def measure(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            self.a.sendall(time.monotonic_ns().to_bytes(8, "little"))
            out.append(int.from_bytes(self.a.recv(8), "little") / 1000.0)
        return out

    def close(self) -> None:
        self.a.close()
        os.waitpid(self.pid, 0)


# -- the suite ---------------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure_level(pool: aem.CapsulePool, n: int, rounds: int) -> dict[str, list[float]]:
    """Every variant at the current RSS, interleaved in ``rounds`` rounds of n/rounds samples.

    The capsule pool was made when the application was small (as an application makes
    it after its imports): its template stays small while the parent grows.  The
    executors and the pre-forked child are made now, from the grown parent, as they
    would be by an application that starts them on first use."""
    pool.wait_ready(30)
    ppe_fork = cf.ProcessPoolExecutor(2, mp_context=mp.get_context("fork"))
    ppe_fs = cf.ProcessPoolExecutor(2, mp_context=mp.get_context("forkserver"))
    mpp = mp.get_context("fork").Pool(2)
    pre = _Prefork()
    variants: dict[str, Callable[[int], list[float]]] = {
        "aem EVF_CAPSULE": lambda k: _aem_variant(aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, k, pool),
        "aem EVF_CAPSULE|EVF_KEEPALIVE": lambda k: _aem_variant(
            aem.EVF_CAPSULE | aem.EVF_KEEPALIVE | aem.EVF_NOCLDWAIT, k, pool),
        "aem EVF_FORK": lambda k: _aem_variant(aem.EVF_FORK | aem.EVF_NOCLDWAIT, k, None),
        "os.fork()": _os_fork,
        "ProcessPoolExecutor (fork)": lambda k: _executor(ppe_fork, k),
        "ProcessPoolExecutor (forkserver)": lambda k: _executor(ppe_fs, k),
        "multiprocessing.Pool.apply_async": lambda k: _mp_pool(mpp, k),
        "pre-forked child on a socketpair": pre.measure,
    }
    out: dict[str, list[float]] = {v: [] for v in variants}
    try:
        per_round = max(1, n // rounds)
        for _ in range(rounds):
            for name, fn in variants.items():
                out[name].extend(fn(per_round))
                pool.wait_ready(10)
    finally:
        ppe_fork.shutdown()
        ppe_fs.shutdown()
        mpp.terminate()
        mpp.join()
        pre.close()
    return out


def run(ctx: Context) -> None:
    """Latency p50/p99 per variant and parent RSS; plot p50 against RSS."""
    levels = [10, 100] if ctx.quick else [10, 500, 2000]
    n = 20 if ctx.quick else 300
    rounds = 1 if ctx.quick else 3
    ballast: list[bytearray] = []
    p50s: dict[str, list[float | None]] = {}
    measured_rss: list[float] = []
    pool = aem.CapsulePool(size=4, reserve=0)  # at start-up, before the application grows
    try:
        _run_levels(ctx, pool, levels, n, rounds, ballast, p50s, measured_rss)
    finally:
        pool.close()
    lines(ctx.plot_path("latency-vs-rss"), "event → handler running in another process (p50)",
          measured_rss, p50s, "parent RSS (MB)", "latency p50 (µs)", logy=True)
    ctx.note(f"{n} samples per variant and RSS level, {rounds} interleaved rounds; a pool of 4 capsules "
             "made at start-up, executors of 2 workers made at each level")
    del ballast


def _run_levels(ctx: Context, pool: aem.CapsulePool, levels: list[int], n: int, rounds: int,
                ballast: list[bytearray], p50s: dict[str, list[float | None]],
                measured_rss: list[float]) -> None:
    for target in levels:
        grow = target - _rss_mb()
        if grow > 0:
            block = bytearray(int(grow * 2**20))
            for i in range(0, len(block), 4096):  # touch every page: resident, not just reserved
                block[i] = 1
            ballast.append(block)
        rss = _rss_mb()
        measured_rss.append(rss)
        results = _measure_level(pool, n, rounds)
        case = f"parent RSS {target} MB"
        for name, samples in results.items():
            d = distribution(samples)
            ctx.record(case, name, "latency p50", d["p50"], "µs", "lower", samples)
            ctx.record(case, name, "latency p99", d["p99"], "µs", "lower")
            p50s.setdefault(name, []).append(d["p50"])
        ctx.note(f"{case}: measured RSS {rss:.0f} MB")
