"""Event sources: what an application can register a handler for.

Each source is a small object describing *what* to wait for; ``aem.register``
hands it to the engine, which arms the matching kernel object (a timer in
the engine's heap behind one timerfd, an fd in epoll, a signal routed to the
engine's pipe, an inotify watch, a pidfd, a PSI trigger).

New kinds of sources can be written by users (AEM's loadable event modules):
subclass :class:`Source`, give it a file descriptor the engine can watch and a
``collect`` method that turns readiness into occurrences.  See
:class:`Source` for the interface.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal as _signal
import socket
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from . import _core
from ._core import AemError, UnknownEventError
from .vmtable import set_shortage_factory

if TYPE_CHECKING:
    from .vmtable import VMTable

__all__ = [
    "IN_ACCESS", "IN_ALL_EVENTS", "IN_ATTRIB", "IN_CLOSE_WRITE", "IN_CREATE", "IN_DELETE",
    "IN_DELETE_SELF", "IN_MODIFY", "IN_MOVED_FROM", "IN_MOVED_TO", "IN_MOVE_SELF",
    "Accept", "ChildExit", "Close", "EventSource", "FileChange", "MemoryPressure", "Read", "Readable",
    "Signal", "Source", "Timer", "UserEvent", "Writable",
]


class HasFileno(Protocol):
    """Anything with a ``fileno()`` method (sockets, files, pipes ...)."""

    def fileno(self) -> int: ...


FdLike = int | HasFileno

# inotify masks (linux/inotify.h)
IN_ACCESS = 0x001
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_CLOSE_NOWRITE = 0x010
IN_OPEN = 0x020
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_ALL_EVENTS = 0xFFF
_IN_DEFAULT = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
               | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)


class SourceHost(Protocol):
    """What a source's ``_attach`` may ask of the engine it is registered with.

    This is the whole interface between the sources and the engine
    (:class:`aem.Engine` implements it): sources never touch the engine's
    fields, and this module does not import the engine.
    """

    @property
    def closed(self) -> bool: ...

    def _add(self, kind: int, target: Any, events: int, handler: Any, flags: int, priority: int,
             obj: Any, data: int = 0, internal: bool = False, /) -> int:
        """Register with the C core: ``kind`` (``_core.K_*``), what to watch, the epoll mask."""

    def _listen_to_job(self, job: int, handler: Any, flags: int, priority: int, obj: Any) -> int:
        """Register a ChildExit(job=...) listener; refuses a job that makes no processes."""

    def _use_process_vmtable(self) -> None:
        """Read payloads go into the process vmtable from now on."""

    def _user_channel(self) -> socket.socket:
        """The write end of the datagram channel forked processes fire UserEvents through."""

    def fire(self, eid: int, payload: Any = None, /) -> None:
        """Deliver one occurrence of UserEvent registration ``eid``."""

    def _deliver_now(self, eid: int, values: tuple[Any, ...], /) -> bool | None:
        """Run ``eid``'s handler now, in this thread (vmtable shortages)."""


#: The process's engine, as the sources see it (set by aem.engine: this module does not import it).
_process_host: Callable[[], SourceHost] | None = None


def set_process_host(get: Callable[[], SourceHost]) -> None:
    """Tell the sources how to reach the process's engine (``aem.engine.current``)."""
    global _process_host
    _process_host = get


def _fd_of(target: FdLike) -> int:
    if isinstance(target, bool):
        raise TypeError("expected a file descriptor (int) or an object with fileno(), not bool")
    if isinstance(target, int):
        fd = target
    elif hasattr(target, "fileno"):
        fd = target.fileno()
        if not isinstance(fd, int):
            raise TypeError(f"{type(target).__name__}.fileno() returned {type(fd).__name__}, not int")
    else:
        raise TypeError(
            f"expected a file descriptor (int) or an object with fileno(), not {type(target).__name__}")
    if fd < 0:
        raise ValueError(f"file descriptor must be >= 0 (got {fd}; is the socket closed?)")
    return fd


class EventSource:
    """Base class of every event source: what ``aem.register`` accepts."""

    __slots__ = ()

    def _attach(self, engine: SourceHost, handler: Any, flags: int, priority: int, obj: Any) -> int:
        raise TypeError(f"{type(self).__name__} does not say how to register it: "
                        "subclass aem.Source and implement fileno() and collect()")


class Source(EventSource, ABC):
    """The interface of user-defined event sources (AEM's loadable event modules).

    A user-defined source watches one file descriptor.  When epoll reports it
    ready (``readiness``: ``aem.EPOLLIN`` by default), the engine calls
    ``collect(events)`` in the delivering thread; every item of the iterable
    it returns becomes one :class:`aem.CustomEvent` whose ``value`` is the
    item (return ``None`` or nothing for no occurrence).  ``collect`` must not
    block: read what is there and return.

    Example — an eventfd counter as a source::

        class Counter(aem.Source):
            def __init__(self):
                self.fd = os.eventfd(0, os.EFD_NONBLOCK)
            def fileno(self):
                return self.fd
            def collect(self, events):
                return [os.eventfd_read(self.fd)]

        aem.register(Counter(), lambda ev: print("count", ev.value))
    """

    __slots__ = ()

    #: epoll events the engine waits for on ``fileno()``.
    readiness: int = _core.EPOLLIN

    @abstractmethod
    def fileno(self) -> int:
        """The file descriptor the engine watches."""

    @abstractmethod
    def collect(self, events: int) -> Iterable[Any] | None:
        """Turn readiness (an epoll mask) into occurrences: one event per item."""

    def _attach(self, engine: SourceHost, handler: Any, flags: int, priority: int, obj: Any) -> int:
        return engine._add(_core.K_CUSTOM, self, self.readiness, handler, flags, priority, obj)


class Timer(_core.TimerBase, EventSource):
    """Fires ``after`` seconds from registration, then every ``interval`` seconds.

    The event's ``count`` is the number of expirations since the last
    delivery (more than 1 when the handler ran late).  A timer without
    ``interval`` fires once and is then unregistered.  Timers cost no file
    descriptor: they live in the engine's heap (64 bytes each), so millions
    of them are fine.  Resolution is the kernel's (nanoseconds).

    Raises ``TypeError`` for a non-number and ``ValueError`` for a negative,
    infinite or NaN time (or an interval of 0).

    >>> aem.register(aem.Timer(0.5, interval=1.0), tick)   # doctest: +SKIP
    """

    __slots__ = ()

    # __new__, after, interval: in C (aem._core.TimerBase), so that creating one is cheap.

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Timer) and other._after_ns == self._after_ns
                and other._interval_ns == self._interval_ns)

    def __hash__(self) -> int:
        return hash((self._after_ns, self._interval_ns))

    def __repr__(self) -> str:
        extra = f", interval={self.interval!r}" if self._interval_ns else ""
        return f"aem.Timer({self.after!r}{extra})"


class _FdSource(EventSource):
    """A source on one file descriptor (kept alive while registered)."""

    __slots__ = ("_target",)
    _kind = 0
    _events = 0

    def __init__(self, target: FdLike) -> None:
        _fd_of(target)  # validate now
        self._target = target

    @property
    def target(self) -> FdLike:
        """The object (or fd) given: kept alive while registered."""
        return self._target

    @property
    def fd(self) -> int:
        """The watched file descriptor."""
        return _fd_of(self.target)

    def fileno(self) -> int:
        """The watched file descriptor."""
        return _fd_of(self.target)

    def _attach(self, engine: SourceHost, handler: Any, flags: int, priority: int, obj: Any) -> int:
        return engine._add(self._kind, _fd_of(self.target), self._events, handler, flags, priority, obj)

    def __repr__(self) -> str:
        return f"aem.{type(self).__name__}({self.target!r})"


class Readable(_FdSource):
    """Fires while ``fd`` is readable (level-triggered); the event carries ``fd``.

    The handler reads; if it leaves data unread, the event fires again.
    """

    __slots__ = ()
    _kind = _core.K_READABLE
    _events = _core.EPOLLIN


class Writable(_FdSource):
    """Fires while ``fd`` is writable (level-triggered); the event carries ``fd``."""

    __slots__ = ()
    _kind = _core.K_WRITABLE
    _events = _core.EPOLLOUT


def _need_socket(sock: object, what: str) -> socket.socket:
    if not isinstance(sock, socket.socket):
        raise TypeError(f"{what} needs a socket.socket, not {type(sock).__name__}")
    if sock.fileno() < 0:
        raise ValueError(f"{what}: the socket is closed")
    return sock


class Accept(_FdSource):
    """A connection arrives on the listening socket: the engine accepts it.

    The event carries ``conn`` (a non-blocking ``socket.socket``) and
    ``addr``; one event per connection.  The listening socket is made
    non-blocking.
    """

    __slots__ = ("_sockargs",)
    _kind = _core.K_ACCEPT
    _events = _core.EPOLLIN

    def __init__(self, listen_sock: socket.socket) -> None:
        sock = _need_socket(listen_sock, "Accept")
        super().__init__(sock)
        self._sockargs = (sock.family, sock.type | socket.SOCK_NONBLOCK, sock.proto)

    def _attach(self, engine: SourceHost, handler: Any, flags: int, priority: int, obj: Any) -> int:
        sock = self.target
        assert isinstance(sock, socket.socket)
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError as e:
            raise ValueError(f"Accept needs a listening socket: {e}") from e
        if not listening:
            raise ValueError("Accept needs a listening socket: call sock.listen() before registering "
                             "(or use aem.Read/aem.Readable on a connected socket)")
        sock.setblocking(False)
        return super()._attach(engine, handler, flags, priority, obj)


class Read(_FdSource):
    """Data arrives on a socket: the engine reads it (at most ``max_size`` bytes).

    The event carries ``data`` (a buffer in the process's vmtable, or bytes),
    ``eof`` (True once, when the peer closed its side; data is then empty and
    no more Read events follow) and ``fd``.  The data's memory goes back to
    the vmtable after the handler unless it calls ``event.keep()``.
    """

    __slots__ = ("max_size",)
    _kind = _core.K_READ
    _events = _core.EPOLLIN

    def __init__(self, sock: FdLike, max_size: int = 65536) -> None:
        super().__init__(sock)
        if isinstance(max_size, bool) or not isinstance(max_size, int):
            raise TypeError("max_size must be an int")
        if not 1 <= max_size <= 1 << 30:
            raise ValueError("max_size must be between 1 byte and 1 GiB")
        self.max_size = max_size

    def _attach(self, engine: SourceHost, handler: Any, flags: int, priority: int, obj: Any) -> int:
        engine._use_process_vmtable()
        return engine._add(self._kind, _fd_of(self.target), self._events, handler, flags, priority, obj,
                           self.max_size)


class Close(_FdSource):
    """The peer hung up, or the socket failed: fires once, then is unregistered.

    The event carries ``fd`` and ``error`` (the socket's pending errno, 0 for
    a plain hang-up).
    """

    __slots__ = ()
    _kind = _core.K_CLOSE
    _events = _core.EPOLLRDHUP


class Signal(EventSource):
    """The signal ``signum`` is delivered to the process.

    While registered, the signal's disposition belongs to aem (as with
    asyncio's ``add_signal_handler``); the previous one comes back when the
    last registration of that signal goes.  The event carries ``signum`` and
    ``info`` (sender pid and uid when the kernel knows them).  Registering
    ``SIGINT`` means Ctrl-C no longer ends ``aem.run()``: your handler decides.
    """

    __slots__ = ("signum",)

    def __init__(self, signum: int) -> None:
        if isinstance(signum, bool) or not isinstance(signum, int):
            raise TypeError(f"signum must be an int (signal.SIGUSR1 ...), not {type(signum).__name__}")
        if not 0 < signum < _signal.NSIG:
            raise ValueError(f"{signum} is not a signal number (1..{_signal.NSIG - 1})")
        if signum in (_signal.SIGKILL, _signal.SIGSTOP):
            raise ValueError("SIGKILL and SIGSTOP cannot be caught")
        self.signum = int(signum)

    def _attach(self, engine: SourceHost, handler: Any, flags: int, priority: int, obj: Any) -> int:
        return engine._add(_core.K_SIGNAL, self.signum, 0, handler, flags, priority, obj)

    def __repr__(self) -> str:
        try:
            name = _signal.Signals(self.signum).name
        except ValueError:
            name = str(self.signum)
        return f"aem.Signal({name})"


class ChildExit(EventSource):
    """A child process ends: ``ChildExit(pid)`` or ``ChildExit(job=eid)``.

    With ``pid``, the engine watches that process through a pidfd and, when
    it ends, reaps it (``reap=False`` leaves it for ``os.waitpid`` or
    ``subprocess`` to reap) and fires once.  With ``job``, it fires for
    every process created by registration ``eid`` (``EVF_FORK`` /
    ``EVF_CAPSULE`` handlers) that ends, with the handler's exception as text
    in ``error`` when it raised.  The event carries ``pid``, ``returncode``
    (negative: killed by that signal; None when the status is not ours to
    read), ``job`` and ``error``.  The source keeps its arguments: ``pid``,
    ``job`` and ``reap``.
    """

    __slots__ = ("job", "pid", "reap")

    def __init__(self, pid: int | None = None, *, job: int | None = None, reap: bool = True) -> None:
        if (pid is None) == (job is None):
            raise TypeError("ChildExit needs exactly one of pid or job=")
        for name, v in (("pid", pid), ("job", job)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name} must be a positive int (got {v!r})")
        if pid is not None and pid == os.getpid():
            raise ValueError(f"ChildExit({pid}): that is this process, whose exit nobody here could "
                             "handle; watch a child's pid")
        self.pid = pid
        self.job = job
        self.reap = bool(reap)

    def _attach(self, engine: SourceHost, handler: Any, flags: int, priority: int, obj: Any) -> int:
        if self.job is not None:
            return engine._listen_to_job(self.job, handler, flags, priority, obj)
        assert self.pid is not None
        pidfd = os.pidfd_open(self.pid)
        try:
            return engine._add(_core.K_CHILD, pidfd, _core.EPOLLIN, handler, flags, priority, obj,
                               self.pid | ((0 if self.reap else 1) << 32))
        except BaseException:
            os.close(pidfd)
            raise

    def __repr__(self) -> str:
        return f"aem.ChildExit({self.pid})" if self.pid is not None else f"aem.ChildExit(job={self.job})"


class FileChange(EventSource):
    """inotify reports a change of ``path`` (a file, or entries of a directory).

    ``mask`` selects the changes (``aem.IN_MODIFY | aem.IN_CREATE`` ...;
    default: modifications, attributes, creation, deletion, moves).  The event
    carries ``path``, ``name`` (the entry in a watched directory, or None) and
    ``mask``.
    """

    __slots__ = ("mask", "path")

    def __init__(self, path: str | os.PathLike[str], mask: int = _IN_DEFAULT) -> None:
        self.path = os.fspath(path)
        if isinstance(mask, bool) or not isinstance(mask, int) or mask <= 0 or mask >> 32:
            raise ValueError("mask must be a non-empty combination of the aem.IN_* constants")
        self.mask = mask

    def _attach(self, engine: SourceHost, handler: Any, flags: int, priority: int, obj: Any) -> int:
        return engine._add(_core.K_FILE, self.path, self.mask, handler, flags, priority, obj)

    def __repr__(self) -> str:
        return f"aem.FileChange({self.path!r}, mask={self.mask:#x})"


class UserEvent(EventSource):
    """An event of the application's own, fired with :meth:`fire`.

    ``fire(payload)`` may be called from any thread, or from a process forked
    from the registering one (the payload then travels pickled through the
    engine's datagram channel).  The event carries ``payload``.
    """

    __slots__ = ("__weakref__", "_lock", "_pid", "_targets")

    def __init__(self) -> None:
        # (engine, eid, owner pid, channel write socket)
        self._targets: list[tuple[weakref.ref[SourceHost], int, int, socket.socket]] = []
        self._lock = threading.Lock()
        self._pid = 0  # the process that rebuilt it from a pickle (0: made here)

    def _attach(self, engine: SourceHost, handler: Any, flags: int, priority: int, obj: Any) -> int:
        channel = engine._user_channel()
        eid = engine._add(_core.K_USER, None, 0, handler, flags, priority, obj)
        with self._lock:
            self._targets = [*self._targets, (weakref.ref(engine), eid, os.getpid(), channel)]
        return eid

    def fire(self, payload: Any = None) -> None:
        """Deliver one occurrence carrying ``payload`` to every registration of this event.

        Raises :class:`aem.UnknownEventError` if the event is not (or no longer)
        registered, and ``ValueError`` if a payload fired from another process
        cannot be pickled or is too large for one datagram.
        """
        pid = _pid[0]
        targets = self._targets  # replaced, never mutated in place: safe to iterate
        if len(targets) == 1 and targets[0][2] == pid:  # the common case: one registration, here
            engine = targets[0][0]()
            if engine is not None and not engine.closed:
                try:
                    engine.fire(targets[0][1], payload)
                    return
                except UnknownEventError:
                    pass
        fired = False
        for ref, eid, owner, channel in targets:
            if pid != owner:
                try:
                    data = pickle.dumps((eid, payload))
                except Exception as e:
                    raise ValueError(f"payload fired from another process must pickle: {e}") from e
                try:
                    channel.send(data)
                except OSError as e:
                    if e.errno == errno.EMSGSIZE:
                        raise ValueError(f"payload too large to fire across processes "
                                         f"({len(data)} bytes pickled)") from e
                    raise
                fired = True
                continue
            engine = ref()
            if engine is None or engine.closed:
                self._forget(eid)
                continue
            try:
                engine.fire(eid, payload)
                fired = True
            except UnknownEventError:
                self._forget(eid)
        if not fired:
            raise UnknownEventError("fire() on a UserEvent that is not registered")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """A UserEvent travels (pickled) to processes aem creates — capsules and EVF_FORK
        children keep the engine's channel — so their handlers can fire it back."""
        with self._lock:
            targets = tuple((eid, owner, channel.fileno()) for _ref, eid, owner, channel in self._targets)
        return (_remote_user_event, (targets,))

    def _forget(self, eid: int) -> None:
        with self._lock:
            self._targets = [t for t in self._targets if t[1] != eid]

    def __repr__(self) -> str:
        return f"aem.UserEvent(registrations={len(self._targets)})"


# os.getpid() is a system call: UserEvent.fire() reads this instead (kept right across fork).
_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


# Pickled UserEvents already rebuilt in this process (a capsule receives the same one
# with every event: rebuilding costs a dup() and a socket object each time).
_rebuilt: dict[tuple[tuple[int, int, int], ...], UserEvent] = {}


def _remote_user_event(targets: tuple[tuple[int, int, int], ...]) -> UserEvent:
    """Rebuild a pickled UserEvent: fire() goes through the inherited channel fds."""
    known = _rebuilt.get(targets)
    if known is not None and known._pid == _pid[0]:
        return known
    ue = UserEvent()
    ue._pid = _pid[0]
    rebuilt: list[Any] = []
    for eid, owner, fd in targets:
        if owner == os.getpid():
            if _process_host is None:
                raise AemError("aem.sources used without aem.engine: import aem")
            eng = _process_host()
            rebuilt.append((weakref.ref(eng), eid, owner, eng._user_channel()))
            continue
        try:
            channel = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # not a process that inherited the channel: fire() will say so
        rebuilt.append((_dead_ref, eid, owner, channel))
    ue._targets = rebuilt
    if len(_rebuilt) < 1024:
        _rebuilt[targets] = ue
    return ue


def _dead_ref() -> SourceHost | None:
    """Stands for the engine of another process (fire() goes through the channel)."""
    return None


class MemoryPressure(EventSource):
    """The kernel's PSI trigger fires: memory stalls exceeded ``stall_us`` in a ``window_us`` window.

    ``kind`` is ``"some"`` (some tasks stalled) or ``"full"`` (all did).  The
    trigger is set on ``/proc/pressure/memory`` (system-wide) or, with
    ``path``, on a cgroup's ``memory.pressure`` file.  The kernel wants
    ``window_us`` between 500 ms and 10 s, and a multiple of 2 s for a
    process without ``CAP_SYS_RESOURCE``.  The event carries ``level`` (the
    kind).
    """

    __slots__ = ("kind", "path", "stall_us", "window_us")

    def __init__(self, stall_us: int, window_us: int, kind: str = "some",
                 path: str = "/proc/pressure/memory") -> None:
        if kind not in ("some", "full"):
            raise ValueError("kind must be 'some' or 'full'")
        for name, v in (("stall_us", stall_us), ("window_us", window_us)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int of microseconds")
        if not 500_000 <= window_us <= 10_000_000:
            raise ValueError("window_us must be between 500000 and 10000000 (the kernel's limits)")
        if stall_us > window_us:
            raise ValueError("stall_us cannot exceed window_us")
        self.stall_us = stall_us
        self.window_us = window_us
        self.kind = kind
        self.path = path

    def _attach(self, engine: SourceHost, handler: Any, flags: int, priority: int, obj: Any) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise OSError(f"{self.path} does not exist: this kernel has no PSI "
                          "(CONFIG_PSI, or psi=0 on its command line)") from None
        try:
            try:
                # The kernel replaces the last byte written with NUL: send one.
                os.write(fd, f"{self.kind} {self.stall_us} {self.window_us}\0".encode())
            except OSError as e:
                if e.errno == errno.EINVAL and self.window_us % 2_000_000:
                    raise ValueError(
                        "the kernel refused the PSI trigger: without CAP_SYS_RESOURCE the window "
                        "must be a multiple of 2 s (window_us=2000000, 4000000, ...)") from e
                raise
            return engine._add(_core.K_PRESSURE, fd, _core.EPOLLPRI, handler, flags, priority, obj)
        except BaseException:
            os.close(fd)
            raise

    def __repr__(self) -> str:
        return f"aem.MemoryPressure({self.stall_us}, {self.window_us}, kind={self.kind!r})"


class Shortage(EventSource):
    """The shortage event of one vmtable: ``vmt.shortage``.

    Register handlers with ``aem.register(vmt.shortage, handler)``.  When a
    request finds no free block, each handler receives, synchronously and in
    the allocating thread, an :class:`aem.ShortageEvent` with ``size`` (the
    bytes requested) and ``vmtable``; it may free blocks, and the request is
    then retried once.  A handler's exception goes to the engine's error
    handler.  Allocations made by a shortage handler from the same vmtable do
    not deliver the event again.

    >>> aem.register(vmt.shortage, lambda ev: cache.evict(ev.size))  # doctest: +SKIP
    """

    __slots__ = ("__weakref__", "_targets", "_vmt")

    def __init__(self, vmt: VMTable) -> None:
        self._vmt: weakref.ref[VMTable] = weakref.ref(vmt)
        #: (engine, eid) of each registration
        self._targets: list[tuple[weakref.ref[SourceHost], int]] = []

    def _attach(self, engine: SourceHost, handler: Any, flags: int, priority: int, obj: Any) -> int:
        eid = int(engine._add(_core.K_HOSTED, None, 0, handler, flags, priority, obj))
        self._targets.append((weakref.ref(engine), eid))
        return eid

    def _deliver(self, size: int) -> int:
        """Run every live registration's handler now; return how many ran."""
        vmt = self._vmt()
        if vmt is None:
            return 0
        ran = 0
        for ref, eid in list(self._targets):
            engine = ref()
            if engine is None or engine.closed:
                self._forget(eid)
                continue
            delivered = engine._deliver_now(eid, (size, vmt, None))
            if delivered:
                ran += 1
            elif delivered is False:
                self._forget(eid)  # unregistered (None: stopped, still registered)
        return ran

    def _forget(self, eid: int) -> None:
        self._targets = [t for t in self._targets if t[1] != eid]

    def __repr__(self) -> str:
        return f"<aem shortage of {self._vmt()!r}, {len(self._targets)} registration(s)>"


set_shortage_factory(Shortage)
_core._set_types(timer=Timer)
