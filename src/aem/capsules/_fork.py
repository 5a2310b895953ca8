"""EVF_FORK: a process forked from the application at the moment of the event (parent side)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _core
from ..engine import INTERNAL_PRIORITY, Engine
from ._child import capsule_main, child_signals, report_error, run_handler
from ._handoff import close_socks, event_state, fields, flush_stdio, read_errors, send, signal_name

# ---- EVF_FORK ------------------------------------------------------------------------------------


@dataclass
class Forked:
    pid: int
    job: int
    flags: int
    chan: socket.socket


class _ForkState:
    """An engine's EVF_FORK children: all of them by pid, the keepalive ones by event id."""

    def __init__(self) -> None:
        self.forks: dict[int, Forked] = {}
        self.attached: dict[int, Forked] = {}


_states: weakref.WeakKeyDictionary[Engine, _ForkState] = weakref.WeakKeyDictionary()


def _state(engine: Engine) -> _ForkState:
    st = _states.get(engine)
    if st is None:
        st = _states[engine] = _ForkState()
    return st


def forked_pids(engine: Engine) -> list[int]:
    """Pids of the EVF_FORK children of ``engine`` still running."""
    st = _states.get(engine)
    return sorted(st.forks) if st is not None else []


def fork_handler(engine: Engine, eid: int, handler: Callable[[Any], object], event: Any, flags: int) -> None:
    """Run ``handler(event)`` in a process forked from this one now (EVF_FORK)."""
    st = _state(engine)
    forks, attached = st.forks, st.attached
    keep = bool(flags & _core.EVF_KEEPALIVE)
    if keep and eid in attached:
        rec = attached[eid]
        kind, attrs, socks = event_state(event)
        try:
            send(rec.chan, ("keep", eid, None, kind, attrs), [s.fileno() for s in socks])
        finally:
            close_socks(socks)
        return
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = os.getpid()
    flush_stdio()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            parent_end.close()
            child_signals()
            if threading.current_thread() is threading.main_thread():
                _core.set_parent_death_signal(signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(1)
            err = run_handler(handler, event)
            if keep:
                if err is not None:
                    print(f"aem: EVF_FORK handler of event {eid} raised:\n{err}", file=sys.stderr)
                capsule_main(child_end, {eid: handler})
            if err is not None:
                report_error(child_end, err)
            code = 0 if err is None else 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    child_end.close()
    parent_end.setblocking(False)
    for name in fields(type(event)):  # sockets handed to the child: not ours any more
        value = getattr(event, name, None)
        if isinstance(value, socket.socket):
            value.close()
    rec = Forked(pid, eid, flags, parent_end)
    forks[pid] = rec
    if keep:
        attached[eid] = rec
    pidfd = os.pidfd_open(pid)
    try:
        engine._add(_core.K_CHILD, pidfd, _core.EPOLLIN, forked_exit_handler(engine), 0,
                    INTERNAL_PRIORITY, None, pid, True)
    except BaseException:
        os.close(pidfd)
        raise


def forked_exit_handler(engine: Engine) -> Callable[[Any], None]:
    ref = weakref.ref(engine)

    def on_exit(ev: Any) -> None:
        eng = ref()
        if eng is None:
            return
        st = _state(eng)
        rec = st.forks.pop(ev.pid, None)
        if rec is None:
            return
        attached = st.attached
        if attached.get(rec.job) is rec:
            del attached[rec.job]
        errors = read_errors(rec.chan)
        rec.chan.close()
        code = ev.returncode
        error = errors[-1] if errors else None
        if code is not None and code < 0 and error is None:
            error = f"process {ev.pid} was killed by {signal_name(-code)}"
        if not rec.flags & _core.EVF_NOCLDWAIT:
            eng._job_exit(rec.job, ev.pid, code, error)

    return on_exit


def end_fork_job(engine: Engine, eid: int, kill: bool) -> None:
    """The registration ``eid`` is gone: release its keepalive child; with ``kill``, end its processes."""
    st = _states.get(engine)
    if st is None:
        return
    rec = st.attached.pop(eid, None)
    if rec is not None and not kill:
        with contextlib.suppress(OSError):
            rec.chan.shutdown(socket.SHUT_WR)
    if kill:
        for r in st.forks.values():
            if r.job == eid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.pid, signal.SIGTERM)

