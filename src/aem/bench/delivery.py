"""``aem bench delivery``: from an occurrence to its handler running in the main thread.

A separate process (the stimulus) writes its ``CLOCK_MONOTONIC`` time into a
pipe at random intervals of 1–3 ms; the handler's first statement reads the
clock again; the difference is the delivery latency.  The main thread is
either *busy* (a pure-Python loop that never polls) or *blocked* (in
``time.sleep``).  Variants, all woken by the same pipe:

* ``aem``: ``aem.Readable(pipe)`` with ``aem.start()`` — the engine's thread
  waits natively and interrupts the main thread (pending call + kick signal).
* ``python thread + pthread_kill``: what a Python programmer writes without
  aem — a watcher thread blocks in ``select`` and wakes the main thread with
  ``signal.pthread_kill``; the Python signal handler reads the pipe.
* ``SIGIO (O_ASYNC)``: the kernel itself signals the process when the pipe
  becomes readable; no thread at all.  The floor for signal delivery.
"""

from __future__ import annotations

import fcntl
import functools
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import aem

from ._harness import Context, distribution, interleave
from ._plot import cdf

STIMULUS = r"""
import os, random, sys, time
fd, n, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
time.sleep(0.02)
for _ in range(n + 1):
    time.sleep(rnd.uniform(0.001, 0.003))
    os.write(fd, time.monotonic_ns().to_bytes(8, "little"))
"""


def _stimulus(w: int, n: int, seed: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", STIMULUS, str(w), str(n), str(seed)], pass_fds=(w,))


def _consume(r: int, out: list[float], now: int) -> None:
    data = os.read(r, 8 * 256)
    for i in range(0, len(data) - 7, 8):
        out.append((now - int.from_bytes(data[i:i + 8], "little")) / 1000.0)


def _wait_main(samples: list[float], n: int, mode: str) -> None:
    deadline = time.monotonic() + 30
    if mode == "busy":
        x = 0
        while len(samples) < n and time.monotonic() < deadline:
            x += 1  # pure Python: never polls, never blocks
    else:
        while len(samples) < n and time.monotonic() < deadline:
            time.sleep(0.05)


def measure_aem(n: int, mode: str, seed: int) -> list[float]:
    """Latencies (µs) with aem.Readable + aem.start()."""
    r, w = os.pipe()
    samples: list[float] = []
    eng = aem.current()
    eid = eng.register(aem.Readable(r), lambda ev: _consume(r, samples, time.monotonic_ns()))
    eng.start()
    p = _stimulus(w, n, seed)
    try:
        _wait_main(samples, n + 1, mode)
    finally:
        eng.stop()
        eng.unregister(eid)
        p.wait()
        os.close(r)
        os.close(w)
    return samples[1:]


def measure_thread_kill(n: int, mode: str, seed: int) -> list[float]:
    """Latencies (µs) with a Python watcher thread and signal.pthread_kill."""
    r, w = os.pipe()
    samples: list[float] = []
    consumed = threading.Event()
    stop = threading.Event()
    main = threading.main_thread().ident
    assert main is not None

    def on_signal(signum: int, frame: object) -> None:
        _consume(r, samples, time.monotonic_ns())
        consumed.set()

    def watcher() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([r], [], [], 0.1)
            if ready and not stop.is_set():
                consumed.clear()
                signal.pthread_kill(main, signal.SIGUSR1)
                consumed.wait(1.0)

    old = signal.signal(signal.SIGUSR1, on_signal)
    t = threading.Thread(target=watcher, daemon=True)
    t.start()
    p = _stimulus(w, n, seed)
    try:
        _wait_main(samples, n + 1, mode)
    finally:
        stop.set()
        t.join()
        signal.signal(signal.SIGUSR1, old)
        p.wait()
        os.close(r)
        os.close(w)
    return samples[1:]


def measure_sigio(n: int, mode: str, seed: int) -> list[float]:
    """Latencies (µs) with O_ASYNC: the kernel sends SIGIO when the pipe is readable."""
    r, w = os.pipe()
    samples: list[float] = []

    def on_sigio(signum: int, frame: object) -> None:
        try:
            _consume(r, samples, time.monotonic_ns())
        except BlockingIOError:
            pass

    old = signal.signal(signal.SIGIO, on_sigio)
    os.set_blocking(r, False)
    fcntl.fcntl(r, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC)
    p = _stimulus(w, n, seed)
    try:
        _wait_main(samples, n + 1, mode)
    finally:
        p.wait()
        fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) & ~os.O_ASYNC)
        signal.signal(signal.SIGIO, old)
        os.close(r)
        os.close(w)
    return samples[1:]


VARIANTS: dict[str, Callable[[int, str, int], list[float]]] = {
    "aem start()": measure_aem,
    "python thread + pthread_kill": measure_thread_kill,
    "SIGIO (O_ASYNC, kernel)": measure_sigio,
}


def _measure_mode(ctx: Context, mode: str, n: int, rounds: int) -> None:
    per_variant: dict[str, list[float]] = {name: [] for name in VARIANTS}
    seeds = iter(range(1000))

    def one(name: str) -> float:
        samples = VARIANTS[name](n, mode, next(seeds))
        per_variant[name].extend(samples)
        return distribution(samples)["p50"] if samples else float("nan")

    interleave({name: functools.partial(one, name) for name in VARIANTS}, rounds=rounds, warmup=0)
    case = f"{mode} main thread"
    for name, samples in per_variant.items():
        if not samples:
            ctx.note(f"{name} ({mode}): no sample arrived")
            continue
        d = distribution(samples)
        for metric in ("p50", "p99", "max"):
            ctx.record(case, name, f"latency {metric}", d[metric], "µs", "lower",
                       samples if metric == "p50" else ())
    cdf(ctx.plot_path(f"{mode}"), f"occurrence → handler start, {mode} main thread", per_variant,
        "latency (µs)")


def run(ctx: Context) -> None:
    """Busy and blocked main thread, every variant, interleaved rounds; p50/p99/max of latency."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("the delivery benchmark must run in the main thread")
    n = 30 if ctx.quick else 300
    rounds = 1 if ctx.quick else 4
    for mode in ("busy", "blocked"):
        _measure_mode(ctx, mode, n, rounds)
    ctx.note(f"{n} occurrences per measurement at 1–3 ms intervals from another process, {rounds} "
             "interleaved rounds; the handler's first statement stamps the time")
