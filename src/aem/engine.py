"""The engine: registrations and the delivery of their events.

Each process has one engine, created on first use and re-created, empty, in
a forked child (the parent's epoll set, threads and signal routes are not
inherited).  The module-level functions (``aem.register``, ``aem.run`` ...)
act on it; :class:`Engine` exists for advanced uses (several engines in one
process, tests).

Two ways to deliver, same registrations:

* ``aem.run()`` — the calling thread waits for events and runs the handlers
  itself: the fast path for servers.
* ``aem.start()`` — handlers run in the main thread *while it does something
  else*: a thread of the engine waits natively (no GIL) and, when events are
  ready, interrupts the main thread at its next safe point (a pending call
  for a busy thread, the kick signal — ``SIGURG`` by default — for one
  blocked in a system call).  ``aem.stop()`` ends it.
"""

from __future__ import annotations

import atexit
import functools
import mmap
import os
import pickle
import signal
import socket
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from . import _core, sources
from ._core import AemError, Event, UnknownEventError
from .sources import EventSource

__all__ = [
    "DEFAULT_KICK_SIGNAL", "Engine", "control", "current", "keepalive", "register", "run",
    "set_error_handler", "start", "stats", "stop", "unregister",
]

Handler = Callable[[Any], object]
ErrorHandler = Callable[[BaseException, "Event | None"], object]

#: The signal that interrupts a blocked main thread in asynchronous mode.
#: SIGURG: ignored by default, so a stray one harms nobody (Go's runtime made
#: the same choice for the same reason).  ``aem.start(signum=...)`` picks another.
DEFAULT_KICK_SIGNAL: int = signal.SIGURG


#: Priority of the engine's own registrations (the channel UserEvents fired from other processes
#: arrive on, the exit watch of a forked handler): the highest, so a backlog of datagrams or a
#: child's exit never waits behind the application's own events.
INTERNAL_PRIORITY = 2**31 - 1
#: Datagrams taken from the channel per readiness (then other events get their turn).
_CHANNEL_BATCH = 256
#: The largest datagram read from the channel (a larger payload is refused at fire()).
_CHANNEL_DATAGRAM_MAX = 1 << 20


class ProcessSupport(Protocol):
    """What runs handlers in other processes (EVF_FORK, EVF_CAPSULE): ``aem.capsules``
    registers itself with :func:`set_process_support` when it is imported."""

    def spawn(self, engine: Engine, eid: int, handler: Handler, event: Event, flags: int, pool: Any,
              priority: int) -> None:
        """Run ``handler(event)`` of registration ``eid`` in another process."""

    def check_pool(self, pool: Any) -> None:
        """Raise if ``pool`` (the ``pool=`` of a registration) cannot run handlers."""

    def end_job(self, engine: Engine, eid: int, kill: bool) -> None:
        """Registration ``eid`` is gone; with ``kill`` (EVJOBSHTDN), end its processes."""

    def stats(self) -> dict[str, int]:
        """Counters for :func:`stats` (under ``"capsules"``)."""


_process_support: ProcessSupport | None = None


def set_process_support(support: ProcessSupport) -> None:
    """Install what runs EVF_FORK / EVF_CAPSULE handlers (called by ``aem.capsules`` at import)."""
    global _process_support
    _process_support = support


def _support() -> ProcessSupport:
    if _process_support is None:
        raise AemError("EVF_FORK/EVF_CAPSULE need process support: import aem.capsules")
    return _process_support


class _Terminated(BaseException):
    """SIGTERM arrived during run()/keepalive(): end them cleanly."""


def default_error_handler(exc: BaseException, event: Event | None) -> None:
    """Print the handler's traceback to stderr (the default error handler)."""
    if event is None:
        print("aem: error in the engine (not in a handler):", file=sys.stderr)
    else:
        print(f"aem: exception in the handler of event {event.eid} ({type(event).__name__}):",
              file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)


class Engine(_core.Engine):
    """An event engine: its registrations and the delivery of their events.

    Most programs use the process's engine through the module-level functions
    (``aem.register`` ...).  An ``Engine`` may also be created directly; it
    must then be closed (``close()`` or a ``with`` block).
    """

    def __init__(self) -> None:
        self.set_error_handler(default_error_handler)
        self._kick: tuple[int, Any] | None = None
        self._channel: tuple[socket.socket, socket.socket] | None = None
        self._channel_buf = memoryview(b"")   # the channel's datagrams are read into it
        #: job eid -> eids of the ChildExit(job=...) registrations listening to it
        self._jobs: dict[int, set[int]] = {}
        #: eids paused by a back-off (see _backoff) that its timer will resume
        self._backing_off: set[int] = set()
        #: eid -> what to call with the AemError if the engine gives the registration up
        #: (its source failed again and again): aem.wait and aem.events await it
        self._give_up_watchers: dict[int, Callable[[BaseException], None]] = {}
        self._set_hooks(spawn=self._spawn, unregister=self._on_unregister,
                        pool=lambda pool: _support().check_pool(pool))
        _engines.add(self)

    # -- registration ----------------------------------------------------------------

    # register(source, handler, flags=0, priority=0, constructor=None, destructor=None, pool=None)
    # is the C method itself (no Python layer on the hot path): see aem.register for its contract.

    def _spawn(self, eid: int, handler: Handler, event: Event, flags: int, pool: Any,
               priority: int) -> None:
        """Run an EVF_FORK / EVF_CAPSULE handler in another process (the process support's spawn).

        The first call makes the support's ``spawn`` the hook itself: later activations go
        straight there (one Python frame less on their path)."""
        spawn = functools.partial(_support().spawn, self)
        self._set_hooks(spawn=spawn)
        spawn(eid, handler, event, flags, pool, priority)

    def _on_unregister(self, eid: int, job_listener: bool, shutdown: bool) -> None:
        if job_listener:
            for job, eids in list(self._jobs.items()):
                eids.discard(eid)
                if not eids:
                    del self._jobs[job]
            return
        if _process_support is not None:
            _process_support.end_job(self, eid, shutdown)

    def _listen_to_job(self, job: int, handler: Handler, flags: int, priority: int, obj: Any) -> int:
        """Register a ChildExit(job=...) listener (see aem.sources.SourceHost).

        Refused at once when ``job`` is not a registration of this engine that creates
        processes (EVF_FORK / EVF_CAPSULE): such a listener could never fire."""
        try:
            job_flags = int(self.describe(job)["flags"])
        except UnknownEventError:
            raise UnknownEventError(f"ChildExit(job={job}): no registration {job} in this engine "
                                    "(register the job's handler first; its eid is the job)") from None
        if not job_flags & (_core.EVF_FORK | _core.EVF_CAPSULE):
            raise ValueError(f"ChildExit(job={job}): registration {job} runs its handler in this "
                             "process (no EVF_FORK or EVF_CAPSULE), so no process of it ever exits")
        eid = self._add(_core.K_JOB, None, 0, handler, flags, priority, obj)
        self._jobs.setdefault(job, set()).add(eid)
        return eid

    def _use_process_vmtable(self) -> None:
        """Read payloads go into the process vmtable (made on first use, or by EVTBLINIT)."""
        if not self.__dict__.get("_payloads_in_vmtable"):
            from .vmtable import process_vmtable

            self._set_hooks(payload=process_vmtable())
            self._payloads_in_vmtable = True

    def _backoff(self, eid: int, pause: float) -> None:
        """The engine's own work for ``eid`` failed (accept() out of descriptors, a source's
        collect() raised): pause the registration for ``pause`` seconds rather than spin.

        A ``control()`` of the application in the meantime wins: the timer resumes only a
        registration still paused by the back-off alone."""
        super().control(eid, _core.EVJOBSTOP)
        self._backing_off.add(eid)

        def resume(ev: Event) -> None:
            if eid not in self._backing_off:
                return  # the application took control of it meanwhile
            self._backing_off.discard(eid)
            try:
                super(Engine, self).control(eid, _core.EVJOBSTART)
            except UnknownEventError:
                pass  # unregistered meanwhile

        self._add_timer(pause, resume)

    def _watch_give_up(self, eid: int, callback: Callable[[BaseException], None] | None) -> None:
        """Call ``callback(error)`` if the engine unregisters ``eid`` because its source kept
        failing (instead of the error handler); None stops watching."""
        if callback is None:
            self._give_up_watchers.pop(eid, None)
        else:
            self._give_up_watchers[eid] = callback

    def _gave_up(self, eid: int, error: BaseException) -> bool:
        """Called by the engine when it unregistered ``eid`` after repeated failures of its
        source: True if a watcher took ``error`` (then the error handler does not get it)."""
        callback = self._give_up_watchers.pop(eid, None)
        if callback is None:
            return False
        callback(error)
        return True

    def control(self, eid: int, op: int, arg: Any = None) -> None:
        """Job control of registration ``eid`` (see :func:`aem.control`)."""
        self._backing_off.discard(eid)  # the application's word wins over a back-off's resume
        super().control(eid, op, arg)

    def _job_exit(self, job: int, pid: int, returncode: int | None, error: str | None) -> int:
        """Deliver the end of a process of ``job`` to its ChildExit(job=...) listeners."""
        n = 0
        for eid in list(self._jobs.get(job, ())):
            if self._push(eid, (pid, returncode, job, error)):
                n += 1
        return n

    def _user_channel(self) -> socket.socket:
        """The write end of the datagram channel that forked processes fire through."""
        if self._channel is None:
            r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            r.setblocking(False)
            self._add(_core.K_READABLE, r.fileno(), _core.EPOLLIN, self._on_channel, 0,
                      INTERNAL_PRIORITY, r, 0, True)
            self._channel = (r, w)
            # one buffer for every datagram (recv(1 MiB) would allocate 1 MiB per read), its
            # pages given by the kernel as datagrams first reach them (a bytearray is zeroed)
            self._channel_buf = memoryview(mmap.mmap(-1, _CHANNEL_DATAGRAM_MAX))
        return self._channel[1]

    def _on_channel(self, event: Event) -> None:
        assert self._channel is not None
        r = self._channel[0]
        buf = self._channel_buf
        for _ in range(_CHANNEL_BATCH):
            try:
                n = r.recv_into(buf)
            except BlockingIOError:
                return
            eid, payload = pickle.loads(buf[:n])
            try:
                self.fire(eid, payload)
            except UnknownEventError:
                pass  # unregistered meanwhile

    # -- delivery -----------------------------------------------------------------------

    def run(self, timeout: float | None = None, until_idle: bool = True) -> str:
        """Wait for events and run their handlers in this thread.

        Returns why it ended: ``"stopped"`` (``stop()`` was called),
        ``"idle"`` (no registration left; only with ``until_idle``),
        ``"timeout"``, ``"interrupted"`` (SIGINT, i.e. Ctrl-C, while it
        waits) or ``"terminated"`` (SIGTERM) — the last two only when the
        application did not register those signals itself.

        A ``KeyboardInterrupt`` or ``SystemExit`` raised in a handler
        (Ctrl-C while a handler runs included) propagates out of ``run()``;
        other exceptions of handlers go to the error handler.
        """
        # SIGTERM ends run() cleanly while it runs, if nobody else handles it.  Inline (no
        # context manager, one disposition check): run() is called in loops.
        installed = (signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
                     and threading.get_ident() == threading.main_thread().ident
                     and not _core.signal_routed(signal.SIGTERM))
        if installed:
            signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return str(super().run(timeout, until_idle))
        except _Terminated:
            return "terminated"
        finally:
            if installed:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def keepalive(self) -> str:
        """Block the main thread doing nothing but receive events (AEM's aem_evkeepalive).

        Returns on ``stop()``, SIGINT or SIGTERM, like :meth:`run`.
        """
        if self.delivering:
            raise AemError("aem.keepalive() called from a handler: handlers never nest")
        if threading.current_thread() is not threading.main_thread():
            raise AemError("keepalive() blocks the main thread: call it from the main thread")
        return self.run(None, until_idle=False)

    def start(self, signum: int | None = None) -> None:
        """Deliver events asynchronously to the main thread until :meth:`stop`.

        Handlers then run in the main thread, interrupting whatever it does —
        a busy loop, ``time.sleep``, a blocking ``recv``, ``input()`` — at
        its next safe point; it then goes on.  Handlers never nest.  The
        main thread is interrupted with ``signum`` (default ``SIGURG``),
        whose disposition aem holds until ``stop()``.  Must be called from
        the main thread.
        """
        if threading.current_thread() is not threading.main_thread():
            raise AemError("start() must be called from the main thread, where handlers will run")
        if self.async_delivery:
            return
        sig = DEFAULT_KICK_SIGNAL if signum is None else signum
        if sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP):
            raise ValueError("choose a kick signal the application does not otherwise use "
                             "(SIGURG, SIGUSR2, a real-time signal ...)")
        if not _core_signal_free(sig):
            raise AemError(f"signal {sig} is registered as an aem.Signal; choose another kick signal")
        prev = signal.signal(sig, _core._kick)
        # A stop() from another thread could not restore the disposition: it is still ours.
        old = self._kick[1] if self._kick is not None and self._kick[0] == sig else prev
        try:
            self._start_async(sig)
        except BaseException:
            signal.signal(sig, old)
            raise
        self._kick = (sig, old)

    def stop(self) -> None:
        """End :meth:`run` (after the handler in progress) and asynchronous delivery.

        From another thread, the kick signal's disposition stays aem's (harmless) until
        the next ``start()`` or a ``stop()`` in the main thread restores it."""
        super().stop()
        if self._kick is not None and threading.current_thread() is threading.main_thread():
            sig, old = self._kick
            self._kick = None
            signal.signal(sig, old if old is not None else signal.SIG_DFL)

    def close(self) -> None:
        """Stop delivery and release every registration, fd and thread of the engine."""
        self.stop()
        super().close()
        if self._channel is not None:
            for s in self._channel:
                s.close()
            self._channel = None
        self._jobs.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _after_fork_in_child(self) -> None:
        self._abandon()
        if self._kick is not None:
            sig, old = self._kick
            self._kick = None
            try:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            except (ValueError, OSError):
                pass
        # The channel's write end stays open: UserEvent.fire() from this child uses it.
        self._jobs.clear()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.stats()['registered']} registered"
        return f"<aem.Engine pid={self.pid} {state}>"


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def _core_signal_free(signum: int) -> bool:
    """True when no aem engine routes ``signum`` (an ``aem.Signal`` registration)."""
    return not _core.signal_routed(signum)


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_current: Engine | None = None
_lock = threading.Lock()


def current() -> Engine:
    """The calling process's engine (created on first use)."""
    global _current
    eng = _current
    if eng is None:
        with _lock:
            if _current is None:
                _current = Engine()
            eng = _current
    return eng


def _after_fork_in_child() -> None:
    global _current
    _current = None
    for eng in list(_engines):
        eng._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
sources.set_process_host(current)  # mypy checks here that Engine implements sources.SourceHost


@atexit.register
def _stop_at_exit() -> None:
    """The doorbell thread must not outlive the interpreter's finalisation."""
    for eng in list(_engines):
        if eng.async_delivery and eng.pid == os.getpid():
            eng.stop()


# -- the module-level API: the process's engine -------------------------------------------

def register(source: EventSource, handler: Handler, flags: int = 0, priority: int = 0,
             constructor: Handler | None = None, destructor: Handler | None = None,
             pool: Any = None) -> int:
    """Register ``handler`` for the occurrences of ``source`` on the process's engine.

    Returns the event id (a positive int, unique in the process).

    ``flags``: ``EVF_ONESHOT`` (unregister after the first delivery),
    ``EVF_FORK`` / ``EVF_CAPSULE`` (run the handler in another process),
    ``EVF_NOCLDWAIT``, ``EVF_KEEPALIVE``.  ``priority``: among pending
    events, higher is delivered first (then order of arrival).
    ``constructor(event)`` runs right before the handler,
    ``destructor(event)`` right after (even if the handler raised).

    Raises ``TypeError`` for a non-source or a non-callable handler,
    ``ValueError`` for unknown flags, a closed fd or a bad priority.

    >>> eid = aem.register(aem.Timer(1.0), lambda ev: print("tick", ev.count))  # doctest: +SKIP
    """
    return (_current or current()).register(source, handler, flags, priority, constructor,
                                            destructor, pool)


def unregister(eid: int, missing_ok: bool = False) -> bool:
    """Remove registration ``eid``; its pending occurrences are dropped.

    Raises :class:`aem.UnknownEventError` if it is not registered (one-shot
    events unregister themselves after delivery), unless ``missing_ok``.
    Returns True if it was registered.
    """
    return bool((_current or current()).unregister(eid, missing_ok))


def control(eid: int, op: int, arg: Any = None) -> None:
    """Job control (AEM's ``aem_evctl``).

    * ``EVJOBPRIO``: ``arg`` is the new priority.
    * ``EVJOBSTOP``: suspend delivery; occurrences are kept (at most
      ``aem.HELD_MAX`` per event; timers coalesce into one with a count).
    * ``EVJOBSTART``: resume; kept occurrences are delivered in order.
    * ``EVJOBSHTDN``: unregister and end the processes attached to the event.
    * ``EVTBLINIT``: configure the process's vmtable (``eid`` 0, ``arg`` a dict).
    """
    if op == _core.EVTBLINIT:
        from .vmtable import configure_process_vmtable

        configure_process_vmtable(arg)
        return
    (_current or current()).control(eid, op, arg)


def run(timeout: float | None = None) -> str:
    """Deliver events in the calling thread until ``stop()``, no registration is left,
    or ``timeout`` seconds pass.  Returns why it ended (see :meth:`Engine.run`)."""
    return (_current or current()).run(timeout)


def start(signum: int | None = None) -> None:
    """Deliver events asynchronously to the main thread (see :meth:`Engine.start`)."""
    current().start(signum)


def stop() -> None:
    """End ``run()``/``keepalive()`` and asynchronous delivery."""
    eng = _current
    if eng is not None and not eng.closed:
        eng.stop()


def keepalive() -> str:
    """Block the main thread receiving events until ``stop()``, SIGINT or SIGTERM."""
    return current().keepalive()


def stats() -> dict[str, Any]:
    """Counters of the process's engine (registered, delivered, queued, errors, per source ...),
    with those of its capsule pools under ``"capsules"``."""
    out = current().stats()
    if _process_support is not None:
        out["capsules"] = _process_support.stats()
    return out


def set_error_handler(fn: ErrorHandler | None) -> ErrorHandler | None:
    """Set ``fn(exc, event)`` to receive exceptions raised by handlers; returns the previous one.

    ``None`` restores the default (print the traceback to stderr).
    """
    eng = current()
    old = eng.set_error_handler(default_error_handler if fn is None else fn)
    return None if old is default_error_handler else old
