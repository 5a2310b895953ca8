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
"""

from __future__ import annotations

import array
import asyncio
import collections
import importlib
import io
import marshal
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import aem

__all__ = ["ClientDisconnected", "FileWrapper", "WSGIWorkers", "load_app", "worker_main"]

CHUNK = 64 * 1024       # one message's body payload at most
FIRST = 32 * 1024       # body bytes that ride in the request message (its head may be ~25 KiB)
RECV = 1 << 18          # receive buffer: larger than any message (the socket's send buffer bounds them)
_FDS = socket.CMSG_SPACE(array.array("i").itemsize)

_INBOX_MAX = 16         # worker messages the front holds before it stops reading that worker

# message kinds, front → worker
M_REQUEST = b"Q"        # marshal(request fields) + first body chunk
M_BODY = b"B"           # a body chunk; b"B" alone: the body is complete
M_ABORT = b"A"          # the client went away before the end of the body
# worker → front
M_HELLO = b"H"          # marshal(pid)
M_WHOLE = b"R"          # marshal((status, headers, body)): the whole response
M_START = b"S"          # marshal((status, headers))
M_DATA = b"D"           # a body chunk
M_FILE = b"F"           # marshal((offset, count)) + an fd (SCM_RIGHTS)
M_END = b"E"            # the response is complete
M_FAIL = b"X"           # the app failed before any byte of its response: 500


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

    def __init__(self, chan: socket.socket, first: bytes, more: bool) -> None:
        self.chan = chan
        self.buf = bytearray(first)
        self.more = more

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        if not self.more:
            return False
        msg = self.chan.recv(RECV)
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


def _handle(app: Any, chan: socket.socket, msg: bytes) -> None:
    """One request: environ, app call, response messages."""
    fields, first, more = marshal.loads(msg[1:])
    body = _Input(chan, first, more)
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
    address, ref = ev.payload
    app = load_app(ref)
    chan = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    chan.connect(address)
    chan.sendall(M_HELLO + marshal.dumps(os.getpid()))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the front decides when we stop
    try:
        while True:
            msg = chan.recv(RECV)
            if not msg:
                break
            if msg[:1] == M_REQUEST:
                _handle(app, chan, msg)
    except (ConnectionError, BrokenPipeError):
        pass
    finally:
        chan.close()
    os._exit(0)


# ---- the front's side --------------------------------------------------------------------------


class _Worker:
    """The front's end of one worker's channel."""

    __slots__ = ("busy", "chan", "dead", "inbox", "loop", "pid", "pool", "reading", "waiter")

    def __init__(self, pool: WSGIWorkers, chan: socket.socket) -> None:
        self.pool = pool
        self.chan = chan
        self.loop = pool.loop
        self.pid = 0
        self.busy = False
        self.dead = False
        self.inbox: collections.deque[tuple[bytes, int]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.reading = True
        self.loop.add_reader(chan.fileno(), self._readable)

    def _readable(self) -> None:
        chan = self.chan
        while True:
            try:
                data, anc, _flags, _addr = chan.recvmsg(RECV, _FDS)
            except BlockingIOError:
                break
            except OSError:
                data, anc = b"", []
            fd = -1
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
                    for extra in fds[1:]:
                        os.close(extra)
                    fd = fds[0] if fds else -1
            if not data:
                self.gone()
                break
            if data[:1] == M_HELLO and not self.pid:
                self.pid = marshal.loads(data[1:])
                self.pool._ready(self)
                continue
            self.inbox.append((data, fd))
            if len(self.inbox) >= _INBOX_MAX:
                # the client is slower than the app: leave the rest in the socket (the
                # worker blocks in send) until the front has passed these on
                self.reading = False
                self.loop.remove_reader(chan.fileno())
                break
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def gone(self) -> None:
        """The channel closed: the worker died (or was killed)."""
        if self.dead:
            return
        self.dead = True
        if self.reading:
            self.loop.remove_reader(self.chan.fileno())
        self.chan.close()
        while self.inbox:
            _, fd = self.inbox.popleft()
            if fd >= 0:
                os.close(fd)
        self.pool._lost(self)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next(self) -> tuple[bytes, int] | None:
        """The worker's next message (and its fd, or -1); None if the worker is gone."""
        while not self.inbox:
            if self.dead:
                return None
            self.waiter = self.loop.create_future()
            await self.waiter
            self.waiter = None
        item = self.inbox.popleft()
        if not self.reading and not self.dead and len(self.inbox) < _INBOX_MAX // 2:
            self.reading = True
            self.loop.add_reader(self.chan.fileno(), self._readable)
        return item


class WSGIWorkers:
    """The front's pool of WSGI workers, used as an ASGI app by :class:`aem.http.asgi.ASGIServer`.

    ``ref``: the app as ``module:attribute`` (each worker imports it; the
    template of the capsule pool has it imported already when the front did).
    ``workers``: how many capsules; ``timeout``: seconds an app call may
    take before its worker is killed and its client gets 504.
    """

    def __init__(self, ref: str, workers: int = 1, timeout: float = 30.0) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if not timeout > 0:
            raise ValueError("timeout must be > 0 seconds")
        self.ref = ref
        self.workers = workers
        self.timeout = timeout
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.idle: collections.deque[_Worker] = collections.deque()
        self.waiting: collections.deque[asyncio.Future[_Worker]] = collections.deque()
        self.all: set[_Worker] = set()
        self.closing = False
        self.killed = 0
        self.replaced = 0
        self._listen: socket.socket | None = None
        self._jobs: list[tuple[aem.UserEvent, int, int]] = []
        self._capsules: Any = None

    async def start(self) -> None:
        """Listen for the workers, start them, wait until each has said hello."""
        self.loop = asyncio.get_running_loop()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        address = f"\0aem-wsgi-{os.getpid()}-{id(self):x}"
        lsock.bind(address)
        lsock.listen(64)
        lsock.setblocking(False)
        self._listen = lsock
        self.loop.add_reader(lsock.fileno(), self._accept)
        self._capsules = aem.CapsulePool(size=self.workers, reserve=0)
        flags = aem.EVF_CAPSULE | aem.EVF_KEEPALIVE
        payload = (address, self.ref)
        for _ in range(self.workers):
            start = aem.UserEvent()
            eid = aem.register(start, worker_main, flags=flags, pool=self._capsules)

            def replace(ev: Any, start: aem.UserEvent = start) -> None:
                if self.closing:
                    return
                self.replaced += 1
                print(f"aem serve: WSGI worker {ev.pid} ended ({ev.returncode}); starting another",
                      file=sys.stderr, flush=True)
                start.fire(payload)

            exit_eid = aem.register(aem.ChildExit(job=eid), replace)
            self._jobs.append((start, eid, exit_eid))
        for start, _, _ in self._jobs:
            start.fire(payload)
        deadline = self.loop.time() + 30
        while len(self.idle) < self.workers:
            if self.loop.time() > deadline:
                raise RuntimeError(f"WSGI workers did not start ({len(self.idle)}/{self.workers} ready)")
            await asyncio.sleep(0.005)

    def _accept(self) -> None:
        assert self._listen is not None
        while True:
            try:
                chan, _ = self._listen.accept()
            except BlockingIOError:
                return
            except OSError:
                return
            chan.setblocking(False)
            w = _Worker(self, chan)
            self.all.add(w)

    def _ready(self, w: _Worker) -> None:
        self._release(w)

    def _lost(self, w: _Worker) -> None:
        self.all.discard(w)
        try:
            self.idle.remove(w)
        except ValueError:
            pass

    def _release(self, w: _Worker) -> None:
        w.busy = False
        if w.dead:
            return
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                w.busy = True
                fut.set_result(w)
                return
        self.idle.append(w)

    async def _acquire(self) -> _Worker:
        while self.idle:
            w = self.idle.popleft()
            if not w.dead:
                w.busy = True
                return w
        fut: asyncio.Future[_Worker] = self.loop.create_future()
        self.waiting.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(fut.result())
            raise

    def stats(self) -> dict[str, int]:
        """Workers alive, idle; requests waiting for one; killed past the timeout; replaced."""
        return {"workers": len(self.all), "idle": len(self.idle), "waiting": len(self.waiting),
                "killed": self.killed, "replaced": self.replaced}

    async def close(self) -> None:
        """Stop the workers (their channels close; their jobs are shut down) and the pool."""
        self.closing = True
        for w in list(self.all):
            w.gone()
        for fut in self.waiting:
            if not fut.done():
                fut.cancel()
        if self._listen is not None:
            self.loop.remove_reader(self._listen.fileno())
            self._listen.close()
            self._listen = None
        for _, eid, exit_eid in self._jobs:
            for e in (exit_eid, eid):
                try:
                    aem.control(e, aem.EVJOBSHTDN)
                except (aem.AemError, aem.UnknownEventError):
                    pass
        self._jobs.clear()
        if self._capsules is not None:
            pool, self._capsules = self._capsules, None
            await self.loop.run_in_executor(None, lambda: pool.close(timeout=2.0))

    # -- one request (the ASGI app the front runs) ----------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any],
                       send: Callable[[dict[str, Any]], Any]) -> None:
        if scope["type"] == "lifespan":
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            msg = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            raise RuntimeError("WSGI apps serve HTTP only")
        msg = await receive()
        body: bytes = msg.get("body", b"")
        streamed = msg.get("more_body", False)   # the rest of the body is still arriving
        fields = (scope["method"], scope["scheme"], scope["root_path"], scope["raw_path"],
                  scope["query_string"], scope["headers"],
                  tuple(scope["server"]) if scope["server"] else None,
                  tuple(scope["client"]) if scope["client"] else None, scope["http_version"],
                  0 if streamed else len(body))
        w = await self._acquire()
        # --timeout bounds how long the worker keeps the front waiting for its next message (the
        # app call until its head, then each chunk); not the time the client takes to read
        timer: asyncio.TimerHandle | None = self.loop.call_later(self.timeout, self._hung, w)
        started = False
        clean = False        # the worker's answer was read to its end: it may take the next request
        pump: asyncio.Task[bool] | None = None
        try:
            first = body[:FIRST]
            more = streamed or len(body) > FIRST
            w.chan.send(M_REQUEST + marshal.dumps((fields, first, more)))
            if more:
                # the body goes on beside the answer (the app may answer before reading it all)
                pump = self.loop.create_task(self._pump(w, body[FIRST:], streamed, receive))
            while True:
                if timer is None:
                    timer = self.loop.call_later(self.timeout, self._hung, w)
                item = await w.next()
                timer.cancel()
                timer = None
                if item is None:
                    if started:
                        raise ConnectionError("the WSGI worker died during the response")
                    status = 504 if w.pid and self._timed_out(w) else 502
                    text = b"504 Gateway Timeout\n" if status == 504 else b"502 Bad Gateway\n"
                    await _plain(send, status, text)
                    return
                data, fd = item
                kind = data[:1]
                if kind == M_WHOLE:
                    clean = True
                    status, headers, payload = marshal.loads(data[1:])
                    await send({"type": "http.response.start", "status": status,
                                "headers": _encode(headers)})
                    await send({"type": "http.response.body", "body": payload})
                    break
                if kind == M_START:
                    status, headers = marshal.loads(data[1:])
                    await send({"type": "http.response.start", "status": status,
                                "headers": _encode(headers)})
                    started = True
                elif kind == M_DATA:
                    await send({"type": "http.response.body", "body": data[1:], "more_body": True})
                elif kind == M_FILE:
                    offset, count = marshal.loads(data[1:])
                    with os.fdopen(fd, "rb") as f:
                        await send({"type": "http.response.zerocopysend", "file": f, "offset": offset,
                                    "count": count, "more_body": True})
                elif kind == M_END:
                    clean = True
                    await send({"type": "http.response.body", "body": b""})
                    break
                elif kind == M_FAIL:
                    clean = True
                    if started:
                        raise RuntimeError("the WSGI app failed during its response")
                    await _plain(send, 500, b"500 Internal Server Error\n")
                    break
            if pump is not None and not await pump:
                clean = False   # the body could not be passed on whole: the worker is out of step
        finally:
            if timer is not None:
                timer.cancel()
            if pump is not None and not pump.done():
                pump.cancel()
            if not clean and not w.dead:
                # cancelled or failed mid-answer: what the worker still sends would be read as
                # the next request's answer — end it (the pool starts another)
                self._kill(w)
            self._release(w)

    async def _pump(self, w: _Worker, rest: bytes, streamed: bool,
                    receive: Callable[[], Any]) -> bool:
        """Pass the body on to the worker as it arrives, in ``CHUNK`` messages; end it with
        ``M_BODY`` alone (``M_ABORT`` if the client went away).  False if the worker went."""
        try:
            while True:
                view = memoryview(rest)
                for i in range(0, len(rest), CHUNK):
                    await self.loop.sock_sendall(w.chan, M_BODY + view[i:i + CHUNK])
                if not streamed:
                    break
                msg = await receive()
                if msg["type"] != "http.request":
                    await self.loop.sock_sendall(w.chan, M_ABORT)
                    return True
                rest = msg.get("body", b"")
                streamed = msg.get("more_body", False)
            await self.loop.sock_sendall(w.chan, M_BODY)
            return True
        except OSError:
            return False

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
        w.pid = -w.pid if w.pid > 0 else w.pid   # remember: this one timed out
        print(f"aem serve: WSGI worker {-w.pid} took longer than {self.timeout:g} s: killed",
              file=sys.stderr, flush=True)
        self._kill(w)

    @staticmethod
    def _timed_out(w: _Worker) -> bool:
        return w.pid < 0


def _encode(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]


async def _plain(send: Callable[[dict[str, Any]], Any], status: int, text: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": text})
