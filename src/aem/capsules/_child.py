"""What runs in a capsule or an EVF_FORK child: the handler runner and the capsule's loop."""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from ..sources import UserEvent
from ._handoff import FdRef, rebuild, recv, release, send


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
    except SystemExit as e:
        return None if e.code in (None, 0) else error_text(e)
    except BaseException as e:
        return error_text(e)
    return None



# ---- the capsule process ------------------------------------------------------------------------


def run_chunk(fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]) -> list[Any]:
    """A chunk of ``Executor.map`` calls, run in one go."""
    return [fn(*args) for args in chunk]


def run_call(blob: bytes) -> tuple[bool, Any]:
    """An executor call: (True, its result pickled) or (False, (its exception pickled or
    None, its traceback as text))."""
    try:
        fn, args, kwargs = pickle.loads(blob)
        return True, pickle.dumps(fn(*args, **kwargs), protocol=5)
    except BaseException as e:
        tb = error_text(e)
        try:
            exc_blob: bytes | None = pickle.dumps(e, protocol=5)
        except Exception:
            exc_blob = None
        return False, (exc_blob, tb)


def _rehearsal_handler(ev: Any) -> None:
    """The handler of the dummy event a capsule runs before it reports itself ready."""
    if ev.payload is not None and ev.fd < 0:  # pragma: no cover - never true
        raise AssertionError(ev)


def warm(chan: socket.socket, table: dict[int, Callable[[Any], object]],
         channel_fds: tuple[int, ...] = ()) -> None:
    """Take a fresh capsule's first-touch costs off the latency path, then say "ready".

    After fork, every page the hand-off path touches is still shared with the template:
    the first event would pay its copy-on-write faults (CPython writes the reference
    counts of every object it reads) and the first run of cold code.  The capsule pays
    them now, while idle: it sends itself a dummy event through the real path (pickle,
    ``sendmsg`` with an fd, ``recvmsg``, unpickle, rebuild, run, release), and touches
    the handlers it knows."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        attrs = {"eid": 0, "time_ns": 0, "payload": (0, b"", "rehearsal", None), "fd": None,
                 "_source_blob": None}
        for _ in range(2):
            fd = os.dup(b.fileno())
            try:
                send(a, ("run", 0, None, "PayloadEvent", attrs), [fd])
            finally:
                os.close(fd)
            msg = recv(b)
            assert msg is not None
            (_op, _eid, _blob, kind, got), fds = msg
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
    for handler in table.values():  # their objects and code: this process's own pages now
        getattr(handler, "__code__", None)
    gc.collect()
    send(chan, ("ready",))


def capsule_main(chan: socket.socket, table: dict[int, Callable[[Any], object]],
                 rehearse: bool = False, channel_fds: tuple[int, ...] = ()) -> NoReturn:
    """Wait for events on ``chan`` and run them; exit after one unless attached (keepalive).

    ``rehearse``: a capsule of a pool warms up first (see :func:`warm`)."""
    code = 0
    try:
        if rehearse:
            warm(chan, table, channel_fds)
        while True:
            msg = recv(chan)
            if msg is None:  # the parent is gone or released us
                break
            (op, eid, blob, kind, attrs), fds = msg
            if op == "call":  # an executor's call: answer, then wait for the next one
                send(chan, ("result", *run_call(blob)))
                continue
            handler = table.get(eid) if blob is None else pickle.loads(blob)
            err: str | None
            if handler is None:
                err = f"capsule: no handler for event {eid}"
            else:
                table[eid] = handler
                event = rebuild(kind, attrs, fds)
                err = run_handler(handler, event)
                release(event)
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

