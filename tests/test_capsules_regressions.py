"""Regression tests for capsule bugs found by trying them (issue 8, item 3): each one is the
exact reproducer of its bug.  (A capsule killed by a real-time signal: see
test_capsules.test_killed_busy_capsule_is_reported_and_replaced.)"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import pytest

import aem
from conftest import run_script, run_until


def test_pool_fills_when_the_application_has_fds_beyond_1024() -> None:
    # select() raised ValueError for fds >= 1024: the manager spun and the pool never filled
    code = """
        import aem, os, resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 2048:
            print("skip"); raise SystemExit(0)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
        held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        results = aem.UserEvent()
        got = []
        aem.register(results, lambda ev: got.append(ev.payload))
        def work(ev):
            ev.payload.fire(os.getpid())
        ue = aem.UserEvent()
        aem.register(ue, work, flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT)
        with aem.CapsulePool(size=2) as pool:
            ready = pool.wait_ready(10)
            aem.register(ue2 := aem.UserEvent(), work, flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=pool)
            ue2.fire(results)
            import time
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                aem.run(timeout=0.05)
            print(ready, max(held) >= 1024, len(got))
    """
    p = run_script(code, timeout=60)
    assert p.returncode == 0, p.stderr
    if p.stdout.strip() == "skip":
        pytest.skip("the hard fd limit is below 2048")
    assert p.stdout.split() == ["True", "True", "1"], p.stderr


def test_registration_checks_the_pool() -> None:
    # a bad or closed pool was accepted; every occurrence then failed at delivery
    with pytest.raises(TypeError, match="CapsulePool"):
        aem.register(aem.UserEvent(), print, flags=aem.EVF_CAPSULE, pool="x")
    closed = aem.CapsulePool(size=1)
    closed.close()
    with pytest.raises(aem.AemError, match="closed"):
        aem.register(aem.UserEvent(), print, flags=aem.EVF_CAPSULE, pool=closed)
    assert aem.current().stats()["registered"] == 0, "nothing was registered"


def _recv_natural(ev: Any) -> None:
    """What a handler naturally writes: trust the socket's mode and recv()."""
    blocking = ev.conn.getblocking()
    data = ev.conn.recv(100)  # the client writes only after a pause
    ev.conn.sendall(f"{blocking} {data.decode()}\n".encode())
    ev.conn.close()


def test_accepted_socket_in_a_capsule_blocks_as_it_says(pool: aem.CapsulePool) -> None:
    # getblocking() said True but the fd was non-blocking: recv() raised BlockingIOError
    srv = socket.create_server(("127.0.0.1", 0))
    exits: list[Any] = []
    eid = aem.register(aem.Accept(srv), _recv_natural, flags=aem.EVF_CAPSULE, pool=pool)
    aem.register(aem.ChildExit(job=eid), exits.append)
    cli = socket.create_connection(srv.getsockname(), timeout=10)
    try:
        run_until(lambda: pool.stats()["busy"] == 1)
        time.sleep(0.3)  # the capsule waits in recv()
        cli.sendall(b"late")
        cli.settimeout(10)
        assert cli.recv(100) == b"True late\n"
        run_until(lambda: bool(exits))
        assert exits[0].returncode == 0, exits[0].error
    finally:
        cli.close()
        srv.close()


def _read_own_fd(ev: Any) -> None:
    ev.payload_sink.fire((os.read(ev.fd, 100), ev.fd))


def test_event_fd_in_a_capsule_is_the_capsules_own(pool: aem.CapsulePool) -> None:
    # ev.fd was the parent's number: meaningless (or another file) in the capsule
    a, b = socket.socketpair()
    results = aem.UserEvent()
    got: list[Any] = []
    aem.register(results, lambda ev: got.append(ev.payload))

    def sink(ev: Any) -> None:
        ev.payload_sink = results

    aem.register(aem.Readable(a), _read_own_fd, flags=aem.EVF_CAPSULE | aem.EVF_ONESHOT, pool=pool,
                 constructor=sink)
    pool.refresh()
    assert pool.wait_ready(10)
    try:
        b.send(b"for the capsule")
        run_until(lambda: bool(got))
        data, fd = got[0]
        assert data == b"for the capsule"
        assert a.fileno() >= 0  # the parent's socket is still its own and open
        a.setblocking(False)
        with pytest.raises(BlockingIOError):
            a.recv(100)  # the capsule consumed the data through its own copy
        assert isinstance(fd, int)
    finally:
        a.close()
        b.close()


def test_short_lived_pool_prints_nothing() -> None:
    # the template printed a BrokenPipeError traceback in 5 of 6 runs
    code = """
        import aem
        for _ in range(6):
            with aem.CapsulePool(size=1):
                pass
        with aem.CapsulePool(size=2) as p:
            p.wait_ready(10)
        aem.CapsulePool(size=1)   # closed at exit
    """
    p = run_script(code, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr


# -- warm capsules, layering -------------------------------------------------------------------------


def test_a_capsule_is_idle_only_once_it_reports_itself_warm() -> None:
    code = """
        import aem, time
        import aem.capsules._child as child
        real_warm = child.warm
        def slow_warm(*args):
            time.sleep(1.0)        # (the template inherits this module state)
            real_warm(*args)
        child.warm = slow_warm
        with aem.CapsulePool(size=1) as pool:
            early = pool.wait_ready(0.5)
            st = pool.stats()
            print(early, st["idle"], st["starting"], pool.wait_ready(10))
    """
    p = run_script(code, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "0", "1", "True"]


def test_a_capsule_that_fails_to_warm_up_is_never_used() -> None:
    code = """
        import aem, time
        import aem.capsules._child as child
        def broken_warm(*args):
            raise RuntimeError("cannot warm up")
        child.warm = broken_warm
        with aem.CapsulePool(size=1) as pool:
            ready = pool.wait_ready(1.0)
            st = pool.stats()
            print(ready, st["idle"], st["reaped"] > 0, st["spawn_failures"] < 40)
    """
    p = run_script(code, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "0", "True", "True"], "retried with a back-off"


def test_the_engine_does_not_import_capsules() -> None:
    import ast
    import inspect

    import aem.engine

    tree = ast.parse(inspect.getsource(aem.engine))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names} | {node.module or "" for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom)}
    assert not any("capsules" in name for name in imported)
    assert "capsules" not in aem.engine.Engine.__dict__.get("_spawn").__code__.co_names


def test_engine_without_process_support_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import aem.engine

    monkeypatch.setattr(aem.engine, "_process_support", None)
    errors: list[BaseException] = []
    with aem.Engine() as eng:
        eng.set_error_handler(lambda exc, ev: errors.append(exc))
        ue = aem.UserEvent()
        eng.register(ue, print, flags=aem.EVF_FORK)
        ue.fire()
        eng.run(timeout=0.1)
    assert len(errors) == 1 and "process support" in str(errors[0])
