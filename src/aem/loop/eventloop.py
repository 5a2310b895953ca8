"""``aem.EventLoop``: a complete asyncio event loop on the aem engine.

The loop is asyncio's own Unix selector loop (its transports, servers, pipes,
``sock_*`` methods, ``sendfile``, TLS through ``sslproto``) driven by the aem
engine instead of an ``epoll`` selector (:mod:`aem.loop.selector`), with the
two things the engine does natively taken from it:

* signals (``add_signal_handler``) go through the engine's signal routing
  (:class:`aem.Signal`), not ``signal.set_wakeup_fd``;
* child processes of ``subprocess_exec``/``subprocess_shell`` are reaped
  through pidfds (:class:`aem.ChildExit`): no ``SIGCHLD`` handler and no
  watcher thread.
"""

from __future__ import annotations

import asyncio
import errno
import os
import selectors
import socket
import sys
import weakref
from asyncio import base_events, constants, events, format_helpers, trsock, unix_events
from asyncio.log import logger
from collections.abc import Iterator
from typing import Any

from .. import _core
from ..engine import Engine, current
from .selector import EngineSelector
from .transports import SocketTransport, _raw_family, _raw_type

__all__ = ["EventLoop", "EventLoopPolicy", "install", "new_event_loop"]


# asyncio's Unix loop; its private helpers (_add_callback, _check_signal ...) are not in typeshed.
_UnixLoop: Any = unix_events.SelectorEventLoop
_Policy: Any = unix_events.DefaultEventLoopPolicy
_EVENT_READ = selectors.EVENT_READ
_LOOP_SLOTS = ("_debug", "_stopping")  # a name, not a literal: see transports.py


class EventLoop(_UnixLoop):  # type: ignore[misc]
    """An asyncio event loop whose waiting, signals and child processes are the aem engine's.

    Everything else is asyncio's: it runs unmodified asyncio programs.  aem
    registrations made in the same process are delivered by the same engine
    turns that run the loop's callbacks.

    The process has one engine (the one ``aem.register`` uses) and one thread
    at a time can wait on it: the first loop made while no other is open runs
    on it; a loop made while another is open (another thread's loop) gets an
    engine of its own, closed with the loop.  ``engine=`` chooses explicitly.
    """

    __slots__ = _LOOP_SLOTS  # read by the C core at their offsets: _stopping twice a turn, _debug per Future

    def __init__(self, engine: Engine | None = None) -> None:
        global _process_engine_loop
        self._own_engine = False
        if engine is None:
            pid, ref = _process_engine_loop
            user = ref() if ref is not None and pid == os.getpid() else None
            if user is None or user.is_closed():
                engine = current()
                _process_engine_loop = (os.getpid(), weakref.ref(self))
            else:  # another open loop (another thread's) turns the process engine: one of our own
                engine = Engine()
                self._own_engine = True
        self._engine = engine
        self._signal_eids: dict[int, int] = {}
        self._child_eids: dict[int, int] = {}
        #: open aem.events() iterators of this loop: closed (unregistered) with the loop
        self._aem_iterators: weakref.WeakSet[Any] = weakref.WeakSet()
        self._core: _core.LoopCore | None = None
        super().__init__(EngineSelector(self._engine))
        core = _core.LoopCore(self, events.Handle, events.TimerHandle, self._selector.select,
                              self._process_events, self._aem_report, self._aem_run_debug,
                              self._clock_resolution)
        self._core = core
        core._attach_engine(self._engine, self._selector._fd_to_key, self._remove_reader, self._remove_writer)
        self._selector.attach(core)
        # asyncio's own methods keep working on these: `_ready` is the C ready queue,
        # `_scheduled` a view of the C timer heap.
        self._ready = core
        self._scheduled = _ScheduledView(core)
        for name in _ALWAYS_C:
            setattr(self, name, getattr(core, name))
        for name in _C_UNLESS_OVERRIDDEN:  # a subclass's own method wins
            if getattr(type(self), name) is getattr(_UnixLoop, name):
                setattr(self, name, getattr(core, name))
        self.set_debug(self._debug)

    @property
    def engine(self) -> Engine:
        """The aem engine this loop runs on."""
        return self._engine

    # -- the C core and debug mode ----------------------------------------------------------------
    # Out of debug mode call_soon/call_later/call_at are the C core's methods, set on the
    # instance; in debug mode the Python ones below (asyncio's, with source tracebacks and
    # thread checks) make the handles and the C core queues them.

    def set_debug(self, enabled: bool) -> None:
        """Debug mode (asyncio's): slow-callback warnings, source tracebacks, thread checks."""
        super().set_debug(enabled)
        core = self._core
        if core is None:
            return
        core._set_state(debug=bool(enabled))
        for name in _FAST_UNLESS_DEBUG:
            if enabled:
                self.__dict__.pop(name, None)
            else:
                setattr(self, name, getattr(core, name))

    def _call_soon(self, callback: Any, args: tuple[Any, ...], context: Any) -> events.Handle:
        handle = events.Handle(callback, args, self, context)
        if handle._source_traceback:  # type: ignore[attr-defined]
            del handle._source_traceback[-1]  # type: ignore[attr-defined]
        assert self._core is not None
        self._core.append(handle)
        return handle

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> events.TimerHandle:
        """Run ``callback(*args)`` at loop time ``when`` (the C core's, out of debug mode)."""
        if when is None:
            raise TypeError("when cannot be None")
        self._check_closed()
        if self._debug:
            self._check_thread()
            self._check_callback(callback, "call_at")
        timer = events.TimerHandle(when, callback, args, self, context)
        if timer._source_traceback:  # type: ignore[attr-defined]
            del timer._source_traceback[-1]  # type: ignore[attr-defined]
        assert self._core is not None
        self._core._push_timer(timer)
        return timer

    def _aem_report(self, handle: events.Handle, exc: BaseException) -> None:
        """A callback raised: to the exception handler, as asyncio's Handle._run does."""
        cb = format_helpers._format_callback_source(handle._callback, handle._args)  # type: ignore
        context = {"message": f"Exception in callback {cb}", "exception": exc, "handle": handle}
        if handle._source_traceback:  # type: ignore[attr-defined]
            context["source_traceback"] = handle._source_traceback  # type: ignore[attr-defined]
        self.call_exception_handler(context)

    def _aem_run_debug(self, handle: events.Handle) -> None:
        """Run one handle in debug mode: warn when it takes longer than slow_callback_duration."""
        try:
            self._current_handle = handle
            t0 = self.time()
            handle._run()  # type: ignore[attr-defined]
            dt = self.time() - t0
            if dt >= self.slow_callback_duration:
                logger.warning("Executing %s took %.3f seconds",
                               base_events._format_handle(handle), dt)  # type: ignore[attr-defined]
        finally:
            self._current_handle = None  # type: ignore[assignment]

    def _make_socket_transport(self, sock: Any, protocol: Any, waiter: Any = None, *, extra: Any = None,
                               server: Any = None) -> Any:
        return SocketTransport(self, sock, protocol, waiter, extra, server)

    # -- a server's new connections --------------------------------------------------------------

    def _accept_connection(self, protocol_factory: Any, sock: Any, sslcontext: Any = None,
                           server: Any = None, backlog: int = 100, *args: Any, **kwargs: Any) -> None:
        """Accept what the listening ``sock`` has (up to ``backlog``), each connection's
        protocol and transport made at once (asyncio makes them in a task of its own, one
        task, one future and three loop turns per connection).  The C core's ``accept``
        answers None once the backlog is drained (no BlockingIOError per batch).  TLS is
        asyncio's path."""
        if sslcontext is not None:
            super()._accept_connection(protocol_factory, sock, sslcontext, server, backlog, *args, **kwargs)
            return
        assert self._core is not None
        accept = self._core.accept
        listen_fd = sock.fileno()
        family, kind, proto = _raw_family(sock), _raw_type(sock), sock.proto
        own_transport = type(self)._make_socket_transport is EventLoop._make_socket_transport
        for _ in range(backlog):
            try:
                got = accept(listen_fd)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # out of descriptors or memory: asyncio's way (stop accepting for a while)
                    self.call_exception_handler({"message": "socket.accept() out of system resource",
                                                 "exception": exc, "socket": trsock.TransportSocket(sock)})
                    self._remove_reader(listen_fd)
                    self.call_later(constants.ACCEPT_RETRY_DELAY, self._start_serving, protocol_factory,
                                    sock, sslcontext, server, backlog, *args, **kwargs)
                    return
                raise  # the loop's exception handler reports it
            if got is None:
                return
            fd, addr = got
            try:
                conn = socket.socket(family, kind, proto, fd)
            except BaseException:
                os.close(fd)
                raise
            protocol = None
            try:
                conn.setblocking(False)
                if addr is None:  # a family the C side does not spell out
                    addr = conn.getpeername()
                if self._debug:
                    logger.debug("%r got a new connection from %r: %r", server, addr, conn)
                protocol = protocol_factory()
                if own_transport:
                    SocketTransport(self, conn, protocol, None, {"peername": addr}, server)
                else:
                    self._make_socket_transport(conn, protocol, extra={"peername": addr}, server=server)
            except (SystemExit, KeyboardInterrupt):
                conn.close()
                raise
            except BaseException as exc:
                conn.close()
                if self._debug:
                    context = {"message": "Error on transport creation for incoming connection",
                               "exception": exc}
                    if protocol is not None:
                        context["protocol"] = protocol
                    self.call_exception_handler(context)

    # -- readers: asyncio's, without its two exceptions per call for a new descriptor -----------

    def _add_reader(self, fd: Any, callback: Any, *args: Any) -> events.Handle:
        if type(fd) is not int:
            return super()._add_reader(fd, callback, *args)  # type: ignore[no-any-return]
        if self._closed:
            raise RuntimeError("Event loop is closed")
        core = self._core
        handle = core.handle(callback, args) if core is not None and not self._debug \
            else events.Handle(callback, args, self, None)
        selector = self._selector
        key = selector._fd_to_key.get(fd)
        if key is None:
            selector.register_fd(fd, _EVENT_READ, (handle, None))
        else:
            reader, writer = key.data
            selector.modify(fd, key.events | _EVENT_READ, (handle, writer))
            if reader is not None:
                reader.cancel()
        return handle

    def _remove_reader(self, fd: Any) -> bool:
        if type(fd) is not int:
            return super()._remove_reader(fd)  # type: ignore[no-any-return]
        if self._closed:
            return False
        selector = self._selector
        key = selector._fd_to_key.get(fd)
        if key is None:
            return False
        reader, writer = key.data
        mask = key.events & ~_EVENT_READ
        if not mask:
            selector.unregister_fd(fd)
        else:
            selector.modify(fd, mask, (None, writer))
        if reader is not None:
            reader.cancel()
            return True
        return False

    # -- signals: the engine's signal routing ------------------------------------------------

    def add_signal_handler(self, sig: int, callback: Any, *args: Any) -> None:
        """Run ``callback(*args)`` in the loop whenever signal ``sig`` arrives."""
        if asyncio.iscoroutine(callback) or asyncio.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        handle = events.Handle(callback, args, self, None)
        if sig not in self._signal_eids:
            try:
                eid = self._engine._add(_core.K_SIGNAL, sig, 0, self._on_signal, 0, 0, None, 0, True)
            except ValueError as exc:
                raise RuntimeError(f"sig {sig:d} cannot be caught") from exc
            self._signal_eids[sig] = eid
        self._signal_handlers[sig] = handle

    def _on_signal(self, ev: Any) -> None:
        handle = self._signal_handlers.get(ev.signum)
        if handle is None:
            return
        if handle._cancelled:
            self.remove_signal_handler(ev.signum)
        else:
            self._add_callback(handle)

    def remove_signal_handler(self, sig: int) -> bool:
        """Remove the handler of ``sig``; the signal's previous disposition comes back."""
        self._check_signal(sig)
        try:
            del self._signal_handlers[sig]
        except KeyError:
            return False
        eid = self._signal_eids.pop(sig, 0)
        if eid:
            self._engine._remove(eid)
        return True

    def _handle_signal(self, sig: int) -> None:  # asyncio's set_wakeup_fd path: unused here
        handle = self._signal_handlers.get(sig)
        if handle is not None:
            self._add_callback_signalsafe(handle)

    # -- child processes: pidfds --------------------------------------------------------------

    async def _make_subprocess_transport(self, protocol: Any, args: Any, shell: bool, stdin: Any,
                                         stdout: Any, stderr: Any, bufsize: int, extra: Any = None,
                                         **kwargs: Any) -> Any:
        waiter = self.create_future()
        transp = unix_events._UnixSubprocessTransport(  # type: ignore[attr-defined]
            self, protocol, args, shell, stdin, stdout, stderr, bufsize, waiter=waiter, extra=extra,
            **kwargs)
        self._watch_child(transp.get_pid(), transp)
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transp.close()
            await transp._wait()
            raise
        return transp

    def _watch_child(self, pid: int, transp: Any) -> None:
        pidfd = os.pidfd_open(pid)

        def exited(ev: Any) -> None:
            self._child_eids.pop(pid, None)
            transp._process_exited(ev.returncode)

        try:
            self._child_eids[pid] = self._engine._add(_core.K_CHILD, pidfd, _core.EPOLLIN, exited, 0, 0,
                                                      None, pid, True)
        except BaseException:
            os.close(pidfd)
            raise

    def close(self) -> None:
        """Close the loop: its descriptors, signal handlers and child watches leave the engine."""
        super().close()
        if not self._closed:
            return
        if self._core is not None:
            self._core._set_state(closed=True)
        for it in list(self._aem_iterators):
            it.close()
        for eid in self._child_eids.values():
            self._engine._remove(eid)
        self._child_eids.clear()
        for eid in self._signal_eids.values():
            self._engine._remove(eid)
        self._signal_eids.clear()
        if self._own_engine and self._closed and not self._engine.closed:
            self._engine.close()


#: The open loop that runs on the process engine (the first one made while none was open).
_process_engine_loop: tuple[int, weakref.ref[EventLoop] | None] = (0, None)

#: C core methods the loop always uses.
_ALWAYS_C = ("_run_once", "_add_callback", "_timer_handle_cancelled", "time")
#: C core methods the loop uses out of debug mode.
_FAST_UNLESS_DEBUG = ("call_soon", "call_later", "call_at", "_call_soon")
#: C core methods doing what asyncio's do (each asyncio.Future made calls both), unless a subclass
#: of aem.EventLoop has its own.
_C_UNLESS_OVERRIDDEN = ("create_future", "get_debug")


class _ScheduledView:
    """``loop._scheduled`` for asyncio's code that looks at it: the C timer heap, read-only."""

    def __init__(self, core: _core.LoopCore) -> None:
        self._core = core

    def __len__(self) -> int:
        return self._core.ntimers

    def __iter__(self) -> Iterator[events.TimerHandle]:
        return iter(self._core.timers())

    def __getitem__(self, i: int) -> events.TimerHandle:
        handle: events.TimerHandle = self._core.timers()[i]
        return handle

    def clear(self) -> None:
        self._core.clear_timers()


def new_event_loop() -> EventLoop:
    """A new :class:`EventLoop` on the process's aem engine (``loop_factory`` of ``asyncio.Runner``)."""
    return EventLoop()


class EventLoopPolicy(_Policy):  # type: ignore[misc]
    """The asyncio policy whose loops are :class:`EventLoop` (as ``uvloop.EventLoopPolicy``)."""

    _loop_factory = EventLoop


def install() -> None:
    """Make :class:`EventLoop` asyncio's loop for this process (``asyncio.set_event_loop_policy``)."""
    if sys.version_info >= (3, 12):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_event_loop_policy(EventLoopPolicy())
    else:
        asyncio.set_event_loop_policy(EventLoopPolicy())


