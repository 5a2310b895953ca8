"""Careless inputs and failing sources: refused at the call with a clear message, or, for
what can only fail later, backed off and disabled — the engine never spins."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

import aem
from conftest import run_script


class _Raising(aem.Source):
    """A source always ready (an eventfd with a count) whose collect() raises."""

    def __init__(self, fail: int = 1 << 30) -> None:
        self.fd = os.eventfd(1, os.EFD_NONBLOCK)
        self.fail = fail
        self.calls = 0

    def fileno(self) -> int:
        return self.fd

    def collect(self, events: int) -> Iterable[Any] | None:
        self.calls += 1
        if self.calls <= self.fail:
            raise RuntimeError(f"collect failure {self.calls}")
        return [os.eventfd_read(self.fd)]

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def errors(engine: aem.Engine) -> list[tuple[BaseException, Any]]:
    got: list[tuple[BaseException, Any]] = []
    engine.set_error_handler(lambda exc, ev: got.append((exc, ev)))
    return got


@pytest.fixture
def raising() -> Iterator[_Raising]:
    src = _Raising()
    yield src
    src.close()


# -- nothing spins ---------------------------------------------------------------------------

def test_accept_on_a_socket_that_does_not_listen_is_refused(engine: aem.Engine) -> None:
    with socket.socket() as s:
        with pytest.raises(ValueError, match=r"listening socket: call sock\.listen\(\)"):
            engine.register(aem.Accept(s), lambda ev: None)
    assert engine.stats()["registered"] == 0


def test_a_source_whose_collect_raises_is_disabled_with_one_clear_error(
        engine: aem.Engine, errors: list[tuple[BaseException, Any]], raising: _Raising) -> None:
    eid = engine.register(raising, lambda ev: None)
    t0 = time.monotonic()
    assert engine.run(timeout=5) == "idle"  # unregistered: nothing left
    took = time.monotonic() - t0
    assert raising.calls == 5, "backs off, then gives up after 5 failures in a row"
    assert 0.1 < took < 2, took  # paused between failures (10+20+40+80 ms), not a spin
    assert len(errors) == 1
    exc, event = errors[0]
    assert isinstance(exc, aem.AemError) and event is None
    text = str(exc)
    assert f"event {eid} " in text and "_Raising" in text and "5 times in a row" in text
    assert "collect failure 5" in text
    assert isinstance(exc.__cause__, RuntimeError)
    assert engine.stats()["errors"] == 5
    with pytest.raises(aem.UnknownEventError):
        engine.unregister(eid)


def _on_aem_loop(main: Any) -> tuple[Any, list[BaseException]]:
    """Run ``main(engine)`` on an aem loop; what it returned and what its error handler got."""
    errors: list[BaseException] = []

    async def run() -> Any:
        engine = asyncio.get_running_loop().engine  # type: ignore[attr-defined]
        engine.set_error_handler(lambda exc, ev: errors.append(exc))
        return await main(engine)

    with asyncio.Runner(loop_factory=aem.new_event_loop) as r:
        return r.run(run()), errors


def test_wait_on_a_source_the_engine_gives_up_raises_its_error(raising: _Raising) -> None:
    async def main(engine: Any) -> tuple[BaseException, int, int]:
        with pytest.raises(aem.AemError) as caught:
            await aem.wait(raising, timeout=10)   # hung until the timeout before
        return caught.value, engine.stats()["registered"], engine.stats()["errors"]

    (exc, registered, count), errors = _on_aem_loop(main)
    assert "5 times in a row" in str(exc) and isinstance(exc.__cause__, RuntimeError)
    assert raising.calls == 5 and registered == 0 and count == 5
    assert errors == []   # raised where it is awaited, not also to the error handler


def test_events_of_a_source_the_engine_gives_up_end_with_its_error() -> None:
    src = _Raising(fail=1 << 30)
    src.fail = 0      # the first collect works (the eventfd's count), then every one fails

    async def main(engine: Any) -> tuple[list[int], BaseException | None, int]:
        got: list[int] = []
        error = None
        it = aem.events(src)
        try:
            async for ev in it:
                got.append(ev.value)
                src.fail = 1 << 30
                os.eventfd_write(src.fd, 1)   # ready again: collect fails from now on
        except aem.AemError as e:
            error = e
        with pytest.raises(StopAsyncIteration):   # ended: a second call does not raise again
            await it.__anext__()
        return got, error, engine.stats()["registered"]

    try:
        (got, error, registered), errors = _on_aem_loop(main)
    finally:
        src.close()
    assert got == [1] and isinstance(error, aem.AemError) and "5 times in a row" in str(error)
    assert registered == 0 and errors == []


def test_a_give_up_nobody_awaits_still_goes_to_the_error_handler(raising: _Raising) -> None:
    async def main(engine: Any) -> int:
        eid = engine.register(raising, lambda ev: None)
        for _ in range(200):
            if engine.stats()["registered"] == 0:
                break
            await asyncio.sleep(0.01)
        return int(eid)

    eid, errors = _on_aem_loop(main)
    assert len(errors) == 1 and f"event {eid} " in str(errors[0])


def test_a_source_that_recovers_is_kept(engine: aem.Engine, errors: list[tuple[BaseException, Any]]) -> None:
    src = _Raising(fail=3)  # fails three times, then works
    try:
        got: list[int] = []
        eid = engine.register(src, lambda ev: (got.append(ev.value), engine.stop()))
        assert engine.run(timeout=5) == "stopped"
        assert got == [1] and errors == []
        assert engine.describe(eid)["state"] == "active"
        # A later run of failures starts from zero again.
        src.calls, src.fail = 0, 4
        os.eventfd_write(src.fd, 1)
        assert engine.run(timeout=5) == "stopped"
        assert errors == [] and got == [1, 1]
    finally:
        engine.close()
        src.close()


def test_a_listener_that_stops_listening_is_disabled_not_spun(
        engine: aem.Engine, errors: list[tuple[BaseException, Any]]) -> None:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    try:
        engine.register(aem.Accept(lst), lambda ev: ev.conn.close())
        lst.shutdown(socket.SHUT_RDWR)  # still open, no longer listening: accept() says EINVAL
        t0 = time.monotonic()
        assert engine.run(timeout=5) == "idle"
        took = time.monotonic() - t0
        assert 0.1 < took < 2, took  # paused between failures (10+20+40+80 ms), not a spin
        assert len(errors) == 1 and engine.stats()["errors"] == 5
        exc = errors[0][0]
        assert "Accept" in str(exc) and "unregistered" in str(exc)
        assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EINVAL
    finally:
        lst.close()


def test_a_read_whose_data_cannot_be_stored_is_disabled_not_spun() -> None:
    p = run_script("""
        import aem, socket
        aem.control(0, aem.EVTBLINIT, {"size": 1 << 16, "fallback": False})
        whole = aem.vmtable().alloc(1 << 16)          # nothing left for a payload
        a, b = socket.socketpair()
        errors = []
        aem.set_error_handler(lambda exc, ev: errors.append(exc))
        eid = aem.register(aem.Read(a), lambda ev: None)
        for _ in range(10):
            b.send(b"x")
            aem.run(timeout=0.2)
        print(len(errors), f"event {eid} (aem.Read(" in str(errors[0]), type(errors[0].__cause__).__name__)
        print(aem.unregister(eid, missing_ok=True))
    """)
    assert p.stdout.split() == ["1", "True", "MemoryError", "False"], p.stdout + p.stderr


def test_a_handler_unregistering_its_failing_source_meanwhile(
        engine: aem.Engine, errors: list[tuple[BaseException, Any]], raising: _Raising) -> None:
    eid = engine.register(raising, lambda ev: None)
    engine._add_timer(0.015, lambda ev: engine.unregister(eid))  # during the back-off
    assert engine.run(timeout=5) == "idle"
    assert 1 <= raising.calls < 5 and errors == []


def test_an_application_stop_during_a_back_off_is_not_undone_by_its_resume(
        engine: aem.Engine, errors: list[tuple[BaseException, Any]]) -> None:
    raising = _Raising(fail=1)  # fails once (a 10 ms back-off), then delivers
    got: list[int] = []
    eid = engine.register(raising, lambda ev: got.append(1))
    engine._add_timer(0.002, lambda ev: engine.control(eid, aem.EVJOBSTOP))  # during the back-off
    engine._add_timer(0.100, lambda ev: engine.stop())                        # long after it ended
    assert engine.run(timeout=5) == "stopped"
    assert raising.calls == 1 and got == [], "resumed by the back-off's timer despite EVJOBSTOP"
    engine.control(eid, aem.EVJOBSTART)
    engine._add_timer(0.050, lambda ev: engine.stop())
    engine.run(timeout=5)
    assert raising.calls >= 2 and len(got) >= 1
    raising.close()


# -- refused at the call ----------------------------------------------------------------------

def test_child_exit_of_this_process_is_refused() -> None:
    with pytest.raises(ValueError, match="that is this process"):
        aem.ChildExit(os.getpid())


def test_child_exit_of_an_unknown_job_is_refused(engine: aem.Engine) -> None:
    with pytest.raises(aem.UnknownEventError, match=r"ChildExit\(job=4242\): no registration 4242"):
        engine.register(aem.ChildExit(job=4242), lambda ev: None)
    assert engine.stats()["registered"] == 0


def test_child_exit_of_a_job_that_makes_no_process_is_refused(engine: aem.Engine) -> None:
    job = engine.register(aem.UserEvent(), lambda ev: None)
    with pytest.raises(ValueError, match="no EVF_FORK or EVF_CAPSULE"):
        engine.register(aem.ChildExit(job=job), lambda ev: None)
    assert engine.stats()["registered"] == 1


def test_evtblinit_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match=r"too small .* at least 65536 bytes"):
        aem.control(0, aem.EVTBLINIT, {"size": 3})


def test_evtblinit_too_small_leaves_the_process_vmtable_unmade() -> None:
    p = run_script("""
        import aem
        try:
            aem.control(0, aem.EVTBLINIT, {"size": 3})
        except ValueError:
            pass
        aem.control(0, aem.EVTBLINIT, {"size": 1 << 20})
        print(aem.vmtable().size)
    """)
    assert p.stdout.strip() == str(1 << 20), p.stderr


# -- messages ---------------------------------------------------------------------------------

def test_unknown_flag_bits_are_named(engine: aem.Engine) -> None:
    with pytest.raises(ValueError, match=r"unknown flag bits 0x100 \(known: EVF_ONESHOT"):
        engine.register(aem.Timer(1), lambda ev: None, flags=0x100 | aem.EVF_ONESHOT)


def test_a_too_long_time_gives_the_limit() -> None:
    with pytest.raises(ValueError, match=r"at most 9000000000 \(about 285 years\), got 10000000000.0"):
        aem.Timer(1e10)


@pytest.mark.parametrize("bad", [True, "1", None, float("nan"), -1, float("inf")])
def test_one_conversion_of_seconds_for_timer_and_run(engine: aem.Engine, bad: Any) -> None:
    kind = TypeError if isinstance(bad, (bool, str)) or bad is None else ValueError
    if bad is None:  # run(timeout=None) means "no timeout"; Timer(None) is an error
        with pytest.raises(TypeError):
            aem.Timer(bad)
        return
    with pytest.raises(kind) as timer_err:
        aem.Timer(bad)
    with pytest.raises(kind) as run_err:
        engine.run(timeout=bad)
    assert str(timer_err.value).replace("after", "X") == str(run_err.value).replace("timeout", "X")


def test_an_fd_number_that_is_aems_own_is_named() -> None:
    before = _epoll_fds()
    eng = aem.Engine()
    try:
        own = _epoll_fds() - before  # this engine's epoll fd (a stale number that now is aem's)
        assert len(own) == 1
        with pytest.raises(ValueError, match=r"fd \d+ is one of aem's own descriptors \(its epoll"):
            eng.register(aem.Readable(own.pop()), lambda ev: None)
        assert eng.stats()["registered"] == 0
    finally:
        eng.close()


def _epoll_fds() -> set[int]:
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_epoll(fd)}


def _is_epoll(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventpoll]"
    except OSError:
        return False


def test_keepalive_from_a_handler_is_named_as_such() -> None:
    got: list[str] = []

    def handler(ev: Any) -> None:
        try:
            aem.keepalive()
        except aem.AemError as e:
            got.append(str(e))

    aem.register(aem.Timer(0), handler)
    aem.run(timeout=1)
    assert got == ["aem.keepalive() called from a handler: handlers never nest"]


def test_the_default_error_handler_names_an_engine_error(capsys: pytest.CaptureFixture[str]) -> None:
    aem.default_error_handler(RuntimeError("x"), None)
    err = capsys.readouterr().err
    assert "aem: error in the engine (not in a handler)" in err and "RuntimeError: x" in err


# -- KeyboardInterrupt ------------------------------------------------------------------------

def test_keyboard_interrupt_in_a_handler_propagates_out_of_run(engine: aem.Engine) -> None:
    def handler(ev: Any) -> None:
        raise KeyboardInterrupt

    engine.register(aem.Timer(0), handler)
    with pytest.raises(KeyboardInterrupt):
        engine.run(timeout=1)
    assert not engine.running


def test_ctrl_c_while_run_waits_returns_interrupted() -> None:
    p = run_script("""
        import aem, os, signal, threading
        aem.register(aem.Timer(100), print)
        threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        print(aem.run())
    """)
    assert p.stdout.strip() == "interrupted" and "Traceback" not in p.stderr, p.stderr
