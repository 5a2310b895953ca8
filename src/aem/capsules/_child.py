"""What runs in a capsule or an EVF_FORK child: the handler runner and the capsule's loop."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from ._handoff import rebuild, recv, release, send


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


def capsule_main(chan: socket.socket, table: dict[int, Callable[[Any], object]]) -> NoReturn:
    """Wait for events on ``chan`` and run them; exit after one unless attached (keepalive)."""
    code = 0
    try:
        while True:
            msg = recv(chan)
            if msg is None:  # the parent is gone or released us
                break
            (op, eid, blob, kind, attrs), fds = msg
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

