"""ASGI 3 apps on the aem event loop (``aem serve module:app --interface asgi``).

One :class:`asyncio.Protocol` per connection on :class:`aem.EventLoop`; the
HTTP/1.1 decisions are :class:`aem.http.protocol.Connection`'s (the same
parser, limits and response framing as AEMhttpd's own server)::

    bytes ──► Connection.receive ──► Request ──► scope + receive/send ──► app task
    app send(http.response.*) ──► Connection.response / render_head ──► transport

* HTTP: the request body streams: ``receive()`` gives ``http.request``
  messages (``more_body`` True until the last) with what arrived since the
  app last asked; the connection stops reading while the app leaves more
  than ``_BODY_HIGH`` bytes unread.  ``Limits.max_body`` still holds (413).
  After the body, ``receive()`` waits for ``http.disconnect``.  Responses stream: a body
  sent with ``more_body`` goes out as it comes, with the app's
  ``Content-Length`` or chunked (HTTP/1.0: delimited by the close).  The
  ``http.response.zerocopysend`` extension sends a file with ``sendfile``.
* ``Expect: 100-continue``: the ``100 Continue`` goes out when the app first
  asks for the body; never if it answers without reading it (the
  connection then closes after the response: RFC 9110 §10.1.1).
* WebSockets (``websocket.*``) through ``wsproto``; lifespan
  (``lifespan.startup``/``shutdown``, ``state``).
* Pipelined requests are answered in order, one app call at a time per
  connection.  Graceful shutdown (:meth:`ASGIServer.shutdown`): stop
  accepting, close idle connections, let in-flight requests finish within the
  grace period, then close everything.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import socket
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TextIO
from urllib.parse import unquote

from .. import _core
from . import status as _status
from .protocol import (
    _STATUS_LINES,
    BODY_END,
    BODY_TIMER,
    CONTINUE,
    CONTINUE_RESPONSE,
    IDLE_TIMER,
    KEEP,
    BodyBudget,
    Connection,
    DateClock,
    HttpError,
    Limits,
    Request,
    StreamedRequest,
    body_allowed,
    render_head,
)

__all__ = ["ASGIApp", "ASGIServer", "LifespanFailed"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]

_ASGI = {"version": "3.0", "spec_version": "2.3"}
# response fields the server frames itself
_STRIP = frozenset({"content-length", "connection", "date", "server", "transfer-encoding", "keep-alive"})
_STRIP_LENGTHS = frozenset(len(n) for n in _STRIP)
# the app's response fields seen before, (name, value) bytes -> the str pair (never one the
# server frames itself: those are not kept)
_FIELDS: dict[tuple[bytes, bytes], tuple[str, str]] = {}
_core.asgi_configure(_STATUS_LINES)
_core.asgi_scope_configure(_ASGI)
_TASK_NAME = "aem-asgi-request"   # the name of every request's task
_PIPELINE_MAX = 16          # parsed requests queued on a connection before reading pauses
_BODY_HIGH = 256 * 1024     # request-body bytes a connection holds unread before reading pauses


class LifespanFailed(RuntimeError):
    """The app reported ``lifespan.startup.failed`` (or raised during startup)."""


class _Stats:
    __slots__ = ("active", "app_errors", "connections", "requests", "responses")

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.active = 0
        self.app_errors = 0
        self.responses = [0] * 6


class ASGIServer:
    """Serve an ASGI 3 app on the running aem event loop.

    ``sock``: a listening socket, or ``host``/``port`` (``reuse_port`` for
    several processes on one port), or ``uds`` (a Unix socket path).
    ``timeout_keep_alive``: seconds an idle keep-alive connection stays open;
    ``header_timeout``/``body_timeout``: a request head / body arriving too
    slowly (408); ``send_timeout``: the longest a client may take none of a
    streamed response (then the connection is dropped).
    ``limit_concurrency``: app calls in progress beyond which requests get 503.
    ``lifespan``: ``"auto"`` (run it; an app that does not support it is
    fine), ``"on"`` (its failure is fatal) or ``"off"``.  ``status_page``:
    answer ``/_aem/status`` (see :mod:`aem.http.status`) with these counters,
    the engine's, and ``pool``'s (an object with ``stats()``, e.g. the WSGI
    workers).  ``direct(conn, req, body)``: asked first for each request; it
    may return the object that answers it (a :class:`_Cycle` of its own, as
    the WSGI front does, with no ASGI messages in between), or None: then
    ``app`` answers.  ``ws_ping_interval``: seconds between the pings an
    accepted WebSocket is sent (None: none); ``ws_ping_timeout``: seconds its
    pong may take, after which the connection is closed (1011) and the app
    gets ``websocket.disconnect`` (None: wait forever).
    """

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 8000,
                 uds: str | None = None, sock: socket.socket | None = None, reuse_port: bool = False,
                 root_path: str = "", limits: Limits | None = None, timeout_keep_alive: float = 5.0,
                 header_timeout: float = 10.0, body_timeout: float = 30.0, send_timeout: float = 30.0,
                 limit_concurrency: int | None = None, lifespan: str = "auto",
                 access_log: TextIO | None = None, error_log: TextIO | None = None,
                 server_name: str = "aem", status_page: bool = False, pool: object = None,
                 direct: Callable[[_HttpProtocol, Request, _Body | None], _Cycle | None] | None = None,
                 ws_ping_interval: float | None = 20.0, ws_ping_timeout: float | None = 20.0,
                 ) -> None:
        if lifespan not in ("auto", "on", "off"):
            raise ValueError("lifespan is 'auto', 'on' or 'off'")
        if min(timeout_keep_alive, header_timeout, body_timeout, send_timeout) <= 0:
            raise ValueError("timeouts must be > 0 seconds")
        if limit_concurrency is not None and limit_concurrency < 1:
            raise ValueError("limit_concurrency must be >= 1")
        for name, v in (("ws_ping_interval", ws_ping_interval), ("ws_ping_timeout", ws_ping_timeout)):
            if v is not None and not 0 < v < float("inf"):
                raise ValueError(f"{name} must be > 0 seconds (or None)")
        self.app = app
        self.ws_ping_interval, self.ws_ping_timeout = ws_ping_interval, ws_ping_timeout
        self.host, self.port_wanted, self.uds, self.reuse_port = host, port, uds, reuse_port
        self.root_path = root_path
        self.limits = limits or Limits()
        self.budget = BodyBudget(self.limits.max_buffered)
        # by RequestParser.timer: KEEP, IDLE_TIMER, HEADER_TIMER, BODY_TIMER
        self.timer_s = (0.0, timeout_keep_alive, header_timeout, body_timeout)
        self.limit_concurrency = limit_concurrency
        self.send_timeout = send_timeout
        self.lifespan_mode = lifespan
        self.access_log = access_log
        self.error_log = error_log if error_log is not None else sys.stderr
        self.server_name = server_name
        self.status_page = status_page
        self.pool = pool
        self.direct = direct
        self.state: dict[str, Any] = {}
        self.stats = _Stats()
        self.shutting_down = False
        self._sock = sock
        self._own_sock = sock is None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_HttpProtocol] = set()
        self._clock = DateClock()
        self._lifespan: _Lifespan | None = None
        self._server_addr: list[Any] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick = min(1.0, min(self.timer_s[1:]) / 4)

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self) -> socket.socket:
        """The listening socket (made now unless one was given)."""
        if self._sock is not None:
            return self._sock
        if self.uds is not None:
            s = listen_unix(self.uds)
        else:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.reuse_port:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind((self.host, self.port_wanted))
                s.listen(1024)
            except BaseException:
                s.close()
                raise
        self._sock = s
        return s

    @property
    def port(self) -> int:
        """The port listened on (after :meth:`start`)."""
        s = self._sock
        if s is None or s.family == socket.AF_UNIX:
            return self.port_wanted
        return int(s.getsockname()[1])

    async def start(self) -> None:
        """Run lifespan startup, then listen.  Raises :class:`LifespanFailed` if the app says so."""
        if self.lifespan_mode != "off":
            self._lifespan = _Lifespan(self)
            await self._lifespan.startup()
        sock = self.bind()
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            self._server_addr = None
        else:
            addr = sock.getsockname()
            self._server_addr = [addr[0], addr[1]]
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _HttpProtocol(self), sock=sock, backlog=1024)

    def _arm_sweeper(self) -> None:
        """A connection came: sweep every tick while there are any (an idle server sleeps)."""
        if self._sweeper is None and not self.shutting_down:
            self._sweeper = asyncio.get_running_loop().call_later(self._tick, self._sweep)

    def _sweep(self) -> None:
        """Every tick while connections are open: close those whose deadline passed (one timer
        for all of them)."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for conn in [c for c in self._conns if 0.0 < c.deadline <= now]:
            conn.expire()
        if self._conns:
            self._arm_sweeper()

    async def shutdown(self, graceful_timeout: float = 30.0) -> None:
        """Stop accepting; let requests in progress end within ``graceful_timeout``; close.

        Lifespan shutdown comes last.
        """
        self.shutting_down = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.shutdown()
        deadline = time.monotonic() + graceful_timeout
        while self._conns and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._conns):
            conn.abort()
        if self._lifespan is not None:
            await self._lifespan.shutdown()
        if self._own_sock and self._sock is not None:
            self._sock.close()
            if self.uds is not None:
                try:
                    os.unlink(self.uds)
                except OSError:
                    pass

    def status(self) -> dict[str, Any]:
        """Counters: connections open, requests, app calls in progress, responses by class."""
        st = self.stats
        return {"connections": len(self._conns), "accepted": st.connections, "requests": st.requests,
                "active": st.active, "app_errors": st.app_errors,
                "responses": {f"{i}xx": n for i, n in enumerate(st.responses) if i and n}}

    def log_error(self, text: str) -> None:
        try:
            self.error_log.write(text if text.endswith("\n") else text + "\n")
            self.error_log.flush()
        except (OSError, ValueError):
            pass


class _Lifespan:
    """The lifespan protocol: one app call for the server's life."""

    def __init__(self, server: ASGIServer) -> None:
        self.server = server
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.started = asyncio.get_running_loop().create_future()
        self.ended = asyncio.get_running_loop().create_future()
        self.unsupported = False
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": _ASGI, "state": self.server.state}
        try:
            await self.server.app(scope, self.inbox.get, self._send)
        except BaseException as e:
            if not self.started.done():
                self.unsupported = True
                if self.server.lifespan_mode == "on":
                    self.started.set_exception(LifespanFailed(f"lifespan startup raised {e!r}"))
                else:
                    self.started.set_result(None)
            elif not self.ended.done():
                self.server.log_error("aem serve: exception in lifespan shutdown:\n"
                                      + traceback.format_exc())
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            if not self.started.done():
                self.started.set_result(None)
            if not self.ended.done():
                self.ended.set_result(None)

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self.started.set_result(None)
        elif kind == "lifespan.startup.failed":
            self.started.set_exception(LifespanFailed(message.get("message", "") or "startup failed"))
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            if kind.endswith("failed"):
                self.server.log_error(f"aem serve: lifespan shutdown failed: {message.get('message', '')}")
            if not self.ended.done():
                self.ended.set_result(None)
        else:
            raise RuntimeError(f"unexpected lifespan message {kind!r}")

    async def startup(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())
        await self.inbox.put({"type": "lifespan.startup"})
        await self.started

    async def shutdown(self) -> None:
        if self.unsupported or self.task is None or self.task.done():
            return
        await self.inbox.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(asyncio.shield(self.ended), 30)
        except TimeoutError:
            self.task.cancel()


class _Body:
    """A request body arriving while the app runs: the chunks it has not taken yet."""

    __slots__ = ("chunks", "complete", "continued", "cycle", "discard", "expect", "failed", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0               # bytes in chunks
        self.complete = False       # the last chunk arrived
        self.failed = False         # cut short by an error (413, 408, 503 ...)
        self.discard = False        # the response is out: what still comes is dropped
        self.expect = False         # the client waits for 100 Continue
        self.continued = False      # ... and it was sent
        self.cycle: _Cycle | None = None


def listen_unix(path: str) -> socket.socket:
    """A stream socket listening on the Unix socket ``path`` (a stale socket file there is
    replaced; a directory is not)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(path) and not os.path.isdir(path):
            os.unlink(path)
        s.bind(path)
        s.listen(1024)
    except BaseException:
        s.close()
        raise
    return s


class _HttpProtocol(asyncio.Protocol):
    """One connection: parse, run the app per request (in order), frame the answers."""

    def __init__(self, server: ASGIServer) -> None:
        self.server = server
        self.http = Connection(server.limits, server_name=server.server_name, stream=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        loop = self.loop = asyncio.get_running_loop()
        # the app's tasks: asyncio.Task itself (no Python frame of create_task) unless the loop
        # has a task factory (the one in effect when the connection opened); named (on 3.11 a
        # task without a name formats one, "Task-N", as it is made)
        self.new_task: Callable[[Any], asyncio.Task[None]] = (
            functools.partial(asyncio.Task, loop=loop, name=_TASK_NAME) if loop.get_task_factory() is None
            else functools.partial(loop.create_task, name=_TASK_NAME))
        # parsed requests not started yet, each with its body when that streams
        self.pending: collections.deque[tuple[Request | HttpError, _Body | None]] = collections.deque()
        self.feeding: _Body | None = None   # the body arriving now
        self.buffered = 0                   # body bytes held for apps (charged to server.budget)
        self.cycle: _Cycle | None = None
        self.client: list[Any] | None = None
        self.server_addr: list[Any] | None = server._server_addr
        self.deadline = 0.0      # loop.time() after which the connection is closed (0: none)
        self.closed = False
        self.eof = False
        self.paused = False
        self.write_paused = False
        self.drained: asyncio.Future[None] | None = None
        self.ws: Any = None
        # a finished response held to the end of the loop turn (written then, or before any
        # other output of the connection: see flush())
        self.link: _core.AsgiLink = None  # type: ignore[assignment]
        self.lingering = False   # answered an error mid-body: reading and dropping, then closing

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        srv = self.server
        self.link = _core.AsgiLink(transport.write, getattr(self.loop, "_core", None), srv.stats,
                                   srv.access_log is not None, self.http)
        srv._conns.add(self)
        if srv._sweeper is None:
            srv._arm_sweeper()
        srv.stats.connections += 1
        # (asyncio's transports set TCP_NODELAY themselves; an AF_UNIX peer is a str)
        peer = transport.get_extra_info("peername")
        if type(peer) is tuple and peer:
            self.client = [peer[0], peer[1]]
        self._arm(IDLE_TIMER)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.drop()
        self.closed = True
        self.server._conns.discard(self)
        self.http.close()
        self.deadline = 0.0
        self.server.budget.used -= self.buffered
        self.buffered = 0
        if self.cycle is not None:
            self.cycle.wake()
        if self.ws is not None:
            self.ws.connection_lost()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        if self.cycle is not None:
            self.cycle.writable()

    async def drain(self) -> None:
        """Wait while the client does not take the output; past ``send_timeout``, drop it."""
        if self.write_paused and not self.closed:
            self.drained = self.loop.create_future()
            stuck = self.loop.call_later(self.server.send_timeout, self._stuck)
            try:
                await self.drained
            finally:
                stuck.cancel()

    def _stuck(self) -> None:
        self.server.log_error("aem serve: a client took none of a response for "
                              f"{self.server.send_timeout:g} s: connection dropped")
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.link.flush()   # what this read answers goes out after what was answered before
        if self.lingering:
            return
        if self.ws is not None:
            self.ws.data_received(data)
            return
        if self.cycle is None and not self.pending and not self.http.closing:
            # between requests, a read that is one simple head: C parses it (no llhttp callbacks)
            req = self.http.parser.feed_simple(data)
            if req is not None:
                self._start(req, None, True)
                return
        events = self.http.receive(data)
        for ev in events:
            t = type(ev)
            if t is bytes:
                if not self._chunk(ev):  # type: ignore[arg-type]
                    break
            elif t is Request:
                self.pending.append((ev, None))  # type: ignore[arg-type]
            elif t is StreamedRequest:
                body = self.feeding = _Body()
                self.pending.append((ev, body))  # type: ignore[arg-type]
            elif ev is BODY_END:
                self._body_end()
            elif ev is CONTINUE:
                if self.feeding is not None:
                    self.feeding.expect = True
            elif t is HttpError:
                if self.feeding is not None:
                    self._body_failed(ev)  # type: ignore[arg-type]
                    break
                self.pending.append((ev, None))  # type: ignore[arg-type]
        if self.cycle is None:
            if self.pending:
                self._next()
            else:
                timer = self.http.timer
                if timer != KEEP:
                    self._arm(timer)
        else:
            self._arm_body()
        if len(self.pending) > _PIPELINE_MAX or self.buffered > _BODY_HIGH:
            self._flow()

    def eof_received(self) -> bool | None:
        self.link.flush()
        if self.lingering:
            self.transport.close()
            return None
        self.eof = True
        if self.cycle is None and not self.pending:
            self.transport.close()
            return None
        if self.cycle is not None:
            self.cycle.wake()   # the app waiting in receive() learns it now
        return True  # half-closed: answer what was asked, then close

    # -- request bodies ------------------------------------------------------------------------

    def _chunk(self, data: bytes) -> bool:
        """A piece of the body arriving; False if it broke the server's body budget."""
        b = self.feeding
        if b is None or b.discard:
            return True
        n = len(data)
        budget = self.server.budget
        if budget.used + n > budget.limit:
            self._body_failed(HttpError(503, "too many request bodies in progress; try again later"))
            return False
        budget.used += n
        self.buffered += n
        b.chunks.append(data)
        b.size += n
        if b.cycle is not None:
            b.cycle.wake()
        return True

    def _body_end(self) -> None:
        b = self.feeding
        self.feeding = None
        if b is None:
            return
        b.complete = True
        if b.cycle is not None:
            b.cycle.wake()
        elif not b.discard:
            # its request has not started: it gets the body whole, as one bytes object
            req, _ = self.pending[-1]
            assert isinstance(req, Request)
            req.body = b"".join(b.chunks) if len(b.chunks) != 1 else b.chunks[0]
            self.pending[-1] = (req, None)
            self._release(b)

    def _release(self, b: _Body) -> None:
        """The app took (or will never take) the chunks of ``b``: they leave the budget."""
        n = b.size
        b.chunks = []
        b.size = 0
        if n and not self.closed:
            self.buffered -= n
            self.server.budget.used -= n
            if self.paused:
                self._flow()

    def _skip_body(self, b: _Body | None) -> None:
        """The request of ``b`` was answered: what is left of its body is read and dropped."""
        if b is not None:
            b.cycle = None
            if not b.complete:
                b.discard = True
            self._release(b)

    def _body_failed(self, err: HttpError) -> None:
        """The body arriving broke a limit or timed out: answer ``err`` in its request's place."""
        b = self.feeding
        assert b is not None
        self.feeding = None
        b.failed = True
        self._release(b)
        self.http.parser.close()   # nothing more is parsed on this connection
        c = self.cycle
        if c is not None and c.body is b:
            srv = self.server
            if not c.head_sent:
                self.transport.write(self.http.error(err, srv._clock.line()))
                srv.stats.responses[err.status // 100] += 1
                self.server_log(c.req, err.status, 0)
            self.closed = True        # the app's sends are dropped, its receive() disconnects
            self._linger()
            c.wake()
            return
        # the request has not started (a pipelined one): the error is its answer
        for i in range(len(self.pending) - 1, -1, -1):
            if self.pending[i][1] is b:
                self.pending[i] = (err, None)
                break

    def _linger(self) -> None:
        """Close after an error answer while the client may still be sending its body: shut our
        side, read and drop what comes for up to 2 s, then close (closing with unread input
        would reset the connection, and the client could lose the answer)."""
        self.http.closing = True
        self.lingering = True
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.transport.close()
            return
        self.loop.call_later(2.0, self.transport.close)

    def _arm_body(self) -> None:
        """While an app runs: the body deadline, when a body is arriving and the client sends it."""
        b = self.feeding
        if b is None or self.paused or (b.expect and not b.continued) or b.discard:
            if b is None or self.paused:
                self.deadline = 0.0
            return
        t = self.http.timer
        if t != KEEP:
            self._arm(t)
        elif not self.deadline:
            self._arm(BODY_TIMER)

    def _flow(self) -> None:
        """Pause reading while too much is queued (requests or body bytes); resume below half."""
        if self.closed:
            return
        if len(self.pending) > _PIPELINE_MAX or self.buffered > _BODY_HIGH:
            if not self.paused:
                self.paused = True
                self.transport.pause_reading()
                if self.cycle is not None:
                    self.deadline = 0.0
        elif self.paused and len(self.pending) <= _PIPELINE_MAX // 2 and self.buffered <= _BODY_HIGH // 2:
            self.paused = False
            self.transport.resume_reading()
            if self.cycle is not None and self.feeding is not None:
                self._arm_body()

    # -- requests ------------------------------------------------------------------------------

    def _arm(self, timer: int) -> None:
        self.deadline = self.loop.time() + self.server.timer_s[timer]

    def expire(self) -> None:
        """The deadline passed (see :meth:`ASGIServer._sweep`): 408 if a request was arriving; close."""
        self.deadline = 0.0
        if self.closed:
            return
        self.link.flush()
        if self.cycle is not None:
            if self.feeding is not None and not self.paused:
                self._body_failed(HttpError(408, "request body not received in time"))
            return
        data = self.http.timeout(self.server._clock.line())
        if data is not None:
            self.transport.write(data)
        self.transport.close()

    def _next(self) -> None:
        """Start the next queued request (or arm the idle deadline)."""
        if self.closed:
            return
        if self.paused:
            self._flow()
        if not self.pending:
            if self.http.closing or self.server.shutting_down or self.eof:
                self.link.flush()
                self.transport.close()
            elif self.feeding is not None:
                self._arm(BODY_TIMER)   # the rest of an answered request's body, dropped
            else:
                self._arm(self.http.timer if self.http.timer != KEEP else IDLE_TIMER)
            return
        self.link.flush()
        ev, body = self.pending.popleft()
        self._start(ev, body)

    def _start(self, ev: Request | HttpError, body: _Body | None, simple: bool = False) -> None:
        """Answer the request ``ev`` (or the error in its place): the app's cycle starts.
        ``simple``: ``ev`` passed :meth:`RequestParser.feed_simple` (it has no ``Upgrade``)."""
        self.deadline = 0.0
        srv = self.server
        if not isinstance(ev, Request):
            assert isinstance(ev, HttpError)
            self.transport.write(self.http.error(ev, srv._clock.line()))
            srv.stats.responses[ev.status // 100] += 1
            self.pending.clear()
            self.transport.close()
            return
        req = ev
        srv.stats.requests += 1
        if srv.shutting_down:
            self.http.closing = True
        if not simple and _is_websocket(req):
            from ._websocket import WebSocketSession

            self.ws = WebSocketSession(self, req)
            return
        if srv.status_page and req.target.startswith(_status.PATH) and req.path == _status.PATH:
            self._skip_body(body)
            self.status_response(req)
            self._next()
            return
        lim = srv.limit_concurrency
        if lim is not None and srv.stats.active >= lim:
            self._skip_body(body)
            self.simple(req, 503, b"503 Service Unavailable\n")
            self._next()
            return
        cycle = srv.direct(self, req, body) if srv.direct is not None else None
        self.cycle = cycle if cycle is not None else _Cycle(self, req, body)
        if body is not None:
            self._arm_body()

    def simple(self, req: Request, status: int, body: bytes) -> None:
        """Answer ``req`` with a small plain-text response."""
        first, second = self.http.response(req, status, [("Content-Type", "text/plain; charset=utf-8")],
                                           body, self.server._clock.line())
        self.transport.write(first + second)
        self.server.stats.responses[status // 100] += 1
        self.server_log(req, status, len(body))

    def status_response(self, req: Request) -> None:
        """``/_aem/status``: the server's counters (app requests included), engine, pool."""
        data = _status.collect(self.server.status(), self.server.pool)
        if _status.wants_json(req.headers.get("accept"), req.query):
            body, ctype = _status.render_json(data), "application/json"
        else:
            body, ctype = _status.render_html(data), "text/html; charset=utf-8"
        first, second = self.http.response(req, 200, [("Content-Type", ctype), ("Cache-Control", "no-store")],
                                           body, self.server._clock.line())
        self.transport.write(first + second)
        self.server.stats.responses[2] += 1
        self.server_log(req, 200, len(body))

    def server_log(self, req: Request, status: int, length: int) -> None:
        log = self.server.access_log
        if log is None:
            return
        who = self.client[0] if self.client else "-"
        stamp = time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", time.gmtime())
        target = req.target if req.target.isprintable() and '"' not in req.target else repr(req.target)
        try:
            log.write(f'{who} - - {stamp} "{req.method} {target} HTTP/{req.version}" {status} {length}\n')
        except (OSError, ValueError):
            pass

    def cycle_done(self) -> None:
        c = self.cycle
        if c is not None and c.body is not None:
            b = c.body
            if b.expect and not b.continued and not b.complete:
                self.http.closing = True   # the client may or may not send the body now: close
            self._skip_body(b)
        self.cycle = None
        if self.http.closing:
            self.pending.clear()
        elif self.feeding is None and not (self.pending or self.paused or self.eof
                                           or self.server.shutting_down):
            # the usual keep-alive case, _next's last branch without its calls: the idle deadline
            self.deadline = self.loop.time() + self.server.timer_s[self.http.parser.timer or IDLE_TIMER]
            return
        self._next()

    def shutdown(self) -> None:
        """Graceful shutdown: close now if idle, else after the response in progress."""
        self.link.flush()
        if self.ws is not None:
            self.ws.shutdown()
        elif self.cycle is None and not self.pending:
            self.transport.close()
        else:
            self.http.closing = True

    def abort(self) -> None:
        self.link.drop()
        if self.cycle is not None:
            self.cycle.cancel()
        self.transport.abort()


def _is_websocket(req: Request) -> bool:
    if req.method != "GET":
        return False
    for name, value in req.raw_headers:   # (not req.headers: that would build a dict per request)
        if len(name) == 7 and name.lower() == b"upgrade":
            return value.strip().lower() == b"websocket"
    return False


def make_scope(conn: _HttpProtocol, req: Request, kind: str) -> dict[str, Any]:
    """The ASGI scope of ``req`` (``kind``: ``"http"`` or ``"websocket"``)."""
    target = req.target
    i = target.find("?")
    raw_path = target if i < 0 else target[:i]
    if not raw_path.startswith("/"):
        raw_path = req.path
    query = b"" if i < 0 else target[i + 1:].encode("latin-1")
    root = conn.server.root_path
    path = unquote(raw_path) if "%" in raw_path else raw_path
    scope: dict[str, Any] = {
        "type": kind,
        "asgi": _ASGI,
        "http_version": req.version,
        "scheme": "http" if kind == "http" else "ws",
        "path": root + path,
        "raw_path": raw_path.encode("latin-1"),
        "query_string": query,
        "root_path": root,
        "headers": [(n.lower(), v) for n, v in req.raw_headers],
        "server": conn.server_addr,
        "client": conn.client,
        "state": conn.server.state.copy(),
    }
    if kind == "http":
        scope["method"] = req.method
        scope["extensions"] = {"http.response.zerocopysend": {}}
    return scope


class _Cycle(_core.AsgiCycle):
    """One request and its response: the app's ``receive`` and ``send``.

    The state and the usual ``receive()``/``send()`` are C (:class:`aem._core.AsgiCycle`,
    asgi_cycle.c; ``_setup`` starts an exchange); what they do not do themselves comes here:
    :meth:`_receive_slow` and :meth:`_send_slow`.  ``body`` is the request body when it
    streams (else it is ``req.body``, whole).
    """

    __slots__ = ()

    def __init__(self, conn: _HttpProtocol, req: Request, body: _Body | None = None) -> None:
        self._setup(conn, req, body)
        srv = conn.server
        scope = _core.asgi_scope(req, srv.root_path, conn.server_addr, conn.client, srv.state)
        if scope is None:
            scope = make_scope(conn, req, "http")
        self.task = conn.new_task(self._run(scope))

    def cancel(self) -> None:
        """The connection is being aborted (shutdown past its grace period): stop the app call."""
        if self.task is not None:
            self.task.cancel()

    def writable(self) -> None:
        """The client takes output again (after ``pause_writing``)."""

    async def _run(self, scope: dict[str, Any]) -> None:
        conn = self.conn
        srv = conn.server
        try:
            await srv.app(scope, self.receive, self.send)
        except BaseException as e:
            srv.stats.app_errors += 1
            if not isinstance(e, asyncio.CancelledError):
                srv.log_error(f"aem serve: exception in the app for {self.req.method} {self.req.target}:\n"
                              + traceback.format_exc())
            if not self.status and not conn.closed:
                self._fail(500)
            elif not self.response_done and not conn.closed:
                conn.http.closing = True
                conn.transport.close()
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
        else:
            if not self.response_done and not conn.closed:
                if not self.status:
                    srv.stats.app_errors += 1
                    srv.log_error(f"aem serve: the app returned no response for {self.req.method} "
                                  f"{self.req.target}")
                    self._fail(500)
                else:
                    conn.http.closing = True   # a response cut short: the framing is broken
                    conn.transport.close()
        finally:
            srv.stats.active -= 1
            self.task = None
            if not conn.closed:
                conn.cycle_done()
            else:
                conn.cycle = None

    def _fail(self, status: int) -> None:
        self.conn.simple(self.req, status, b"500 Internal Server Error\n")
        self.response_done = True

    def wake(self) -> None:
        """Something ``receive()`` waits for happened (body bytes, the response's end, a disconnect)."""
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _receive_slow(self) -> Message:
        if not self.request_read:
            if self.body is not None:
                return await self._receive_body(self.body)
            self.request_read = True
            return {"type": "http.request", "body": self.req.body, "more_body": False}
        if not self.response_done and not self.conn.closed:
            self.waiter = self.conn.loop.create_future()
            await self.waiter
        return {"type": "http.disconnect"}

    async def _receive_body(self, body: _Body) -> Message:
        """The body bytes that arrived since the last call (waiting for some if none did)."""
        conn = self.conn
        while not (conn.closed or body.failed):
            if body.chunks or body.complete:
                chunks = body.chunks
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                conn._release(body)
                if body.complete:
                    self.request_read = True
                return {"type": "http.request", "body": data, "more_body": not body.complete}
            if conn.eof:
                break
            if body.expect and not body.continued:
                if self.head_sent:
                    break          # answered without the body: it will not be read
                body.continued = True
                conn.transport.write(CONTINUE_RESPONSE)
                conn._arm_body()
            self.waiter = conn.loop.create_future()
            await self.waiter
        self.request_read = True
        return {"type": "http.disconnect"}

    async def _send_slow(self, message: Message) -> None:
        kind = message["type"]
        conn = self.conn
        if conn.closed:
            return
        if kind == "http.response.start":
            if self.status:
                raise RuntimeError("http.response.start sent twice")
            status = int(message["status"])
            if not 100 <= status <= 599:
                raise ValueError(f"status {status} is not an HTTP status code")
            self._set_raw_head(status, message.get("headers", ()))
            return
        if kind == "http.response.body":
            if not self.status:
                raise RuntimeError("http.response.body before http.response.start")
            if self.response_done:
                raise RuntimeError("http.response.body after the response ended")
            self._own_head()
            body = message.get("body", b"")
            more = message.get("more_body", False)
            self._body(bytes(body) if type(body) is not bytes else body, more)
            if more:
                await conn.drain()
            return
        if kind == "http.response.zerocopysend":
            if not self.status:
                raise RuntimeError("http.response.zerocopysend before http.response.start")
            self._own_head()
            await self._sendfile(message)
            return
        raise RuntimeError(f"unexpected ASGI message {kind!r} in an http scope")

    def _own_head(self) -> None:
        """The response fields, if only the C half read them: as :meth:`_set_raw_head` keeps them."""
        raw = self._take_raw_head()
        if raw is not None:
            self._set_raw_head(self.status, raw)

    def _set_raw_head(self, status: int, headers: Any) -> None:
        """:meth:`_set_head` for the app's byte pairs; each pair seen before is looked up
        (the ``str`` pair it gives), not decoded again.  (``status`` is set last: a field
        that raises leaves the response unstarted, and the app's failure gets a 500.)"""
        fields: list[tuple[str, str]] = []
        known = _FIELDS
        for pair in headers:
            try:
                field = known.get(pair)
            except TypeError:      # a pair given as a list: not hashable
                field = None
            if field is not None:
                fields.append(field)
                continue
            n, v = pair
            field = (bytes(n).decode("latin-1"), bytes(v).decode("latin-1"))
            name = field[0]
            if len(name) in _STRIP_LENGTHS and (lname := name.lower()) in _STRIP:
                if lname == "content-length":
                    self.want_length = int(field[1])
                continue
            if type(pair) is tuple and type(n) is bytes and type(v) is bytes:
                if len(known) >= 1024:
                    known.clear()
                known[pair] = field
            fields.append(field)
        self.headers = fields
        self.status = status

    def _set_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        """The response's status and fields (those the server frames itself are taken out)."""
        self.status = status
        fields: list[tuple[str, str]] = []
        for field in headers:
            name = field[0]
            if len(name) in _STRIP_LENGTHS and (lname := name.lower()) in _STRIP:
                if lname == "content-length":
                    self.want_length = int(field[1])
                continue
            fields.append(field)
        self.headers = fields

    def _body(self, body: bytes, more: bool) -> None:
        conn = self.conn
        http = conn.http
        req = self.req
        date = conn.server._clock.line()
        if not self.head_sent:
            if self.body is None:
                self.head_sent = True
            else:
                self._answering()
            want = self.want_length
            if not more and (want is None or want == len(body) or req.method == "HEAD"):
                if req.method == "HEAD" and want is not None and body_allowed("GET", self.status):
                    head, _ = http.file_response(req, self.status, self.headers, want, date)
                    conn.transport.write(head)
                else:
                    try:
                        first, second = http.response(req, self.status, self.headers, body, date)
                    except (ValueError, UnicodeEncodeError) as e:
                        self._bad_header(e)
                        return
                    conn.transport.write(first + second if second else first)
                self._done(len(body))
                return
            try:
                self._head(want)
            except (ValueError, UnicodeEncodeError) as e:
                self._bad_header(e)
                return
        if body and body_allowed(req.method, self.status):
            self.sent += len(body)
            if self.chunked:
                conn.transport.write(b"%x\r\n%s\r\n" % (len(body), body))
            else:
                conn.transport.write(body)
        if not more:
            if self.chunked:
                conn.transport.write(b"0\r\n\r\n")
            elif self.want_length is not None and self.sent != self.want_length and body_allowed(
                    req.method, self.status):
                http.closing = True  # the app broke its own Content-Length: end the stream
            self._done(self.sent)

    def _answering(self) -> None:
        """The response head goes out now.  A client still waiting for ``100 Continue`` will
        not get it: the connection closes after this response (RFC 9110 §10.1.1)."""
        self.head_sent = True
        b = self.body
        if b is not None and b.expect and not b.continued and not b.complete:
            self.conn.http.closing = True

    def _head(self, length: int | None) -> None:
        conn = self.conn
        http = conn.http
        req = self.req
        keep = req.keep_alive and not http.closing
        has_body = body_allowed(req.method, self.status)
        fields = self.headers
        if length is None and has_body:
            if req.version == "1.1":
                self.chunked = True
                fields = [*fields, ("Transfer-Encoding", "chunked")]
            else:
                keep = False  # HTTP/1.0: the body ends with the connection
        if not keep:
            http.closing = True
        no_length = self.status < 200 or self.status in (204, 304)
        conn.transport.write(render_head(self.status, fields, None if no_length else length, keep,
                                         req.version, conn.server._clock.line(),
                                         http._server_line))

    def _bad_header(self, e: Exception) -> None:
        conn = self.conn
        conn.server.stats.app_errors += 1
        conn.server.log_error(f"aem serve: bad response header for {self.req.method} {self.req.target}: {e}")
        self.status = 500
        self._fail(500)

    def _done(self, length: int) -> None:
        self.response_done = True
        srv = self.conn.server
        srv.stats.responses[self.status // 100] += 1
        if srv.access_log is not None:
            self.conn.server_log(self.req, self.status, length)
        if self.waiter is not None:
            self.wake()  # a receive() waiting for the disconnect returns now

    async def _sendfile(self, message: Message) -> None:
        f = message["file"]
        offset = int(message.get("offset", 0) or 0)
        count = message.get("count")
        more = message.get("more_body", False)
        conn = self.conn
        if not self.head_sent:
            if count is None:
                count = os.fstat(f.fileno()).st_size - offset
            self._answering()
            want = self.want_length
            if want is None and not more:
                want = int(count)
            self._head(want)
        if count is None:
            count = os.fstat(f.fileno()).st_size - offset
        if body_allowed(self.req.method, self.status) and count:
            if self.chunked:
                conn.transport.write(b"%x\r\n" % count)
            await conn.drain()
            await conn.loop.sendfile(conn.transport, f, offset, count)
            self.sent += count
            if self.chunked:
                conn.transport.write(b"\r\n")
        if not more:
            if self.chunked:
                conn.transport.write(b"0\r\n\r\n")
            self._done(self.sent)

