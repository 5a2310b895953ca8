"""The engine's own hand-off (handoff.c, aem_handoff_deliver): a native fd-less occurrence of
an EVF_CAPSULE registration the template knows goes from the engine's delivery path straight
onto an idle capsule's socket, with no Python; the pool learns of it afterwards (its idle
table's takes).  Everything else takes the pool's Python path, and every guarantee holds."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

import aem
from aem import _core
from conftest import run_until


@pytest.fixture
def counted(pool: aem.CapsulePool) -> Iterator[list[Any]]:
    """The pool's Python activations (the spawn hook's path), recorded."""
    calls: list[Any] = []
    original = pool._activate

    def activate(eid: int, handler: Any, event: Any, flags: int, priority: int) -> None:
        calls.append((eid, type(event).__name__))
        original(eid, handler, event, flags, priority)

    pool._activate = activate  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del pool._activate


def test_native_occurrences_go_from_the_engine_to_a_capsule(pool: aem.CapsulePool,
                                                             counted: list[Any]) -> None:
    results = aem.UserEvent()
    got: list[Any] = []
    exits: list[Any] = []
    aem.register(results, lambda ev: got.append(ev.payload))
    ue = aem.UserEvent()
    eid = aem.register(ue, lambda ev: results.fire((os.getpid(), ev.payload)), flags=aem.EVF_CAPSULE,
                       pool=pool)
    aem.register(aem.ChildExit(job=eid), lambda ev: exits.append((ev.pid, ev.returncode, ev.job)))
    pool.refresh()  # the template knows the handler by its id
    assert pool.wait_ready(10)
    for n, payload in enumerate((7, b"bytes", None), 1):
        ue.fire(payload)
        run_until(lambda n=n: len(got) == n and len(exits) == n)  # type: ignore[misc]
    assert [p for _pid, p in got] == [7, b"bytes", None]
    assert counted == [], "no occurrence went through Python"
    assert sorted(e[0] for e in exits) == sorted(pid for pid, _p in got)
    assert all(rc == 0 and job == eid for _pid, rc, job in exits)
    st = pool.stats()
    assert st["activations"] == 3 and st["failed"] == 0


def _switches(tid: int) -> int:
    """The voluntary context switches of thread ``tid`` of this process so far."""
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


def test_a_full_pool_s_manager_sleeps_until_something_happens(pool: aem.CapsulePool) -> None:
    assert pool.wait_ready(10)
    time.sleep(0.1)
    tid = pool._manager.native_id
    assert tid is not None
    before = _switches(tid)
    time.sleep(0.6)
    assert _switches(tid) - before <= 1, "the manager thread woke up with nothing to do (polling)"


def test_the_pool_refills_what_the_engine_took_before_those_capsules_end(
        pool: aem.CapsulePool, counted: list[Any]) -> None:
    started = aem.UserEvent()
    got: list[int] = []
    aem.register(started, lambda ev: got.append(ev.payload))
    ue = aem.UserEvent()

    def long_job(ev: Any) -> None:
        started.fire(os.getpid())
        time.sleep(5)

    aem.register(ue, long_job, flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=pool)
    pool.refresh()
    assert pool.wait_ready(10)
    size = pool.stats()["size"]
    for _ in range(size):               # every capsule taken by the engine itself ...
        ue.fire(None)
    run_until(lambda: len(got) == size)
    assert counted == [], "the engine took them"
    # ... and the pool is full again while they still run (their exits are seconds away)
    run_until(lambda: pool._table.idle == size, timeout=3)
    assert pool.stats()["busy"] == size


def test_python_path_for_what_the_engine_does_not_take(pool: aem.CapsulePool, counted: list[Any]) -> None:
    results = aem.UserEvent()
    got: list[Any] = []
    aem.register(results, lambda ev: got.append(ev.payload))
    ue = aem.UserEvent()
    eid = aem.register(ue, lambda ev: results.fire(ev.payload), flags=aem.EVF_CAPSULE, pool=pool)
    pool.refresh()
    assert pool.wait_ready(10)
    ue.fire({"a": 1})  # not a native payload: pickled
    ue.fire(2**70)     # an int beyond 64 bits: pickled
    run_until(lambda: len(got) == 2)
    assert sorted(map(str, got)) == sorted(["{'a': 1}", str(2**70)])
    assert [c[0] for c in counted] == [eid, eid]


def test_reserve_capsule_is_not_taken_by_the_engine() -> None:
    pool = aem.CapsulePool(size=1, reserve=1)
    try:
        results = aem.UserEvent()
        got: list[Any] = []
        aem.register(results, lambda ev: got.append(ev.payload))
        ue = aem.UserEvent()
        aem.register(ue, lambda ev: results.fire(ev.payload), flags=aem.EVF_CAPSULE, pool=pool)
        pool.refresh()
        assert pool.wait_ready(10)
        calls: list[int] = []
        original = pool._activate
        pool._activate = lambda *a: (calls.append(a[0]), original(*a))  # type: ignore[method-assign,func-returns-value]
        ue.fire(1)  # 2 idle > reserve: the engine takes one
        ue.fire(2)  # 1 idle = reserve, low priority: the pool's Python path (it waits for a refill)
        run_until(lambda: len(got) == 2)
        assert sorted(got) == [1, 2]
        assert len(calls) == 1
    finally:
        pool.close()


def test_dead_idle_capsule_makes_the_engine_fall_back(pool: aem.CapsulePool, counted: list[Any]) -> None:
    results = aem.UserEvent()
    got: list[Any] = []
    aem.register(results, lambda ev: got.append(ev.payload))
    ue = aem.UserEvent()
    aem.register(ue, lambda ev: results.fire(ev.payload), flags=aem.EVF_CAPSULE, pool=pool)
    pool.refresh()
    assert pool.wait_ready(10)
    dead_a, dead_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead_b.close()
    try:
        with pool._lock:  # a capsule that died unnoticed is the newest in the engine's table
            pool._sync()
            pool._table.clear()
            for cap in pool._idle:
                pool._table.push(cap.chan.fileno(), cap.token)
            pool._table.push(dead_a.fileno(), 10**9)
        ue.fire(5)
        run_until(lambda: got)
        assert got == [5] and len(counted) == 1, "the send failed: the occurrence took the Python path"
        assert pool.stats()["failed"] == 0
    finally:
        dead_a.close()


@pytest.mark.parametrize("lifo", [1, 0])
def test_the_newest_idle_capsule_takes_the_next_event(pool: aem.CapsulePool, counted: list[Any],
                                                       lifo: int) -> None:
    """LIFO (the default): the capsule that became ready last has slept the least."""
    results = aem.UserEvent()
    got: list[int] = []
    aem.register(results, lambda ev: got.append(ev.payload))
    ue = aem.UserEvent()
    aem.register(ue, lambda ev: results.fire(os.getpid()), flags=aem.EVF_CAPSULE, pool=pool)
    pool.refresh()
    assert pool.wait_ready(10)
    assert pool._table.lifo == 1, "LIFO is the default"
    pool._table.lifo = lifo
    for n in (1, 2):
        with pool._lock:
            pool._sync()
            order = [c.pid for c in pool._idle]  # oldest first, as they became ready
        assert len(order) == 2
        ue.fire()
        run_until(lambda n=n: len(got) == n)  # type: ignore[misc]
        assert got[-1] == (order[-1] if lifo else order[0])
        assert pool.wait_ready(10)
    # the pool's Python path picks the same way (a pickled payload: the engine does not take it)
    with pool._lock:
        pool._sync()
        order = [c.pid for c in pool._idle]
    ue.fire({"pickled": True})
    run_until(lambda: len(got) == 3)
    assert got[-1] == (order[-1] if lifo else order[0]) and len(counted) == 1


def test_killed_capsule_after_the_engine_hand_off_is_reported(pool: aem.CapsulePool,
                                                              counted: list[Any]) -> None:
    results = aem.UserEvent()
    started: list[int] = []
    aem.register(results, lambda ev: started.append(ev.payload))
    exits: list[Any] = []

    def slow(ev: Any) -> None:
        results.fire(os.getpid())
        signal.pause()

    ue = aem.UserEvent()
    eid = aem.register(ue, slow, flags=aem.EVF_CAPSULE, pool=pool)
    aem.register(aem.ChildExit(job=eid), exits.append)
    pool.refresh()
    assert pool.wait_ready(10)
    ue.fire()
    run_until(lambda: started)
    os.kill(started[0], signal.SIGKILL)
    run_until(lambda: exits)
    assert counted == []
    assert (exits[0].pid, exits[0].returncode, exits[0].job) == (started[0], -signal.SIGKILL, eid)
    assert pool.wait_ready(10)


def test_idle_table_misuse_and_bookkeeping() -> None:
    t = _core.HandoffTable(1, 100)
    assert (t.idle, t.reserve, t.reserve_priority, t.open, t.lifo) == (0, 1, 100, 0, 1)
    t.push(5, 1)
    t.push(6, 2)
    assert t.idle == 2 and t.remove(1) and not t.remove(1) and t.idle == 1
    t.clear()
    assert t.idle == 0 and t.drain() == []
    with pytest.raises(ValueError):
        t.push(-1, 3)
    t.attach(7, 5)
    t.attach(7, 6)  # again: replaced
    t.attach(8, 5)
    assert t.attached == 2 and t.detach(7) and not t.detach(7) and t.attached == 1 and t.kept == 0
    with pytest.raises(ValueError):
        t.attach(9, -1)
    with pytest.raises(OverflowError):
        t.detach(-1)
    with pytest.raises(TypeError):
        t.set_known({1, 2})  # type: ignore[arg-type]
    t.set_known(frozenset({1}))
    t.set_known(None)
    with pytest.raises(TypeError):
        _core.handoff_set_default(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _core.HandoffTable()  # type: ignore[call-arg]


def test_closed_default_pool_leaves_the_engine() -> None:
    pool = aem.default_pool()
    try:
        assert _core.handoff_default() is pool._table
        other = aem.CapsulePool(size=1)
        other.close()  # another pool's close leaves the default alone
        assert _core.handoff_default() is pool._table
    finally:
        pool.close()
    assert _core.handoff_default() is None, "a closed pool's table stays out of the engine"
    again = aem.default_pool()  # the next default pool is registered again
    try:
        assert again is not pool and _core.handoff_default() is again._table
    finally:
        again.close()
    assert _core.handoff_default() is None


# ---- events with an fd, and keepalive occurrences, from the engine too ----------------------------

def _serve_natural(ev: Any) -> None:
    """Trust the socket's mode: a blocking recv() waits for the client's late bytes."""
    blocking = ev.conn.getblocking()
    data = ev.conn.recv(100)
    ev.conn.sendall(f"{blocking} {data.decode()} {os.getpid()}\n".encode())
    ev.conn.close()


def test_accepted_socket_goes_from_the_engine_blocking(pool: aem.CapsulePool, counted: list[Any]) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    exits: list[Any] = []
    try:
        eid = aem.register(aem.Accept(srv), _serve_natural, flags=aem.EVF_CAPSULE, pool=pool)
        aem.register(aem.ChildExit(job=eid), exits.append)
        pool.refresh()
        assert pool.wait_ready(10)
        cli = socket.create_connection(srv.getsockname(), timeout=10)
        try:
            run_until(lambda: pool.stats()["busy"] == 1)
            cli.sendall(b"late")
            reply = cli.recv(100).decode().split()
            assert reply[:2] == ["True", "late"] and int(reply[2]) != os.getpid()
        finally:
            cli.close()
        run_until(lambda: bool(exits))
        assert exits[0].returncode == 0, exits[0].error
        assert counted == [], "the connection went from the engine to the capsule"
    finally:
        srv.close()


def _read_fd(ev: Any) -> None:
    ev.source.results.fire(os.read(ev.fd, 100))


def _report_read(ev: Any) -> None:
    ev.source.results.fire(bytes(ev.data) if not ev.eof else None)


class _Readable(aem.Readable):
    results: aem.UserEvent


class _Read(aem.Read):
    results: aem.UserEvent


@pytest.mark.parametrize(("kind", "handler"), [(_Readable, _read_fd), (_Read, _report_read)])
def test_fd_events_go_from_the_engine(pool: aem.CapsulePool, counted: list[Any], kind: Any,
                                      handler: Any) -> None:
    """Readable: the capsule reads through its own copy of the fd; Read: the data travels."""
    a, b = socket.socketpair()
    got: list[Any] = []
    src = kind(a)
    src.results = aem.UserEvent()
    aem.register(src.results, lambda ev: got.append(ev.payload))
    aem.register(src, handler, flags=aem.EVF_CAPSULE | aem.EVF_ONESHOT | aem.EVF_NOCLDWAIT, pool=pool)
    pool.refresh()
    assert pool.wait_ready(10)
    try:
        b.send(b"for the capsule")
        run_until(lambda: bool(got))
        assert got == [b"for the capsule"] and counted == []
        a.setblocking(False)
        with pytest.raises(BlockingIOError):
            a.recv(100)  # consumed (by the capsule, or by the engine's read); still open here
    finally:
        a.close()
        b.close()


def _echo_order(ev: Any) -> None:
    ev.source.results.fire((os.getpid(), ev.payload))


class _Ordered(aem.UserEvent):
    results: aem.UserEvent


def _keepalive(pool: aem.CapsulePool, handler: Any) -> tuple[_Ordered, list[Any]]:
    got: list[Any] = []
    src = _Ordered()
    src.results = aem.UserEvent()
    aem.register(src.results, lambda ev: got.append(ev.payload))
    aem.register(src, handler, flags=aem.EVF_CAPSULE | aem.EVF_KEEPALIVE | aem.EVF_NOCLDWAIT, pool=pool)
    pool.refresh()
    assert pool.wait_ready(10)
    return src, got


def test_keepalive_occurrences_go_from_the_engine_in_order(pool: aem.CapsulePool, counted: list[Any]) -> None:
    src, got = _keepalive(pool, _echo_order)
    src.fire(0)
    run_until(lambda: len(got) == 1)  # the first attaches a capsule (the pool's path)
    assert len(counted) == 1 and pool._table.attached == 1
    for i in range(1, 200):
        src.fire(i)
    run_until(lambda: len(got) == 200)
    assert [p for _pid, p in got] == list(range(200))
    assert len({pid for pid, _p in got}) == 1, "one attached capsule"
    assert len(counted) == 1, "the others went from the engine"
    st = pool.stats()
    assert st["activations"] == 200 and st["attached"] == 1 and st["failed"] == 0


def _slow_echo(ev: Any) -> None:
    time.sleep(0.002)
    ev.source.results.fire((os.getpid(), len(ev.payload), ev.payload[:4]))


def test_keepalive_socket_full_keeps_the_order(pool: aem.CapsulePool, counted: list[Any]) -> None:
    src, got = _keepalive(pool, _slow_echo)
    n, big = 60, 50_000  # more than the socket holds: the engine's send fails, the pool queues
    for i in range(n):
        src.fire(i.to_bytes(4, "big") + bytes(big))
    run_until(lambda: len(got) == n, timeout=30)
    assert [int.from_bytes(p[2], "big") for p in got] == list(range(n))
    assert all(p[1] == big + 4 for p in got)
    assert len(counted) > 1, "the pool queued some (its backlog) ..."
    assert len(counted) < n, "... and the engine sent the others"
    run_until(lambda: pool._table.attached == 1)  # the backlog flushed: the engine sends again
    src.fire(b"last")
    run_until(lambda: len(got) == n + 1)
    assert got[-1][2] == b"last" and pool.stats()["activations"] == n + 1
