"""The round trip of an executor call (CapsulePool.submit → result()): the thread waiting in
result() reads its worker's answers itself.  What that must keep: large calls and results
(they travel in a memfd), several threads waiting on one worker, a timeout while the worker
is slow, a worker killed while a thread waits, answers nobody waits for.  Tests that hold
for any executor run against ProcessPoolExecutor too."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from capsulekit import EXECUTORS, executor_of, wait_for_file

import aem
from aem import _core
from aem.capsules._executor import _NotAnAnswer, answer
from aem.capsules._handoff import MAX_INLINE, send


@pytest.fixture(params=EXECUTORS)
def executor(request: pytest.FixtureRequest) -> Iterator[cf.Executor]:
    """One worker: calls submitted together go to the same worker."""
    with executor_of(request.param, 1) as ex:
        yield ex


def size_of(data: bytes) -> int:
    return len(data)


def make_bytes(n: int) -> bytes:
    return bytes(range(256)) * (n // 256)


def sleep_then(x: Any, seconds: float) -> Any:
    time.sleep(seconds)
    return x


def pid_then_sleep(path: str, seconds: float) -> int:
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


# -- any executor ----------------------------------------------------------------------------------


def test_large_arguments_and_results_travel(executor: cf.Executor) -> None:
    big = MAX_INLINE * 3
    assert executor.submit(size_of, b"x" * big).result(timeout=20) == big
    assert executor.submit(make_bytes, big).result(timeout=20) == bytes(range(256)) * (big // 256)
    # and small ones still after them, in order
    assert [executor.submit(size_of, b"ab").result(timeout=20) for _ in range(3)] == [2, 2, 2]


def test_result_timeout_while_the_worker_is_slow(executor: cf.Executor) -> None:
    fut = executor.submit(sleep_then, "late", 1.5)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.1)
    assert time.monotonic() - t0 < 1.2, "result(timeout) waited for the call, not for the timeout"
    assert not fut.done()
    assert fut.result(timeout=20) == "late"


def test_threads_waiting_on_calls_of_one_worker_get_their_own_results(executor: cf.Executor) -> None:
    futures = [executor.submit(sleep_then, i, 0.01) for i in range(12)]
    got: dict[int, Any] = {}

    def wait(i: int) -> None:
        got[i] = futures[i].result(timeout=30)

    threads = [threading.Thread(target=wait, args=(i,)) for i in reversed(range(12))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == {i: i for i in range(12)}


def test_many_threads_submitting_and_waiting(executor: cf.Executor) -> None:
    errors: list[BaseException] = []

    def loop(base: int) -> None:
        try:
            for i in range(50):
                assert executor.submit(size_of, b"y" * (base + i)).result(timeout=30) == base + i
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_answers_nobody_waits_for_complete_their_futures(executor: cf.Executor) -> None:
    # the first call has a thread in result(); the second (handed to the same worker) only
    # a callback: it completes too, once the waiting thread is gone
    first = executor.submit(sleep_then, 1, 0.2)
    second = executor.submit(sleep_then, 2, 0.2)
    done = threading.Event()
    second.add_done_callback(lambda f: done.set())
    assert first.result(timeout=20) == 1
    assert done.wait(20) and second.result() == 2


# -- CapsulePool ------------------------------------------------------------------------------------


def test_a_worker_killed_while_a_thread_waits_in_result(tmp_path: Path) -> None:
    with aem.CapsulePool(size=1) as pool:
        fut = pool.submit(pid_then_sleep, str(tmp_path / "victim"), 30)
        pid = wait_for_file(tmp_path / "victim")
        caught: list[BaseException] = []
        waiting = threading.Event()

        def wait() -> None:
            waiting.set()
            try:
                fut.result(timeout=30)
            except BaseException as e:  # checked below
                caught.append(e)

        t = threading.Thread(target=wait)
        t.start()
        assert waiting.wait(10)
        time.sleep(0.1)  # the thread is in result(), reading the worker's socket
        os.kill(pid, signal.SIGKILL)
        t.join(30)
        assert not t.is_alive()
        assert len(caught) == 1 and isinstance(caught[0], aem.AemError) and "SIGKILL" in str(caught[0])
        assert pool.submit(size_of, b"abc").result(timeout=20) == 3, "the pool goes on"


class _FailsInTheParent:
    """Pickles in the capsule; its unpickling raises in the parent (the pool's own process)."""

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return _rebuild, (self.parent,)


def _rebuild(parent: int) -> object:
    if os.getpid() == parent:
        raise ValueError("cannot be rebuilt here")
    return object()


def unloadable(parent: int) -> _FailsInTheParent:
    return _FailsInTheParent(parent)


def test_a_result_that_cannot_be_unpickled_fails_only_its_call() -> None:
    with aem.CapsulePool(size=1) as pool:
        with pytest.raises(ValueError, match="cannot be rebuilt here"):
            pool.submit(unloadable, os.getpid()).result(timeout=20)
        assert pool.submit(size_of, b"ab").result(timeout=20) == 2


def test_answers_are_bare_pickles_or_result_messages() -> None:
    import pickle

    assert answer(pickle.dumps([1, 2], protocol=5), []) == (True, [1, 2])
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        send(a, ("result", False, (pickle.dumps(KeyError("k")), "Traceback ...\nKeyError: 'k'")))
        data = b.recv(1 << 16)
        ok, exc = answer(data, [])
        assert not ok and isinstance(exc, KeyError) and "KeyError" in str(exc.__cause__)
        send(a, ("error", "a report, not an answer"))
        with pytest.raises(_NotAnAnswer):
            answer(b.recv(1 << 16), [])


# -- the C helpers (calls.c) ------------------------------------------------------------------------


def test_call_recv_does_not_wait_and_says_end_of_stream() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setblocking(False)
    with a, b:
        assert _core.call_recv(b.fileno()) is None  # nothing yet: None, no exception
        a.send(b"\x80hello")
        assert _core.call_recv(b.fileno()) == (b"\x80hello", [])
        r, w = os.pipe()
        try:
            a.sendmsg([b"with an fd"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, "little"))])
            data, fds = _core.call_recv(b.fileno())  # type: ignore[misc]
            assert data == b"with an fd" and len(fds) == 1
            os.write(w, b"!")
            assert os.read(fds[0], 1) == b"!"
            os.close(fds[0])
        finally:
            os.close(r)
            os.close(w)
        a.shutdown(socket.SHUT_WR)
        assert _core.call_recv(b.fileno()) == (b"", [])


def test_call_recv_and_wait_readable_errors() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError):
        _core.call_recv(r)
    with pytest.raises(OverflowError):
        _core.call_recv(1 << 40)
    with pytest.raises(TypeError):
        _core.call_recv("3")  # type: ignore[arg-type]


def test_wait_readable() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        t0 = time.monotonic()
        assert _core.wait_readable(b.fileno(), 50) is False
        assert time.monotonic() - t0 >= 0.04
        assert _core.wait_readable(b.fileno(), 0, 200) is False  # spins 200 µs, then gives up
        threading.Timer(0.05, lambda: a.send(b"x")).start()
        assert _core.wait_readable(b.fileno(), 5000, 30) is True
        assert b.recv(10) == b"x"
        a.close()
        assert _core.wait_readable(b.fileno(), 5000) is True  # its end is readable too


def test_capsule_serve_spins_then_sleeps() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.send(b"\x80ready")  # there before the spin: taken at once
        assert _core.capsule_serve(b.fileno(), {}, {}, 1000) == (0, b"\x80ready", [])
        threading.Timer(0.002, lambda: a.send(b"\x80during")).start()  # comes while it polls
        assert _core.capsule_serve(b.fileno(), {}, {}, 200_000) == (0, b"\x80during", [])
        threading.Timer(0.05, lambda: a.send(b"\x80later")).start()  # after the spin: it slept
        assert _core.capsule_serve(b.fileno(), {}, {}, 100) == (0, b"\x80later", [])
        a.close()
        assert _core.capsule_serve(b.fileno(), {}, {}, 100) is None


def test_a_worker_answers_calls_spaced_beyond_its_spin() -> None:
    with aem.CapsulePool(size=1) as pool:
        for i in range(5):
            assert pool.submit(size_of, b"z" * i).result(timeout=20) == i
            time.sleep(0.01)  # far longer than the worker's and the caller's spin
