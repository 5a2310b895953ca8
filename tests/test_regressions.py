"""Bugs found in review, each kept from coming back (reproducers of the review, as tests).

Those touching the process's signals, stdout or capsules run in a child Python.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import aem
from conftest import AEM_PATH, run_script


def test_oneshot_accept_accepts(engine: aem.Engine) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    got: list[Any] = []
    errors: list[BaseException] = []
    engine.set_error_handler(lambda exc, ev: errors.append(exc))
    engine.register(aem.Accept(srv), lambda ev: (got.append(ev.addr), ev.conn.close()),
                    flags=aem.EVF_ONESHOT)
    cli = socket.create_connection(srv.getsockname())
    assert engine.run(timeout=2) == "idle"
    assert len(got) == 1 and errors == []
    cli.close()
    srv.close()


def test_read_unregisters_itself_at_end_of_stream(engine: aem.Engine) -> None:
    a, b = socket.socketpair()
    eofs: list[bool] = []
    eid = engine.register(aem.Read(a), lambda ev: eofs.append(ev.eof))
    b.close()
    assert engine.run(timeout=2) == "idle"
    assert eofs == [True]
    assert engine.unregister(eid, missing_ok=True) is False
    a.close()


def test_stopped_oneshot_signal_is_delivered_once_started(engine: aem.Engine) -> None:
    got: list[int] = []
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        eid = engine.register(aem.Signal(signal.SIGUSR2), lambda ev: got.append(ev.signum),
                              flags=aem.EVF_ONESHOT)
        engine.control(eid, aem.EVJOBSTOP)
        os.kill(os.getpid(), signal.SIGUSR2)
        engine.run(timeout=0.1)
        assert got == [] and engine.stats()["held"] == 1
        engine.control(eid, aem.EVJOBSTART)
        assert engine.run(timeout=1) == "idle"
        assert got == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_new_registration_on_a_reused_fd_number_fires(engine: aem.Engine) -> None:
    a, b = socket.socketpair()
    engine.register(aem.Readable(a), lambda ev: None)
    number = a.fileno()
    a.close()  # closed without unregistering: epoll forgets it, the engine's list does not
    c, d = socket.socketpair()
    if c.fileno() != number:  # make the new socket take the old number
        os.dup2(c.fileno(), number)
        c.close()
        c = socket.socket(fileno=number)
    got: list[int] = []
    engine.register(aem.Readable(c), lambda ev: (got.append(ev.fd), c.recv(10)))
    d.send(b"x")
    engine.run(timeout=0.3)
    assert number in got
    for s in (b, c, d):
        s.close()


def test_stopped_shortage_registration_stays_registered(engine: aem.Engine) -> None:
    vmt = aem.VMTable(1 << 16, fallback=True)
    calls: list[int] = []
    eid = engine.register(vmt.shortage, lambda ev: calls.append(ev.size))
    engine.control(eid, aem.EVJOBSTOP)
    big = vmt.alloc(1 << 16)
    small = vmt.alloc(64)  # shortage while stopped: not delivered, not forgotten
    small.free()
    engine.control(eid, aem.EVJOBSTART)
    small = vmt.alloc(64)
    assert calls == [64]
    small.free()
    big.free()
    vmt.close()


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


def test_oneshot_timer_with_a_lambda_runs_in_a_capsule() -> None:
    p = run_script("""
        import aem, os, time
        pool = aem.CapsulePool(size=1)
        assert pool.wait_ready(10)
        results = aem.UserEvent()
        got = []
        aem.register(results, lambda ev: got.append(ev.payload))
        aem.register(aem.Timer(0.05), lambda ev: results.fire(os.getpid()),
                     flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=pool)
        t0 = time.process_time()
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            aem.run(timeout=0.05)
        print(len(got), got[0] != os.getpid(), time.process_time() - t0 < 5)
        pool.close()
    """)
    assert p.stdout.split() == ["1", "True", "True"], p.stderr


def test_refresh_lets_running_capsules_finish() -> None:
    p = run_script("""
        import aem, time
        a, b = aem.UserEvent(), aem.UserEvent()
        ea = aem.register(a, lambda ev: time.sleep(0.5), flags=aem.EVF_CAPSULE)
        pool = aem.CapsulePool(size=2)
        assert pool.wait_ready(10)
        exits = []
        aem.register(aem.ChildExit(job=ea), lambda ev: exits.append(("A", ev.returncode)))
        a.fire()
        aem.run(timeout=0.2)
        eb = aem.register(b, lambda ev: None, flags=aem.EVF_CAPSULE, pool=pool)  # unknown lambda
        aem.register(aem.ChildExit(job=eb), lambda ev: exits.append(("B", ev.returncode)))
        b.fire()                       # refreshes the template
        deadline = time.monotonic() + 10
        while len(exits) < 2 and time.monotonic() < deadline:
            aem.run(timeout=0.05)
        print(sorted(exits))
        pool.close()
    """)
    assert p.stdout.strip() == "[('A', 0), ('B', 0)]", p.stderr


def test_keepalive_capsule_raising_every_time_does_not_stall() -> None:
    p = run_script("""
        import aem, os, sys, time
        reply = aem.UserEvent()
        got = []
        aem.register(reply, lambda ev: got.append(ev.payload))
        def h(ev):
            reply.fire(ev.payload)
            raise ValueError("bad request " + "x" * 200)
        ue = aem.UserEvent()
        pool = aem.CapsulePool(size=1)
        aem.register(ue, h, flags=aem.EVF_CAPSULE | aem.EVF_KEEPALIVE, pool=pool)
        assert pool.wait_ready(10)
        for i in range(600):
            ue.fire(i)
            if i % 50 == 0:
                aem.run(timeout=0.02)
        deadline = time.monotonic() + 20
        while len(got) < 600 and time.monotonic() < deadline:
            aem.run(timeout=0.05)
        print(len(got))
        pool.close(timeout=0.5)
    """, timeout=60)
    assert p.stdout.strip() == "600", p.stderr[-2000:]


def test_forks_do_not_repeat_what_the_application_printed(tmp_path: Any) -> None:
    script = tmp_path / "dup.py"
    script.write_text(textwrap.dedent("""
        import aem
        def h(ev):
            pass
        print("HELLO-FROM-PARENT")          # still in the buffer: stdout is a file
        pool = aem.CapsulePool(size=2)
        ue = aem.UserEvent()
        aem.register(ue, h, flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=pool)
        pool.wait_ready(10)
        for i in range(3):
            ue.fire(i)
            aem.run(timeout=0.2)
        fe = aem.UserEvent()
        aem.register(fe, h, flags=aem.EVF_FORK | aem.EVF_NOCLDWAIT)
        fe.fire()
        aem.run(timeout=0.3)
        pool.close()
    """))
    out = tmp_path / "out.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = AEM_PATH
    with open(out, "w") as f:
        subprocess.run([sys.executable, str(script)], stdout=f, stderr=subprocess.PIPE, env=env,
                       timeout=60, check=True)
    time.sleep(0.2)
    assert out.read_text().count("HELLO-FROM-PARENT") == 1
