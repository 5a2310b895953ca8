"""The pool, parent side: the application's CapsulePool and its manager thread."""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import _core
from .._core import (
    AemError,
    ChildExitEvent,
    FileChangeEvent,
    PayloadEvent,
    ReadEvent,
    SignalEvent,
    TimerEvent,
)
from ..vmtable import TBL_VZONE, Block
from ._executor import Call, ExecutorPart
from ._handoff import (
    NATIVE,
    OwnedFd,
    Passed,
    close_socks,
    discard,
    event_state,
    flush_stdio,
    read_errors,
    recv,
    send,
    signal_name,
)
from ._template import template_main

if TYPE_CHECKING:
    from ..engine import Engine

def send_message(sock: socket.socket, msg: Any, fds: list[int]) -> None:
    """A native record (bytes) or a pickled message (a tuple) onto a capsule's socket."""
    if isinstance(msg, bytes):
        _core.handoff_send(sock.fileno(), msg, fds[0] if fds else -1)
    else:
        send(sock, msg, fds)


#: Seconds between tries to start a template after the kernel refused the fork.
_RETRY_TEMPLATE = 0.05

#: Events with at least this priority may use a pool's reserve capsules.
RESERVE_PRIORITY = 100


# ---- the pool (parent side) -----------------------------------------------------------------------


@dataclass(eq=False)
class Capsule:
    token: int
    chan: socket.socket
    template: Template
    pid: int = 0
    # starting, warming, idle, busy, attached (events); worker (executor calls);
    # broken (dying), released
    state: str = "starting"
    job: int = 0
    flags: int = 0
    errors: list[str] = field(default_factory=list)
    backlog: deque[tuple[Any, list[int], list[Passed]]] = field(default_factory=deque)
    calls: deque[Call] = field(default_factory=deque)  # executor calls sent to it, oldest first
    waiters: int = 0  # threads reading its answers themselves (CallFuture.result)


@dataclass
class Template:
    pid: int
    ctl: socket.socket
    table: frozenset[int]
    retired: bool = False
    alive: bool = True
    denied: threading.Event = field(default_factory=threading.Event)


@dataclass
class Activation:
    eid: int
    handler: Callable[[Any], object]
    kind: str
    attrs: dict[str, Any]
    socks: list[Passed]
    flags: int
    priority: int
    since: float = field(default_factory=time.monotonic)
    record: bytes | None = None  # the native record (kind is NATIVE)


pools: weakref.WeakSet[CapsulePool] = weakref.WeakSet()

#: Events that travel without an fd (see CapsulePool._fast).
_FDLESS = frozenset({PayloadEvent, TimerEvent, SignalEvent, ChildExitEvent, FileChangeEvent})

# os.getpid() is a system call: activations read this (kept right across fork).
_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


class CapsulePool(ExecutorPart):
    """A pool of ready processes (capsules) that run handlers of ``EVF_CAPSULE`` events,
    and a ``concurrent.futures.Executor`` (``submit``, ``map``, ``shutdown``).

    ``size`` capsules are kept ready for any event, plus ``reserve`` more for
    events of priority at least ``reserve_priority``.  The pool starts at
    once (its template is forked from this process now, so create it after
    your imports); ``close()`` ends it and every process it created.

    >>> pool = aem.CapsulePool(size=4, reserve=1)                          # doctest: +SKIP
    >>> aem.register(src, handler, flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=pool)  # doctest: +SKIP

    Raises ``ValueError`` for a negative size or reserve, ``OSError`` when the
    template cannot be forked.
    """

    def __init__(self, size: int = 4, reserve: int = 0, *, reserve_priority: int = RESERVE_PRIORITY,
                 spawn_timeout: float = 2.0, engine: Engine | None = None) -> None:
        for name, v in (("size", size), ("reserve", reserve)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0")
        if size + reserve == 0:
            raise ValueError("a pool needs at least one capsule (size + reserve >= 1)")
        if not spawn_timeout > 0:
            raise ValueError("spawn_timeout must be > 0")
        from .. import engine as _engine_mod

        self.size = size
        self.reserve = reserve
        self.reserve_priority = reserve_priority
        self.spawn_timeout = spawn_timeout
        self._engine = engine if engine is not None else _engine_mod.current()
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._tokens = itertools.count(1)
        self._capsules: dict[int, Capsule] = {}       # token -> capsule
        self._by_pid: dict[int, Capsule] = {}
        self._idle: deque[Capsule] = deque()
        self._attached: dict[int, Capsule] = {}       # keepalive: eid -> capsule
        self._blobs: dict[int, tuple[Any, bytes]] = {}  # eid -> (handler, its pickle)
        self._pending: deque[Activation] = deque()
        self._templates: list[Template] = []
        self._spawn_errors: deque[tuple[float, str]] = deque(maxlen=8)
        self._last_spawn_ok = time.monotonic()
        self._consecutive_failures = 0
        self._counters = dict(spawned=0, reaped=0, failed=0, refills=0, activations=0, refreshes=0,
                              spawn_failures=0)
        self._closed = False
        # Idle capsules as the engine's delivery path sees them (handoff.c): it takes one
        # itself for a native fd-less occurrence; _sync() applies its takes here.
        self._table = _core.HandoffTable(reserve, reserve_priority)
        self._table.open = 1
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # the engine's takes wake the manager once half the ordinary capsules are gone (it
        # refills then; a one-shot capsule's exit refills too, a keepalive attach wakes it)
        self._table.wake_fd = self._wake_w
        self._table.low_water = reserve + size // 2
        self._init_executor()
        self._start_template()
        self._manager = threading.Thread(target=self._manage, name="aem-capsule-manager", daemon=True)
        self._manager.start()
        pools.add(self)

    # -- public ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """The pool's state and counters (see docs/capsules.md, "The pool's stats()").

        Now: ``size``, ``reserve``, ``idle`` (ready capsules), ``busy`` (running an event),
        ``attached`` (keepalive registrations with their capsule), ``workers`` (capsules
        kept for executor calls, at most ``size``; not in SPEC's list), ``starting``
        (forked or warming up), ``pending`` (activations waiting for a capsule),
        ``templates`` (alive).  Since the start: ``spawned``, ``reaped``, ``failed``,
        ``refills``, ``activations``, ``refreshes``, ``spawn_failures``."""
        with self._lock:
            self._sync()
            states = [c.state for c in self._capsules.values()
                      if not c.template.retired or c.state not in ("starting", "warming")]
            return {
                "size": self.size,
                "reserve": self.reserve,
                "idle": len(self._idle),
                "busy": states.count("busy"),
                "attached": len(self._attached),
                "workers": len(self._workers),
                "starting": states.count("starting") + states.count("warming"),
                "pending": len(self._pending),
                "templates": sum(1 for t in self._templates if t.alive),
                **self._counters,
            }

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Block until every capsule (size + reserve) is idle, or ``timeout``; True if ready."""
        deadline = time.monotonic() + timeout
        self._wake()  # the manager refills what the engine took since it last looked
        while time.monotonic() < deadline:
            with self._lock:
                self._sync()
                if len(self._idle) >= self.size + self.reserve:
                    return True
            time.sleep(0.002)
        return False

    def pids(self) -> list[int]:
        """Pids of the pool's processes: templates first, then capsules."""
        with self._lock:
            return ([t.pid for t in self._templates if t.alive]
                    + [c.pid for c in self._capsules.values() if c.pid])

    def refresh(self) -> None:
        """Make a new template from the application as it is now (with its current handlers)."""
        with self._lock:
            self._check_open()
            self._refresh_locked()
        self._wake()

    def close(self, timeout: float = 2.0) -> None:
        """End the pool: its template, its capsules (busy ones get SIGTERM, then SIGKILL)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._table.open = 0
            self._table.wake_fd = -1  # the pipe closes below
            self._table.clear()
            for eid in self._attached:
                self._table.detach(eid)
            if _core.handoff_default() is self._table:  # the default pool's: the engine forgets it
                _core.handoff_set_default(None)
            self._sync()
            for act in self._pending:
                discard(act.attrs, act.socks)
            self._pending.clear()
        self._wake()
        if self._pid == os.getpid():
            self._manager.join(timeout + 1.0)
        with self._lock:
            self._fail_calls("the capsule pool was closed while the call ran")
            for cap in self._capsules.values():
                with contextlib.suppress(OSError):
                    cap.chan.close()
            for t in self._templates:
                with contextlib.suppress(OSError):
                    t.ctl.close()
        if self._pid == os.getpid():
            deadline = time.monotonic() + timeout
            for t in self._templates:
                self._reap_template(t, deadline)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def closed(self) -> bool:
        """True once closed."""
        return self._closed

    def __enter__(self) -> CapsulePool:
        return self

    def __exit__(self, *exc: object) -> None:
        """``with pool:`` ends like an executor's: waits for the calls submitted, then closes."""
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        s = self.stats()
        return f"<aem.CapsulePool size={self.size} reserve={self.reserve} idle={s['idle']} busy={s['busy']}>"

    # -- activation (the delivering thread) -----------------------------------------------------------

    def _activate(self, eid: int, handler: Callable[[Any], object], event: Any, flags: int,
                  priority: int) -> None:
        """Hand the event to a capsule (or queue it until one is free). Never blocks on a process."""
        if self._closed or self._pid != _pid[0]:
            self._check_open()
        if type(event) in _FDLESS:
            keep = flags & _core.EVF_KEEPALIVE
            encoded = _core.handoff_encode(event, _core.HANDOFF_KEEP if keep else _core.HANDOFF_RUN)
            if encoded is not None and (self._fast_attached(eid, encoded[0]) if keep
                                        else self._fast(eid, handler, flags, priority, encoded[0])):
                return
        act = self._native(eid, handler, event, flags, priority)
        if act is None:  # the pickled path
            kind, attrs, socks = event_state(event)
            act = Activation(eid, handler, kind, attrs, socks, flags, priority)
        with self._lock:
            self._counters["activations"] += 1
            # An occurrence never overtakes an earlier one of the same event still waiting.
            if not any(a.eid == eid for a in self._pending) and self._dispatch(act):
                # No wake-up of the manager here: the capsule's exit, reported by the
                # template, is what makes it refill (a wake-up would make the manager
                # thread contend for the GIL right on the activation's path).
                return
            self._pending.append(act)
            self._gate()
        self._wake()  # no capsule was free: the manager makes more

    def _fast(self, eid: int, handler: Callable[[Any], object], flags: int, priority: int,
              record: bytes) -> bool:
        """The common case, straight: a native record without fd, to an idle capsule of the
        live template, nothing waiting.  False: take the general path."""
        with self._lock:
            self._sync()
            t = self._templates[-1] if self._templates else None
            idle = self._idle
            if (self._pending or t is None or not t.alive or t.retired or eid not in t.table or not idle
                    or (priority < self.reserve_priority and len(idle) <= self.reserve)):
                return False
            cap = idle[-1] if self._table.lifo else idle[0]
            if cap.template is not t or not self._table.remove(cap.token):
                return False
            idle.remove(cap)
            self._counters["activations"] += 1
            cap.job, cap.flags, cap.state = eid, flags, "busy"
            try:
                _core.handoff_send(cap.chan.fileno(), record, -1)
            except OSError as e:  # it died before taking it: this event failed (once)
                cap.state, cap.job = "dead", 0
                self._fail(Activation(eid, handler, NATIVE, {}, [], flags, priority, record=record),
                           f"capsule {cap.pid} could not take the event: {e}")
            return True

    def _fast_attached(self, eid: int, record: bytes) -> bool:
        """A keepalive occurrence, straight to its attached capsule when nothing waits before it."""
        with self._lock:
            cap = self._attached.get(eid)
            if cap is None or cap.backlog or self._pending or eid not in cap.template.table:
                return False
            try:
                _core.handoff_send(cap.chan.fileno(), record, -1)
            except BlockingIOError:  # its socket is full: queued, the manager sends it
                cap.backlog.append((record, [], []))
                self._wake()
            except OSError:  # it died: the general path reports this occurrence as failed
                self._table.detach(eid)
                return False
            self._counters["activations"] += 1
            self._publish(eid, cap)
            return True

    def _native(self, eid: int, handler: Callable[[Any], object], event: Any, flags: int,
                priority: int) -> Activation | None:
        """The event as a native record (see handoff.c), or None when it needs pickling.

        A VZONE block travels by reference on the pickled path (no copy at all)."""
        if type(event) is ReadEvent:
            data = event.data
            if isinstance(data, Block) and data.vmtable.zone == TBL_VZONE:
                return None
        encoded = _core.handoff_encode(event, _core.HANDOFF_KEEP if flags & _core.EVF_KEEPALIVE
                                       else _core.HANDOFF_RUN)
        if encoded is None:
            return None
        record, fdobj = encoded
        socks: list[Passed] = [] if fdobj is None else [fdobj] if isinstance(fdobj, socket.socket) \
            else [OwnedFd(fdobj)]
        return Activation(eid, handler, NATIVE, {}, socks, flags, priority, record=record)

    def _dispatch(self, act: Activation) -> bool:
        """With the lock: give ``act`` to a capsule if one may take it (False: it waits)."""
        keep = bool(act.flags & _core.EVF_KEEPALIVE)
        if keep and act.eid in self._attached:
            self._send_to(self._attached[act.eid], act, attach=True)
            self._publish(act.eid, self._attached.get(act.eid))
            return True
        if not self._reachable(act):
            self._refresh_for(act)  # a template that knows the handler; act waits for it
            return False
        cap = self._take_idle(act.priority)
        if cap is None:
            return False
        cap.job, cap.flags = act.eid, act.flags
        cap.state = "attached" if keep else "busy"
        if keep:
            self._attached[act.eid] = cap
            self._wake()  # one capsule fewer for new events: the manager makes another
        self._send_to(cap, act, attach=keep)
        if keep:
            self._publish(act.eid, self._attached.get(act.eid))
        return True

    def _take_idle(self, priority: int) -> Capsule | None:
        while True:
            self._sync()
            if not self._idle:
                return None
            if priority < self.reserve_priority and len(self._idle) <= self.reserve:
                return None
            # the newest idle capsule (see HandoffTable.lifo): it slept the least
            cap = self._idle[-1] if self._table.lifo else self._idle[0]
            if self._table.remove(cap.token):
                self._idle.remove(cap)
                return cap
            # the engine took it meanwhile: _sync() applies that

    # -- the engine's takes (see handoff.c) ---------------------------------------------------------

    def _sync(self) -> None:
        """With the lock: apply the capsules the engine took from the idle table since last time
        (and count the keepalive occurrences it sent to attached capsules)."""
        if self._table.kept:
            self._counters["activations"] += self._table.kept
            self._table.kept = 0
        for token, eid, flags, err in self._table.drain():
            cap = self._capsules.get(token)
            if cap is None or cap.state != "idle":
                continue
            if err == errno.EAGAIN:  # its socket was full: still idle
                self._table.push(cap.chan.fileno(), cap.token)
                continue
            with contextlib.suppress(ValueError):
                self._idle.remove(cap)
            if err:  # it died before taking the event (which took the Python path)
                cap.state, cap.job = "dead", 0
                continue
            self._counters["activations"] += 1
            cap.job, cap.flags, cap.state = eid, flags, "busy"

    def _unidle(self, cap: Capsule) -> None:
        """With the lock: ``cap`` is idle no more (if the engine took it, it is busy now)."""
        self._table.remove(cap.token)
        self._sync()
        if cap in self._idle:
            self._idle.remove(cap)

    def _publish(self, eid: int, cap: Capsule | None) -> None:
        """With the lock: the engine sends keepalive ``eid``'s next occurrences to ``cap`` itself
        while it is attached, knows the handler and holds no backlog (else they take this path,
        in order).  Call it whenever one of these changes: the table must never hold the fd of
        a capsule whose socket is closed."""
        if (cap is not None and self._attached.get(eid) is cap and not cap.backlog
                and eid in cap.template.table and cap.chan.fileno() >= 0):
            self._table.attach(eid, cap.chan.fileno())
        else:
            self._table.detach(eid)

    def _gate(self) -> None:
        """With the lock: the engine may take capsules only when no activation waits here."""
        self._table.open = int(not self._pending and not self._closed)

    def _live_template(self) -> Template | None:
        live = [t for t in self._templates if t.alive and not t.retired]
        return live[-1] if live else None

    def _reachable(self, act: Activation) -> bool:
        """Can a capsule of the live template get this handler (by id, or pickled)?"""
        t = self._live_template()
        if t is not None and act.eid in t.table:
            return True
        return self._blob(act) is not None

    def _blob(self, act: Activation) -> bytes | None:
        cached = self._blobs.get(act.eid)
        if cached is not None and cached[0] is act.handler:
            return cached[1]
        try:
            blob = pickle.dumps(act.handler, protocol=5)
        except Exception:
            return None
        self._blobs[act.eid] = (act.handler, blob)
        return blob

    def _send_to(self, cap: Capsule, act: Activation, attach: bool) -> None:
        msg: Any
        if act.record is not None and act.eid in cap.template.table:
            msg = act.record  # the native record, as it is
        else:  # pickled: with the handler if the template does not know it
            blob = None if act.eid in cap.template.table else self._blob(act)
            msg = ("keep" if attach else "run", act.eid, blob, act.kind,
                   act.record if act.record is not None else act.attrs)
        fds = [s.fileno() for s in act.socks]
        if cap.backlog:
            cap.backlog.append((msg, fds, act.socks))
            return
        try:
            send_message(cap.chan, msg, fds)
        except BlockingIOError:
            cap.backlog.append((msg, fds, act.socks))
            self._wake()  # the manager sends it once the capsule's socket takes more
            return
        except OSError as e:  # the capsule died before taking it: this event failed (once)
            cap.state, cap.job = "dead", 0
            if self._attached.get(act.eid) is cap:
                del self._attached[act.eid]
                self._table.detach(act.eid)
            self._fail(act, f"capsule {cap.pid} could not take the event: {e}")
            return
        close_socks(act.socks)

    def _refresh_for(self, act: Activation) -> None:
        """Start a template that knows ``act``'s handler, unless the newest one does."""
        newest = self._templates[-1] if self._templates else None
        if newest is not None and newest.alive and act.eid in newest.table:
            return  # already on its way
        self._refresh_locked({act.eid: act.handler})

    def _refresh_locked(self, extra: dict[int, Callable[[Any], object]] | None = None) -> None:
        """Retire the templates (they end once their busy capsules have), start a new one."""
        self._counters["refreshes"] += 1
        for t in self._templates:
            if not t.retired:
                t.retired = True
                with contextlib.suppress(OSError):
                    send(t.ctl, ("retire",))
        self._table.clear()
        self._sync()
        for cap in list(self._idle):
            self._release(cap)
        self._idle.clear()
        waiting = {a.eid: a.handler for a in self._pending}
        self._start_template({**waiting, **(extra or {})})

    # -- the template --------------------------------------------------------------------------------

    def _start_template(self, extra: dict[int, Callable[[Any], object]] | None = None) -> None:
        known = [] if self._engine.closed else self._engine._handlers(_core.EVF_CAPSULE)
        handlers = {eid: h for eid, h, _f, _src in known}
        sources = {eid: src for eid, _h, _f, src in known if src is not None}
        handlers.update(extra or {})
        keep_fds = () if self._engine.closed else (self._engine._user_channel().fileno(),)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        flush_stdio()
        try:
            pid = os.fork()
        except OSError:
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:  # the template
            parent_end.close()
            template_main(child_end, handlers, keep_fds, sources)
        child_end.close()
        parent_end.setblocking(False)
        self._templates.append(Template(pid, parent_end, frozenset(handlers)))

    def _reap_template(self, t: Template, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(t.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            time.sleep(0.005)
        with contextlib.suppress(ProcessLookupError):
            os.kill(t.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(t.pid, 0)

    def _deny_fork_for_tests(self, err: int = errno.EAGAIN) -> None:
        """Fault injection: from now on the kernel refuses the template's forks (seccomp)."""
        with self._lock:
            t = next(t for t in self._templates if not t.retired)
            send(t.ctl, ("deny_fork", err))
        if not t.denied.wait(5):
            raise AemError("the template did not confirm the fork denial")

    # -- the capsule manager (its own thread) -------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _manage(self) -> None:
        """The manager thread's loop.  ``poll`` (not ``select``): a busy application's fds may be
        numbered beyond 1024.  An unexpected error is printed and the loop goes on: a dead
        manager would leave the pool unfilled and exits unreported."""
        poller = select.poll()
        watched: set[int] = set()
        while True:
            try:
                if self._manage_once(poller, watched):
                    break
            except Exception:  # pragma: no cover - a bug: say so, keep the pool alive
                traceback.print_exc()
                time.sleep(0.05)
        self._shutdown()

    def _manage_once(self, poller: select.poll, watched: set[int]) -> bool:
        """One round of the manager: maintain, wait until something is ready or due, handle
        what is ready.  True: closed.

        No polling: in a steady pool the manager sleeps until a socket it watches is
        readable or it is woken (:meth:`_wake`: an activation found no capsule, a keepalive
        attached one, a backlog formed, the engine's takes left few idle, the pool closes);
        it sets a time-out only while something is due at a time of its own (a back-off
        after the kernel refused a fork, activations that may fail for want of one)."""
        with self._lock:
            if self._closed:
                return True
            due = self._maintain()
            want: dict[int, int] = {self._wake_r: select.POLLIN}
            templates = {t.ctl.fileno(): t for t in self._templates if t.alive}
            for fd in templates:
                want[fd] = select.POLLIN
            warming = {c.chan.fileno(): c for c in self._capsules.values() if c.state == "warming"}
            for fd in warming:
                want[fd] = select.POLLIN
            # every worker, busy or not: a call handed to it by another thread is answered
            # without waking this thread first
            working = {c.chan.fileno(): c for c in self._workers if c.state == "worker" and not c.waiters}
            for fd in working:
                want[fd] = select.POLLIN
            backlogged = {c.chan.fileno(): c for c in self._capsules.values() if c.backlog}
            for fd in backlogged:
                want[fd] = want.get(fd, 0) | select.POLLOUT
        for fd in watched - want.keys():
            poller.unregister(fd)
        for fd, mask in want.items():
            poller.register(fd, mask)  # (re-)registering sets the mask
        watched.clear()
        watched.update(want)
        ready = dict(poller.poll(-1 if due is None else max(1, math.ceil(due * 1000))))
        with self._lock:
            if self._closed:
                return True
            if ready.get(self._wake_r):
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
            for fd, t in templates.items():
                if t.alive and ready.get(fd):
                    self._from_template(t)
            for fd, cap in warming.items():
                if cap.state == "warming" and ready.get(fd):
                    self._warmed(cap)
            for fd, cap in working.items():
                if cap.state == "worker" and not cap.waiters and ready.get(fd):
                    self._call_done(cap)
            for fd, cap in backlogged.items():
                if cap.backlog and ready.get(fd, 0) & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                    self._flush(cap)
        return False

    def _maintain(self) -> float | None:
        """With the lock: dispatch pending activations, keep the pool filled, fail what waited
        too long.  Returns the seconds after which it must run again even if nothing wakes
        the manager (None: not before something does)."""
        self._sync()
        self._dispatch_calls()
        while self._pending:
            if not self._dispatch(self._pending[0]):
                break
            self._pending.popleft()
        live = [t for t in self._templates if t.alive and not t.retired]
        if not live and not self._templates_starting():
            try:
                self._start_template()
            except OSError as e:
                self._spawn_errors.append((time.monotonic(), str(e)))
                return _RETRY_TEMPLATE   # try again then
            return None                  # its socket wakes the manager
        starting = sum(1 for c in self._capsules.values()
                       if c.state in ("starting", "warming") and not c.template.retired)
        want = self.size + self.reserve + min(len(self._pending), self.size + 1)
        missing = want - len(self._idle) - starting
        # after the kernel refused a fork, retry with an exponential back-off (10 ms .. 1 s)
        fails = self._consecutive_failures
        backoff = min(1.0, 0.01 * 2 ** min(fails, 10)) if fails else 0.0
        now = time.monotonic()
        due: float | None = None
        if self._spawn_errors and now - self._spawn_errors[-1][0] < backoff:
            if missing > 0:
                due = self._spawn_errors[-1][0] + backoff - now
            missing = 0
        for _ in range(max(0, missing)):
            self._spawn(live[-1])
        # activations that found no capsule while the kernel refused to create one
        if self._spawn_errors and now - self._last_spawn_ok > self.spawn_timeout:
            while self._pending and now - self._pending[0].since > self.spawn_timeout:
                act = self._pending.popleft()
                self._fail(act, "no capsule available: the kernel refused to create a process "
                                f"({self._spawn_errors[-1][1]})")
        if self._spawn_errors and self._pending:   # when the oldest would fail (see above)
            fail_at = max(self._last_spawn_ok, self._pending[0].since) + self.spawn_timeout
            due = min(due if due is not None else math.inf, max(0.0, fail_at - now))
        self._gate()
        return due

    def _warmed(self, cap: Capsule) -> None:
        """A warming capsule's socket is readable: it is ready (or it died warming up)."""
        try:
            msg = recv(cap.chan)
        except BlockingIOError:
            return
        except OSError:
            msg = None
        if msg is None or msg[0] != ("ready",):
            if msg is not None and msg[0][0] == "error":
                cap.errors.append(msg[0][1])
            cap.state = "broken"  # its exit, reported by the template, removes it
            return
        if cap.template.retired:
            self._release(cap)
            return
        cap.state = "idle"
        self._consecutive_failures = 0  # a capsule made it to ready: the back-off starts over
        self._idle.append(cap)
        self._table.set_known(cap.template.table)
        self._table.push(cap.chan.fileno(), cap.token)

    def _workers_pending(self) -> bool:
        """Capsules on their way (starting, warming) that could become workers."""
        return any(c.state in ("starting", "warming") for c in self._capsules.values())

    def _templates_starting(self) -> bool:
        return False

    def _spawn(self, t: Template) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        token = next(self._tokens)
        try:
            send(t.ctl, ("spawn", token), [child_end.fileno()])
        except OSError as e:
            parent_end.close()
            child_end.close()
            self._spawn_errors.append((time.monotonic(), f"template unreachable: {e}"))
            return
        child_end.close()
        parent_end.setblocking(False)
        self._capsules[token] = Capsule(token, parent_end, t)

    def _from_template(self, t: Template) -> None:
        while True:
            try:
                msg = recv(t.ctl)
            except BlockingIOError:
                return
            except OSError:
                msg = None
            if msg is None:
                self._template_gone(t)
                return
            (op, *args), _fds = msg
            if op == "spawned":
                token, pid = args
                cap = self._capsules.get(token)
                if cap is None:
                    continue
                cap.pid = pid
                self._by_pid[pid] = cap
                self._counters["spawned"] += 1
                self._last_spawn_ok = time.monotonic()  # the kernel forks again
                if t.retired:  # spawned by a template being replaced: not for new work
                    self._release(cap)
                    continue
                cap.state = "warming"  # idle once it says it is ready (see _child.warm)
                if self._counters["spawned"] > self.size + self.reserve:
                    self._counters["refills"] += 1
            elif op == "spawn_failed":
                token, _err, text = args
                cap = self._capsules.pop(token, None)
                if cap is not None:
                    cap.chan.close()
                self._counters["spawn_failures"] += 1
                self._consecutive_failures += 1
                self._spawn_errors.append((time.monotonic(), text))
            elif op == "exited":
                pid, code = args
                self._exited(pid, code)
            elif op == "denied":
                t.denied.set()

    def _exited(self, pid: int, code: int, note: str = "") -> None:
        cap = self._by_pid.get(pid)
        if cap is None:
            return
        self._unidle(cap)  # first: the engine may have given it an event
        del self._by_pid[pid]
        self._capsules.pop(cap.token, None)
        self._counters["reaped"] += 1
        if self._attached.get(cap.job) is cap:
            del self._attached[cap.job]
            self._table.detach(cap.job)
        errors = cap.errors + read_errors(cap.chan)
        with contextlib.suppress(OSError):
            cap.chan.close()
        for msg, _fds, socks in cap.backlog:
            discard(msg[4] if isinstance(msg, tuple) and isinstance(msg[4], dict) else {}, socks)
        if cap in self._workers:
            self._worker_exited(cap, code, errors)
        elif cap.state in ("starting", "warming", "broken"):  # it died before it was ever ready: back off
            self._consecutive_failures += 1
            self._counters["spawn_failures"] += 1
            why = errors[-1].splitlines()[-1] if errors else f"exit {code}"
            self._spawn_errors.append((time.monotonic(), f"capsule {pid} died warming up: {why}"))
        if cap.state in ("busy", "attached"):
            error = errors[-1] if errors else None
            if code < 0 and error is None:
                error = f"capsule {pid} was killed by {signal_name(-code)}"
                if note:
                    error += f" ({note})"
            if code != 0:
                self._counters["failed"] += 1
            if not cap.flags & _core.EVF_NOCLDWAIT:
                self._engine_push(cap.job, pid, code, error)
        self._wake()

    def _template_gone(self, t: Template) -> None:
        t.alive = False
        with contextlib.suppress(OSError):
            t.ctl.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(t.pid, os.WNOHANG)
        # Capsules of a dead template die with it (parent-death signal); their exits will
        # never be reported by it: report the busy ones here, forget the others.
        for cap in [c for c in self._capsules.values() if c.template is t]:
            self._unidle(cap)
            if cap.state in ("busy", "attached") or cap in self._workers:
                self._exited(cap.pid, -signal.SIGKILL, note=f"its template {t.pid} died")
            else:
                self._release(cap)

    def _flush(self, cap: Capsule) -> None:
        while cap.backlog:
            msg, fds, socks = cap.backlog[0]
            try:
                send_message(cap.chan, msg, fds)
            except BlockingIOError:
                return
            except OSError:
                return  # the exit report will follow
            cap.backlog.popleft()
            close_socks(socks)
        if cap.state == "attached":
            self._publish(cap.job, cap)  # in order again: the engine may send to it

    def _release(self, cap: Capsule) -> None:
        """Let a capsule go: closing its socket makes it exit (one still warming up, which does
        not read its socket yet, is ended by its template at once)."""
        if cap.pid and cap.state in ("starting", "warming") and cap.template.alive:
            with contextlib.suppress(OSError):
                send(cap.template.ctl, ("kill", cap.pid, signal.SIGKILL))
        cap.state = "released"
        self._capsules.pop(cap.token, None)
        if cap.pid:
            self._by_pid.pop(cap.pid, None)
        with contextlib.suppress(OSError):
            cap.chan.close()

    def _fail(self, act: Activation, error: str) -> None:
        self._counters["failed"] += 1
        discard(act.attrs, act.socks)
        if not act.flags & _core.EVF_NOCLDWAIT:
            self._engine_push(act.eid, 0, None, error)
        else:
            print(f"aem: capsule activation of event {act.eid} failed: {error}", file=sys.stderr)

    def _engine_push(self, job: int, pid: int, code: int | None, error: str | None) -> None:
        eng = self._engine
        if not eng.closed:
            eng._job_exit(job, pid, code, error)

    def _check_open(self) -> None:
        if self._closed:
            raise AemError("this capsule pool is closed")
        if self._pid != os.getpid():
            raise AemError("this capsule pool belongs to the parent process; create one in this process")

    # -- jobs ---------------------------------------------------------------------------------

    def _end_job(self, eid: int, kill: bool) -> None:
        """Registration ``eid`` is gone: release its attached capsule; with ``kill``, end its processes."""
        with self._lock:
            if self._closed:
                return
            self._pending = deque(a for a in self._pending if a.eid != eid)
            self._gate()
            self._blobs.pop(eid, None)
            cap = self._attached.pop(eid, None)
            self._table.detach(eid)
            if cap is not None and not kill:
                cap.state = "busy"  # it finishes what it has, then exits; its exit is still reported
                with contextlib.suppress(OSError):
                    cap.chan.shutdown(socket.SHUT_WR)
            if kill:
                for c in self._capsules.values():
                    if c.job == eid and c.state in ("busy", "attached") and c.pid:
                        with contextlib.suppress(OSError):
                            send(c.template.ctl, ("kill", c.pid, signal.SIGTERM))

    def _shutdown(self) -> None:
        with self._lock:
            for t in self._templates:
                if t.alive:
                    with contextlib.suppress(OSError):
                        send(t.ctl, ("exit",))

