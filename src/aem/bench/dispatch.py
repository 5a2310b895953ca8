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


def _players(a: socket.socket, b: socket.socket, n: int, done: Callable[[], object],
             recv: bool = True) -> tuple[Callable[..., None], Callable[..., None]]:
    """The two handlers of the ping-pong, the same work under every loop: read the byte
    (unless the loop already did), send it back; ``done()`` after n round trips."""
    left = [n]
    a_recv, a_send, b_recv, b_send = a.recv, a.send, b.recv, b.send

    def on_a(*_: object) -> None:
        if recv:
            a_recv(1)
        left[0] -= 1
        if left[0]:
            a_send(b"x")
        else:
            done()

    def on_b(*_: object) -> None:
        if recv:
            b_recv(1)
        b_send(b"x")

    return on_a, on_b


def _aem(n: int, source: Callable[[socket.socket], aem.EventSource], recv: bool) -> float:
    a, b = _pair()
    eng = aem.Engine()
    on_a, on_b = _players(a, b, n, eng.stop, recv)
    eng.register(source(a), on_a)
    eng.register(source(b), on_b)
    t0 = time.perf_counter()
    a.send(b"x")
    eng.run()
    dt = time.perf_counter() - t0
    eng.close()
    a.close()
    b.close()
    return dt / n * 1e6


def aem_readable(n: int) -> float:
    """aem: Readable on both ends, handlers recv/send, aem.run dispatches."""
    return _aem(n, aem.Readable, recv=True)


def aem_read(n: int) -> float:
    """aem: Read on both ends (the engine recv()s in C), handlers only send."""
    return _aem(n, lambda s: aem.Read(s, 64), recv=False)


def _asyncio_like(loop: asyncio.AbstractEventLoop, n: int) -> float:
    a, b = _pair()
    on_a, on_b = _players(a, b, n, loop.stop)
    loop.add_reader(a.fileno(), on_a)
    loop.add_reader(b.fileno(), on_b)
    t0 = time.perf_counter()
    a.send(b"x")
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
    running = [True]
    on_a, on_b = _players(a, b, n, lambda: running.__setitem__(0, False))
    callbacks: dict[int, Callable[[], None]] = {a.fileno(): on_a, b.fileno(): on_b}
    ep.register(a.fileno(), select.EPOLLIN)
    ep.register(b.fileno(), select.EPOLLIN)
    poll = ep.poll
    t0 = time.perf_counter()
    a.send(b"x")
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
