"""``aem bench timers``: registering a million timers, their memory, and lateness at scale.

* Registration: N timers due far in the future, registered in a fresh
  process per measurement (so the memory figure is the RSS growth of that
  process alone): seconds, registrations/s and bytes per timer.  aem is
  measured keeping the event ids in a list (as asyncio's handles are kept, so
  they can be cancelled) and dropping them; asyncio and uvloop keep their
  ``TimerHandle``\\ s in a list.
* Lateness: 100,000 timers due at random moments over one second; the
  handler compares the clock with the deadline; p50/p99 of the lateness.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import os
import random
import time
from collections.abc import Callable

import aem

from ._harness import Context, distribution, interleave, json_from_child
from ._plot import bars, cdf


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _noop(*args: object) -> None:
    pass


def _register_aem(n: int, keep: bool) -> tuple[float, int]:
    eng = aem.Engine()
    reg = eng.register
    timer = aem.Timer
    gc.collect()
    before = _rss()
    t0 = time.perf_counter()
    if keep:
        eids = [reg(timer(3600.0), _noop) for _ in range(n)]
    else:
        for _ in range(n):
            reg(timer(3600.0), _noop)
        eids = []
    dt = time.perf_counter() - t0
    gc.collect()
    grown = _rss() - before
    assert eng.stats()["timers"] == n and len(eids) == (n if keep else 0)
    return dt, grown


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        import uvloop

        return uvloop.new_event_loop()  # type: ignore[no-any-return]
    return asyncio.new_event_loop()


def _register_asyncio(n: int, use_uvloop: bool) -> tuple[float, int]:
    loop = _new_loop(use_uvloop)
    call_later = loop.call_later
    gc.collect()
    before = _rss()
    t0 = time.perf_counter()
    handles = [call_later(3600.0, _noop) for _ in range(n)]
    dt = time.perf_counter() - t0
    gc.collect()
    grown = _rss() - before
    assert len(handles) == n
    return dt, grown


REGISTRATION: dict[str, Callable[[int], tuple[float, int]]] = {
    "aem (eids kept)": lambda n: _register_aem(n, True),
    "aem (eids dropped)": lambda n: _register_aem(n, False),
    "asyncio call_later": lambda n: _register_asyncio(n, False),
    "uvloop call_later": lambda n: _register_asyncio(n, True),
}


def child_main(variant: str, n: int) -> None:
    """Entry point of the measuring child process: prints one JSON line."""
    dt, grown = REGISTRATION[variant](n)
    print(json.dumps({"seconds": dt, "bytes": grown}))


def _measure_in_child(variant: str, n: int) -> dict[str, float]:
    return json_from_child(f"from aem.bench.timers import child_main; child_main({variant!r}, {n})", 600)


# Timers are due from HEAD seconds after their registration on, so that registering
# them all (0.1-0.5 s for 100,000) does not count as lateness.
HEAD = 1.5


def lateness_aem(n: int, spread: float, seed: int, head: float = HEAD) -> list[float]:
    """Lateness (µs) of n aem timers due at random moments within ``spread`` seconds."""
    rnd = random.Random(seed)
    eng = aem.Engine()
    late: list[float] = []
    deadlines: dict[int, int] = {}
    now = time.monotonic_ns

    def fired(ev: aem.TimerEvent) -> None:
        late.append((now() - deadlines[ev.eid]) / 1000.0)

    for _ in range(n):
        after = rnd.uniform(head, head + spread)
        t = now()
        eid = eng.register(aem.Timer(after), fired)
        deadlines[eid] = t + int(after * 1e9)
    eng.run(timeout=head + spread + 5)
    eng.close()
    return late


def lateness_asyncio(n: int, spread: float, seed: int, use_uvloop: bool = False,
                     head: float = HEAD) -> list[float]:
    """Lateness (µs) of n call_later timers on asyncio or uvloop."""
    rnd = random.Random(seed)
    loop = _new_loop(use_uvloop)
    late: list[float] = []
    now = time.monotonic_ns
    left = [n]

    def fired(deadline: int) -> None:
        late.append((now() - deadline) / 1000.0)
        left[0] -= 1
        if not left[0]:
            loop.stop()

    for _ in range(n):
        after = rnd.uniform(head, head + spread)
        loop.call_later(after, fired, now() + int(after * 1e9))
    loop.run_forever()
    loop.close()
    return late


def run(ctx: Context) -> None:
    """Registration (fresh process per measurement) and lateness, interleaved."""
    n = 20_000 if ctx.quick else 1_000_000
    rounds = 1 if ctx.quick else 3
    variants = dict(REGISTRATION)
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover
        variants.pop("uvloop call_later")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}

    def one(v: str) -> float:
        r = _measure_in_child(v, n)
        results[v].append(r)
        return r["seconds"]

    interleave({v: functools.partial(one, v) for v in variants}, rounds=rounds, warmup=0)
    rates, per_timer = {}, {}
    for v, rs in results.items():
        secs = sorted(r["seconds"] for r in rs)[len(rs) // 2]
        bytes_ = sorted(r["bytes"] for r in rs)[len(rs) // 2] / n
        rates[v], per_timer[v] = n / secs, bytes_
        case = f"register {n:,} timers"
        ctx.record(case, v, "registrations/s", n / secs, "1/s", "higher", [n / r["seconds"] for r in rs])
        ctx.record(case, v, "memory per timer", bytes_, "B", "lower", [r["bytes"] / n for r in rs])
    bars(ctx.plot_path("memory"), f"memory per timer, {n:,} timers (lower is better)",
         list(per_timer), list(per_timer.values()), "bytes per timer (RSS growth)")
    bars(ctx.plot_path("rate"), f"registrations per second, {n:,} timers (higher is better)",
         list(rates), list(rates.values()), "registrations/s")

    m = 5_000 if ctx.quick else 100_000
    spread = 0.3 if ctx.quick else 1.0
    head = 0.2 if ctx.quick else HEAD
    late: dict[str, list[float]] = {"aem": [], "asyncio call_later": [], "uvloop call_later": []}
    lat_variants: dict[str, Callable[[], float]] = {
        "aem": lambda: _p50(late["aem"], lateness_aem(m, spread, 1, head)),
        "asyncio call_later": lambda: _p50(late["asyncio call_later"],
                                           lateness_asyncio(m, spread, 1, False, head)),
    }
    if "uvloop call_later" in variants:
        lat_variants["uvloop call_later"] = lambda: _p50(late["uvloop call_later"],
                                                          lateness_asyncio(m, spread, 1, True, head))
    else:  # pragma: no cover
        late.pop("uvloop call_later")
    interleave(lat_variants, rounds=rounds, warmup=0)
    case = f"{m:,} timers firing over {spread:g} s"
    for v, samples in late.items():
        d = distribution(samples)
        ctx.record(case, v, "lateness p50", d["p50"], "µs", "lower")
        ctx.record(case, v, "lateness p99", d["p99"], "µs", "lower")
    cdf(ctx.plot_path("lateness"), case, late, "lateness (µs)")
    ctx.note(f"registration: fresh process per measurement, median of {rounds}; memory = RSS growth / n")
    ctx.note(f"lateness: timers due {head:g} s to {head + spread:g} s after registration; "
             "handler start minus deadline")


def _p50(acc: list[float], samples: list[float]) -> float:
    acc.extend(samples)
    return distribution(samples)["p50"]
