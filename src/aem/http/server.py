"""AEMhttpd: an HTTP/1.1 server in one thread, driven by aem events.

Where a request travels::

    aem.Accept(listen)  ──► _on_accept: TCP_NODELAY, a _Conn, aem.Read(conn) registered
    aem.Read(conn)      ──► _Conn.on_read: RequestParser.feed(bytes) ─► events, in order
                             Request  ─► status page | app(request) | static files | 404
                             CONTINUE ─► "100 Continue"
                             HttpError ─► the error response, then close
                         ──► responses appended to the connection's output, flushed
                             once per read (pipelined responses leave in one send())
    aem.Writable(conn)  ──► registered only while the client does not take what is sent
                             (EAGAIN); meanwhile the connection's Read is stopped
                             (EVJOBSTOP) and parsed-but-unanswered requests wait:
                             output is bounded, and so is the work done for a client
                             that does not read
    aem.Timer(tick)     ──► _sweep: the connections whose deadline passed are closed

Protocol decisions live in :mod:`.protocol` (what the bytes mean, what to
answer) and :mod:`.static` (which file, which span); this module moves bytes.

Timeouts (:class:`Timeouts`; a connection's deadline follows its state):

* ``idle`` (15 s): no request in progress — a keep-alive connection between
  requests, or a new one that has sent nothing yet;
* ``header`` (10 s): from the first byte of a request to the end of its
  headers, however the bytes trickle in (slowloris) — answered 408;
* ``body`` (30 s): the longest pause while a request body arrives — 408;
* ``send`` (30 s): the longest time the client takes none of a pending
  response;
* ``linger`` (2 s): after the last response of a connection the server
  closes, how long it waits for the client to close its side (reading and
  dropping what comes), so that the response is not destroyed by a reset.

Deadlines are checked by one periodic timer (every ``min(1 s, shortest
timeout / 4)``) against a heap of (check time, connection); a request only
stores its connection's new deadline (one attribute), and the sweep touches
a connection only when its check time comes, so ten thousand idle
connections cost the sweep nothing.  The entries of closed connections are
dropped once they outnumber the open ones (the heap holds at most twice the
open connections, plus 1024): a closed connection is not kept in memory until
its old deadline.
"""

from __future__ import annotations

import errno
import heapq
import ipaddress
import itertools
import os
import resource
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import aem

from . import status as _status
from .app import App, Response
from .fast import FastPath
from .protocol import (
    CONTINUE,
    CONTINUE_RESPONSE,
    IDLE,
    IDLE_TIMER,
    KEEP,
    BodyBudget,
    Connection,
    DateClock,
    HttpError,
    Limits,
    Request,
)
from .static import StaticFiles

__all__ = ["HTTPServer", "Timeouts", "raise_nofile_limit"]

_HIGH_WATER = 64 * 1024      # flush the output of a batch of pipelined requests past this
_MAX_FILES = 16              # open files queued on one connection before a flush
_HEAP_SLACK = 1024           # dead deadline-heap entries tolerated beyond the open connections
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
_time = time.time
_EV_STOP = aem.EVJOBSTOP
_EV_START = aem.EVJOBSTART
_STATUS_PATH = _status.PATH
_STATUS_KEEP = 60.0          # seconds the status snapshot is refreshed after the page was asked
_TIMEOUT_MAX = 86400.0 * 365  # a connection timeout longer than a year is a mistake (also nan, inf)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds before a connection is closed, by state (see the module doc)."""

    idle: float = 15.0
    header: float = 10.0
    body: float = 30.0
    send: float = 30.0
    linger: float = 2.0

    def __post_init__(self) -> None:
        for name in ("idle", "header", "body", "send", "linger"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"timeout {name} must be a number of seconds, not {type(v).__name__}")
            if not (0 < v <= _TIMEOUT_MAX):
                raise ValueError(f"timeout {name} must be > 0 and <= {_TIMEOUT_MAX:g} seconds, not {v!r}")


def raise_nofile_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _is_loopback(addr: Any) -> bool:
    """True for a client on this machine (a loopback address or a Unix socket)."""
    if not isinstance(addr, tuple) or not addr:
        return True
    try:
        return ipaddress.ip_address(str(addr[0]).partition("%")[0]).is_loopback
    except ValueError:
        return False


def _no_body(method: str, target: str) -> bool:
    return False


class _FileSpan:
    """``remaining`` bytes of open file ``fd`` from ``offset``, to go out with sendfile."""

    __slots__ = ("fd", "offset", "remaining")

    def __init__(self, fd: int, offset: int, remaining: int) -> None:
        self.fd = fd
        self.offset = offset
        self.remaining = remaining


class _Conn:
    """One client connection: its parser, its pending output, its deadline."""

    __slots__ = (
        "addr", "backlog", "check", "closed", "deadline", "eid", "eof", "fd", "files", "http",
        "lingering", "out", "out_len", "read_stopped", "server", "sock", "weid",
    )

    def __init__(self, server: HTTPServer, sock: socket.socket, addr: Any) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.http = Connection(server.limits, budget=server._budget,
                               wants_body=server._wants_body, server_name=server.server_name)
        self.eid = 0
        self.weid = 0              # the Writable registration while output is blocked
        self.out: list[bytes | memoryview | _FileSpan] = []
        self.out_len = 0
        self.files = 0
        self.backlog: list[Any] | None = None   # parsed events waiting for output room
        self.deadline = 0
        self.check = 0
        self.closed = False
        self.lingering = False     # our side is shut: waiting for the client's FIN
        self.eof = False           # the client closed its side (or reset)
        self.read_stopped = False

    # -- events ----------------------------------------------------------------------------

    def on_read(self, ev: Any) -> None:
        """aem.Read handler: hand the bytes to the protocol, send its answers, re-arm the deadline.

        The one place where received bytes enter the protocol (see docs/http.md).
        """
        if ev.eof:
            self._on_eof()
            return
        if self.lingering:
            return
        srv = self.server
        http = self.http
        try:
            data = ev.data
            p = http.parser
            if srv._fast is not None and p.phase == IDLE and not self.out and not p.dead:
                data = srv._fast(self, data)  # the native path (.fast): what it leaves
            events = http.receive(data) if data else None
            if events:
                srv._dispatch(self, events)
                if self.closed:
                    return
        except Exception as e:
            srv._internal_error(self, e)
            return
        if self.closed or self.weid or self.lingering:
            return
        timer = http.parser.timer if data else IDLE_TIMER
        if timer == KEEP:
            return
        dl = ev.time_ns + srv._timer_ns[timer]
        self.deadline = dl
        if dl < self.check:
            srv._schedule(self, dl)

    def on_writable(self, ev: Any) -> None:
        """aem.Writable handler: the client took some output; send more, resume when drained."""
        try:
            if not self.flush():
                return
            srv = self.server
            backlog = self.backlog
            if backlog is not None:
                self.backlog = None
                srv._dispatch(self, backlog)
                if self.closed or self.weid or self.lingering:
                    return
            elif self.http.closing:
                self.finish()
                return
            elif self.eof:
                self.close()
                return
            if self.read_stopped and not self.eof:
                self.read_stopped = False
                srv.engine.control(self.eid, _EV_START)
            dl = time.monotonic_ns() + srv._timer_ns[self.http.resume_timer()]
            self.deadline = dl
            if dl < self.check:
                srv._schedule(self, dl)
        except Exception as e:
            self.server._internal_error(self, e)

    def _on_eof(self) -> None:
        """The client closed its side, or the connection failed."""
        self.eof = True
        if self.lingering or (not self.out and self.backlog is None):
            self.close()
        # else: responses are still going out; on_writable closes when they are done

    # -- output ----------------------------------------------------------------------------

    def flush(self) -> bool:
        """Send what can be sent now.  True when everything went out.

        On EAGAIN, waits for aem.Writable (and stops reading); on a send error
        (the client reset) closes the connection and returns False.
        """
        out = self.out
        srv = self.server
        if len(out) == 1 and type(out[0]) is bytes and not self.weid:
            # the common case: one batch of responses, all in memory
            data = out[0]
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                srv.resets += 1
                self.close()
                return False
            srv.bytes_out += n
            if n == len(data):
                out.clear()
                self.out_len = 0
                return True
            out[0] = memoryview(data)[n:]
            return self._block()
        sock = self.sock
        while out:
            item = out[0]
            if isinstance(item, _FileSpan):
                try:
                    n = os.sendfile(self.fd, item.fd, item.offset, min(item.remaining, 1 << 30))
                except BlockingIOError:
                    return self._block()
                except OSError:
                    srv.resets += 1
                    self.close()
                    return False
                if n == 0:  # the file shrank under us: the promised length cannot be kept
                    self.close()
                    return False
                srv.bytes_out += n
                item.offset += n
                item.remaining -= n
                if item.remaining == 0:
                    os.close(item.fd)
                    self.files -= 1
                    del out[0]
                continue
            n_items = 1
            if len(out) > 1:
                while n_items < len(out) and type(out[n_items]) is not _FileSpan:
                    n_items += 1
            chunk: bytes | memoryview
            if n_items == 1:
                chunk = item
            else:
                chunk = b"".join(out[:n_items])  # type: ignore[arg-type]
            flags = _MSG_MORE if n_items < len(out) else 0
            try:
                n = sock.send(chunk, flags)
            except BlockingIOError:
                n = 0
            except OSError:
                srv.resets += 1
                self.close()
                return False
            srv.bytes_out += n
            if n < len(chunk):
                del out[:n_items]
                out.insert(0, memoryview(chunk)[n:])
                return self._block()
            del out[:n_items]
        self.out_len = 0
        if self.weid:
            srv.engine.unregister(self.weid, True)
            self.weid = 0
        return True

    def _block(self) -> bool:
        """Output is stuck: wait for Writable, stop reading, arm the send deadline."""
        srv = self.server
        if not self.weid:
            self.weid = srv.engine.register(aem.Writable(self.sock), self.on_writable)
            if not self.read_stopped and not self.eof and not self.lingering:
                self.read_stopped = True
                srv.engine.control(self.eid, _EV_STOP)
        dl = time.monotonic_ns() + srv._send_ns
        self.deadline = dl
        if dl < self.check:
            srv._schedule(self, dl)
        return False

    def send_answers(self) -> None:
        """Send the answers made in one batch (joined into one write), then end the
        connection if the protocol or the client's EOF says so."""
        out = self.out
        if len(out) > 1 and not self.files:
            out[:] = [b"".join(out)]  # type: ignore[arg-type]
        if self.flush():
            if self.http.closing:
                self.finish()
            elif self.eof:
                self.close()

    def finish(self) -> None:
        """Every response is out and the connection ends: shut our side, linger for the FIN."""
        if self.eof:
            self.close()
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.lingering = True
        srv = self.server
        if self.read_stopped:
            self.read_stopped = False
            srv.engine.control(self.eid, _EV_START)
        dl = time.monotonic_ns() + srv._linger_ns
        self.deadline = dl
        if dl < self.check:
            srv._schedule(self, dl)

    def close(self) -> None:
        """Release everything: registrations, queued files, the socket."""
        if self.closed:
            return
        self.closed = True
        self.http.close()
        eng = self.server.engine
        if not eng.closed:
            if self.eid:
                eng.unregister(self.eid, True)
            if self.weid:
                eng.unregister(self.weid, True)
        self.weid = 0
        for item in self.out:
            if type(item) is _FileSpan:
                os.close(item.fd)
        self.out.clear()
        self.backlog = None
        try:
            self.sock.close()
        except OSError:
            pass
        srv = self.server
        srv._conns.discard(self)
        if len(srv._heap) > 2 * len(srv._conns) + _HEAP_SLACK:
            srv._compact_heap()


class HTTPServer:
    """An HTTP/1.1 server on aem events: static files under ``root``, an ``app``, or both.

    ``app(request)`` (see :mod:`aem.http.app`) is asked first; when it
    returns None, or there is no app, the static files under ``root``
    answer; without a root, 404.  ``status_page``: who sees the process's
    statistics at ``/_aem/status`` (see :mod:`aem.http.status`) —
    ``"loopback"`` (the default: clients on this machine only), ``True``
    (everyone) or ``False`` (no one); for the others that path is an ordinary
    one (``aem serve`` turns the page off unless given ``--status``).

    ``host``/``port`` (port 0: any free port; see :attr:`port`) or a ready
    listening ``sock``.  ``access_log``: a text stream for one line per
    request (Common Log Format), or None.  ``error_log``: where errors go
    (default stderr).  ``engine``: the aem engine to run on (default: the
    process's).  ``reuse_port`` sets ``SO_REUSEPORT`` (several processes on
    one port).  ``pool``: a capsule pool whose statistics the status page
    shows.  ``fast_path=False`` turns off the native per-request path
    (:mod:`.fast`).  The access log is buffered: it is written at every tick of
    the server's timer (at least once a second), when 64 KiB are waiting, and
    when the server stops; a failed write is reported on ``error_log`` (at most
    once a second) and its lines are dropped, the server goes on.

    Raises ``OSError`` when the address cannot be bound and
    ``NotADirectoryError`` for a root that is not a directory.

    >>> server = HTTPServer(root="public", port=8080)   # doctest: +SKIP
    >>> server.start(); server.run()                     # doctest: +SKIP
    """

    def __init__(self, app: App | None = None, root: str | os.PathLike[str] | None = None,
                 host: str = "127.0.0.1", port: int = 8080, *, sock: socket.socket | None = None,
                 limits: Limits | None = None, timeouts: Timeouts | None = None,
                 access_log: TextIO | None = None, error_log: TextIO | None = None,
                 server_name: str = "aem", backlog: int = 4096, reuse_port: bool = False,
                 engine: aem.Engine | None = None, pool: object = None,
                 status_page: bool | str = "loopback",
                 read_size: int = 65536, fast_path: bool = True) -> None:
        self.app = app
        self.static = StaticFiles(root) if root is not None else None
        self.host = host
        self.limits = limits or Limits()
        self.timeouts = timeouts or Timeouts()
        self.access_log = access_log
        self.error_log = error_log if error_log is not None else sys.stderr
        self.engine: aem.Engine = engine if engine is not None else aem.current()
        self.pool = pool
        if status_page not in (True, False, "loopback"):
            raise ValueError(f"status_page is True, False or 'loopback', not {status_page!r}")
        self.status_page = status_page
        self.read_size = read_size
        self.fast_path = fast_path
        self._fastpath: FastPath | None = None
        self._fast: Callable[[_Conn, Any], Any] | None = None
        self.server_name = server_name
        self._server_line = f"Server: {server_name}\r\n".encode("latin-1")
        self._budget = BodyBudget(self.limits.max_buffered)
        # without an app no one reads a request body: answer at once, drop the body
        self._wants_body: Callable[[str, str], bool] | None = (
            None if app is not None else _no_body)
        self._sock = sock
        self._own_sock = sock is None
        self._bind = (host, port)
        self._backlog = backlog
        self._reuse_port = reuse_port
        t = self.timeouts
        self._idle_ns = int(t.idle * 1e9)
        self._header_ns = int(t.header * 1e9)
        self._body_ns = int(t.body * 1e9)
        self._send_ns = int(t.send * 1e9)
        self._linger_ns = int(t.linger * 1e9)
        # by RequestParser.timer: KEEP, IDLE_TIMER, HEADER_TIMER, BODY_TIMER
        self._timer_ns = (0, self._idle_ns, self._header_ns, self._body_ns)
        self._tick = min(1.0, min(t.idle, t.header, t.body, t.send, t.linger) / 4)
        self._clock = DateClock()
        self._date = self._clock.line()
        self._date_next = 0
        #: ``time.time()`` when the batch of requests being answered arrived.
        self.now = _time()
        self._log_sec = -1
        self._log_time = ""
        self._conns: set[_Conn] = set()
        self._heap: list[tuple[int, int, _Conn]] = []
        self._seq = itertools.count()
        self._accept_eid = 0
        self._timer_eid = 0
        self._last_pause_log = 0.0
        self._last_log_failure = 0.0
        self._status_asked = -1e9   # time.monotonic() of the last status page request
        self._status_seen = 0       # the C path's status answers, at the last tick
        self._prev_error_handler: Any = None
        self._started = False
        # counters (see stats())
        self.accepted = 0
        self.requests = 0
        self.bytes_out = 0
        self.resets = 0
        self.timeouts_fired = 0
        self.app_errors = 0
        self.accept_pauses = 0
        self._by_class = [0] * 6
        self.started_at = time.time()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on (useful after binding port 0)."""
        if self._sock is None:
            return self._bind[1]
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        """``http://host:port/``."""
        return f"http://{self.host}:{self.port}/"

    def start(self) -> None:
        """Bind and listen (unless given a socket), raise ``RLIMIT_NOFILE``, register the events."""
        if self._started:
            return
        raise_nofile_limit()
        if self._sock is None:
            host, port = self._bind
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self._reuse_port:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind((host, port))
                s.listen(self._backlog)
            except BaseException:
                s.close()
                raise
            self._sock = s
        eng = self.engine
        self._accept_eid = eng.register(aem.Accept(self._sock), self._on_accept)
        self._timer_eid = eng.register(aem.Timer(self._tick, interval=self._tick), self._sweep)
        self._prev_error_handler = eng.set_error_handler(self._on_engine_error)
        if self.fast_path:
            self._fastpath = FastPath(self)
            self._fast = self._fastpath.serve
        self._started = True

    def run(self, timeout: float | None = None) -> str:
        """Start if needed and deliver events until stopped; returns why ``aem.run`` ended."""
        self.start()
        try:
            return str(self.engine.run(timeout))
        finally:
            self._flush_log()

    def close(self) -> None:
        """Stop listening, close every connection, unregister the server's events."""
        eng = self.engine
        for conn in list(self._conns):
            conn.close()
        if not eng.closed:
            for eid in (self._accept_eid, self._timer_eid):
                if eid:
                    eng.unregister(eid, True)
            if self._started:
                eng.set_error_handler(self._prev_error_handler)
        self._accept_eid = self._timer_eid = 0
        if self._sock is not None and self._own_sock:
            self._sock.close()
        self._heap.clear()
        self._started = False
        self._flush_log()

    def __enter__(self) -> HTTPServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """The server's counters: connections, requests, responses by class, bytes, timeouts ..."""
        return {
            "connections": len(self._conns),
            "accepted": self.accepted,
            "requests": self.requests,
            "responses": {f"{i}xx": n for i, n in enumerate(self._by_class) if i and n},
            "bytes_out": self.bytes_out,
            "client_resets": self.resets,
            "timeouts": self.timeouts_fired,
            "app_errors": self.app_errors,
            "accept_pauses": self.accept_pauses,
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    # -- connections -----------------------------------------------------------------------

    def _on_accept(self, ev: Any) -> None:
        sock: socket.socket = ev.conn
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(self, sock, ev.addr)
        try:
            handler = conn.on_read if self._fastpath is None else self._fastpath.handler(conn)
            conn.eid = self.engine.register(aem.Read(sock, self.read_size), handler)
        except Exception:
            sock.close()
            raise
        self.accepted += 1
        self._conns.add(conn)
        dl = ev.time_ns + self._idle_ns
        conn.deadline = dl
        conn.check = dl
        heapq.heappush(self._heap, (dl, next(self._seq), conn))

    def _schedule(self, conn: _Conn, when: int) -> None:
        conn.check = when
        heapq.heappush(self._heap, (when, next(self._seq), conn))

    def _compact_heap(self) -> None:
        """Drop the deadline heap's entries no sweep needs: those of closed connections and
        those a connection's newer, earlier check replaced.  Without this a closed
        connection stays in the heap (and in memory) until its old deadline comes — an idle
        timeout later; called when the heap holds more than twice the open connections, so
        its cost is spread over the entries it drops."""
        heap = [e for e in self._heap if not e[2].closed and e[0] == e[2].check]
        heapq.heapify(heap)
        self._heap[:] = heap

    def _sweep(self, ev: Any) -> None:
        """The periodic timer: close the connections whose deadline passed."""
        now = time.monotonic_ns()
        heap = self._heap
        while heap and heap[0][0] <= now:
            t, _, conn = heapq.heappop(heap)
            if conn.closed or t != conn.check:
                continue
            if conn.deadline <= now:
                self._expire(conn)
            else:
                conn.check = conn.deadline
                heapq.heappush(heap, (conn.deadline, next(self._seq), conn))
        if self.static is not None and self.static.cache:
            self.static.purge()
        fp = self._fastpath
        if fp is not None and self.status_page:
            # the status JSON's snapshot for the C path, while someone asks for it
            served, mono = fp.status_served, time.monotonic()
            if served != self._status_seen:
                self._status_seen = served
                self._status_asked = mono
            if mono - self._status_asked < _STATUS_KEEP:
                fp.snapshot_status(_status.collect(self.stats(), self.pool))
        self._flush_log()

    def _expire(self, conn: _Conn) -> None:
        self.timeouts_fired += 1
        data = conn.http.timeout(self._clock.line())
        if data is not None and not conn.lingering and not conn.weid and not conn.out:
            # a request was arriving too slowly: say so (best effort), then close
            try:
                conn.sock.send(data)
            except OSError:
                pass
        conn.close()

    # -- requests --------------------------------------------------------------------------

    def _set_now(self, now: float) -> None:
        """The time of the answers about to be made (and their Date line, once a second)."""
        if now >= self._date_next:
            self._date = self._clock.line(now)
            self._date_next = int(now) + 1
        self.now = now

    def _dispatch(self, conn: _Conn, events: list[Any]) -> None:
        """Answer ``events`` in order; flush; queue the rest if the client stops reading."""
        self._set_now(_time())
        out = conn.out
        http = conn.http
        for i, ev in enumerate(events):
            if type(ev) is Request:
                self._respond(conn, ev)
            elif ev is CONTINUE:
                out.append(CONTINUE_RESPONSE)
            elif type(ev) is HttpError:
                self._error(conn, ev)
            if http.closing or conn.closed:
                break
            if conn.out_len > _HIGH_WATER or conn.files >= _MAX_FILES:
                if not conn.flush():
                    if not conn.closed and i + 1 < len(events):
                        conn.backlog = events[i + 1:]
                    return
        if conn.closed:
            return
        conn.send_answers()

    def _respond(self, conn: _Conn, req: Request) -> None:
        req.client = conn.addr
        self.requests += 1
        target = req.target
        if (self.status_page and target.startswith(_STATUS_PATH) and req.path == _STATUS_PATH
                and (self.status_page is True or _is_loopback(conn.addr))):
            self._status_response(conn, req)
            return
        result = None
        if self.app is not None:
            try:
                result = self.app(req)
            except Exception:
                self.app_errors += 1
                self._log_error(f"aem.http: exception in the app for {req.method} {target}:\n"
                                + traceback.format_exc())
                result = Response(b"500 Internal Server Error\n", 500)
        self._answer(conn, req, result)

    def _answer(self, conn: _Conn, req: Request, result: object) -> None:
        """Answer ``req`` with what the app returned (None: the static files, or 404)."""
        if result is not None:
            if type(result) is not Response:
                if isinstance(result, (bytes, str)):
                    result = Response(result)
                else:
                    self.app_errors += 1
                    self._log_error(f"aem.http: the app returned {type(result).__name__} for "
                                    f"{req.method} {req.target}: expected a Response")
                    result = Response(b"500 Internal Server Error\n", 500)
            assert isinstance(result, Response)
            self._send(conn, req, result.status, result.headers, result.body)
            return
        if self.static is not None:
            sr = self.static.respond(req.method, req.path, req.headers, req.query, self.now)
            st = sr.status
            head, content = conn.http.file_response(req, st, sr.headers, sr.length, self._date)
            out = conn.out
            if sr.fd >= 0:
                out.append(head)
                if content:
                    out.append(_FileSpan(sr.fd, sr.offset, sr.length))
                    conn.files += 1
                else:
                    sr.close()
            else:
                out.append(head + sr.body if content else head)
                if st == 200 and self._fastpath is not None:
                    self._fastpath.remember(self.static, req.target, self.now)
            conn.out_len += len(head) + len(sr.body)
            self._by_class[st // 100] += 1
            if self.access_log is not None:
                self._log_access(conn, req, st, sr.length)
            return
        self._send(conn, req, 404, [("Content-Type", "text/plain; charset=utf-8")],
                   b"404 Not Found\n")

    def _send(self, conn: _Conn, req: Request, status: int, headers: list[tuple[str, str]],
              body: bytes) -> None:
        try:
            first, second = conn.http.response(req, status, headers, body, self._date)
        except (ValueError, UnicodeEncodeError) as e:
            self.app_errors += 1
            self._log_error(f"aem.http: bad response header for {req.method} {req.target}: {e}")
            status, body = 500, b"500 Internal Server Error\n"
            first, second = conn.http.response(
                req, 500, [("Content-Type", "text/plain; charset=utf-8")], body, self._date)
        conn.out.append(first)
        if second:
            conn.out.append(second)
        conn.out_len += len(first) + len(second)
        self._by_class[status // 100] += 1
        if self.access_log is not None:
            self._log_access(conn, req, status, len(body))

    def _status_response(self, conn: _Conn, req: Request) -> None:
        data = _status.collect(self.stats(), self.pool)
        if self._fastpath is not None:
            self._status_asked = time.monotonic()
            self._fastpath.snapshot_status(data)
        if _status.wants_json(req.headers.get("accept"), req.query):
            body, ctype = _status.render_json(data), "application/json"
        else:
            body, ctype = _status.render_html(data), "text/html; charset=utf-8"
        self._send(conn, req, 200, [("Content-Type", ctype), ("Cache-Control", "no-store")], body)

    def _error(self, conn: _Conn, err: HttpError) -> None:
        conn.out.append(conn.http.error(err, self._date))
        self._by_class[err.status // 100] += 1
        if self.access_log is not None:
            self._log_line(conn, f"- {err.status} -", err.status, 0)

    def _internal_error(self, conn: _Conn, exc: BaseException) -> None:
        self._log_error("aem.http: internal error on a connection (closed):\n"
                        + "".join(traceback.format_exception(exc)))
        conn.close()

    # -- engine errors: out of descriptors -------------------------------------------------------

    def _on_engine_error(self, exc: BaseException, event: Any) -> None:
        if (event is None and isinstance(exc, OSError)
                and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)):
            # The engine pauses the Accept for a moment by itself (no spinning); say so, once a second.
            self.accept_pauses += 1
            now = time.monotonic()
            if now - self._last_pause_log >= 1.0:
                self._last_pause_log = now
                self._log_error(f"aem.http: cannot accept ({exc.strerror}); accepting pauses briefly "
                                f"with {len(self._conns)} connections open")
            return
        prev: Callable[[BaseException, Any], object] | None = self._prev_error_handler
        (prev or aem.default_error_handler)(exc, event)

    # -- logging ---------------------------------------------------------------------------

    def _log_access(self, conn: _Conn, req: Request, status: int, length: int) -> None:
        target = req.target
        if not target.isprintable() or '"' in target:  # no control bytes into the log
            target = "".join(c if " " <= c <= "~" and c != '"' else f"\\x{ord(c):02x}"
                             for c in target)
        self._log_line(conn, f'"{req.method} {target} HTTP/{req.version}"', status, length)

    def _log_line(self, conn: _Conn, request_line: str, status: int, length: int) -> None:
        log = self.access_log
        if log is None:
            return
        now = int(time.time())
        if now != self._log_sec:
            self._log_sec = now
            self._log_time = time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", time.gmtime(now))
        addr = conn.addr[0] if isinstance(conn.addr, tuple) and conn.addr else "-"
        line = f"{addr} - - {self._log_time} {request_line} {status} {length}\n"
        if self._fastpath is not None:
            self._fastpath.log(line)  # one buffer for both paths: lines stay in order
            return
        try:
            log.write(line)
        except (OSError, ValueError) as e:
            self._log_failed(e, 1)

    def _log_error(self, text: str) -> None:
        try:
            self.error_log.write(text if text.endswith("\n") else text + "\n")
            self.error_log.flush()
        except (OSError, ValueError):
            pass

    def _flush_log(self) -> None:
        """Write what the access log holds (the native path's buffer) and flush the stream."""
        log = self.access_log
        if log is None:
            return
        data = self._fastpath.take_log() if self._fastpath is not None else b""
        try:
            if data:
                log.write(data.decode("utf-8", "replace"))
            log.flush()
        except (OSError, ValueError) as e:
            self._log_failed(e, data.count(b"\n"))

    def _log_failed(self, exc: Exception, lines: int) -> None:
        """The access log cannot be written: drop the lines, say so (at most once a second)."""
        now = time.monotonic()
        if now - self._last_log_failure >= 1.0:
            self._last_log_failure = now
            self._log_error(f"aem.http: cannot write the access log ({exc}): "
                            f"{lines} line(s) dropped; the server goes on")
