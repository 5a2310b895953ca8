"""Handlers in their own processes: ``EVF_FORK``, capsules, ``EVF_NOCLDWAIT``, ``EVF_KEEPALIVE``.

Creating a process on demand is slow (``fork()`` of a Python process costs
~0.7 ms at 10 MB and grows with its memory), blocks the parent, and fails
exactly when it is needed most: under memory shortage.  A *capsule* is a
process already created, initialised and waiting in a pool; handing it an
event takes microseconds.

How a pool works (``CapsulePool``)::

    application (parent)                template (zygote)            capsules
    ────────────────────                ─────────────────            ────────
    main thread: the handler of an      forked from the parent       forked from the
    EVF_CAPSULE event sends the event   when the pool starts, so it  template; each waits
    to an idle capsule over its         has the application's        on its own socket for
    socket (SOCK_SEQPACKET)             imports and handlers; small,  one event (or, attached
                                        single-threaded; the         to an EVF_KEEPALIVE
    capsule manager thread: keeps the   subreaper of everything the  event, for all of its
    pool filled (asks the template to   capsules create; reaps them  occurrences)
    fork), learns of exits, reports     and reports each exit
    them as ChildExit(job=eid) events

* Handlers are handed over by event id: the template holds a snapshot of the
  registrations that existed when it was made.  A handler registered later is
  sent by importable reference (pickle); if it cannot be pickled (a lambda, a
  closure), the pool is *refreshed*: a new template is forked from the
  application (one fork of the parent, once) and new capsules come from it.
* Event data is copied (pickled); sockets in an event (``AcceptEvent.conn``)
  are handed over as file descriptors and closed in the parent.
* The template lets go of every file descriptor but stdin/stdout/stderr
  and the engine's UserEvent channel: a handler in a capsule gets what it
  needs through its event, and may ``fire()`` the application's
  user events to send results back.
* ``reserve`` extra capsules are kept for events of priority at least
  ``reserve_priority`` (default :data:`RESERVE_PRIORITY`): a graceful
  shutdown handler still runs in its own process when the kernel refuses to
  create any.
* A capsule that dies is replaced; the event it ran is reported as failed
  (``ChildExit(job=eid)`` with the signal as a negative return code).  When
  no capsule is available and none can be created for ``spawn_timeout``
  seconds, the activation is reported as failed (``pid`` 0,
  ``returncode`` None, the kernel's refusal in ``error``).  Nothing is lost
  silently and the main thread never waits for a process.
* The application's ``SIGCHLD`` disposition is never touched: ``subprocess``
  keeps reporting exit codes correctly.

``EVF_FORK`` handlers run in a process forked from the application at the
moment of the event (so they see its current state); the parent reaps them
through a pidfd.  Processes created by aem end when the application ends.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import errno
import gc
import itertools
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
import types
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from . import _core
from ._core import AemError
from .vmtable import TBL_VZONE, Block, by_id

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["RESERVE_PRIORITY", "CapsulePool", "ProcessEvent", "default_pool"]

#: Events with at least this priority may use a pool's reserve capsules.
RESERVE_PRIORITY = 100

_MAX_INLINE = 60 * 1024  # larger messages travel in a memfd
_FDS_MAX = 16


# ---- what a handler in another process receives ---------------------------------------------


class ProcessEvent:
    """An event as a handler running in another process sees it.

    It has the attributes of the original event (``eid``, ``time_ns``, and
    those of its kind: ``payload``, ``data``, ``conn`` ...), copied; ``source``
    when it could be pickled, else None; ``kind`` names the original class
    (``"PayloadEvent"`` ...).
    """

    def __init__(self, kind: str, attrs: dict[str, Any]) -> None:
        self.kind = kind
        self.__dict__.update(attrs)

    def keep(self) -> None:
        """Keep data handed over in a shared (VZONE) block (a memoryview of it) after the
        handler returns; other data is this process's own copy anyway."""
        self.__dict__["_kept"] = True

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"{self.kind} has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"<aem.ProcessEvent {self.kind} eid={self.__dict__.get('eid')}>"


@dataclass(frozen=True)
class _SocketRef:
    index: int
    family: int
    type: int
    proto: int


_FIELDS: dict[type, tuple[str, ...]] = {}


def _fields(tp: type) -> tuple[str, ...]:
    names = _FIELDS.get(tp)
    if names is None:
        seen: list[str] = []
        for klass in tp.__mro__:
            for name, value in vars(klass).items():
                if (isinstance(value, types.GetSetDescriptorType) and not name.startswith("__")
                        and name not in ("kept", "source") and name not in seen):
                    seen.append(name)
        names = _FIELDS[tp] = tuple(seen)
    return names


@dataclass(frozen=True)
class _SharedBlockRef:
    """A block of a VZONE vmtable, handed over by offset: no copy."""

    vmtable_id: int
    offset: int
    length: int


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if isinstance(value, Block) and not value.freed and not value.fallback:
        vmt = value.vmtable
        if vmt.zone == TBL_VZONE:  # shared memory: the other process maps it too
            length = len(value)
            return _SharedBlockRef(vmt.id, value.detach(), length)
    try:
        return bytes(memoryview(value))  # buffers (vmtable blocks, bytearray, ...) by value
    except TypeError:
        return value


def event_state(event: Any) -> tuple[str, dict[str, Any], list[socket.socket]]:
    """What of ``event`` travels to another process: its kind, attributes, and sockets."""
    attrs: dict[str, Any] = {}
    socks: list[socket.socket] = []
    for name in _fields(type(event)):
        value = getattr(event, name)
        if isinstance(value, socket.socket):
            attrs[name] = _SocketRef(len(socks), value.family, value.type, value.proto)
            socks.append(value)
        else:
            attrs[name] = _plain(value)
    if isinstance(event, ProcessEvent):
        attrs.update(event.__dict__)
    else:
        extra = getattr(event, "__dict__", None)
        if extra:
            attrs.update({k: _plain(v) for k, v in extra.items()})
    source = event.source
    attrs["source"] = source if _picklable_source(source) else None
    kind = event.kind if isinstance(event, ProcessEvent) else type(event).__name__
    return kind, attrs, socks


_PICKLABLE: dict[type, bool] = {}


def _picklable_source(source: Any) -> bool:
    """Whether sources of this type travel to other processes (tried once per type)."""
    tp = type(source)
    ok = _PICKLABLE.get(tp)
    if ok is None:
        try:
            pickle.dumps(source)
            ok = True
        except Exception:
            ok = False
        _PICKLABLE[tp] = ok
    return ok


def _rebuild(kind: str, attrs: dict[str, Any], fds: list[int]) -> ProcessEvent:
    for name, value in list(attrs.items()):
        if isinstance(value, _SocketRef):
            attrs[name] = socket.socket(value.family, value.type, value.proto, fileno=fds[value.index])
        elif isinstance(value, _SharedBlockRef):
            vmt = by_id(value.vmtable_id)
            if vmt is None:
                raise AemError(f"event {attrs.get('eid')}: its data is in a shared vmtable this process "
                               "does not map (create the vmtable before the capsule pool)")
            block = vmt.block_at(value.offset)
            view = memoryview(block)[: value.length]
            attrs[name] = view
            attrs.setdefault("_shared", []).append((block, view))
    return ProcessEvent(kind, attrs)


# ---- messages on SOCK_SEQPACKET sockets ----------------------------------------------------------


def _send(sock: socket.socket, obj: Any, fds: list[int] = (),  # type: ignore[assignment]
          flags: int = 0) -> None:
    data = pickle.dumps(obj, protocol=5)
    fds = list(fds)
    memfd = -1
    if len(data) > _MAX_INLINE:
        memfd = os.memfd_create("aem-msg", os.MFD_CLOEXEC)
        os.write(memfd, data)
        data = b"M"
        fds.append(memfd)
    else:
        data = b"P" + data
    if not fds:
        sock.send(data, flags)
        return
    try:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_array(fds).tobytes())], flags)
    finally:
        if memfd >= 0:
            os.close(memfd)


def _fd_array(fds: list[int]) -> array.array[int]:
    return array.array("i", fds)


def _recv(sock: socket.socket, flags: int = 0) -> tuple[Any, list[int]] | None:
    """One message and the fds that came with it; None at end of stream."""
    data, anc, _flags, _addr = sock.recvmsg(_MAX_INLINE + 16, socket.CMSG_SPACE(_FDS_MAX * 4), flags)
    if not data:
        return None
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if data[:1] == b"M":
        memfd = fds.pop()
        try:
            size = os.fstat(memfd).st_size
            data = os.pread(memfd, size, 0)
        finally:
            os.close(memfd)
        return pickle.loads(data), fds
    return pickle.loads(data[1:]), fds


def _flush_stdio() -> None:
    """Before fork(): what the application printed must not come out once per child."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _report_error(chan: socket.socket, err: str) -> None:
    """Tell the parent a handler raised, without ever blocking on it (the parent reads
    these when the process ends; beyond what the socket holds they are dropped)."""
    with contextlib.suppress(OSError):
        _send(chan, ("error", err), flags=socket.MSG_DONTWAIT)


def _child_signals() -> None:
    """Signals in a process aem created: SIGTERM ends it (EVJOBSHTDN sends it); SIGINT —
    Ctrl-C reaches the whole process group — is left to the application, which ends
    its processes itself."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _read_errors(chan: socket.socket) -> list[str]:
    """The errors a process that ended reported on its (non-blocking) socket."""
    out = []
    while True:
        try:
            msg = _recv(chan)
        except OSError:
            break
        if msg is None:
            break
        (op, *args), fds = msg
        for fd in fds:
            os.close(fd)
        if op == "error":
            out.append(args[0])
    return out


def _discard(attrs: dict[str, Any], socks: list[socket.socket]) -> None:
    """An event that will reach no process: close its sockets, free its shared blocks."""
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()
    for value in attrs.values():
        if isinstance(value, _SharedBlockRef):
            vmt = by_id(value.vmtable_id)
            if vmt is not None:
                with contextlib.suppress(Exception):
                    vmt.free_offset(value.offset)


def _release_shared(event: ProcessEvent) -> None:
    """The default destructor in a capsule: shared blocks go back unless kept."""
    if event.__dict__.get("_kept"):
        return
    for block, view in event.__dict__.get("_shared", ()):
        view.release()
        if not block.freed:
            with contextlib.suppress(Exception):
                block.free()


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


def _run_handler(handler: Callable[[Any], object], event: Any) -> str | None:
    """Run ``handler(event)``; the exception as text, or None."""
    try:
        handler(event)
    except SystemExit as e:
        return None if e.code in (None, 0) else _error_text(e)
    except BaseException as e:
        return _error_text(e)
    return None


# ---- the capsule process ------------------------------------------------------------------------


def _capsule_main(chan: socket.socket, table: dict[int, Callable[[Any], object]]) -> NoReturn:
    """Wait for events on ``chan`` and run them; exit after one unless attached (keepalive)."""
    code = 0
    try:
        while True:
            msg = _recv(chan)
            if msg is None:  # the parent is gone or released us
                break
            (op, eid, blob, kind, attrs), fds = msg
            handler = table.get(eid) if blob is None else pickle.loads(blob)
            err: str | None
            if handler is None:
                err = f"capsule: no handler for event {eid}"
            else:
                table[eid] = handler
                event = _rebuild(kind, attrs, fds)
                err = _run_handler(handler, event)
                _release_shared(event)
            if op == "run":
                if err is not None:
                    _report_error(chan, err)
                code = 0 if err is None else 1
                break
            if err is not None:  # attached: report, go on
                print(f"aem capsule {os.getpid()}: handler of event {eid} raised:\n{err}", file=sys.stderr)
                _report_error(chan, err)
                code = 1
    except BaseException as e:  # a capsule never lets an exception escape
        _report_error(chan, _error_text(e))
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    os._exit(code)


# ---- the template process -----------------------------------------------------------------------


def _template_main(ctl: socket.socket, table: dict[int, Callable[[Any], object]],
                   keep_fds: tuple[int, ...]) -> NoReturn:
    """The zygote: forks capsules on request, reaps everything below it, reports exits.

    ``keep_fds``: the application's fds capsules keep (the engine's UserEvent
    channel, so that handlers in capsules can fire the application's events)."""
    code = 0
    try:
        # No parent-death signal here: when the application ends, the control socket reaches
        # end of file and the template ends its capsules (SIGTERM, then SIGKILL) before it goes.
        _core.set_child_subreaper(True)
        _child_signals()
        # Let go of every file the application had open (listening sockets, files ...),
        # keeping the numbers taken by /dev/null so that a Python object of the
        # application that closes "its" fd later cannot close one of ours.
        keep = {0, 1, 2, ctl.fileno(), *keep_fds}
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        keep.add(devnull)
        for fd in _open_fds():
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.dup2(devnull, fd, inheritable=False)
        from . import engine as _engine_mod

        eng = _engine_mod.current()
        template_pid = os.getpid()
        children: set[int] = set()
        state = {"exit": False, "retiring": False}

        def reap(ev: object = None) -> None:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return
                if pid in children:
                    children.discard(pid)
                    with contextlib.suppress(OSError):
                        _send(ctl, ("exited", pid, os.waitstatus_to_exitcode(status)))
                    if state["retiring"] and not children:
                        state["exit"] = True
                        eng.stop()

        def command(ev: object) -> None:
            try:
                msg = _recv(ctl, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            if msg is None:
                state["exit"] = True
                eng.stop()
                return
            (op, *args), fds = msg
            if op == "spawn":
                (token,) = args
                if state["retiring"]:
                    for fd in fds:
                        os.close(fd)
                    _send(ctl, ("spawn_failed", token, 0, "template retired"))
                    return
                _flush_stdio()
                try:
                    pid = os.fork()
                except OSError as e:
                    for fd in fds:
                        os.close(fd)
                    _send(ctl, ("spawn_failed", token, e.errno, str(e)))
                    return
                if pid == 0:
                    # a capsule dies with its template (which is single-threaded)
                    _core.set_parent_death_signal(signal.SIGKILL)
                    if os.getppid() != template_pid:
                        os._exit(1)
                    chan = socket.socket(fileno=fds[0])
                    ctl.close()
                    _capsule_main(chan, table)
                for fd in fds:
                    os.close(fd)
                children.add(pid)
                _send(ctl, ("spawned", token, pid))
            elif op == "kill":
                pid, sig = args
                if pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            elif op == "deny_fork":
                _core._deny_process_creation(args[0])
                _send(ctl, ("denied",))
            elif op == "retire":  # no new capsules; end once the running ones have
                state["retiring"] = True
                if not children:
                    state["exit"] = True
                    eng.stop()
            elif op == "exit":
                state["exit"] = True
                eng.stop()

        ctl.setblocking(True)  # reports to the parent always go out; reads use MSG_DONTWAIT

        def fatal(exc: BaseException, ev: object) -> None:
            # The template cannot go on after a failed command (its socket would stay
            # readable and spin it): say why and end; the pool starts another.
            traceback.print_exception(exc)
            state["exit"] = True
            eng.stop()

        eng.set_error_handler(fatal)
        eng.register(_engine_mod_signal(signal.SIGCHLD), reap)
        eng.register(_engine_mod_readable(ctl), command)
        gc.freeze()  # pages shared with the capsules stay shared
        while not state["exit"]:
            _core.Engine.run(eng, None, False)  # the C loop: no SIGTERM/SIGINT handling of run()
        # end of the template: end the capsules (gently, then not), reap everything
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        while children and time.monotonic() < deadline:
            reap()
            time.sleep(0.01)
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)


def _engine_mod_signal(signum: int) -> Any:
    from .sources import Signal

    return Signal(signum)


def _engine_mod_readable(sock: socket.socket) -> Any:
    from .sources import Readable

    return Readable(sock)


def _open_fds() -> list[int]:
    try:
        return [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # pragma: no cover
        return list(range(3, 1024))


# ---- the pool (parent side) -----------------------------------------------------------------------


@dataclass
class _Capsule:
    token: int
    chan: socket.socket
    template: _Template
    pid: int = 0
    state: str = "starting"  # starting, idle, busy, attached, released
    job: int = 0
    flags: int = 0
    errors: list[str] = field(default_factory=list)
    backlog: deque[tuple[Any, list[int], list[socket.socket]]] = field(default_factory=deque)


@dataclass
class _Template:
    pid: int
    ctl: socket.socket
    table: frozenset[int]
    retired: bool = False
    alive: bool = True
    denied: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Activation:
    eid: int
    handler: Callable[[Any], object]
    kind: str
    attrs: dict[str, Any]
    socks: list[socket.socket]
    flags: int
    priority: int
    since: float = field(default_factory=time.monotonic)


_pools: weakref.WeakSet[CapsulePool] = weakref.WeakSet()


class CapsulePool:
    """A pool of ready processes (capsules) that run handlers of ``EVF_CAPSULE`` events.

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
        from . import engine as _engine_mod

        self.size = size
        self.reserve = reserve
        self.reserve_priority = reserve_priority
        self.spawn_timeout = spawn_timeout
        self._engine = engine if engine is not None else _engine_mod.current()
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._tokens = itertools.count(1)
        self._capsules: dict[int, _Capsule] = {}       # token -> capsule
        self._by_pid: dict[int, _Capsule] = {}
        self._idle: deque[_Capsule] = deque()
        self._attached: dict[int, _Capsule] = {}       # keepalive: eid -> capsule
        self._blobs: dict[int, tuple[Any, bytes]] = {}  # eid -> (handler, its pickle)
        self._pending: deque[_Activation] = deque()
        self._templates: list[_Template] = []
        self._spawn_errors: deque[tuple[float, str]] = deque(maxlen=8)
        self._last_spawn_ok = time.monotonic()
        self._consecutive_failures = 0
        self._counters = dict(spawned=0, reaped=0, failed=0, refills=0, activations=0, refreshes=0,
                              spawn_failures=0)
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._start_template()
        self._manager = threading.Thread(target=self._manage, name="aem-capsule-manager", daemon=True)
        self._manager.start()
        _pools.add(self)

    # -- public ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """idle, busy, attached, starting, pending, spawned, reaped, failed, refills, ..."""
        with self._lock:
            states = [c.state for c in self._capsules.values()
                      if not c.template.retired or c.state != "starting"]
            return {
                "size": self.size,
                "reserve": self.reserve,
                "idle": len(self._idle),
                "busy": states.count("busy"),
                "attached": len(self._attached),
                "starting": states.count("starting"),
                "pending": len(self._pending),
                "templates": sum(1 for t in self._templates if t.alive),
                **self._counters,
            }

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Block until every capsule (size + reserve) is idle, or ``timeout``; True if ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
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
            for act in self._pending:
                _discard(act.attrs, act.socks)
            self._pending.clear()
        self._wake()
        if self._pid == os.getpid():
            self._manager.join(timeout + 1.0)
        with self._lock:
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
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        return f"<aem.CapsulePool size={self.size} reserve={self.reserve} idle={s['idle']} busy={s['busy']}>"

    # -- activation (the delivering thread) -----------------------------------------------------------

    def _activate(self, eid: int, handler: Callable[[Any], object], event: Any, flags: int,
                  priority: int) -> None:
        """Hand the event to a capsule (or queue it until one is free). Never blocks on a process."""
        self._check_open()
        kind, attrs, socks = event_state(event)
        act = _Activation(eid, handler, kind, attrs, socks, flags, priority)
        with self._lock:
            self._counters["activations"] += 1
            # An occurrence never overtakes an earlier one of the same event still waiting.
            if not any(a.eid == eid for a in self._pending) and self._dispatch(act):
                # No wake-up of the manager here: the capsule's exit, reported by the
                # template, is what makes it refill (a wake-up would make the manager
                # thread contend for the GIL right on the activation's path).
                return
            self._pending.append(act)
        self._wake()  # no capsule was free: the manager makes more

    def _dispatch(self, act: _Activation) -> bool:
        """With the lock: give ``act`` to a capsule if one may take it (False: it waits)."""
        keep = bool(act.flags & _core.EVF_KEEPALIVE)
        if keep and act.eid in self._attached:
            self._send_to(self._attached[act.eid], act, attach=True)
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
        self._send_to(cap, act, attach=keep)
        return True

    def _take_idle(self, priority: int) -> _Capsule | None:
        if not self._idle:
            return None
        if priority < self.reserve_priority and len(self._idle) <= self.reserve:
            return None
        return self._idle.popleft()

    def _live_template(self) -> _Template | None:
        live = [t for t in self._templates if t.alive and not t.retired]
        return live[-1] if live else None

    def _reachable(self, act: _Activation) -> bool:
        """Can a capsule of the live template get this handler (by id, or pickled)?"""
        t = self._live_template()
        if t is not None and act.eid in t.table:
            return True
        return self._blob(act) is not None

    def _blob(self, act: _Activation) -> bytes | None:
        cached = self._blobs.get(act.eid)
        if cached is not None and cached[0] is act.handler:
            return cached[1]
        try:
            blob = pickle.dumps(act.handler, protocol=5)
        except Exception:
            return None
        self._blobs[act.eid] = (act.handler, blob)
        return blob

    def _send_to(self, cap: _Capsule, act: _Activation, attach: bool) -> None:
        blob = None if act.eid in cap.template.table else self._blob(act)
        msg = ("keep" if attach else "run", act.eid, blob, act.kind, act.attrs)
        fds = [s.fileno() for s in act.socks]
        if cap.backlog:
            cap.backlog.append((msg, fds, act.socks))
            return
        try:
            _send(cap.chan, msg, fds)
        except BlockingIOError:
            cap.backlog.append((msg, fds, act.socks))
            return
        except OSError as e:  # the capsule died before taking it: this event failed (once)
            cap.state, cap.job = "dead", 0
            if self._attached.get(act.eid) is cap:
                del self._attached[act.eid]
            self._fail(act, f"capsule {cap.pid} could not take the event: {e}")
            return
        self._close_socks(act.socks)

    def _refresh_for(self, act: _Activation) -> None:
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
                    _send(t.ctl, ("retire",))
        for cap in list(self._idle):
            self._release(cap)
        self._idle.clear()
        waiting = {a.eid: a.handler for a in self._pending}
        self._start_template({**waiting, **(extra or {})})

    # -- the template --------------------------------------------------------------------------------

    def _start_template(self, extra: dict[int, Callable[[Any], object]] | None = None) -> None:
        handlers = {} if self._engine.closed else {
            eid: h for eid, h, _f in self._engine._handlers(_core.EVF_CAPSULE)}
        handlers.update(extra or {})
        keep_fds = () if self._engine.closed else (self._engine._user_channel().fileno(),)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        _flush_stdio()
        try:
            pid = os.fork()
        except OSError:
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:  # the template
            parent_end.close()
            _template_main(child_end, handlers, keep_fds)
        child_end.close()
        parent_end.setblocking(False)
        self._templates.append(_Template(pid, parent_end, frozenset(handlers)))

    def _reap_template(self, t: _Template, deadline: float) -> None:
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
            _send(t.ctl, ("deny_fork", err))
        if not t.denied.wait(5):
            raise AemError("the template did not confirm the fork denial")

    # -- the capsule manager (its own thread) -------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _manage(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    break
                self._maintain()
                readers: list[Any] = [self._wake_r] + [t.ctl for t in self._templates if t.alive]
                writers = [c.chan for c in self._capsules.values() if c.backlog]
            try:
                r, w, _ = select.select(readers, writers, [], 0.05)
            except (OSError, ValueError):
                r, w = [], []
            with self._lock:
                if self._closed:
                    break
                if self._wake_r in r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                for t in list(self._templates):
                    if t.alive and t.ctl in r:
                        self._from_template(t)
                for cap in list(self._capsules.values()):
                    if cap.backlog and cap.chan in w:
                        self._flush(cap)
        self._shutdown()

    def _maintain(self) -> None:
        """With the lock: dispatch pending activations, keep the pool filled, fail what waited too long."""
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
            return
        starting = sum(1 for c in self._capsules.values() if c.state == "starting" and not c.template.retired)
        want = self.size + self.reserve + min(len(self._pending), self.size + 1)
        missing = want - len(self._idle) - starting
        # after the kernel refused a fork, retry with an exponential back-off (10 ms .. 1 s)
        fails = self._consecutive_failures
        backoff = min(1.0, 0.01 * 2 ** min(fails, 10)) if fails else 0.0
        if self._spawn_errors and time.monotonic() - self._spawn_errors[-1][0] < backoff:
            missing = 0
        for _ in range(max(0, missing)):
            self._spawn(live[-1])
        # activations that found no capsule while the kernel refused to create one
        now = time.monotonic()
        if self._spawn_errors and now - self._last_spawn_ok > self.spawn_timeout:
            while self._pending and now - self._pending[0].since > self.spawn_timeout:
                act = self._pending.popleft()
                self._fail(act, "no capsule available: the kernel refused to create a process "
                                f"({self._spawn_errors[-1][1]})")

    def _templates_starting(self) -> bool:
        return False

    def _spawn(self, t: _Template) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        token = next(self._tokens)
        try:
            _send(t.ctl, ("spawn", token), [child_end.fileno()])
        except OSError as e:
            parent_end.close()
            child_end.close()
            self._spawn_errors.append((time.monotonic(), f"template unreachable: {e}"))
            return
        child_end.close()
        parent_end.setblocking(False)
        self._capsules[token] = _Capsule(token, parent_end, t)

    def _from_template(self, t: _Template) -> None:
        while True:
            try:
                msg = _recv(t.ctl)
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
                self._last_spawn_ok = time.monotonic()
                self._consecutive_failures = 0
                if t.retired:  # spawned by a template being replaced: not for new work
                    self._release(cap)
                    continue
                cap.state = "idle"
                self._idle.append(cap)
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
        cap = self._by_pid.pop(pid, None)
        if cap is None:
            return
        self._capsules.pop(cap.token, None)
        self._counters["reaped"] += 1
        if cap in self._idle:
            self._idle.remove(cap)
        if self._attached.get(cap.job) is cap:
            del self._attached[cap.job]
        errors = cap.errors + _read_errors(cap.chan)
        with contextlib.suppress(OSError):
            cap.chan.close()
        for msg, _fds, socks in cap.backlog:
            _discard(msg[4], socks)
        if cap.state in ("busy", "attached"):
            error = errors[-1] if errors else None
            if code < 0 and error is None:
                error = f"capsule {pid} was killed by {signal.Signals(-code).name}"
                if note:
                    error += f" ({note})"
            if code != 0:
                self._counters["failed"] += 1
            if not cap.flags & _core.EVF_NOCLDWAIT:
                self._engine_push(cap.job, pid, code, error)
        self._wake()

    def _template_gone(self, t: _Template) -> None:
        t.alive = False
        with contextlib.suppress(OSError):
            t.ctl.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(t.pid, os.WNOHANG)
        # Capsules of a dead template die with it (parent-death signal); their exits will
        # never be reported by it: report the busy ones here, forget the others.
        for cap in [c for c in self._capsules.values() if c.template is t]:
            if cap in self._idle:
                self._idle.remove(cap)
            if cap.state in ("busy", "attached"):
                self._exited(cap.pid, -signal.SIGKILL, note=f"its template {t.pid} died")
            else:
                self._release(cap)

    def _flush(self, cap: _Capsule) -> None:
        while cap.backlog:
            msg, fds, socks = cap.backlog[0]
            try:
                _send(cap.chan, msg, fds)
            except BlockingIOError:
                return
            except OSError:
                return  # the exit report will follow
            cap.backlog.popleft()
            self._close_socks(socks)

    def _release(self, cap: _Capsule) -> None:
        """Let a capsule go: closing its socket makes it exit."""
        cap.state = "released"
        self._capsules.pop(cap.token, None)
        if cap.pid:
            self._by_pid.pop(cap.pid, None)
        with contextlib.suppress(OSError):
            cap.chan.close()

    def _fail(self, act: _Activation, error: str) -> None:
        self._counters["failed"] += 1
        _discard(act.attrs, act.socks)
        if not act.flags & _core.EVF_NOCLDWAIT:
            self._engine_push(act.eid, 0, None, error)
        else:
            print(f"aem: capsule activation of event {act.eid} failed: {error}", file=sys.stderr)

    def _engine_push(self, job: int, pid: int, code: int | None, error: str | None) -> None:
        eng = self._engine
        if not eng.closed:
            eng._job_exit(job, pid, code, error)

    @staticmethod
    def _close_socks(socks: list[socket.socket]) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

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
            self._blobs.pop(eid, None)
            cap = self._attached.pop(eid, None)
            if cap is not None and not kill:
                cap.state = "busy"  # it finishes what it has, then exits; its exit is still reported
                with contextlib.suppress(OSError):
                    cap.chan.shutdown(socket.SHUT_WR)
            if kill:
                for c in self._capsules.values():
                    if c.job == eid and c.state in ("busy", "attached") and c.pid:
                        with contextlib.suppress(OSError):
                            _send(c.template.ctl, ("kill", c.pid, signal.SIGTERM))

    def _shutdown(self) -> None:
        with self._lock:
            for t in self._templates:
                if t.alive:
                    with contextlib.suppress(OSError):
                        _send(t.ctl, ("exit",))


# ---- EVF_FORK ------------------------------------------------------------------------------------


@dataclass
class _Forked:
    pid: int
    job: int
    flags: int
    chan: socket.socket


def fork_handler(engine: Engine, eid: int, handler: Callable[[Any], object], event: Any, flags: int) -> None:
    """Run ``handler(event)`` in a process forked from this one now (EVF_FORK)."""
    forks: dict[int, _Forked] = engine.__dict__.setdefault("_forks", {})
    attached: dict[int, _Forked] = engine.__dict__.setdefault("_fork_attached", {})
    keep = bool(flags & _core.EVF_KEEPALIVE)
    if keep and eid in attached:
        rec = attached[eid]
        kind, attrs, socks = event_state(event)
        try:
            _send(rec.chan, ("keep", eid, None, kind, attrs), [s.fileno() for s in socks])
        finally:
            CapsulePool._close_socks(socks)
        return
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = os.getpid()
    _flush_stdio()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            parent_end.close()
            _child_signals()
            if threading.current_thread() is threading.main_thread():
                _core.set_parent_death_signal(signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(1)
            err = _run_handler(handler, event)
            if keep:
                if err is not None:
                    print(f"aem: EVF_FORK handler of event {eid} raised:\n{err}", file=sys.stderr)
                _capsule_main(child_end, {eid: handler})
            if err is not None:
                _report_error(child_end, err)
            code = 0 if err is None else 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    child_end.close()
    parent_end.setblocking(False)
    for name in _fields(type(event)):  # sockets handed to the child: not ours any more
        value = getattr(event, name, None)
        if isinstance(value, socket.socket):
            value.close()
    rec = _Forked(pid, eid, flags, parent_end)
    forks[pid] = rec
    if keep:
        attached[eid] = rec
    pidfd = os.pidfd_open(pid)
    try:
        engine._add(_core.K_CHILD, pidfd, _core.EPOLLIN, _forked_exit_handler(engine), 0,
                    2**31 - 1, None, pid, True)
    except BaseException:
        os.close(pidfd)
        raise


def _forked_exit_handler(engine: Engine) -> Callable[[Any], None]:
    ref = weakref.ref(engine)

    def on_exit(ev: Any) -> None:
        eng = ref()
        if eng is None:
            return
        forks: dict[int, _Forked] = eng.__dict__.get("_forks", {})
        rec = forks.pop(ev.pid, None)
        if rec is None:
            return
        attached: dict[int, _Forked] = eng.__dict__.get("_fork_attached", {})
        if attached.get(rec.job) is rec:
            del attached[rec.job]
        errors = _read_errors(rec.chan)
        rec.chan.close()
        code = ev.returncode
        error = errors[-1] if errors else None
        if code is not None and code < 0 and error is None:
            error = f"process {ev.pid} was killed by {signal.Signals(-code).name}"
        if not rec.flags & _core.EVF_NOCLDWAIT:
            eng._job_exit(rec.job, ev.pid, code, error)

    return on_exit


def end_fork_job(engine: Engine, eid: int, kill: bool) -> None:
    """The registration ``eid`` is gone: release its keepalive child; with ``kill``, end its processes."""
    attached: dict[int, _Forked] = engine.__dict__.get("_fork_attached", {})
    rec = attached.pop(eid, None)
    if rec is not None and not kill:
        with contextlib.suppress(OSError):
            rec.chan.shutdown(socket.SHUT_WR)
    if kill:
        for r in engine.__dict__.get("_forks", {}).values():
            if r.job == eid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.pid, signal.SIGTERM)


# ---- the process's default pool, hooks, clean exit -----------------------------------------------

_default: CapsulePool | None = None
_default_lock = threading.Lock()


def default_pool() -> CapsulePool:
    """The process's default pool (``size`` = number of CPUs, ``reserve`` = 1), started on first use."""
    global _default
    with _default_lock:
        if _default is None or _default.closed or _default._pid != os.getpid():
            _default = CapsulePool(size=os.cpu_count() or 2, reserve=1)
        return _default


def spawn(engine: Engine, eid: int, handler: Callable[[Any], object], event: Any, flags: int,
          pool: CapsulePool | None, priority: int) -> None:
    """The engine's spawn hook: run an EVF_FORK or EVF_CAPSULE handler in another process."""
    if flags & _core.EVF_FORK:
        fork_handler(engine, eid, handler, event, flags)
        return
    target = pool if pool is not None else default_pool()
    if not isinstance(target, CapsulePool):
        raise TypeError(f"pool must be an aem.CapsulePool, not {type(target).__name__}")
    target._activate(eid, handler, event, flags, priority)


def end_job(engine: Engine, eid: int, kill: bool) -> None:
    """Registration ``eid`` of ``engine`` is gone (kill: shut down) — tell pools and forks."""
    for pool in list(_pools):
        if pool._engine is engine:
            pool._end_job(eid, kill)
    end_fork_job(engine, eid, kill)


def pool_stats() -> dict[str, int]:
    """The capsule pools' counters, summed (for aem.stats())."""
    total: dict[str, int] = {}
    for pool in list(_pools):
        if pool.closed or pool._pid != os.getpid():
            continue
        for k, v in pool.stats().items():
            total[k] = total.get(k, 0) + v
    return total


def _after_fork_in_child() -> None:
    global _default
    _default = None
    for pool in list(_pools):
        pool._closed = True  # the parent's pools are not ours; their sockets close with us
        for t in pool._templates:
            with contextlib.suppress(OSError):
                t.ctl.close()
        for cap in pool._capsules.values():
            with contextlib.suppress(OSError):
                cap.chan.close()
    _pools.clear()


def _at_exit() -> None:
    for pool in list(_pools):
        if pool._pid == os.getpid():
            with contextlib.suppress(Exception):
                pool.close(timeout=1.0)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
