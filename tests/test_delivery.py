"""Asynchronous delivery (aem.start), signals ending run/keepalive, fork safety.

Tests that send SIGINT/SIGTERM or rely on the process's main-thread state run
in a child Python (run_script) so that a failure cannot take the test session
down with it.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

import pytest

import aem
from conftest import AEM_PATH, run_script


def test_async_delivery_interrupts_a_busy_loop() -> None:
    got: list[float] = []
    aem.register(aem.Timer(0.02, interval=0.02), lambda ev: got.append(time.monotonic()))
    aem.start()
    try:
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 0.25:
            n += 1  # pure Python, never polls
    finally:
        aem.stop()
    assert len(got) >= 5
    assert threading.current_thread() is threading.main_thread()


def test_async_delivery_interrupts_sleep_and_recv() -> None:
    where: list[str] = []

    def handler(ev: Any) -> None:
        where.append(threading.current_thread().name)

    aem.register(aem.Timer(0.05), handler)
    aem.start()
    try:
        t0 = time.monotonic()
        time.sleep(0.2)  # interrupted, then resumed for the rest of the time
        assert time.monotonic() - t0 >= 0.19
        assert where == ["MainThread"]
        a, b = socket.socketpair()
        aem.register(aem.Timer(0.05), handler)
        threading.Timer(0.15, lambda: b.send(b"z")).start()
        assert a.recv(1) == b"z"  # blocking recv, interrupted by the handler, then completes
        assert where == ["MainThread", "MainThread"]
        a.close()
        b.close()
    finally:
        aem.stop()


def test_handlers_never_nest_in_async_mode() -> None:
    active = [0]
    overlaps = [0]
    calls = [0]

    def slow(ev: Any) -> None:
        active[0] += 1
        if active[0] > 1:
            overlaps[0] += 1
        calls[0] += 1
        time.sleep(0.01)  # events arrive meanwhile; they must wait
        active[0] -= 1

    aem.register(aem.Timer(0.001, interval=0.002), slow)
    ue = aem.UserEvent()
    aem.register(ue, slow)
    aem.start()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.2:
            ue.fire()
            time.sleep(0.001)
    finally:
        aem.stop()
    assert calls[0] > 5 and overlaps[0] == 0


def test_start_stop_are_idempotent_and_restore_the_kick_signal() -> None:
    before = signal.getsignal(aem.DEFAULT_KICK_SIGNAL)
    aem.start()
    aem.start()
    assert aem.stats()["async"] is True
    aem.stop()
    aem.stop()
    assert aem.stats()["async"] is False
    assert signal.getsignal(aem.DEFAULT_KICK_SIGNAL) == before


def test_start_refuses_bad_kick_signals_and_other_threads() -> None:
    with pytest.raises(ValueError):
        aem.start(signal.SIGINT)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            aem.start()
        except aem.AemError as e:
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1


def test_run_from_another_thread_while_async_is_refused() -> None:
    aem.register(aem.Timer(10), print)
    aem.start()
    errors: list[BaseException] = []
    try:
        t = threading.Thread(target=lambda: errors.append(_catch(aem.run, 0)))
        t.start()
        t.join()
    finally:
        aem.stop()
    assert isinstance(errors[0], aem.AemError)


def _catch(fn: Any, *args: Any) -> BaseException | None:
    try:
        fn(*args)
    except BaseException as e:
        return e
    return None


def test_run_in_main_thread_takes_over_async_delivery() -> None:
    got: list[int] = []
    aem.register(aem.Timer(0.01), lambda ev: got.append(1))
    aem.start()
    try:
        assert aem.run(timeout=1) == "idle"
    finally:
        aem.stop()
    assert got == [1]


def test_async_handler_exceptions_go_to_the_error_handler() -> None:
    errors: list[BaseException] = []
    aem.set_error_handler(lambda exc, ev: errors.append(exc))
    aem.register(aem.Timer(0.01), lambda ev: 1 / 0)
    aem.start()
    try:
        time.sleep(0.1)
    finally:
        aem.stop()
    assert [type(e) for e in errors] == [ZeroDivisionError]


def test_async_input_is_interrupted_and_resumes() -> None:
    code = """
        import aem, sys, time
        got = []
        aem.register(aem.Timer(0.1), lambda ev: got.append("tick"))
        aem.start()
        line = input()
        aem.stop()
        print(repr(line), got)
    """
    import subprocess
    import sys as _sys
    import textwrap

    env = dict(os.environ, PYTHONPATH=AEM_PATH)
    p = subprocess.Popen([_sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        time.sleep(0.5)  # the timer fires while input() blocks
        out, err = p.communicate("typed\n", timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert out.strip() == "'typed' ['tick']", err


def test_keepalive_ends_on_stop_from_a_handler() -> None:
    code = """
        import aem
        aem.register(aem.Timer(0.05), lambda ev: aem.stop())
        aem.start()
        print(aem.keepalive())
    """
    p = run_script(code)
    assert p.stdout.strip() == "stopped", p.stderr


@pytest.mark.parametrize("sig,reason", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_terminating_signal_ends_run_cleanly(sig: int, reason: str) -> None:
    code = f"""
        import aem, os, signal, threading
        aem.register(aem.Timer(100), print)
        threading.Timer(0.1, lambda: os.kill(os.getpid(), {int(sig)})).start()
        print(aem.run())
        print(aem.keepalive() if False else "after", aem.stats()["registered"])
    """
    p = run_script(code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [reason, "after", "1"], p.stderr
    assert "Traceback" not in p.stderr


def test_registered_sigint_is_an_event_not_an_interruption() -> None:
    code = """
        import aem, os, signal, threading
        got = []
        def on_int(ev):
            got.append(ev.signum)
            aem.stop()
        aem.register(aem.Signal(signal.SIGINT), on_int)
        threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        print(aem.run(timeout=5), got == [signal.SIGINT])
    """
    p = run_script(code)
    assert p.stdout.split() == ["stopped", "True"], p.stderr


def test_keepalive_ends_on_sigterm() -> None:
    code = """
        import aem, os, signal, threading
        threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        print(aem.keepalive())
    """
    p = run_script(code)
    assert p.stdout.strip() == "terminated", p.stderr


def test_system_exit_in_a_handler_propagates() -> None:
    code = """
        import aem, sys, time
        aem.register(aem.Timer(0.01), lambda ev: sys.exit(7))
        aem.start()
        time.sleep(5)
        print("not reached")
    """
    p = run_script(code)
    assert p.returncode == 7 and "not reached" not in p.stdout


# -- fork safety -----------------------------------------------------------------------------------


def test_forked_child_gets_a_fresh_empty_engine() -> None:
    parent_hits: list[int] = []
    aem.register(aem.Timer(0.05), lambda ev: parent_hits.append(os.getpid()))
    parent_engine = aem.current()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            eng = aem.current()
            fresh = eng is not parent_engine and eng.stats()["registered"] == 0
            hits: list[int] = []
            aem.register(aem.Timer(0.01), lambda ev: hits.append(1))
            reason = aem.run(timeout=1)  # the parent's timer must not fire here
            os.write(w, f"{fresh} {reason} {hits} {parent_hits}".encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 100):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert data.decode() == "True idle [1] []"
    assert aem.run(timeout=1) == "idle"  # the parent's engine is intact
    assert parent_hits == [os.getpid()]


def test_fork_while_delivering_asynchronously() -> None:
    ticks: list[int] = []
    aem.register(aem.Timer(0.01, interval=0.01), lambda ev: ticks.append(1))
    aem.start()
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                st = aem.stats()  # a fresh engine: no doorbell thread, nothing registered
                time.sleep(0.05)
                os.write(w, f"{st['async']} {st['registered']}".encode())
            finally:
                os._exit(0)
        os.close(w)
        data = os.read(r, 100)
        os.close(r)
        os.waitpid(pid, 0)
        time.sleep(0.05)
    finally:
        aem.stop()
    assert data == b"False 0"
    assert len(ticks) >= 3


def test_fork_resets_signal_routes_in_the_child() -> None:
    got: list[int] = []
    aem.register(aem.Signal(signal.SIGUSR2), lambda ev: got.append(ev.info["pid"]))
    pid = os.fork()
    if pid == 0:
        # In the child the parent's route is gone: SIGUSR2's old disposition (default: terminate).
        os._exit(0 if not aem._core.signal_routed(signal.SIGUSR2) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    os.kill(os.getpid(), signal.SIGUSR2)
    aem.run(timeout=0.2)
    assert got == [os.getpid()]


def test_async_mode_leaves_the_fds_as_it_found_them() -> None:
    import fcntl

    a, b = socket.socketpair()
    try:
        eid = aem.register(aem.Readable(a), lambda ev: a.recv(10))
        aem.start()
        assert fcntl.fcntl(a, fcntl.F_GETFL) & os.O_ASYNC, "data on a signals the main thread directly"
        b.send(b"x")
        time.sleep(0.05)
        aem.stop()
        assert not fcntl.fcntl(a, fcntl.F_GETFL) & os.O_ASYNC
        aem.start()
        aem.unregister(eid)
        assert not fcntl.fcntl(a, fcntl.F_GETFL) & os.O_ASYNC
        aem.stop()
    finally:
        a.close()
        b.close()


def test_psi_trigger_events_reach_an_asynchronous_main_thread() -> None:
    """A PSI trigger reports each event once, to whoever polls first: in async mode the
    doorbell thread's wait sees it and must hand it over (the CPU pressure file is used:
    three busy processes on this machine make CPU stalls, a real kernel trigger)."""
    if not os.path.exists("/proc/pressure/cpu"):
        pytest.skip("no PSI on this kernel")
    code = """
        import aem, subprocess, sys, time
        n = []
        aem.register(aem.MemoryPressure(1000, 2_000_000, path="/proc/pressure/cpu"),
                     lambda ev: n.append(ev.level))
        hogs = [subprocess.Popen([sys.executable, "-c", "import time\\nt=time.time()\\n"
                                  "while time.time()-t < 4: pass"]) for _ in range(3)]
        aem.start()
        deadline = time.monotonic() + 8
        while not n and time.monotonic() < deadline:
            time.sleep(0.05)
        aem.stop()
        for h in hogs:
            h.kill(); h.wait()
        print(len(n) > 0, n[:1])
    """
    p = run_script(code, timeout=60)
    assert p.stdout.split() == ["True", "['some']"], p.stderr


# -- kept from review (were in test_regressions.py) ------------------------------

def test_async_chain_of_events_fired_by_handlers_completes() -> None:
    p = run_script("""
        import aem, time
        ue = aem.UserEvent()
        n = [0]
        def h(ev):
            n[0] += 1
            if n[0] < 200:
                ue.fire()
        aem.register(ue, h)
        aem.start()
        ue.fire()
        t = time.monotonic()
        while n[0] < 200 and time.monotonic() - t < 5:
            time.sleep(0.01)
        aem.stop()
        print(n[0], aem.stats()["queued"])
    """)
    assert p.stdout.split() == ["200", "0"], p.stderr


def test_async_delivery_survives_a_shortage_handler() -> None:
    p = run_script("""
        import aem, time
        hits = []
        vmt = aem.VMTable(size=1 << 20, fallback=True)
        aem.register(vmt.shortage, lambda ev: time.sleep(0.2))
        aem.register(aem.Timer(0.05), lambda ev: hits.append(1))
        aem.start()
        big = vmt.alloc(1 << 20)
        blk = vmt.alloc(64)            # shortage: its handler runs synchronously, here
        time.sleep(0.2)
        aem.register(aem.Timer(0.02, interval=0.02), lambda ev: hits.append(2))
        time.sleep(0.5)
        aem.stop()
        print(hits.count(1), hits.count(2) >= 5)
    """)
    assert p.stdout.split() == ["1", "True"], p.stderr


def test_stop_from_another_thread_then_start_restores_the_kick_signal() -> None:
    p = run_script("""
        import aem, signal, threading
        before = signal.getsignal(signal.SIGURG)
        aem.start()
        t = threading.Thread(target=aem.stop); t.start(); t.join()
        aem.start(); aem.stop()
        print(signal.getsignal(signal.SIGURG) == before)
    """)
    assert p.stdout.strip() == "True", p.stderr
