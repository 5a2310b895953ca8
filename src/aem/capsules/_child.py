"""What runs in a capsule or an EVF_FORK child: the handler runner and the capsule's loop."""

from __future__ import annotations

import builtins
import contextlib
import functools
import os
import pickle
import signal
import socket
import struct
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any, NoReturn

from .. import _core
from .._core import CloseEvent
from ..sources import UserEvent
from ._handoff import MAX_INLINE, NATIVE, PICKLE, FdRef, ProcessEvent, decode, rebuild, release, send


def report_error(chan: socket.socket, err: str) -> None:
    """Tell the parent a handler raised, without ever blocking on it (the parent reads
    these when the process ends; beyond what the socket holds they are dropped)."""
    with contextlib.suppress(OSError):
        send(chan, ("error", err), flags=socket.MSG_DONTWAIT)


def child_signals() -> None:
    """Signals in a process aem created: SIGTERM ends it (EVJOBSHTDN sends it); SIGINT —
    Ctrl-C reaches the whole process group — is left to the application, which ends
    its processes itself."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


def run_handler(handler: Callable[[Any], object], event: Any) -> str | None:
    """Run ``handler(event)``; the exception as text, or None."""
    try:
        handler(event)
    except BaseException as e:
        return handler_error(e)
    return None


def handler_error(exc: BaseException) -> str | None:
    """What a handler raised, as the text reported (None: ``sys.exit()``/``sys.exit(0)``)."""
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        return None
    return error_text(exc)



# ---- the capsule process ------------------------------------------------------------------------


def run_chunk(fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]) -> list[Any]:
    """A chunk of ``Executor.map`` calls, run in one go."""
    return [fn(*args) for args in chunk]


def answer_call(chan: socket.socket, blob: bytes) -> None:
    """Run an executor call and send its answer: the result's bare pickle (a pickle's first
    byte tells it from the other messages), else ("result", ok, payload): ok False with the
    exception (see :func:`failure`), or True with a result too large for one message (it
    travels in a memfd)."""
    try:
        fn, args, kwargs = pickle.loads(blob)
        out = pickle.dumps(fn(*args, **kwargs), protocol=5)
    except BaseException as e:
        send(chan, ("result", False, failure(e)))
        return
    if len(out) <= MAX_INLINE:
        chan.send(out)
    else:
        send(chan, ("result", True, out))


def failure(exc: BaseException) -> tuple[bytes | None, str]:
    """An exception raised by a call, as it travels: pickled (None if it cannot be) and its
    traceback as text."""
    tb = error_text(exc)
    try:
        exc_blob: bytes | None = pickle.dumps(exc, protocol=5)
    except Exception:
        exc_blob = None
    return exc_blob, tb


def _rehearsal_handler(ev: Any) -> None:
    """The handler of the dummy event a capsule runs before it reports itself ready."""
    if ev.payload is None and getattr(ev, "fd", None) is None:  # pragma: no cover - never true
        raise AssertionError(ev)


def _rehearsal_record(eid: int, payload: int) -> bytes:
    """A native record of a UserEvent with an int payload (see handoff.h)."""
    header = struct.pack("=IBBBBIIQqQQqqq", 0x484D4541, 1, _core.HANDOFF_RUN, _core.K_USER, 1, 0, 0,
                         eid, 0, 0, 0, payload, 0, 0)
    assert len(header) == _core.HANDOFF_HEADER
    return header


def warm(chan: socket.socket, table: dict[int, Callable[[Any], object]],
         channel_fds: tuple[int, ...] = (), sources: dict[int, Any] | None = None) -> None:
    """Take a fresh capsule's first-touch costs off the latency path, then say "ready".

    After fork, every page the hand-off path touches is still shared with the template:
    the first event would pay its copy-on-write faults (CPython writes the reference
    counts of every object it reads) and the first run of cold code.  The capsule pays
    them now, while idle: it sends itself dummy events through the real paths (the
    native record, and the pickled message with an fd: ``recvmsg``, parse or unpickle,
    rebuild, run, release; the receive buffer is touched whole), and touches the
    handlers it knows and their sources (a native event references its source)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        attrs = {"eid": 0, "time_ns": 0, "payload": (0, b"", "rehearsal", None), "fd": None,
                 "_source_blob": None}
        for _ in range(2):
            _core.handoff_send(a.fileno(), _rehearsal_record(0, 1))
            native = _core.capsule_serve(b.fileno(), {0: _rehearsal_handler}, {})
            assert native is not None and native[0] == _core.HANDOFF_RUN and native[3] is None
            release_native(native[2])
            fd = os.dup(b.fileno())
            try:
                send(a, ("run", 0, None, "PayloadEvent", attrs), [fd])
            finally:
                os.close(fd)
            raw = _core.handoff_recv(b.fileno(), {})
            assert raw is not None and raw[0] == 0
            (_op, _eid, _blob, kind, got), fds = decode(raw[1], raw[2])
            got["fd"] = FdRef(0)
            event = rebuild(kind, got, fds)
            run_handler(_rehearsal_handler, event)
            release(event)
    finally:
        a.close()
        b.close()
    # results usually go back through a UserEvent in the payload: rebuild one, and wrap an
    # inherited channel fd the way a rebuilt UserEvent does
    pickle.loads(pickle.dumps(UserEvent(), protocol=5))
    for fd in channel_fds:
        socket.socket(fileno=os.dup(fd)).close()
    touched: list[object] = []
    for handler in table.values():  # their objects and code: this process's own pages now
        touch_handler(handler, touched)
    touched += (sources or {}).values()
    # the allocator's current page of every small size class: a handler's first objects
    # (an int, a tuple, a frame's locals) come from there
    touched += [bytes(n) for n in range(0, 512, 8) for _ in range(4)]
    del touched
    send(chan, ("ready",))


def touch_handler(handler: object, out: list[object]) -> None:
    """Append to ``out`` (a reference is a write: the page becomes this process's own) what
    a call of ``handler`` reaches first: the function, its code, globals, defaults and
    closure, and the objects its code names (globals and builtins, and their attributes
    when they are modules or classes), through bound methods, ``functools.partial`` and
    callable instances.  Reads only: no attribute is computed, nothing is called."""
    seen: set[int] = set()
    names: set[str] = set()  # what the code met so far names
    todo: list[tuple[object, int]] = [(handler, 0)]
    while todo:
        obj, depth = todo.pop()
        if id(obj) in seen or depth > 3:
            continue
        seen.add(id(obj))
        out.append(obj)
        if isinstance(obj, types.MethodType):
            todo += [(obj.__self__, depth + 1), (obj.__func__, depth)]
        elif isinstance(obj, functools.partial):
            todo += [*((a, depth + 1) for a in obj.args), (obj.func, depth)]
        elif isinstance(obj, types.FunctionType):
            glob = obj.__globals__
            out += [glob, obj.__defaults__, obj.__kwdefaults__]
            out += [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
            codes = [obj.__code__]
            while codes:  # nested code: inner functions, comprehensions
                co = codes.pop()
                out.append(co)
                codes += [c for c in co.co_consts if isinstance(c, types.CodeType)]
                out += [c for c in co.co_consts if not isinstance(c, types.CodeType)]
                names.update(co.co_names)
                for name in co.co_names:
                    for where in (glob, builtins.__dict__):
                        if name in where:
                            todo.append((where[name], depth + 1))
                            break
        elif isinstance(obj, (types.ModuleType, type)):
            attrs = vars(obj)  # the namespace itself: nothing computed
            out += [attrs[n] for n in names if n in attrs]
            call = attrs.get("__call__")
            if isinstance(obj, type) and isinstance(call, types.FunctionType):
                todo.append((call, depth))
        elif depth == 0:  # a callable instance: its class's __call__
            todo.append((type(obj), depth))


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True


def release_native(event: Any) -> None:
    """After the handler of a native event: the capsule's copy of its fd is closed, unless kept."""
    if event.kept:
        return
    fd = getattr(event, "fd", None)
    if isinstance(fd, int) and fd >= 0 and type(event) is not CloseEvent:
        with contextlib.suppress(OSError):
            os.close(fd)


Message = tuple[str, int, Any, Callable[[Any], object] | None, bool, str | None]


#: After an executor call's answer, a worker polls its socket this long before it sleeps:
#: the next call of a caller that submits right after its result costs no wake-up (from
#: another CPU, a wake-up costs tens of µs).
WORKER_SPIN_US = 50


def _next_event(chan: socket.socket, table: dict[int, Callable[[Any], object]],
                sources: dict[int, Any], spin_us: int = 0) -> Message | None:
    """The next message the C loop (``_core.capsule_serve``) did not finish itself:
    (op, eid, event, handler, ran, err) — ``ran``: the C loop already ran the handler,
    ``err`` is what it raised —, ("call", 0, blob, None, False, None), or None at the end."""
    got = _core.capsule_serve(chan.fileno(), table, sources, spin_us)
    if got is None:
        return None
    if got[0]:  # a native record: the C loop ran its handler, or the table has none
        op, eid, event, exc = got
        name = "run" if op == _core.HANDOFF_RUN else "keep"
        if eid in table:
            return name, eid, event, table[eid], True, None if exc is None else handler_error(exc)
        return name, eid, event, None, False, None
    if got[1][:1] == PICKLE and not got[2]:  # an executor's call, its bare pickle
        return "call", 0, got[1], None, False, None
    (op, eid, blob, kind, attrs), fds = decode(got[1], got[2])
    if op == "call":
        return op, 0, blob, None, False, None
    handler = table.get(eid) if blob is None else pickle.loads(blob)
    if handler is not None:
        table[eid] = handler
    if kind == NATIVE:  # a native record sent with the handler: this capsule did not know it
        try:
            _op, _eid, event = _core._handoff_parse(attrs, fds, sources)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return op, eid, event, handler, False, None
    return op, eid, rebuild(kind, attrs, fds), handler, False, None


def capsule_main(chan: socket.socket, table: dict[int, Callable[[Any], object]],
                 rehearse: bool = False, channel_fds: tuple[int, ...] = (),
                 sources: dict[int, Any] | None = None) -> NoReturn:
    """Wait for events on ``chan`` and run them; exit after one unless attached (keepalive).

    ``rehearse``: a capsule of a pool warms up first (see :func:`warm`).  ``sources``: the
    template's registrations' sources by event id (native events get theirs from it)."""
    code = 0
    known = sources if sources is not None else {}
    try:
        if rehearse:
            warm(chan, table, channel_fds, known)
        spin = 0
        while True:
            msg = _next_event(chan, table, known, spin)
            if msg is None:  # the parent is gone or released us
                break
            op, eid, event, handler, ran, err = msg
            if op == "call":  # an executor's call: answer, then wait for the next one
                answer_call(chan, event)
                spin = WORKER_SPIN_US
                continue
            if handler is None:
                err = f"capsule: no handler for event {eid}"
            elif not ran:
                err = run_handler(handler, event)
            if isinstance(event, ProcessEvent):
                release(event)
            else:
                release_native(event)
            if op == "run":
                if err is not None:
                    report_error(chan, err)
                code = 0 if err is None else 1
                break
            if err is not None:  # attached: report, go on
                print(f"aem capsule {os.getpid()}: handler of event {eid} raised:\n{err}", file=sys.stderr)
                report_error(chan, err)
                code = 1
    except BaseException as e:  # a capsule never lets an exception escape
        report_error(chan, error_text(e))
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    os._exit(code)
