"""WSGI (PEP 3333) apps in capsules (``aem serve module:app --interface wsgi``).

::

    client ──► front (aem loop, aem.http.asgi): HTTP parsing, limits, timeouts, keep-alive
                 │  request + body, in SOCK_SEQPACKET messages (64 KiB each)
                 ▼
               an idle worker: an EVF_CAPSULE | EVF_KEEPALIVE capsule, forked from a
               template that has imported the app; builds the environ, calls the app
                 │  response: one message when small and whole; else status/headers,
                 │  chunks as the app yields them, files as descriptors (sendfile)
                 ▼
    client ◄── front: framing (Content-Length or chunked), sendfile, access log

* The front never blocks and never runs app code; a blocking app call ties
  up one worker, and requests go to whichever worker is idle (a slow
  handler does not hold up fast ones while another worker is free).
* ``wsgi.input`` reads the body as the front sends it; ``wsgi.file_wrapper``
  hands the file's descriptor to the front, which sends it with
  ``sendfile``; ``start_response`` takes ``exc_info`` (PEP 3333 rules).
* ``timeout``: a worker whose app call lasts longer is killed (SIGKILL) and
  replaced (its job's ``ChildExit`` fires its start event again); its client
  gets ``504`` (or, if the response had begun, the connection is closed).
  Other requests are not affected.
* A worker that dies (crash, OOM kill) fails only its request (502) and is
  replaced the same way.
* The front's thread runs as ``SCHED_BATCH`` while the workers serve
  (``yield_to_workers``): a request arriving while a worker runs the app then
  waits until that worker blocks (in its next read, or the app's own I/O)
  instead of preempting it for a read that cannot be dispatched anyway.  With
  one worker on the front's CPU this took the server's CPU per request from
  230 to 198 µs (Flask hello, medians of 10 interleaved rounds): two context
  switches per request instead of ~3.4, and the app's caches left warm.
"""

from __future__ import annotations

import array
import asyncio
import collections
import importlib
import io
import marshal
import mmap
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import aem

from .asgi import _Cycle
from .workers import same_user, shut_down_jobs

if TYPE_CHECKING:
    from .asgi import _Body, _HttpProtocol
    from .protocol import Request

__all__ = ["ClientDisconnected", "FileWrapper", "WSGIWorkers", "load_app", "worker_main"]

CHUNK = 64 * 1024       # one message's body payload at most
FIRST = 32 * 1024       # body bytes that ride in the request message (its head may be ~25 KiB)
RECV = 1 << 18          # receive buffer: larger than any message (the socket's send buffer bounds them)
_FDS = socket.CMSG_SPACE(array.array("i").itemsize)


class _Reader:
    """Reads whole messages of one channel into a buffer it keeps (``RECV`` bytes, made once;
    anonymous memory, so only the pages messages reach are ever resident).

    ``socket.recv(RECV)`` would allocate ``RECV`` bytes for every message and
    shrink them to its size: ~14 µs per call here for a message of a few
    hundred bytes (2.6 µs with this buffer), on each side of every request."""

    __slots__ = ("buf", "view")

    def __init__(self) -> None:
        self.buf = mmap.mmap(-1, RECV)
        self.view = memoryview(self.buf)

    def recv(self, chan: socket.socket) -> bytes:
        """The next message (b"" when the other end closed); blocking as ``chan`` is."""
        n = chan.recv_into(self.buf)
        return bytes(self.view[:n])

    def recvmsg(self, chan: socket.socket) -> tuple[bytes, list[tuple[int, int, bytes]]]:
        """The next message and its ancillary data (room for one descriptor)."""
        n, anc, _flags, _addr = chan.recvmsg_into([self.buf], _FDS)
        return bytes(self.view[:n]), anc


# message kinds, front → worker
M_REQUEST = b"Q"        # marshal(request fields) + first body chunk
M_BODY = b"B"           # a body chunk; b"B" alone: the body is complete
M_ABORT = b"A"          # the client went away before the end of the body
# worker → front
M_HELLO = b"H"          # marshal((pid, tag)): tag names the job (a temporary worker's is < 0)
M_WHOLE = b"R"          # marshal((status, headers, body)): the whole response
M_START = b"S"          # marshal((status, headers))
M_DATA = b"D"           # a body chunk
M_FILE = b"F"           # marshal((offset, count)) + an fd (SCM_RIGHTS)
M_END = b"E"            # the response is complete
M_FAIL = b"X"           # the app failed before any byte of its response: 500
M_WANT = b"W"           # the app reads a body the client sends after 100 Continue: ask for it


def load_app(ref: str) -> Any:
    """Import ``module:attribute`` (``attribute`` may be dotted) and return the object."""
    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"expected module:app, got {ref!r}")
    module = importlib.import_module(mod_name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r}") from None
    return obj


# ---- the worker (runs in a capsule) ---------------------------------------------------------


class FileWrapper:
    """``wsgi.file_wrapper``: a file the front sends with ``sendfile`` (iterable as a fallback)."""

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def fileno(self) -> int | None:
        try:
            return int(self.filelike.fileno())
        except (AttributeError, OSError, io.UnsupportedOperation):
            return None

    def __iter__(self) -> Iterator[bytes]:
        while True:
            data = self.filelike.read(self.blksize)
            if not data:
                return
            yield data


class ClientDisconnected(OSError):
    """Raised by ``wsgi.input``: the client went away before the end of the request body."""


class _Input(io.RawIOBase):
    """``wsgi.input``: the request body, read from the front's messages as the app asks."""

    def __init__(self, chan: socket.socket, reader: _Reader, first: bytes, more: bool,
                 expect: bool = False) -> None:
        self.chan = chan
        self.reader = reader
        self.buf = bytearray(first)
        self.more = more
        self.expect = expect   # the client waits for 100 Continue: ask the front on the first read

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        if not self.more:
            return False
        if self.expect:
            self.expect = False
            self.chan.sendall(M_WANT)
        msg = self.reader.recv(self.chan)
        if msg[:1] == M_ABORT:
            self.more = False
            raise ClientDisconnected("the client went away before the end of the request body")
        if not msg or msg[:1] != M_BODY:
            raise ConnectionError("the front closed the request body")
        if len(msg) == 1:
            self.more = False
            return False
        self.buf += msg[1:]
        return True

    def read(self, size: int | None = -1) -> bytes:  # type: ignore[override]
        if size is None or size < 0:
            while self._fill():
                pass
            data = bytes(self.buf)
            self.buf.clear()
            return data
        while len(self.buf) < size and self._fill():
            pass
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def readline(self, size: int | None = -1) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0 or not self._fill():
                break
        end = len(self.buf) if i < 0 else i + 1
        if size is not None and size >= 0:
            end = min(end, size)
        data = bytes(self.buf[:end])
        del self.buf[:end]
        return data

    def drain(self) -> None:
        """Read and drop what the app left of the body (the next request follows it)."""
        if self.expect:
            return     # never asked for: the client does not send it
        try:
            while self._fill():
                self.buf.clear()
        except ClientDisconnected:
            pass
        self.buf.clear()


def _environ(fields: tuple[Any, ...], body: _Input) -> dict[str, Any]:
    (method, scheme, root_path, raw_path, query, headers, server, client, version, length) = fields
    path = raw_path
    if b"%" in path:
        from urllib.parse import unquote_to_bytes

        path = unquote_to_bytes(path)
    script = root_path.encode("utf-8").decode("latin-1")
    path_info = path.decode("latin-1")
    if script and path_info.startswith(script):
        path_info = path_info[len(script):]
    env: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": script,
        "PATH_INFO": path_info,
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_PROTOCOL": f"HTTP/{version}",
        "SERVER_NAME": server[0] if server else "localhost",
        "SERVER_PORT": str(server[1]) if server else "80",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
        "wsgi.input_terminated": True,
    }
    if client:
        env["REMOTE_ADDR"] = client[0]
        env["REMOTE_PORT"] = str(client[1])
    for name, value in headers:
        key = name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            env[key] = text
            continue
        key = "HTTP_" + key
        if key in env:
            env[key] += ("; " if key == "HTTP_COOKIE" else ",") + text
        else:
            env[key] = text
    if length and "CONTENT_LENGTH" not in env:   # a chunked body, decoded by the front
        env["CONTENT_LENGTH"] = str(length)
    return env


class _Responder:
    """``start_response`` and the sending of one response, PEP 3333's rules."""

    def __init__(self, chan: socket.socket) -> None:
        self.chan = chan
        self.status: int = 0
        self.headers: list[tuple[str, str]] = []
        self.sent = False

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status:
            raise RuntimeError("start_response called twice without exc_info")
        if not isinstance(status, str) or len(status) < 3 or not status[:3].isdigit():
            raise ValueError(f"bad WSGI status {status!r}")
        for name, value in headers:
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"WSGI header fields are str pairs, not {name!r}: {value!r}")
        self.status = int(status[:3])
        self.headers = [(n, v) for n, v in headers]
        return self.write

    def content_length(self) -> int | None:
        """The ``Content-Length`` the app announced, or None."""
        for name, value in self.headers:
            if len(name) == 14 and name.lower() == "content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    def _start(self) -> None:
        if not self.sent:
            if not self.status:
                raise RuntimeError("the app sent a body before calling start_response")
            self.sent = True
            self.chan.sendall(M_START + marshal.dumps((self.status, self.headers)))

    def write(self, data: bytes) -> None:
        """The legacy ``write()`` callable (and every body chunk)."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"a WSGI body chunk is bytes, not {type(data).__name__}")
        self._start()
        view = memoryview(data)
        for i in range(0, len(view), CHUNK):
            self.chan.sendall(M_DATA + view[i:i + CHUNK])

    def send_file(self, wrapper: FileWrapper) -> bool:
        fd = wrapper.fileno()
        if fd is None:
            return False
        try:
            offset = os.lseek(fd, 0, os.SEEK_CUR)
            size = os.fstat(fd).st_size
        except OSError:
            return False
        count = max(0, size - offset)
        self._start()
        self.chan.sendmsg([M_FILE + marshal.dumps((offset, count))],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        return True


def _handle(app: Any, chan: socket.socket, reader: _Reader, msg: bytes) -> None:
    """One request: environ, app call, response messages (``reader``: the channel's)."""
    fields, first, more, expect = marshal.loads(msg[1:])
    body = _Input(chan, reader, first, more, expect)
    env = _environ(fields, body)
    resp = _Responder(chan)
    result: Any = None
    try:
        try:
            result = app(env, resp.start_response)
            if (not resp.sent and resp.status and isinstance(result, (list, tuple))
                    and all(type(c) is bytes for c in result)):
                data = b"".join(result)
                if len(data) <= CHUNK:
                    chan.sendall(M_WHOLE + marshal.dumps((resp.status, resp.headers, data)))
                    return
            if isinstance(result, FileWrapper) and resp.send_file(result):
                chan.sendall(M_END)
                return
            it = iter(result)
            want = resp.content_length()
            if not resp.sent and want is not None and want <= CHUNK:
                # a small body of announced length (Flask, Django ...): gather it, one message
                parts: list[bytes] = []
                got = 0
                for chunk in it:
                    if type(chunk) is not bytes:
                        raise TypeError(f"a WSGI body chunk is bytes, not {type(chunk).__name__}")
                    parts.append(chunk)
                    got += len(chunk)
                    if got >= want or resp.sent:
                        break
                if not resp.sent:
                    data = b"".join(parts)
                    rest = next(it, None)
                    if rest is None:
                        chan.sendall(M_WHOLE + marshal.dumps((resp.status, resp.headers, data)))
                        return
                    parts = [data, rest]
                for chunk in parts:
                    resp.write(chunk)
            for chunk in it:
                if chunk:
                    resp.write(chunk)
            resp._start()
            chan.sendall(M_END)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
    except (ConnectionError, BrokenPipeError):
        raise
    except Exception:
        text = traceback.format_exc()
        print(f"aem serve: exception in the WSGI app for {env['REQUEST_METHOD']} {env['PATH_INFO']}:\n"
              f"{text}", file=sys.stderr, flush=True)
        chan.sendall(M_FAIL if not resp.sent else M_FAIL + b"sent")
    finally:
        body.drain()


def worker_main(ev: Any) -> None:
    """The handler of a worker's start event, run in its capsule: serve requests until the front goes."""
    address, ref, tag = ev.payload
    app = load_app(ref)
    chan = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    chan.connect(address)
    chan.sendall(M_HELLO + marshal.dumps((os.getpid(), tag)))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the front decides when we stop
    reader = _Reader()
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        _set_policy(os.SCHED_OTHER)    # (inherited from a front that yields to its workers)
    try:
        while True:
            msg = reader.recv(chan)
            if not msg:
                break
            if msg[:1] == M_REQUEST:
                _handle(app, chan, reader, msg)
    except (ConnectionError, BrokenPipeError):
        pass
    finally:
        chan.close()
    os._exit(0)


# ---- the front's side --------------------------------------------------------------------------


_LONG_PATHS = 4096      # slow paths remembered (the set is cleared when full)


def _set_policy(policy: int) -> bool:
    """Set this thread's scheduling policy (priority 0); False if the system refuses."""
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True


def _warmth(w: _Worker) -> float:
    return w.warm


def _take_fd(anc: list[tuple[int, int, bytes]]) -> int:
    """The descriptor passed with a message (SCM_RIGHTS), or -1; any extra ones are closed."""
    fd = -1
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
            for extra in fds[1:]:
                os.close(extra)
            if fds:
                fd = fds[0]
    return fd


class _Worker:
    """The front's end of one worker's channel: its messages go to the exchange it serves."""

    __slots__ = ("chan", "dead", "deadline", "exchange", "extra", "fd", "loop", "pid", "pool", "reading",
                 "since", "warm")

    def __init__(self, pool: WSGIWorkers, chan: socket.socket) -> None:
        self.pool = pool
        self.chan = chan
        self.fd = chan.fileno()
        self.loop = pool.loop
        self.pid = 0
        self.dead = False
        self.exchange: _Exchange | None = None
        #: loop.time() by which the worker owes its next message (0: it owes none now)
        self.deadline = 0.0
        #: loop.time() since when it serves its request, or has been idle
        self.since = 0.0
        #: loop.time() it last ran, as far as the front knows: when it answered its last
        #: request, or when it began it if that took long (it slept or waited meanwhile)
        self.warm = 0.0
        #: the job tag of a temporary (burst) worker, else 0
        self.extra = 0
        self.reading = True
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        chan = self.chan
        while self.reading:
            try:
                data, anc = self.pool.reader.recvmsg(chan)
            except BlockingIOError:
                return
            except OSError:
                data, anc = b"", []
            fd = _take_fd(anc) if anc else -1
            if not data:
                self.gone()
                return
            ex = self.exchange
            if ex is not None:
                if ex.message(data, fd):
                    return      # the answer is complete: the worker sends nothing more unasked
            elif data[:1] == M_HELLO and not self.pid:
                self.pid, tag = marshal.loads(data[1:])
                self.pool._hello(self, tag)
            elif fd >= 0:
                os.close(fd)

    def pause(self) -> None:
        """Leave the worker's messages in the socket (it blocks in send) until :meth:`resume`."""
        if self.reading and not self.dead:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def resume(self) -> None:
        if not self.reading and not self.dead:
            self.reading = True
            self.loop.add_reader(self.fd, self._readable)

    def gone(self) -> None:
        """The channel closed: the worker died (or was killed)."""
        if self.dead:
            return
        self.dead = True
        if self.reading:
            self.loop.remove_reader(self.fd)
        self.chan.close()
        self.pool._lost(self)
        ex = self.exchange
        self.exchange = None
        if ex is not None:
            ex.lost(self)


class _Exchange(_Cycle):
    """One request answered by a worker: the front's part, with no ASGI messages in between.

    The request goes to the worker in one message (and its body, if more than
    ``FIRST`` bytes or still arriving, in ``CHUNK`` messages from a task); the
    worker's messages are handled as they are read — a whole small response is
    framed and written at once.  The framing is :class:`aem.http.asgi._Cycle`'s.
    """

    __slots__ = ("ended", "finished", "pool", "pump", "sending", "stuck", "want", "worker")

    def __init__(self, pool: WSGIWorkers, conn: _HttpProtocol, req: Request,
                 body: _Body | None) -> None:
        self._setup(conn, req, body)
        self.pool = pool
        self.worker: _Worker | None = None
        self.pump: asyncio.Task[None] | None = None
        self.want: asyncio.Future[None] | None = None
        self.stuck: asyncio.TimerHandle | None = None
        self.sending = False       # a file is being sent (the worker's channel is not read)
        self.ended = False         # the worker's answer is complete (or the worker is gone)
        self.finished = False
        pool._dispatch(self)

    def begin(self, w: _Worker) -> None:
        """The worker ``w`` takes the request."""
        self.worker = w
        w.exchange = self
        pool = self.pool
        w.since = pool.loop.time()
        w.deadline = w.since + pool.timeout
        if pool._ticker is None:
            pool._arm()
        req = self.req
        conn = self.conn
        target = req.target
        i = target.find("?")
        raw_path = target if i < 0 else target[:i]
        if not raw_path.startswith("/"):
            raw_path = req.path
        body = self.body
        data = req.body if body is None else b""
        fields = (req.method, "http", conn.server.root_path, raw_path.encode("latin-1"),
                  b"" if i < 0 else target[i + 1:].encode("latin-1"), req.raw_headers,
                  conn.server_addr, conn.client, req.version, len(data))
        expect = body is not None and body.expect and not body.continued
        more = body is not None or len(data) > FIRST
        try:
            w.chan.send(M_REQUEST + marshal.dumps((fields, data[:FIRST], more, expect)))
        except OSError:
            pool._kill(w)          # (an idle worker's channel has room: it is gone)
            return
        if more:
            self.pump = pool.loop.create_task(self._pump(w, data[FIRST:], expect))

    async def _pump(self, w: _Worker, rest: bytes, expect: bool) -> None:
        """Pass the rest of the body to the worker, as it arrives; then ``M_BODY`` alone
        (``M_ABORT`` if the client went away).  With ``expect``, not before the app reads it."""
        loop = self.pool.loop
        try:
            if expect:
                self.want = loop.create_future()
                await self.want
            streamed = self.body is not None
            while True:
                view = memoryview(rest)
                for i in range(0, len(rest), CHUNK):
                    await loop.sock_sendall(w.chan, M_BODY + view[i:i + CHUNK])
                if not streamed:
                    break
                msg = await self.receive()
                if msg["type"] != "http.request":
                    await loop.sock_sendall(w.chan, M_ABORT)
                    return
                rest = msg.get("body", b"")
                streamed = msg.get("more_body", False)
            await loop.sock_sendall(w.chan, M_BODY)
        except OSError:
            pass                   # the worker is gone: its channel's reader says so
        finally:
            self.pump = None
            if self.ended:
                self._finish()

    def message(self, data: bytes, fd: int) -> bool:
        """A message of the worker's answer; True when it was the last one."""
        kind = data[:1]
        conn = self.conn
        if kind == M_WHOLE:
            if not conn.closed:
                status, headers, payload = marshal.loads(data[1:])
                self._set_head(status, headers)
                self._body(payload, False)
            self._end()
            return True
        if kind == M_START:
            if not conn.closed:
                status, headers = marshal.loads(data[1:])
                self._set_head(status, headers)
        elif kind == M_DATA:
            if not conn.closed:
                self._body(data[1:], True)
        elif kind == M_END:
            if not conn.closed:
                self._body(b"", False)
            self._end()
            return True
        elif kind == M_FAIL:
            if not conn.closed:
                if not self.head_sent:
                    self._fail(500)
                else:
                    conn.http.closing = True   # the framing cannot be completed
                    conn.transport.close()
            self._end()
            return True
        elif kind == M_FILE:
            offset, count = marshal.loads(data[1:])
            self._file(fd, offset, count)
            return False
        elif kind == M_WANT:
            if self.want is not None and not self.want.done():
                self.want.set_result(None)
        elif fd >= 0:
            os.close(fd)
        w = self.worker
        assert w is not None
        if conn.write_paused and not conn.closed:
            # the client is slower than the app: the worker waits in its send (the time the
            # client takes does not count against --timeout; the server's send_timeout does)
            w.pause()
            w.deadline = 0.0
            if self.stuck is None:
                self.stuck = self.pool.loop.call_later(conn.server.send_timeout, conn._stuck)
        else:
            w.deadline = self.pool.loop.time() + self.pool.timeout
        return False

    def writable(self) -> None:
        w = self.worker
        if w is not None and not w.reading and not self.sending:
            if self.stuck is not None:
                self.stuck.cancel()
                self.stuck = None
            w.deadline = self.pool.loop.time() + self.pool.timeout
            w.resume()

    def _file(self, fd: int, offset: int, count: int) -> None:
        w = self.worker
        assert w is not None
        w.pause()
        w.deadline = 0.0
        self.sending = True
        self.pool.loop.create_task(self._send_file(w, fd, offset, count))

    async def _send_file(self, w: _Worker, fd: int, offset: int, count: int) -> None:
        conn = self.conn
        try:
            with os.fdopen(fd, "rb") as f:
                if not conn.closed:
                    await self._sendfile({"file": f, "offset": offset, "count": count,
                                          "more_body": True})
        except (OSError, RuntimeError):
            if not conn.closed:
                conn.http.closing = True
                conn.transport.close()
        finally:
            self.sending = False
            if self.worker is w and not w.dead:
                w.deadline = self.pool.loop.time() + self.pool.timeout
                w.resume()

    def _end(self) -> None:
        """The worker's answer is complete: it may take the next request once the body is passed."""
        self.ended = True
        w = self.worker
        if w is not None:
            w.deadline = 0.0
        pump = self.pump
        if pump is not None and self.want is not None and not self.want.done():
            pump.cancel()          # answered without reading a body the client waits to send
        elif pump is None:
            self._finish()

    def lost(self, w: _Worker) -> None:
        """The worker died (or was killed past the timeout) before its answer was complete."""
        if self.ended:
            return
        conn = self.conn
        if not conn.closed:
            if not self.head_sent and not self.response_done:
                timed_out = w.pid < 0
                conn.simple(self.req, 504 if timed_out else 502,
                            b"504 Gateway Timeout\n" if timed_out else b"502 Bad Gateway\n")
                self.response_done = True
            else:
                conn.http.closing = True
                conn.transport.close()
        self.ended = True
        self.worker = None
        if self.pump is not None:
            self.pump.cancel()
        else:
            self._finish()

    def cancel(self) -> None:
        w = self.worker
        if w is not None and not self.ended:
            self.pool._kill(w)
        elif w is None and not self.finished:
            self._leave_queue()

    def wake(self) -> None:
        super().wake()
        if self.worker is None and self.conn.closed and not self.finished:
            self._leave_queue()     # the client left while the request waited for a worker

    def _leave_queue(self) -> None:
        try:
            self.pool.waiting.remove(self)
        except ValueError:
            pass
        self.ended = True
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.stuck is not None:
            self.stuck.cancel()
            self.stuck = None
        w = self.worker
        self.worker = None
        if w is not None:
            w.exchange = None
            w.deadline = 0.0
            if not w.dead:
                w.resume()
                self.pool._release(w, self.req.path)
        conn = self.conn
        conn.server.stats.active -= 1
        if conn.closed:
            if conn.cycle is self:
                conn.cycle = None
        else:
            conn.cycle_done()


class WSGIWorkers:
    """The WSGI workers of a front: :meth:`direct` answers requests of an
    :class:`aem.http.asgi.ASGIServer` (its ``direct`` hook) with them.

    ``ref``: the app as ``module:attribute`` (each worker imports it; the
    template of the capsule pool has it imported already when the front did).
    ``workers``: how many capsules serve steadily; ``timeout``: seconds a
    worker may keep the front waiting for its next message before it is
    killed (its client gets 504) and replaced.

    Which idle worker takes a request: the one that ran last (its caches are
    the warmest), except for a path whose last request took ``burst_after``
    seconds or more (a slow handler): it gets the one that ran longest ago.

    Burst workers: when requests wait for a worker while one has been busy
    with a single request for ``burst_after`` seconds (a slow handler), a
    temporary worker is started from the capsule pool (a ready capsule: no
    fork, no import), at most ``burst`` of them at a time (0: never); one
    that has been idle for ``burst_idle`` seconds is retired (its process
    ends; the pool keeps its ready capsules).  A temporary worker that dies
    or hangs past ``timeout`` is not replaced.
    """

    def __init__(self, ref: str, workers: int = 1, timeout: float = 30.0, *, burst: int | None = None,
                 burst_after: float = 0.02, burst_idle: float = 2.0,
                 yield_to_workers: bool = True) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if not timeout > 0:
            raise ValueError("timeout must be > 0 seconds")
        if burst is None:
            burst = workers
        if burst < 0:
            raise ValueError("burst must be >= 0")
        if not (burst_after > 0 and burst_idle > 0):
            raise ValueError("burst_after and burst_idle must be > 0 seconds")
        self.ref = ref
        self.workers = workers
        self.timeout = timeout
        self.burst = burst
        self.burst_after = burst_after
        self.burst_idle = burst_idle
        self.yield_to_workers = yield_to_workers
        #: the policy the front's thread had before it yielded to the workers (None: not changed)
        self._policy: int | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.idle: list[_Worker] = []
        self.waiting: collections.deque[_Exchange] = collections.deque()
        #: paths whose last request took ``burst_after`` or longer (see :meth:`_pick`)
        self._long: set[str] = set()
        self.all: set[_Worker] = set()
        self.closing = False
        self.killed = 0
        self.replaced = 0
        self.bursts = 0            # temporary workers started
        self.retired = 0           # ... and retired when idle
        self._address = ""
        self.reader = _Reader()    # the workers' messages (the front reads one at a time)
        self._listen: socket.socket | None = None
        self._jobs: list[tuple[aem.UserEvent, int, int]] = []
        # temporary workers' jobs by tag (-1, -2, ...), from their start to their process's end
        self._extras: dict[int, tuple[aem.UserEvent, int, int]] = {}
        self._extra_tags = 0
        self._starting: set[int] = set()   # tags of temporary workers not yet said hello
        self._capsules: Any = None
        self._ticker: asyncio.TimerHandle | None = None
        self._burst_check: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Listen for the workers, start them, wait until each has said hello."""
        self.loop = asyncio.get_running_loop()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        address = self._address = f"\0aem-wsgi-{os.getpid()}-{id(self):x}"
        lsock.bind(address)
        lsock.listen(64)
        lsock.setblocking(False)
        self._listen = lsock
        self.loop.add_reader(lsock.fileno(), self._accept)
        # as many ready capsules as burst workers may take at once (they start with no fork)
        self._capsules = aem.CapsulePool(size=max(self.workers, self.burst), reserve=0)
        for tag in range(1, self.workers + 1):
            start = aem.UserEvent()
            eid = aem.register(start, worker_main, flags=aem.EVF_CAPSULE | aem.EVF_KEEPALIVE,
                               pool=self._capsules)

            def replace(ev: Any, start: aem.UserEvent = start, tag: int = tag) -> None:
                if self.closing:
                    return
                self.replaced += 1
                print(f"aem serve: WSGI worker {ev.pid} ended ({ev.returncode}); starting another",
                      file=sys.stderr, flush=True)
                start.fire((self._address, self.ref, tag))

            exit_eid = aem.register(aem.ChildExit(job=eid), replace)
            self._jobs.append((start, eid, exit_eid))
        for tag, (start, _, _) in enumerate(self._jobs, 1):
            start.fire((address, self.ref, tag))
        deadline = self.loop.time() + 30
        while len(self.idle) < self.workers:
            if self.loop.time() > deadline:
                raise RuntimeError(f"WSGI workers did not start ({len(self.idle)}/{self.workers} ready)")
            await asyncio.sleep(0.005)
        if self.yield_to_workers and self._policy is None:
            policy = os.sched_getscheduler(0)
            if policy == os.SCHED_OTHER and _set_policy(os.SCHED_BATCH):
                self._policy = policy

    def _tick_s(self) -> float:
        return min(0.5, self.timeout / 8, self.burst_idle / 4)

    def _arm(self) -> None:
        """A request began, or a temporary worker fell idle: tick while that lasts (an idle
        front sleeps)."""
        if self._ticker is None and not self.closing:
            self._ticker = self.loop.call_later(self._tick_s(), self._tick)

    def _tick(self) -> None:
        """Kill the workers that owe a message past their deadline, retire the temporary ones
        idle for ``burst_idle`` (one timer for all; it runs while a worker serves a request or
        a temporary one is idle)."""
        self._ticker = None
        now = self.loop.time()
        for w in [w for w in self.all if 0.0 < w.deadline <= now and w.exchange is not None]:
            self._hung(w)
        for w in [w for w in self.idle if w.extra and now - w.since >= self.burst_idle]:
            self.idle.remove(w)
            self.retired += 1
            w.gone()               # its channel closes: worker_main returns, the process ends
        if any(w.exchange is not None for w in self.all) or any(w.extra for w in self.idle):
            self._arm()

    # -- burst workers -----------------------------------------------------------------------

    def _check_burst(self) -> None:
        """Requests wait: start a temporary worker for each worker that has been busy with one
        request for ``burst_after`` seconds (stuck in a slow handler), beyond those already
        started; look again when the next busy one would count (while requests still wait)."""
        self._burst_check = None
        if self.closing or not self.waiting or len(self._extras) >= self.burst:
            return
        now = self.loop.time()
        after = self.burst_after
        stuck = 0
        due = now + after
        for w in self.all:
            if w.exchange is not None:
                if now - w.since >= after:
                    stuck += 1
                else:
                    due = min(due, w.since + after)
        if stuck > len(self._extras) and not self._starting:
            self._start_extra()
        self._burst_check = self.loop.call_at(due, self._check_burst)

    def _start_extra(self) -> None:
        self._extra_tags -= 1
        tag = self._extra_tags
        start = aem.UserEvent()
        eid = aem.register(start, worker_main, flags=aem.EVF_CAPSULE | aem.EVF_KEEPALIVE,
                           pool=self._capsules)
        exit_eid = aem.register(aem.ChildExit(job=eid), lambda ev: self._extra_ended(tag))
        self._extras[tag] = (start, eid, exit_eid)
        self._starting.add(tag)
        self.bursts += 1
        start.fire((self._address, self.ref, tag))

    def _extra_ended(self, tag: int) -> None:
        """A temporary worker's process ended (retired, died or killed): end its jobs."""
        job = self._extras.pop(tag, None)
        if job is None:
            return
        self._starting.discard(tag)
        shut_down_jobs(job[1:])

    def _hello(self, w: _Worker, tag: int) -> None:
        if tag < 0:
            if tag not in self._extras:   # (its job ended meanwhile)
                w.gone()
                return
            w.extra = tag
            self._starting.discard(tag)
        self._release(w)

    # -- requests ------------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listen is not None
        while True:
            try:
                chan, _ = self._listen.accept()
            except OSError:
                return
            if not same_user(chan):  # not one of our workers (another user's process)
                chan.close()
                continue
            chan.setblocking(False)
            self.all.add(_Worker(self, chan))

    def direct(self, conn: _HttpProtocol, req: Request, body: _Body | None) -> _Exchange:
        """Answer ``req`` with a worker (the ``direct`` hook of :class:`ASGIServer`)."""
        return _Exchange(self, conn, req, body)

    def _dispatch(self, ex: _Exchange) -> None:
        idle = self.idle
        while idle:
            w = idle.pop() if len(idle) == 1 else self._pick(ex.req.path)
            if not w.dead:
                ex.begin(w)
                return
        self.waiting.append(ex)
        if self._burst_check is None and self.burst:
            self._check_burst()

    def _pick(self, path: str) -> _Worker:
        """Take the idle worker for a request to ``path`` (two or more are idle).

        A steady one first (temporary workers then stay idle when they are not
        needed, and retire); among them the one that ran last (its caches are
        the warmest) — unless the last request to ``path`` took long (a slow
        handler): that one gets the worker that ran longest ago, and the warm
        ones are left to the fast requests, for which a cold worker's first
        requests would cost the most."""
        idle = self.idle
        pool = [w for w in idle if not w.extra] or idle
        w = (min if path in self._long else max)(pool, key=_warmth)
        idle.remove(w)
        return w

    def _release(self, w: _Worker, path: str | None = None) -> None:
        """``w`` is free: it answered a request to ``path`` (None: it has just started)."""
        if w.dead:
            return
        now = self.loop.time()
        if path is not None and now - w.since >= self.burst_after:
            w.warm = w.since       # it slept or waited most of that time
            if len(self._long) >= _LONG_PATHS:
                self._long.clear()
            self._long.add(path)
        else:
            w.warm = now
            if path is not None and self._long:
                self._long.discard(path)
        while self.waiting:
            ex = self.waiting.popleft()
            if not ex.finished:
                ex.begin(w)
                return
        w.since = now
        self.idle.append(w)
        if w.extra and self._ticker is None:
            self._arm()

    def _lost(self, w: _Worker) -> None:
        self.all.discard(w)
        try:
            self.idle.remove(w)
        except ValueError:
            pass

    def stats(self) -> dict[str, int]:
        """Workers alive (temporary ones included), idle; requests waiting for one; killed
        past the timeout; replaced; temporary (burst) workers serving or starting now, started
        in all, retired.  (The ``burst`` bound also counts retired ones whose process has not
        ended yet.)"""
        return {"workers": len(self.all), "idle": len(self.idle), "waiting": len(self.waiting),
                "killed": self.killed, "replaced": self.replaced,
                "extra": sum(1 for w in self.all if w.extra) + len(self._starting),
                "bursts": self.bursts, "retired": self.retired}

    async def close(self) -> None:
        """Stop the workers (their channels close; their jobs are shut down) and the pool."""
        self.closing = True
        for timer in (self._ticker, self._burst_check):
            if timer is not None:
                timer.cancel()
        self._ticker = self._burst_check = None
        if self._policy is not None:
            _set_policy(self._policy)
            self._policy = None
        for w in list(self.all):
            w.gone()
        if self._listen is not None:
            self.loop.remove_reader(self._listen.fileno())
            self._listen.close()
            self._listen = None
        jobs = [*self._jobs, *self._extras.values()]
        shut_down_jobs(e for _, eid, exit_eid in jobs for e in (exit_eid, eid))
        self._jobs.clear()
        self._extras.clear()
        if self._capsules is not None:
            pool, self._capsules = self._capsules, None
            await self.loop.run_in_executor(None, lambda: pool.close(timeout=2.0))

    def _kill(self, w: _Worker) -> None:
        pid = abs(w.pid)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        w.gone()

    def _hung(self, w: _Worker) -> None:
        self.killed += 1
        w.pid = -w.pid if w.pid > 0 else w.pid   # remember: this one timed out (504)
        print(f"aem serve: WSGI worker {-w.pid} took longer than {self.timeout:g} s: killed",
              file=sys.stderr, flush=True)
        self._kill(w)
