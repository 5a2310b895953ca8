"""The capsule's receive loop in C (``_core.capsule_serve``): native events whose handler
it knows run with no Python before the handler; keepalive ones are released and the loop
goes on; everything else (pickled messages, a raising handler, an unknown eid, the end of
the stream, a run-once event) comes back to the Python loop, losing nothing."""

from __future__ import annotations

import functools
import os
import socket
import time
import types
from typing import Any

import pytest
from capsulekit import HAS_FD, header, pair_fixture, user  # noqa: F401  (the pair fixture)

from aem import _core
from aem.capsules._child import touch_handler


def serve(pair: tuple[socket.socket, socket.socket], table: dict[int, Any],
          sources: dict[int, Any] | None = None) -> Any:
    return _core.capsule_serve(pair[1].fileno(), table, {} if sources is None else sources)


def test_keepalive_events_run_in_the_loop_until_a_pickled_message(pair: Any) -> None:
    seen: list[tuple[int, Any]] = []
    for n in (1, 2, 3):
        _core.handoff_send(pair[0].fileno(), user(_core.HANDOFF_KEEP, n))
    pair[0].send(b"P-pickled")
    got = serve(pair, {7: lambda ev: seen.append((ev.payload, ev.source))}, {7: "src"})
    assert got == (0, b"P-pickled", [])
    assert seen == [(1, "src"), (2, "src"), (3, "src")]


def test_a_run_event_comes_back_after_its_handler(pair: Any) -> None:
    seen: list[int] = []
    _core.handoff_send(pair[0].fileno(), user(_core.HANDOFF_RUN, 5))
    _core.handoff_send(pair[0].fileno(), user(_core.HANDOFF_RUN, 6))
    op, eid, event, exc = serve(pair, {7: lambda ev: seen.append(ev.payload)})
    assert (op, eid, event.payload, exc, seen) == (_core.HANDOFF_RUN, 7, 5, None, [5])
    assert serve(pair, {7: lambda ev: seen.append(ev.payload)})[2].payload == 6  # one at a time


def test_a_raising_handler_comes_back_with_its_exception(pair: Any) -> None:
    def handler(ev: Any) -> None:
        raise ValueError(f"bad {ev.payload}")

    _core.handoff_send(pair[0].fileno(), user(_core.HANDOFF_KEEP, 9))
    op, eid, event, exc = serve(pair, {7: handler})
    assert (op, eid, event.payload) == (_core.HANDOFF_KEEP, 7, 9)
    assert isinstance(exc, ValueError) and str(exc) == "bad 9"
    assert exc.__traceback__ is not None  # the capsule reports it with its traceback


def test_system_exit_comes_back_for_the_caller_to_judge(pair: Any) -> None:
    def handler(ev: Any) -> None:
        raise SystemExit(0)

    _core.handoff_send(pair[0].fileno(), user(_core.HANDOFF_KEEP, 1))
    assert isinstance(serve(pair, {7: handler})[3], SystemExit)


def test_an_unknown_eid_comes_back_unrun(pair: Any) -> None:
    _core.handoff_send(pair[0].fileno(), user(_core.HANDOFF_KEEP, 1, eid=8))
    op, eid, event, exc = serve(pair, {7: lambda ev: pytest.fail("not this one")})
    assert (op, eid, event.payload, exc) == (_core.HANDOFF_KEEP, 8, 1, None)


def test_end_of_stream_is_none(pair: Any) -> None:
    _core.handoff_send(pair[0].fileno(), user(_core.HANDOFF_KEEP, 1))
    pair[0].shutdown(socket.SHUT_WR)
    seen: list[int] = []
    assert serve(pair, {7: lambda ev: seen.append(ev.payload)}) is None
    assert seen == [1]


@pytest.mark.parametrize("keep", [False, True])
def test_a_keepalive_events_fd_is_closed_unless_kept(pair: Any, keep: bool) -> None:
    r, w = os.pipe()
    fds: list[int] = []

    def handler(ev: Any) -> None:
        fds.append(ev.fd)
        if keep:
            ev.keep()

    try:
        _core.handoff_send(pair[0].fileno(), header(_core.K_READABLE, HAS_FD, op=_core.HANDOFF_KEEP), r)
        pair[0].send(b"P-stop")
        assert serve(pair, {7: handler}) == (0, b"P-stop", [])
        assert len(fds) == 1 and fds[0] not in (r, w)
        if keep:
            os.fstat(fds[0])
            os.close(fds[0])
        else:
            with pytest.raises(OSError):
                os.fstat(fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_malformed_record_is_refused_and_loses_no_fd(pair: Any) -> None:
    before = len(os.listdir("/proc/self/fd"))
    r, w = os.pipe()
    _core.handoff_send(pair[0].fileno(), header(_core.K_USER, HAS_FD, op=_core.HANDOFF_KEEP), r)
    os.close(r)
    os.close(w)
    with pytest.raises(ValueError, match="flags not of this kind"):
        serve(pair, {7: print})
    assert len(os.listdir("/proc/self/fd")) == before


def test_misuse_is_refused(pair: Any) -> None:
    with pytest.raises(TypeError):
        _core.capsule_serve(pair[1].fileno(), [], {})  # type: ignore[arg-type]
    with pytest.raises(OSError):
        _core.capsule_serve(-1, {}, {})


# ---- the warm-up touches what a handler reaches first (copy-on-write off the latency path) ----

class _Trap:
    """Any computed attribute raises: touching must only read, never compute or call."""

    calls = 0

    @property
    def boom(self) -> Any:
        raise AssertionError("a property was computed")

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"__getattr__({name!r}) was called")

    def method(self, ev: Any) -> None:
        time.monotonic_ns()

    def __call__(self, ev: Any) -> None:
        _Trap.calls += 1


def _probe(ev: Any) -> None:
    time.monotonic_ns()
    _Trap.calls += len(list(1 for _ in ()))  # a generator has a code object (3.12 inlines comprehensions)


def test_touch_handler_reaches_code_globals_and_named_attributes() -> None:
    out: list[object] = []
    touch_handler(_probe, out)
    ids = {id(o) for o in out}
    for obj in (_probe, _probe.__code__, _probe.__globals__, time, time.monotonic_ns, _Trap, len):
        assert id(obj) in ids, obj
    nested = [c for c in _probe.__code__.co_consts if isinstance(c, types.CodeType)]
    assert nested and all(id(c) in ids for c in nested), "the generator's code too"


def test_touch_handler_only_reads() -> None:
    trap = _Trap()
    empty_cell = types.CellType()

    def closure(ev: Any) -> Any:
        return trap, empty_cell

    for handler in (trap.method, trap, functools.partial(_probe), closure, len, print, object()):
        out: list[object] = []
        touch_handler(handler, out)  # no property, no __getattr__, no call
        assert out and out[0] is handler
    assert _Trap.calls == 0
    out = []
    touch_handler(trap.method, out)
    assert any(o is trap for o in out) and any(o is _Trap.method for o in out)
