"""``aem bench dispatch``: fd event round trip on a socketpair (ping-pong).

Two sockets of a socketpair, a handler on each: a byte goes from one end to
the other and back — one round trip is two readiness events, two handler
calls, two ``recv`` and two ``send``.  Every variant runs the same handler
work in one thread; only the event loop differs:

* aem ``Readable`` + ``aem.run`` (handler calls ``recv``), and aem ``Read``
  (the engine reads the byte in C and hands it over);
* asyncio ``loop.add_reader`` and uvloop ``loop.add_reader``;
* a bare ``select.epoll`` loop in Python (dict of fd -> callback).

Figures: µs per round trip (median of interleaved rounds) and callbacks/s.
"""

from __future__ import annotations

import asyncio
import functools
import select
import socket
import time
from collections.abc import Callable

import aem

from ._harness import Context, distribution, interleave
from ._plot import bars

Variant = Callable[[int], float]


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def aem_readable(n: int) -> float:
    """aem: Readable on both ends, handlers recv/send, aem.run dispatches."""
    a, b = _pair()
    eng = aem.Engine()
    left = [n]
    a_recv, a_send, b_recv, b_send = a.recv, a.send, b.recv, b.send

    def on_a(ev: object) -> None:
        a_recv(1)
        left[0] -= 1
        if left[0]:
            a_send(b"x")
        else:
            eng.stop()

    def on_b(ev: object) -> None:
        b_recv(1)
        b_send(b"x")

    eng.register(aem.Readable(a), on_a)
    eng.register(aem.Readable(b), on_b)
    t0 = time.perf_counter()
    a_send(b"x")
    eng.run()
    dt = time.perf_counter() - t0
    eng.close()
    a.close()
    b.close()
    return dt / n * 1e6


def aem_read(n: int) -> float:
    """aem: Read on both ends (the engine recv()s in C), handlers only send."""
    a, b = _pair()
    eng = aem.Engine()
    left = [n]
    a_send, b_send = a.send, b.send

    def on_a(ev: object) -> None:
        left[0] -= 1
        if left[0]:
            a_send(b"x")
        else:
            eng.stop()

    def on_b(ev: object) -> None:
        b_send(b"x")

    eng.register(aem.Read(a, 64), on_a)
    eng.register(aem.Read(b, 64), on_b)
    t0 = time.perf_counter()
    a_send(b"x")
    eng.run()
    dt = time.perf_counter() - t0
    eng.close()
    a.close()
    b.close()
    return dt / n * 1e6


def _asyncio_like(loop: asyncio.AbstractEventLoop, n: int) -> float:
    a, b = _pair()
    left = [n]
    a_recv, a_send, b_recv, b_send = a.recv, a.send, b.recv, b.send

    def on_a() -> None:
        a_recv(1)
        left[0] -= 1
        if left[0]:
            a_send(b"x")
        else:
            loop.stop()

    def on_b() -> None:
        b_recv(1)
        b_send(b"x")

    loop.add_reader(a.fileno(), on_a)
    loop.add_reader(b.fileno(), on_b)
    t0 = time.perf_counter()
    a_send(b"x")
    loop.run_forever()
    dt = time.perf_counter() - t0
    loop.remove_reader(a.fileno())
    loop.remove_reader(b.fileno())
    loop.close()
    a.close()
    b.close()
    return dt / n * 1e6


def asyncio_loop(n: int) -> float:
    """asyncio's default (selector) loop, add_reader."""
    return _asyncio_like(asyncio.new_event_loop(), n)


def uvloop_loop(n: int) -> float:
    """uvloop, add_reader."""
    import uvloop

    return _asyncio_like(uvloop.new_event_loop(), n)


def bare_epoll(n: int) -> float:
    """A bare select.epoll loop: dict fd -> callback, no framework."""
    a, b = _pair()
    ep = select.epoll()
    callbacks: dict[int, Callable[[], None]] = {}
    left = [n]
    running = [True]
    a_recv, a_send, b_recv, b_send = a.recv, a.send, b.recv, b.send

    def on_a() -> None:
        a_recv(1)
        left[0] -= 1
        if left[0]:
            a_send(b"x")
        else:
            running[0] = False

    def on_b() -> None:
        b_recv(1)
        b_send(b"x")

    callbacks[a.fileno()] = on_a
    callbacks[b.fileno()] = on_b
    ep.register(a.fileno(), select.EPOLLIN)
    ep.register(b.fileno(), select.EPOLLIN)
    poll = ep.poll
    t0 = time.perf_counter()
    a_send(b"x")
    while running[0]:
        for fd, _ in poll():
            callbacks[fd]()
    dt = time.perf_counter() - t0
    ep.close()
    a.close()
    b.close()
    return dt / n * 1e6


def variants() -> dict[str, Variant]:
    """Every variant measured, aem's first."""
    out: dict[str, Variant] = {
        "aem Readable+run": aem_readable,
        "aem Read+run": aem_read,
        "asyncio add_reader": asyncio_loop,
    }
    try:
        import uvloop  # noqa: F401

        out["uvloop add_reader"] = uvloop_loop
    except ImportError:  # pragma: no cover - uvloop is in the bench extra
        pass
    out["bare select.epoll loop"] = bare_epoll
    return out


def run(ctx: Context) -> None:
    """Measure every variant, interleaved; record µs per round trip and callbacks/s."""
    n = 2_000 if ctx.quick else 50_000
    rounds = 1 if ctx.quick else 7
    vs = variants()
    results = interleave({name: functools.partial(fn, n) for name, fn in vs.items()}, rounds=rounds,
                         warmup=1)
    medians = {}
    for name, samples in results.items():
        d = distribution(samples)
        medians[name] = d["p50"]
        ctx.record("socketpair ping-pong", name, "round trip", d["p50"], "µs", "lower", samples)
        ctx.record("socketpair ping-pong", name, "callbacks/s", 2e6 / d["p50"], "1/s", "higher",
                   [2e6 / s for s in samples])
    ctx.note(f"{n} round trips per measurement, {rounds} interleaved rounds after a warm-up; median shown")
    bars(ctx.plot_path("roundtrip"), "socketpair ping-pong round trip (lower is better)",
         list(medians), list(medians.values()), "µs per round trip")
