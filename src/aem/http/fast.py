"""AEMhttpd's native per-request path: the glue between the server and ``aem._core.HttpFast``.

For a complete, simple request head at the start of what a connection read
(``GET``/``HEAD``, origin-form target, ``HTTP/1.1``, one valid ``Host``, no
body, no ``Transfer-Encoding``/``Content-Length``/``Connection``/``Expect``/
``Upgrade``; see ``src/aem/_core/http_parse.h``), C parses the head in one
pass and answers it:

* with no app, a small file from the fast path's cache is written with no
  Python at all;
* with an app, the app is called once with a ready :class:`~.protocol.Request`,
  and a plain :class:`~.app.Response` (status 200..599 but 204/304, ``str``
  header pairs) is serialised in C; when it returns None, the cached file;
* the responses of a batch of pipelined requests leave in one ``send()``.

Anything else — a partial or unusual head, a status-page request, an app
exception or unusual result, a file not in the cache, a send that would
block — goes the full way: the request (if the app already saw it) through
:meth:`HTTPServer._answer`, the remaining bytes through httptools.  The fast
path may defer, never accept what the full path rejects, and writes the same
bytes (``tests/test_http_fast_diff.py`` checks both paths on generated and
mutated requests).

Where it runs: a connection's ``aem.Read`` is registered with the handler
:meth:`FastPath.handler` returns, an ``aem._core.HttpReadHook``; the engine
recognises it and runs the C path on the bytes it read before any event
object exists (no Python frame for a cached file; one, the app's, for an app
request), moving the connection's idle deadline itself; only what is left
reaches ``_Conn.on_read``, which also tries the C path (one call) when it gets
bytes while the connection is between requests.

The access log: while the server keeps one, the C path writes each
answer's line into a buffer it owns (``HttpFast.log``/``take_log``, the same
Common Log Format line as :meth:`HTTPServer._log_line`), and the full path's
lines go into the same buffer, so lines keep the order of the answers; the
server writes the buffer to its log stream on every tick of its timer (at
least once a second), when it passes 64 KiB (the C path calls the server's
``_flush_log``) and when it stops.

The file cache is the server's small-file cache (:class:`~.static.CacheEntry`,
keyed by the resolved path) seen through :func:`cached_file`, the one place
that knows its shape: after the full path served a file from that cache, its
entry is copied here, keyed by the canonical target (one spelling per file:
``AEM_HTTP_CANONICAL``, whose resolved key is the target without its first
``/``), as ``(expiry, head after the Date line, body)``; it expires with the
entry it was copied from.  Requests with ``If-*`` or ``Range`` fields never
use it (the full path decides 304, 412, 206), nor do targets under
``/_aem/`` (the status page, an option of the server).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aem import _core

from . import status as _status
from .app import Response
from .protocol import _STATUS_LINES, IDLE, Request

if TYPE_CHECKING:
    from .server import HTTPServer, _Conn
    from .static import StaticFiles

__all__ = ["FastPath", "cached_file"]

MAX_ENTRIES = 1024   # files in the fast path's cache (all dropped when full)


def cached_file(static: StaticFiles, target: str) -> tuple[float, bytes, bytes] | None:
    """The static files' cache entry for the canonical ``target``: (expiry, head, body), or None.

    The narrow interface to :class:`~.static.StaticFiles`' small-file cache
    (a dict ``resolved key -> CacheEntry``; a canonical target's key is the
    target without its first ``/``).  ``head``: the entry's own header lines
    and ``Content-Length``, ending with the empty line (what follows the
    ``Date`` line of a kept-alive HTTP/1.1 200 answer).
    """
    entry = static.cache.get(target[1:])
    if entry is None:
        return None
    return entry.expires, entry.head + b"Content-Length: %d\r\n\r\n" % len(entry.body), entry.body


_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~/")


def _canonical(target: str) -> bool:
    """The targets the C path looks up in its cache (``AEM_HTTP_CANONICAL``)."""
    if not target.startswith("/") or not _PATH_CHARS.issuperset(target):
        return False
    segs = target.split("/")[1:]
    return all(s not in (".", "..") for s in segs) and all(segs[:-1])


class FastPath:
    """The fast path of one :class:`~.server.HTTPServer` (built by it at ``start()``).

    ``serve(conn, data)`` (the C method) answers what it can of ``data`` and
    returns the bytes left for the full parser.
    """

    __slots__ = ("_bytes", "_core", "_server", "log", "serve", "take_log")

    #: Who sees the status page, as the C path reads it (HTTPServer.status_page).
    STATUS_MODES = {True: 1, "loopback": 2}
    #: The oldest status snapshot the C path answers from, in seconds.
    STATUS_MAX_AGE = 2.0

    def __init__(self, server: HTTPServer) -> None:
        lim = server.limits
        self._server = server
        self._core = _core.HttpFast(
            server, server.app, Request, Response, _STATUS_LINES, server._by_class,
            server._server_line, _status.PATH.rsplit("/", 1)[0].encode() + b"/", self._slow,
            lim.max_request_line, lim.max_header_size, lim.max_headers)
        self._bytes = 0
        self.serve = self._core.serve
        #: Append a line to the access log buffer; take what it holds (bytes, UTF-8).
        self.log = self._core.log
        self.take_log = self._core.take_log
        if server.access_log is not None:
            self._core.set_log(server._flush_log)

    def handler(self, conn: _Conn) -> Callable[[Any], None]:
        """The handler of ``conn``'s ``aem.Read``: the engine runs the C path on the bytes
        first, before any event exists; what is left reaches ``conn.on_read``."""
        hook: Callable[[Any], None] = _core.HttpReadHook(self._core, conn, conn.on_read,
                                                         self._server._idle_ns)
        return hook

    def snapshot_status(self, data: dict[str, Any]) -> None:
        """Give the C path the status page's JSON around its live parts (see
        :func:`.status.json_parts`): it answers ``/_aem/status?format=json`` from it, with
        no Python, for the next :attr:`STATUS_MAX_AGE` seconds."""
        head, mid, tail = _status.json_parts(data)
        mode = self.STATUS_MODES.get(self._server.status_page, 0)
        self._core.set_status(mode, head, mid, tail, time.monotonic(), self.STATUS_MAX_AGE)

    @property
    def status_served(self) -> int:
        """Status page JSON answers the C path made."""
        return self._core.status_served

    @property
    def cache(self) -> dict[str, tuple[float, bytes, bytes]]:
        """The fast path's file cache: ``{target: (expiry, head after Date, body)}``."""
        cache: dict[str, tuple[float, bytes, bytes]] = self._core.cache
        return cache

    def _slow(self, conn: _Conn, rest: Any, pending: bytes | None, req: Request | None,
              result: object, exc: BaseException | None, err: int) -> Any:
        """What the C path hands back; returns the bytes left for the full parser.

        ``(rest, True)`` asks the C path to go on with ``rest``.
        """
        srv = self._server
        if err:
            srv.resets += 1
            conn.close()
            return b""
        http = conn.http
        if pending is not None:
            conn.out.append(pending)
            conn.out_len += len(pending)
            conn._block()
        if req is not None:
            srv._set_now(time.time())
            if exc is not None:
                srv.app_errors += 1
                srv._log_error(f"aem.http: exception in the app for {req.method} {req.target}:\n"
                               + "".join(traceback.format_exception(exc)))
                result = Response(b"500 Internal Server Error\n", 500)
            srv._answer(conn, req, result)
            if not conn.weid:
                conn.send_answers()
        if conn.closed or conn.lingering:
            return b""
        if not conn.weid:
            p = http.parser
            # back to the C path for the rest when nothing waits (no recursion: C loops)
            return rest, bool(rest) and not conn.out and p.phase == IDLE and not p.dead
        # the client does not take what is sent: what follows waits (as in the full path)
        if rest:
            events = http.receive(rest)
            if events:
                conn.backlog = events
        return b""

    def remember(self, static: StaticFiles, target: str, now: float) -> None:
        """Copy the static files' cache entry for ``target`` into the fast path's cache.

        Called by the server after the full path answered ``target`` with a file
        held in memory (a 200 from :class:`~.static.StaticFiles`)."""
        if static.cache_ttl <= 0 or not _canonical(target):
            return
        entry = cached_file(static, target)
        if entry is None or entry[0] <= now:
            return
        expiry, head, body = entry
        cache = self.cache
        old = cache.pop(target, None)
        if old is not None:
            self._bytes -= len(old[1]) + len(old[2])
        cost = len(head) + len(body)
        if len(cache) >= MAX_ENTRIES or self._bytes + cost > static.cache_max_bytes:
            cache.clear()
            self._bytes = 0
        cache[target] = (expiry, head, body)
        self._bytes += cost
