"""``aem bench capsules``: from an event to its handler running in another process.

Latency is measured from the occurrence (``time.monotonic_ns()`` read right before
``UserEvent.fire()``, or before the anchor's submit/send call) to the first line of
the handler running in another process, with the same pause (5 ms) before every
event, for:

* aem ``EVF_CAPSULE`` (a pool of 4 warm capsules), ``EVF_CAPSULE | EVF_KEEPALIVE``
  (one attached capsule), ``CapsulePool.submit`` (its executor side), ``EVF_FORK``;
* a bare pre-forked child woken through a socketpair (the floor of any hand-off,
  measured in the same run; for round trips, one answering pickled calls),
  ``ProcessPoolExecutor.submit`` (fork and forkserver), ``multiprocessing.Pool.apply_async``,
  ``os.fork()`` per event.

The aem events are fired by a driver timer inside one ``run()`` of the engine (as in
an application, where the engine waits in ``run()``).  The set is measured with the
parent's RSS at 10 MB, 500 MB and 2 GB (a touched ballast), to show what grows with
the parent's memory.  Then throughput (events handed to capsules whose handler returns
at once; ``submit(fn).result()`` round trips; a burst of ``submit`` calls) against
``ProcessPoolExecutor`` with the same number of workers, and the private memory (USS,
``/proc/PID/smaps_rollup``) of an idle capsule before and after its warm-up next to an
idle ``ProcessPoolExecutor`` worker's.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import pickle
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import aem

from ._harness import Context, distribution, json_from_child
from ._plot import lines

PAUSE = 0.005  # between events, for every variant
WORKERS = 4    # capsules in the pool, workers of the executors

# -- the handlers (module-level: importable in every process, and known to the template) ----------

#: Latencies come back through this event: registered before the pool is made, so the
#: capsules inherit a UserEvent that reaches the application.
RESULTS = aem.UserEvent()


def capsule_probe(ev: Any) -> None:
    """First line stamps the clock; the payload is the occurrence's timestamp."""
    t1 = time.monotonic_ns()
    RESULTS.fire(t1 - ev.payload)


def quiet_probe(ev: Any) -> None:
    """Returns at once; the last of a burst (payload < 0) reports back."""
    if ev.payload < 0:
        RESULTS.fire(0)


def pool_probe(t0: int) -> int:
    """For executors: the latency is the return value."""
    return time.monotonic_ns() - t0


def noop(x: int) -> int:
    """A call that returns at once."""
    return x


# -- latency: each returns latencies in µs --------------------------------------------------------


class _Aem:
    """The aem variants: registrations made once, before the pool's template is forked."""

    def __init__(self) -> None:
        self.eng = aem.current()
        self.got: list[int] = []
        self.r_eid = self.eng.register(RESULTS, lambda ev: self.got.append(ev.payload))
        self.sources = {"capsule": aem.UserEvent(), "keepalive": aem.UserEvent(), "quiet": aem.UserEvent(),
                        "quiet-keepalive": aem.UserEvent(), "fork": aem.UserEvent()}
        self.pool = aem.CapsulePool(size=WORKERS, reserve=0)
        nocld = aem.EVF_NOCLDWAIT
        self.eids = [
            self.eng.register(self.sources["capsule"], capsule_probe, flags=aem.EVF_CAPSULE | nocld,
                              pool=self.pool),
            self.eng.register(self.sources["keepalive"], capsule_probe,
                              flags=aem.EVF_CAPSULE | aem.EVF_KEEPALIVE | nocld, pool=self.pool),
            self.eng.register(self.sources["quiet"], quiet_probe, flags=aem.EVF_CAPSULE | nocld,
                              pool=self.pool),
            self.eng.register(self.sources["quiet-keepalive"], quiet_probe,
                              flags=aem.EVF_CAPSULE | aem.EVF_KEEPALIVE | nocld, pool=self.pool),
            self.eng.register(self.sources["fork"], capsule_probe, flags=aem.EVF_FORK | nocld),
        ]
        self.pool.refresh()  # a template that knows these registrations (the native hand-off)
        self.pool.wait_ready(30)

    def latency(self, name: str, n: int) -> list[float]:
        """n events, one every PAUSE, fired by a driver timer inside one run()."""
        src = self.sources[name]
        start = len(self.got)
        fired = [0]

        def drive(ev: Any) -> None:
            if len(self.got) - start < fired[0]:
                return  # the previous one is still on its way: keep the pause after it
            if fired[0] == n:
                self.eng.stop()
                return
            fired[0] += 1
            src.fire(time.monotonic_ns())

        tid = self.eng.register(aem.Timer(PAUSE, PAUSE), drive)
        try:
            self.eng.run(timeout=n * PAUSE * 20 + 10)
        finally:
            self.eng.unregister(tid)
        self.pool.wait_ready(10)
        return [x / 1000.0 for x in self.got[start:start + n]]

    def burst(self, name: str, k: int) -> float:
        """Events per second: k events fired back to back; done when the last has run."""
        src = self.sources[name]
        start = len(self.got)
        self.pool.wait_ready(30)
        t0 = time.perf_counter()
        for i in range(k - 1):
            src.fire(i)
        if name == "quiet":  # one capsule each: wait for every one to have ended
            reaped = self.pool.stats()["reaped"]
            src.fire(-1)
            deadline = time.monotonic() + 120
            while (self.pool.stats()["reaped"] < reaped + k or len(self.got) == start) \
                    and time.monotonic() < deadline:
                self.eng.run(timeout=0.001)
        else:
            src.fire(-1)
            deadline = time.monotonic() + 120
            while len(self.got) == start and time.monotonic() < deadline:
                self.eng.run(timeout=0.01)
        return k / (time.perf_counter() - t0)

    def close(self) -> None:
        for eid in [*self.eids, self.r_eid]:
            self.eng.unregister(eid, missing_ok=True)
        self.pool.close()


def _paced(n: int, one: Callable[[], float]) -> list[float]:
    out = []
    for _ in range(n):
        time.sleep(PAUSE)
        out.append(one())
    return out


def _os_fork() -> float:
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
    return int.from_bytes(data, "little") / 1000.0


def _submit_latency(ex: cf.Executor) -> float:
    return float(ex.submit(pool_probe, time.monotonic_ns()).result()) / 1000.0


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

    def one(self) -> float:
        self.a.sendall(time.monotonic_ns().to_bytes(8, "little"))
        return int.from_bytes(self.a.recv(8), "little") / 1000.0

    def close(self) -> None:
        self.a.close()
        os.waitpid(self.pid, 0)


class _CallFloor:
    """The floor of a ``submit(fn).result()`` round trip: a bare pre-forked child answering
    pickled calls on a ``SOCK_SEQPACKET`` socketpair (what a call must do at least: pickle,
    send, wake, receive, unpickle, call, and back), with nothing else around it.

    ``spin``: both ends poll their socket before they sleep, as a CapsulePool's caller and
    worker do (``SPIN_US``, ``WORKER_SPIN_US``): the floor of that way of waiting."""

    def __init__(self, spin: bool = False) -> None:
        from aem._core import wait_readable
        from aem.capsules._child import WORKER_SPIN_US
        from aem.capsules._executor import SPIN_US

        self.a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.wait = (lambda fd: wait_readable(fd, -1, SPIN_US)) if spin else None
        self.pid = os.fork()
        if self.pid == 0:
            self.a.close()
            while True:
                if spin:
                    wait_readable(b.fileno(), -1, WORKER_SPIN_US)
                data = b.recv(65536)
                if not data:
                    os._exit(0)
                fn, args, kwargs = pickle.loads(data)
                b.send(pickle.dumps(fn(*args, **kwargs), protocol=5))
        b.close()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.a.send(pickle.dumps((fn, args, {}), protocol=5))
        if self.wait is not None:
            self.wait(self.a.fileno())
        return pickle.loads(self.a.recv(65536))

    def close(self) -> None:
        self.a.close()
        os.waitpid(self.pid, 0)


# -- the suite ---------------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure_level(a: _Aem, n: int, rounds: int) -> dict[str, list[float]]:
    """Every variant at the current RSS, interleaved in ``rounds`` rounds of n/rounds samples.

    The capsule pool was made when the application was small (as an application makes
    it after its imports): its template stays small while the parent grows.  The
    executors and the pre-forked child are made now, from the grown parent, as they
    would be by an application that starts them on first use."""
    ppe_fork = cf.ProcessPoolExecutor(WORKERS, mp_context=mp.get_context("fork"))
    ppe_fs = cf.ProcessPoolExecutor(WORKERS, mp_context=mp.get_context("forkserver"))
    mpp = mp.get_context("fork").Pool(WORKERS)
    pre = _Prefork()
    for ex in (ppe_fork, ppe_fs):
        list(ex.map(noop, range(WORKERS * 2)))  # workers up
    mpp.apply_async(noop, (0,)).get()
    variants: dict[str, Callable[[int], list[float]]] = {
        "aem EVF_CAPSULE": lambda k: a.latency("capsule", k),
        "aem EVF_CAPSULE|EVF_KEEPALIVE": lambda k: a.latency("keepalive", k),
        "aem CapsulePool.submit": lambda k: _paced(k, lambda: _submit_latency(a.pool)),
        "aem EVF_FORK": lambda k: a.latency("fork", k),
        "pre-forked child on a socketpair": lambda k: _paced(k, pre.one),
        "ProcessPoolExecutor (fork)": lambda k: _paced(k, lambda: _submit_latency(ppe_fork)),
        "ProcessPoolExecutor (forkserver)": lambda k: _paced(k, lambda: _submit_latency(ppe_fs)),
        "multiprocessing.Pool.apply_async": lambda k: _paced(
            k, lambda: float(mpp.apply_async(pool_probe, (time.monotonic_ns(),)).get()) / 1000.0),
        "os.fork()": lambda k: _paced(k, _os_fork),
    }
    out: dict[str, list[float]] = {v: [] for v in variants}
    try:
        per_round = max(1, n // rounds)
        for _ in range(rounds):
            for name, fn in variants.items():
                out[name].extend(fn(per_round))
                a.pool.wait_ready(10)
    finally:
        ppe_fork.shutdown()
        ppe_fs.shutdown()
        mpp.terminate()
        mpp.join()
        pre.close()
    return out


def _throughput(ctx: Context, a: _Aem, k: int, rounds: int) -> None:
    """Events/s and calls/s against ProcessPoolExecutor with as many workers, and round trips
    against their floor too, interleaved (the round trips of one round run back to back)."""
    ctx.step(f"throughput: events, submit bursts, round trips, {rounds} rounds")
    ppe = cf.ProcessPoolExecutor(WORKERS, mp_context=mp.get_context("fork"))
    list(ppe.map(noop, range(WORKERS * 2)))
    floor, spinning = _CallFloor(), _CallFloor(spin=True)

    def burst(ex: cf.Executor) -> float:
        t0 = time.perf_counter()
        cf.wait([ex.submit(noop, i) for i in range(k)])
        return k / (time.perf_counter() - t0)

    def round_trips(call: Callable[[int], Any]) -> float:
        t0 = time.perf_counter()
        for i in range(k):
            call(i)
        return k / (time.perf_counter() - t0)

    events = "events handed to capsules, handlers return at once"
    calls = "a burst of submit() calls that return at once"
    trips = "submit(fn).result() round trips"
    aem_trips, ppe_trips = (trips, "aem CapsulePool"), (trips, "ProcessPoolExecutor (fork)")
    floor_trips = (trips, "pre-forked child answering pickled calls on a socketpair")
    spin_trips = (trips, "the same, both ends polling before they sleep (as aem's)")
    variants: dict[tuple[str, str], Callable[[], float]] = {
        (events, "aem EVF_CAPSULE|EVF_KEEPALIVE"): lambda: a.burst("quiet-keepalive", k),
        (events, "aem EVF_CAPSULE (a fresh capsule per event)"): lambda: a.burst("quiet", k),
        (calls, "aem CapsulePool.submit"): lambda: burst(a.pool),
        (calls, "ProcessPoolExecutor.submit (fork)"): lambda: burst(ppe),
        aem_trips: lambda: round_trips(lambda i: a.pool.submit(noop, i).result()),
        ppe_trips: lambda: round_trips(lambda i: ppe.submit(noop, i).result()),
        floor_trips: lambda: round_trips(lambda i: floor.call(noop, i)),
        spin_trips: lambda: round_trips(lambda i: spinning.call(noop, i)),
    }
    got: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    try:
        for _ in range(rounds):
            for key, fn in variants.items():
                got[key].append(fn())
                a.pool.wait_ready(10)
    finally:
        ppe.shutdown()
        spinning.close()  # first: its child, forked after the floor's, holds the floor's socket too
        floor.close()
    # the anchor of the events: the same executor burst (as many workers), measured in the same rounds
    got[(events, "ProcessPoolExecutor.submit (fork)")] = got[(calls, "ProcessPoolExecutor.submit (fork)")]
    for (case, variant), values in got.items():
        d = distribution(values)
        ctx.record(case, variant, "per second (median round)", d["p50"], "/s", "higher", values)
    # the ratio of each round (its figures were measured a second apart), then their median
    per_round = f"{trips}: aem ÷ anchor, round by round"
    for anchor in (ppe_trips, floor_trips, spin_trips):
        q = [x / y for x, y in zip(got[aem_trips], got[anchor], strict=True)]
        ctx.record(per_round, f"aem CapsulePool ÷ {anchor[1]}", "ratio (median of the rounds)",
                   statistics.median(q), "×", "higher", q)
        ctx.note(f"{trips}, aem CapsulePool ÷ {anchor[1]}, round by round: "
                 + ", ".join(f"{x:.2f}" for x in q) + f" (min {min(q):.2f}, max {max(q):.2f})")
    ctx.note(f"throughput: {k} events or calls per round, {rounds} interleaved rounds, {WORKERS} capsules "
             f"or workers")


_USS_CHILD = """
import json, os, time, concurrent.futures as cf, multiprocessing as mp
import aem
import aem.capsules._child as child
from aem.bench.capsules import noop
def uss(pid):
    kb = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                kb += int(line.split()[1])
    return kb / 1024
def capsule_uss():
    with aem.CapsulePool(size=2) as pool:
        pool.wait_ready(30)
        time.sleep(0.3)
        vals = sorted(uss(pid) for pid in pool.pids()[1:])
        return vals[len(vals) // 2]
out = {"warm": capsule_uss()}
real = child.warm
def unwarmed(chan, table, channel_fds=(), sources=None):
    child.send(chan, ("ready",))  # reports ready without the rehearsal
child.warm = unwarmed
out["unwarmed"] = capsule_uss()
child.warm = real
ex = cf.ProcessPoolExecutor(2, mp_context=mp.get_context("fork"))
list(ex.map(noop, range(8)))
time.sleep(0.3)
vals = sorted(uss(p.pid) for p in ex._processes.values())
out["ppe"] = vals[len(vals) // 2]
ex.shutdown()
print(json.dumps(out))
"""


def _memory(ctx: Context) -> None:
    data = json_from_child(_USS_CHILD, 120)
    case = "idle process, private memory (USS)"
    ctx.record(case, "aem capsule, warm (after its rehearsal)", "USS", data["warm"], "MB")
    ctx.record(case, "aem capsule before warming (rehearsal skipped)", "USS", data["unwarmed"], "MB")
    ctx.record(case, "ProcessPoolExecutor worker (fork), after a call", "USS", data["ppe"], "MB")
    ctx.note("USS from /proc/PID/smaps_rollup (Private_Clean + Private_Dirty) in a fresh Python: "
             + json.dumps({k: round(v, 2) for k, v in data.items()}))


def run(ctx: Context) -> None:
    """Latency p50/p99 per variant and parent RSS; throughput; idle memory."""
    levels = [10] if ctx.quick else [10, 500, 2000]
    n = 12 if ctx.quick else 300
    rounds = 1 if ctx.quick else 3
    k = 40 if ctx.quick else 2000
    ballast: list[bytearray] = []
    p50s: dict[str, list[float | None]] = {}
    measured_rss: list[float] = []
    a = _Aem()  # at start-up, before the application grows
    try:
        _run_levels(ctx, a, levels, n, rounds, ballast, p50s, measured_rss)
        _throughput(ctx, a, k, 1 if ctx.quick else 7)
    finally:
        a.close()
    del ballast
    _memory(ctx)
    if len(measured_rss) > 1:
        for name, values in p50s.items():
            first, last = values[0], values[-1]
            if first and last:
                ctx.record(f"flatness: p50 at {measured_rss[-1]:.0f} MB ÷ p50 at {measured_rss[0]:.0f} MB",
                           name, "ratio", last / first, "×")
    lines(ctx.plot_path("latency-vs-rss"), "event → handler running in another process (p50)",
          measured_rss, p50s, "parent RSS (MB)", "latency p50 (µs)", logy=True)
    ctx.note(f"latency: {n} samples per variant and RSS level, {rounds} interleaved rounds, "
             f"{PAUSE * 1000:.0f} ms before every event; a pool of {WORKERS} capsules made at start-up, "
             f"executors of {WORKERS} workers made at each level")


def _run_levels(ctx: Context, a: _Aem, levels: list[int], n: int, rounds: int,
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
        case = f"parent RSS {target} MB"
        ctx.step(f"latency at {case}: every variant, {rounds} rounds")
        results = _measure_level(a, n, rounds)
        for name, samples in results.items():
            d = distribution(samples)
            ctx.record(case, name, "latency p50", d["p50"], "µs", "lower", samples)
            ctx.record(case, name, "latency p99", d["p99"], "µs", "lower")
            p50s.setdefault(name, []).append(d["p50"])
        ctx.note(f"{case}: measured RSS {rss:.0f} MB")
