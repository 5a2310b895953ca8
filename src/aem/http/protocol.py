"""HTTP/1.1 without I/O: bytes in, request events out; responses rendered to bytes.

Nothing here touches a socket, a file or a clock of its own (the caller
passes the time when it matters), so every protocol decision can be tested by
feeding bytes (``tests/test_http_protocol.py``).  The server (:mod:`.server`)
moves the bytes; this module decides what they mean and what to answer.

Two layers, after h11:

* :class:`RequestParser` reads: :meth:`RequestParser.feed` takes the bytes
  that arrived and returns the events they complete, in order —
  :class:`Request` (one complete request, head and body), :data:`CONTINUE`
  (the client waits for ``100 Continue`` before its body), :class:`HttpError`
  (the stream is broken or over a limit: answer ``status`` and close; always
  the last event, and the parser ignores everything fed after it).  An empty
  list means "need more data".  A parser made with ``stream=True`` gives a
  request with a body as soon as its head is complete (``more_body`` True),
  then the body as ``bytes`` events as it arrives, then :data:`BODY_END`.
* :class:`Connection` is the whole connection's state machine: the parser,
  plus every decision about what goes back — keep-alive or close after a
  response, the framing of HEAD/1xx/204/304 responses, which timeout applies
  now (:attr:`RequestParser.timer`), the error responses and their ``Allow``
  list.  The server only moves the bytes it produces.

Parsing is done by llhttp (through ``httptools``); this module adds the
limits and checks llhttp does not have and turns errors into status codes:

=====================================================  ======
what                                                   status
=====================================================  ======
malformed request line, header or framing              400
HTTP/1.1 without ``Host``; two ``Host``; a bad ``Host``    400
``Transfer-Encoding`` in HTTP/1.0 (RFC 9112 §6.1)        400
``chunked`` given twice                                400
request target longer than ``max_request_line``        414
headers (or trailers) over ``max_header_size`` / ``max_headers``  431
unknown method token, or one not implemented           501 (+ ``Allow``)
a transfer coding other than ``chunked``               501
body over ``max_body``                                 413
bodies of all connections over ``max_buffered``        503
HTTP version other than 1.x (``HTTP/1.2`` is read as 1.1)  505
``RTSP/1.0`` and other protocols llhttp knows          505
=====================================================  ======
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Final

import httptools

from aem._core import simple_request as _simple_request

__all__ = [
    "ALLOW_METHODS", "BODY_END", "BODY_TIMER", "CONTINUE", "CONTINUE_RESPONSE", "HEADER_TIMER", "IDLE_TIMER",
    "IMPLEMENTED_METHODS", "KEEP", "REASONS", "BodyBudget", "Connection", "DateClock", "Headers",
    "HttpError", "Limits", "Request", "RequestParser", "StreamedRequest", "body_allowed", "error_response",
    "render_head",
]

#: Methods the server implements; llhttp knows ~40 more (WebDAV, RTSP ...): those get 501.
IMPLEMENTED_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
#: The ``Allow`` list of a 501 for a method the server does not implement.
ALLOW_METHODS: Final = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"

#: Reason phrases of the status codes the server sends.
REASONS: Final[dict[int, str]] = {
    100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
    206: "Partial Content", 301: "Moved Permanently", 302: "Found", 303: "See Other",
    304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 406: "Not Acceptable", 408: "Request Timeout", 409: "Conflict",
    410: "Gone", 411: "Length Required", 412: "Precondition Failed", 413: "Content Too Large",
    414: "URI Too Long", 415: "Unsupported Media Type", 416: "Range Not Satisfiable",
    417: "Expectation Failed", 422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

#: The interim response sent when a client asked for ``Expect: 100-continue``.
CONTINUE_RESPONSE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

_HTTP_1X = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/1\.[0-9]\r?\n")
_TOKEN_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64} [\x21-\x7e]")
_METHOD_STR = {m.encode(): m for m in IMPLEMENTED_METHODS}


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits of a request (bytes unless said otherwise).

    ``max_request_line``: the request target (URL) as sent — over it, 414.
    ``max_header_size``: the header lines together — over it, 431;
    ``max_headers``: their number — over it, 431.  ``max_body``: the body,
    after chunked decoding — over it, 413 (checked against
    ``Content-Length`` before any body byte is read); a body is held in
    one buffer, so a connection holds at most ``max_body`` bytes of it however
    it is chunked.  ``max_buffered``: the request-body bytes all connections
    of a server hold together — over it, 503 (see :class:`BodyBudget`).  The
    fields of a chunked body's trailer section count with the header fields.
    """

    max_request_line: int = 8192
    max_header_size: int = 16384
    max_headers: int = 100
    max_body: int = 1 << 20
    max_buffered: int = 64 << 20

    def __post_init__(self) -> None:
        for name in ("max_request_line", "max_header_size", "max_headers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_body < 0 or self.max_buffered < 0:
            raise ValueError("max_body and max_buffered must be >= 0")


class Headers(Mapping[str, str]):
    """The request's header fields: a read-only, case-insensitive mapping.

    Keys are lower-case ``str``; fields sent several times are joined with
    ``", "`` (``Set-Cookie`` never appears in requests).  :attr:`raw` keeps
    the fields as sent: ``(name, value)`` byte pairs, in order.  The mapping
    is built on first use, so requests whose headers nobody reads pay nothing.
    """

    __slots__ = ("_map", "raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw
        self._map: dict[str, str] | None = None

    def _build(self) -> dict[str, str]:
        m: dict[str, str] = {}
        for name, value in self.raw:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            m[key] = f"{m[key]}, {text}" if key in m else text
        self._map = m
        return m

    def __getitem__(self, key: str) -> str:
        m = self._map if self._map is not None else self._build()
        return m[key.lower()]

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        """The field's value (case-insensitive name), or ``default``."""
        m = self._map if self._map is not None else self._build()
        return m.get(key.lower(), default)

    def __contains__(self, key: object) -> bool:
        m = self._map if self._map is not None else self._build()
        return isinstance(key, str) and key.lower() in m

    def __iter__(self) -> Iterator[str]:
        m = self._map if self._map is not None else self._build()
        return iter(m)

    def __len__(self) -> int:
        m = self._map if self._map is not None else self._build()
        return len(m)

    def __repr__(self) -> str:
        return f"Headers({self.raw!r})"


class Request:
    """One complete HTTP request, as the client sent it.

    ``method`` (``"GET"`` ...), ``target`` (the request target as sent,
    ``str``, e.g. ``"/a%20b?x=1"``), ``version`` (``"1.1"`` or ``"1.0"``),
    ``headers`` (:class:`Headers`; ``raw_headers`` the byte pairs as sent),
    ``body`` (``bytes``, chunked encoding
    removed) and ``keep_alive`` (whether the client lets the connection stay
    open after the response, from the version and ``Connection``).
    ``more_body`` is True for a :class:`StreamedRequest`, whose body
    follows it as events (``RequestParser(stream=True)``).
    :attr:`path` and :attr:`query` split the target; ``client`` is the
    peer's address when the server knows it.
    """

    # (exactly these eight: the C fast path fills a Request's slots directly when it sees them)
    __slots__ = ("_headers", "body", "client", "keep_alive", "method", "raw_headers", "target",
                 "version")
    more_body = False

    def __init__(self, method: str, target: str, version: str,
                 raw_headers: list[tuple[bytes, bytes]], body: bytes = b"",
                 keep_alive: bool = True, client: object = None) -> None:
        self.method = method
        self.target = target
        self.version = version
        #: The header fields as sent: ``(name, value)`` byte pairs, in order.
        self.raw_headers = raw_headers
        self.body = body
        self.keep_alive = keep_alive
        self.client = client
        self._headers: Headers | None = None

    @property
    def headers(self) -> Headers:
        """The header fields as a case-insensitive mapping (:class:`Headers`)."""
        h = self._headers
        if h is None:
            h = self._headers = Headers(self.raw_headers)
        return h

    @property
    def path(self) -> str:
        """The path part of the target, still percent-encoded (``"/a%20b"``).

        For an absolute-form target (``http://host/p?q``) it is ``"/p"``;
        for ``*`` (``OPTIONS *``) it is ``"*"``.
        """
        t = self.target
        if not t.startswith("/") and t != "*":
            try:
                t = httptools.parse_url(t.encode("latin-1")).path.decode("latin-1") or "/"
            except httptools.HttpParserInvalidURLError:
                return t
        i = t.find("?")
        return t if i < 0 else t[:i]

    @property
    def query(self) -> str:
        """The query string after ``?`` (not decoded), or ``""``."""
        i = self.target.find("?")
        return "" if i < 0 else self.target[i + 1:]

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} HTTP/{self.version}>"


class StreamedRequest(Request):
    """A request given by a streaming parser at its head: its body follows as events."""

    __slots__ = ()
    more_body = True


class HttpError:
    """The request stream cannot go on: answer ``status`` (with ``detail`` as body) and close."""

    __slots__ = ("detail", "headers", "status")

    def __init__(self, status: int, detail: str = "",
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.status = status
        self.detail = detail
        #: Extra response fields (``Allow`` for an unimplemented method).
        self.headers = headers

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HttpError) and other.status == self.status

    def __hash__(self) -> int:
        return hash(self.status)

    def __repr__(self) -> str:
        return f"HttpError({self.status}, {self.detail!r})"


class _Continue:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CONTINUE"


#: Event: the client sent ``Expect: 100-continue`` and waits before sending its body.
CONTINUE: Final = _Continue()


class _BodyEnd:
    __slots__ = ()

    def __repr__(self) -> str:
        return "BODY_END"


#: Event of a streaming parser: the body of the request given with ``more_body`` has ended.
BODY_END: Final = _BodyEnd()

Event = Request | HttpError | _Continue | bytes | _BodyEnd


class _Reject(Exception):
    """Raised from a parser callback: stop parsing, answer ``status`` (0: close, answer nothing)."""

    def __init__(self, status: int, detail: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail
        self.headers = headers


class BodyBudget:
    """The request-body bytes all connections of a server may hold at once.

    Every :class:`RequestParser` given the same budget charges the body bytes
    it buffers to ``used`` and gives them back when the request is handed out
    or the connection ends; a body that would take ``used`` past ``limit`` is
    refused with 503 (and its connection closed).
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("a body budget must be >= 0 bytes")
        self.limit = limit
        self.used = 0


_DEFAULT_LIMITS = Limits()
# len(b"host"), len(b"expect"), len(b"connection"), len(b"content-length"),
# len(b"transfer-encoding")
_SPECIAL_LENGTHS = frozenset({4, 6, 10, 14, 17})
# Host = uri-host [ ":" port ] (RFC 9110 §7.2, RFC 3986 §3.2.2); not empty
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]+)(?::[0-9]*)?\Z")

# Parser phases (RequestParser.phase).
IDLE: Final = 0   # between requests
HEAD: Final = 1   # request line and headers arriving
BODY: Final = 2   # body arriving

# Which timeout to arm after a feed (RequestParser.timer).
KEEP: Final = 0          # leave the connection's deadline as it is
IDLE_TIMER: Final = 1    # Timeouts.idle: between requests
HEADER_TIMER: Final = 2  # Timeouts.header: from a request head's first byte
BODY_TIMER: Final = 3    # Timeouts.body: since the body last made progress


class RequestParser:
    """Turns the bytes of one connection into :class:`Request` events (see the module doc).

    ``phase`` tells where the stream stands after the last :meth:`feed`:
    ``IDLE`` (0, between requests), ``HEAD`` (1, a request line or headers
    are incomplete) or ``BODY`` (2, a body is arriving).  ``timer`` says which
    timeout the caller arms after the feed (``KEEP``: none — the deadline
    set earlier stands, as when a head trickles in or a body stalls in its
    framing or trailer section).

    ``budget``: a :class:`BodyBudget` shared by the connections of a server.
    ``wants_body(method, target)``: asked once per request that has a body,
    when its head is complete; False means the answer does not depend on the
    body (no one will read it): the :class:`Request` is delivered at once with
    an empty body, and the body is read and dropped as it comes (a chunked
    body, or one the client waits to send after ``Expect: 100-continue``,
    is not read: that request closes the connection).

    ``stream=True``: bodies are not held.  A request with a body is given
    when its head is complete, with ``more_body`` True (and :data:`CONTINUE`
    after it if the client waits for ``100 Continue``); its body follows as
    ``bytes`` events as it arrives (chunked encoding removed), then
    :data:`BODY_END`.  ``max_body`` still applies (413); the caller holds
    the chunks, so ``budget`` and ``wants_body`` are the caller's business.
    """

    __slots__ = (
        "_begins",
        "_body",
        "_body_len",
        "_budget",
        "_cursor",
        "_data",
        "_discard",
        "_events",
        "_head_raw",
        "_head_size",
        "_headers",
        "_host",
        "_keep_alive",
        "_lenient",
        "_limits",
        "_max_body",
        "_max_head",
        "_max_headers",
        "_max_url",
        "_method",
        "_open",
        "_parser",
        "_partial",
        "_partial_len",
        "_progress",
        "_stall",
        "_stream",
        "_url",
        "_version",
        "_wants_body",
        "_window",
        "dead",
        "phase",
        "timer",
    )

    def __init__(self, limits: Limits | None = None, *, budget: BodyBudget | None = None,
                 wants_body: Callable[[str, str], bool] | None = None,
                 stream: bool = False) -> None:
        lim = self._limits = limits or _DEFAULT_LIMITS
        self._stream = stream
        self._open = False      # stream: a request given with more_body whose body is arriving
        self._max_url = lim.max_request_line
        self._max_head = lim.max_header_size
        self._max_headers = lim.max_headers
        self._max_body = lim.max_body
        self._budget = budget
        self._wants_body = wants_body
        self._parser = httptools.HttpRequestParser(self)
        # llhttp refuses HTTP/1.2, which RFC 9112 §2.5 says to read as 1.1: on the first such
        # request the connection's parser is replaced by one that reads any HTTP/d.d (and
        # on_headers_complete answers 505 for the versions that are not 1.x)
        self._lenient = False
        self._events: list[Event] = []
        self.phase = IDLE
        self.timer = KEEP
        #: True after an HttpError (or an upgrade, or a request that closes): nothing more is parsed.
        self.dead = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._head_raw = 0
        self._body: bytearray | None = None
        self._body_len = 0
        self._discard = False
        self._progress = False
        self._stall = 0
        self._method = ""
        self._version = "1.1"
        self._keep_alive = True
        self._begins = 0
        self._data: bytes | bytearray | memoryview = b""   # the feed being parsed
        self._window: bytes | None = None                   # see _not_http
        self._cursor = 0                                     # see _not_http
        self._host: bytes | None = None                      # the last valid Host value
        # Bytes fed since the stream was last between requests at the end of a feed
        # (to find where a request line began, on rare paths only).
        self._partial: list[bytes] = []
        self._partial_len = 0

    # -- the llhttp callbacks (hot: one request calls each at least once) ----------------

    def on_message_begin(self) -> None:
        self.phase = HEAD
        self._begins += 1
        self._url = b""
        self._headers = []
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        if self._url:
            url = self._url + url
        self._url = url
        if len(url) > self._max_url:
            raise _Reject(414, f"request target longer than {self._max_url} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # also called for the fields of a chunked body's trailer section: they count too
        headers = self._headers
        headers.append((name, value))
        size = self._head_size + len(name) + len(value) + 4
        self._head_size = size
        if size > self._max_head or len(headers) > self._max_headers:
            if size > self._max_head:
                raise _Reject(431, f"header fields larger than {self._max_head} bytes")
            raise _Reject(431, f"more than {self._max_headers} header fields")

    def on_headers_complete(self) -> None:
        p = self._parser
        self.phase = BODY
        self._head_raw = 0
        expect: bytes | None = None
        te: bytes | None = None
        hosts = 0
        host_ok = True
        length = -1
        connection = False
        for name, value in self._headers:
            if len(name) in _SPECIAL_LENGTHS:
                lname = name.lower()
                if lname == b"host":
                    hosts += 1
                    if value != self._host:  # a connection sends the same Host again and again
                        if _HOST.match(value) is None:
                            host_ok = False
                        else:
                            self._host = value
                elif lname == b"content-length":
                    length = int(value)
                elif lname == b"connection":
                    connection = True
                elif lname == b"expect":
                    expect = value
                elif lname == b"transfer-encoding":
                    te = value if te is None else te + b"," + value
        keep = p.should_keep_alive()
        if keep and not connection and not self._lenient:
            # strict llhttp reads only 0.9, 1.0, 1.1 and 2.0, and keeps only 1.1 alive by
            # default (asking it for the version string costs more than this whole callback)
            version = "1.1"
        else:
            version = p.get_http_version()
            if version != "1.1":
                if version == "1.0":
                    if self._not_http():
                        raise _Reject(505, "only HTTP/1.1 and HTTP/1.0 are supported")
                elif version[:2] == "1." and len(version) == 3:
                    version = "1.1"  # HTTP/1.x, x > 1: answered as 1.1 (RFC 9112 §2.5)
                else:
                    raise _Reject(505, f"HTTP/{version} is not supported (HTTP/1.1 and 1.0 are)")
        method = _METHOD_STR.get(p.get_method())
        if length > self._max_body:
            raise _Reject(413, f"body larger than {self._max_body} bytes")
        has_body = length > 0
        if hosts != 1 and (hosts > 1 or version == "1.1"):
            raise _Reject(400, "no Host field" if hosts == 0 else "more than one Host field")
        if not host_ok:
            raise _Reject(400, "invalid Host field")
        if te is not None:
            _check_transfer_coding(te, version)
            has_body = True
        if method is None:
            raise _Reject(501, f"method {p.get_method().decode('latin-1')} is not implemented",
                          (("Allow", ALLOW_METHODS),))
        self._method = method
        self._version = version
        self._keep_alive = keep
        if expect is not None and expect.lower() != b"100-continue":
            raise _Reject(417, "only 'Expect: 100-continue' is understood")
        if has_body and self._stream:
            self._open = True
            self._events.append(StreamedRequest(method, self._url.decode("latin-1"), version,
                                                self._headers, b"", keep))
            if expect is not None and version == "1.1":
                self._events.append(CONTINUE)
            return
        if has_body and self._wants_body is not None and not self._wants_body(
                method, self._url.decode("latin-1")):
            # the answer does not depend on the body: give the request now, drop the body
            self._discard = True
            keep = keep and te is None and expect is None
            self._events.append(Request(method, self._url.decode("latin-1"), version,
                                        self._headers, b"", keep))
            if not keep:
                raise _Reject(0, "")
            return
        if expect is not None and version == "1.1" and has_body:
            self._events.append(CONTINUE)

    def _not_http(self) -> bool:
        """True if the request line of a "1.0" request names another protocol (RTSP/1.0).

        llhttp reports RTSP/1.0 as version 1.0; its line is looked for in the
        bytes since the stream was last idle — a window built, and scanned for
        the protocol names, once per feed, however many HTTP/1.0 requests it holds.
        """
        window = self._window
        if window is None:
            window = self._window = b"".join(self._partial) + bytes(self._data)
            if b"RTSP/" not in window and b"ICE/" not in window:
                self._window = window = b""
        if not window:
            return False
        # this request's line is the first "<url> HTTP|RTSP|ICE/1.0" after the previous one's
        line = b" " + self._url + b" "
        found = [(i, proto) for proto in (b"HTTP/1.0", b"RTSP/1.0", b"ICE/1.0")
                 if (i := window.find(line + proto, self._cursor)) >= 0]
        if not found:
            return False
        pos, proto = min(found)
        self._cursor = pos + len(line)
        return proto != b"HTTP/1.0"

    def on_body(self, body: bytes) -> None:
        self._progress = True
        if self._discard:
            return
        n = self._body_len + len(body)
        if n > self._max_body:
            raise _Reject(413, f"body larger than {self._max_body} bytes")
        if self._stream:
            self._body_len = n
            self._events.append(body)
            return
        budget = self._budget
        if budget is not None:
            if budget.used + len(body) > budget.limit:
                raise _Reject(503, "too many request bodies in progress; try again later")
            budget.used += len(body)
        self._body_len = n
        if self._body is None:
            self._body = bytearray(body)
        else:
            self._body += body

    def on_message_complete(self) -> None:
        self.phase = IDLE
        if self._discard:
            self._discard = False
            return
        if self._open:
            self._open = False
            self._body_len = 0
            self._events.append(BODY_END)
            return
        body = self._body
        if body is not None:
            self._body = None
            if self._budget is not None:
                self._budget.used -= self._body_len
            self._body_len = 0
            data = bytes(body)
        else:
            data = b""
        self._events.append(Request(self._method, self._url.decode("latin-1"), self._version,
                                    self._headers, data, self._keep_alive))

    # -- feeding ---------------------------------------------------------------------------

    def feed_simple(self, data: bytes) -> Request | None:
        """The request ``data`` is, when it is exactly one simple head and the stream is
        between requests; else None, and nothing was consumed (then :meth:`feed` it).

        Simple is what AEMhttpd's C fast path parses in one pass
        (``aem._core.http_parse``, fuzzed and differential-tested against this parser; the
        :class:`Request` is built in C too, ``aem._core.simple_request``):
        ``GET``/``HEAD``, an origin-form target, ``HTTP/1.1``, one valid ``Host``, at most
        one ``Connection`` field, ``close`` or ``keep-alive``, no ``Content-Length``,
        ``Transfer-Encoding``, ``Expect`` or ``Upgrade``, within the limits.  It never
        accepts what :meth:`feed` rejects.  After a ``Connection: close`` request the parser
        takes nothing more, as after :meth:`feed` gave one (what follows is not answered).
        """
        if self.phase != IDLE or self.dead or self._lenient:
            return None
        req = _simple_request(data, self._max_url, self._max_head, self._max_headers, Request)
        if req is not None:
            self.timer = IDLE_TIMER
            if not req.keep_alive:
                self.dead = True
        return req

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse ``data`` (the next bytes of the stream); return the events it completes.

        Never raises for any input: a broken stream gives an :class:`HttpError`
        as the last event and the parser ignores what follows.  Sets
        :attr:`phase` and :attr:`timer`.
        """
        if self.dead:
            return []
        events = self._events = []
        phase0 = self.phase
        self._begins = 0
        self._progress = False
        self._data = data
        self._window = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade/CONNECT: not supported; the request was answered normally, then close.
            self.dead = True
            for ev in events:
                if isinstance(ev, Request):
                    ev.keep_alive = False
            return events
        except httptools.HttpParserCallbackError as e:
            ctx = e.__context__
            if not isinstance(ctx, _Reject):
                raise
            return self._fail(ctx.status, ctx.detail, ctx.headers)
        except httptools.HttpParserInvalidMethodError:
            status = self._unknown_method_status(data, phase0)
            return self._fail(status, "unknown method" if status == 501 else "malformed request",
                              (("Allow", ALLOW_METHODS),) if status == 501 else ())
        except httptools.HttpParserError as e:
            detail = str(e) or "malformed request"
            if detail != "Invalid HTTP version":
                return self._fail(400, detail)
            other_version = True
        else:
            other_version = False
        if other_version:  # (outside the except clause: it parses again)
            return self._other_version(data, phase0, events)
        phase = self.phase
        if phase == IDLE:
            self.timer = IDLE_TIMER
            if self._partial_len:
                self._partial.clear()
                self._partial_len = 0
            self._cursor = 0
            return events
        if phase == HEAD:
            if self._begins == 0:  # every byte of this feed belongs to the same head
                self._head_raw += len(data)
                lim = self._limits
                if self._head_raw > lim.max_request_line + lim.max_header_size:
                    return self._fail(431, "request head too large")
                self.timer = KEEP     # the header deadline runs from the head's first byte
            else:
                self.timer = HEADER_TIMER
        elif self._progress or phase0 != BODY:
            self._stall = 0
            self.timer = BODY_TIMER
        else:
            # body framing or a trailer section, no body byte: bounded like a head, and
            # the body deadline is not renewed
            self._stall += len(data)
            if self._stall > self._max_head:
                return self._fail(431, "chunk framing or trailer section too large")
            self.timer = KEEP
        if self._partial_len < 16384:
            self._partial.append(bytes(data))
            self._partial_len += len(data)
        return events

    def feed_eof(self) -> bool:
        """The peer closed its side.  True if a request was cut short (nothing to answer)."""
        return not self.dead and self.phase != IDLE

    def close(self) -> None:
        """The connection ends: give back the body bytes held (see :class:`BodyBudget`)."""
        self.dead = True
        if self._body is not None:
            self._body = None
            if self._budget is not None:
                self._budget.used -= self._body_len
            self._body_len = 0

    def _fail(self, status: int, detail: str,
              headers: tuple[tuple[str, str], ...] = ()) -> list[Event]:
        self.close()
        last = self._events[-1] if self._events else None
        if status == 0 or (type(last) is Request and not last.keep_alive and not last.more_body) or (
                last is BODY_END and not self._keep_alive):
            return self._events  # bytes after a closing request are not answered
        self._events.append(HttpError(status, detail, headers))
        return self._events

    def _other_version(self, data: bytes | bytearray | memoryview, phase0: int,
                       events: list[Event]) -> list[Event]:
        """A request line with a version strict llhttp refuses: 1.x is read again as 1.1."""
        if self._lenient or (phase0 != IDLE and self._partial_len >= 16384):
            return self._fail(505, "only HTTP/1.1 and HTTP/1.0 are supported")
        window = b"".join(self._partial) + bytes(data) if phase0 != IDLE else bytes(data)
        start = _last_message_offset(window, False)
        if not _HTTP_1X.match(window, start):
            return self._fail(505, "only HTTP/1.1 and HTTP/1.0 are supported")
        # re-read from that request on, with a parser that takes any version
        self._lenient = True
        self._parser = httptools.HttpRequestParser(self)
        self._parser.set_dangerous_leniencies(lenient_version=True)
        self.phase = IDLE
        self._partial.clear()
        self._partial_len = 0
        self._cursor = 0
        return events + self.feed(window[start:])

    def _unknown_method_status(self, data: bytes | bytearray | memoryview, phase0: int) -> int:
        """501 if the offending request starts with a method-like token, else 400."""
        if phase0 == IDLE and self._begins <= 1:
            start = bytes(memoryview(data)[:200]).lstrip(b"\r\n")  # the bad request opens this feed
        elif self._partial_len >= 16384:
            return 400
        else:
            window = b"".join(self._partial) + bytes(data)
            window = window[:16384]
            start = window[_last_message_offset(window, self._lenient):][:80]
        return 501 if _TOKEN_LINE.match(start) else 400


def _check_transfer_coding(te: bytes, version: str) -> None:
    """Raise the answer to a ``Transfer-Encoding`` the server cannot read (RFC 9112 §6.1)."""
    if version == "1.0":
        raise _Reject(400, "Transfer-Encoding in an HTTP/1.0 request (faulty framing)")
    codings = [c.strip().lower() for c in te.split(b",")]
    for c in codings:
        if c != b"chunked":
            raise _Reject(501, f"transfer coding {c.decode('latin-1')!r} is not implemented")
    if len(codings) != 1:
        raise _Reject(400, "chunked applied more than once")


def _completed(window: bytes, lenient: bool) -> int:
    """How many requests of ``window`` a fresh parser completes (errors end the count)."""
    count = 0

    class _Probe:
        def on_message_complete(self) -> None:
            nonlocal count
            count += 1

    p = httptools.HttpRequestParser(_Probe())
    if lenient:
        p.set_dangerous_leniencies(lenient_version=True)
    try:
        p.feed_data(window)
    except httptools.HttpParserError:
        pass
    return count


def _last_message_offset(window: bytes, lenient: bool) -> int:
    """Where the last request of ``window`` begins (after the CRLFs that may precede it).

    The start is the shortest prefix holding every request that completes:
    found by bisection, a few whole parses rather than one per byte.
    """
    total = _completed(window, lenient)
    lo, hi = 0, len(window)   # _completed(window[:hi], lenient) == total
    if total:
        while lo < hi:
            mid = (lo + hi) // 2
            if _completed(window[:mid], lenient) >= total:
                hi = mid
            else:
                lo = mid + 1
    else:
        hi = 0
    while window[hi:hi + 1] in (b"\r", b"\n") and hi < len(window):
        hi += 1
    return hi


# -- responses ------------------------------------------------------------------------------

class DateClock:
    """The ``Date`` header line, formatted once per second.

    ``line(now)`` takes ``time.time()`` (seconds) and returns
    ``b"Date: Tue, 15 Nov 1994 08:12:31 GMT\\r\\n"``.
    """

    __slots__ = ("_line", "_sec")

    def __init__(self) -> None:
        self._sec = -1
        self._line = b""

    def line(self, now: float | None = None) -> bytes:
        """The header line for ``now`` (default: the current time)."""
        sec = int(time.time() if now is None else now)
        if sec != self._sec:
            self._sec = sec
            self._line = b"Date: " + formatdate(sec, usegmt=True).encode() + b"\r\n"
        return self._line


def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n".encode()


_STATUS_LINES: dict[int, bytes] = {s: _status_line(s) for s in REASONS}


_LINES: dict[tuple[str, str], bytes] = {}


def _header_line(field: tuple[str, str]) -> bytes:
    name, value = field
    line = f"{name}: {value}\r\n"
    if "\n" in line[:-2] or "\r" in line[:-2] or ":" in name or not name:
        raise ValueError(f"bad response header field {name!r}: {value!r}")
    data = line.encode("latin-1")
    if len(_LINES) >= 4096:
        _LINES.clear()
    _LINES[field] = data
    return data


def render_head(status: int, headers: list[tuple[str, str]], content_length: int | None,
                keep_alive: bool, version: str, date_line: bytes, server_line: bytes) -> bytes:
    """The status line and header block of a response, ending with the empty line.

    ``headers`` are the response's own fields (``str`` pairs, latin-1);
    ``Date`` and ``Server`` come as ready lines; ``Content-Length`` is added
    when ``content_length`` is not None; ``Connection`` as needed: ``close``
    when not ``keep_alive``, ``keep-alive`` for an HTTP/1.0 client that keeps
    the connection.  Raises ``ValueError`` for a field containing CR or LF
    (response splitting) or a bad name, ``UnicodeEncodeError`` for one that
    is not latin-1.
    """
    parts = [_STATUS_LINES.get(status) or _status_line(status), server_line, date_line]
    lines = _LINES
    for field in headers:
        line = lines.get(field)
        parts.append(line if line is not None else _header_line(field))
    if content_length is not None:
        parts.append(b"Content-Length: %d\r\n\r\n" % content_length if keep_alive
                     and version == "1.1" else b"Content-Length: %d\r\n" % content_length)
        if keep_alive and version == "1.1":
            return b"".join(parts)
    if not keep_alive:
        parts.append(b"Connection: close\r\n\r\n")
    elif version == "1.0":
        parts.append(b"Connection: keep-alive\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


def error_response(status: int, detail: str, keep_alive: bool, version: str, date_line: bytes,
                   server_line: bytes, head_only: bool = False,
                   extra: list[tuple[str, str]] | None = None) -> bytes:
    """A complete small plain-text response for ``status`` (its reason and ``detail``)."""
    text = f"{status} {REASONS.get(status, 'Error')}\n"
    if detail:
        text += detail + "\n"
    body = text.encode("utf-8", "replace")
    headers = [("Content-Type", "text/plain; charset=utf-8")]
    if extra:
        headers += extra
    head = render_head(status, headers, len(body), keep_alive, version, date_line, server_line)
    return head if head_only else head + body


# -- the connection ---------------------------------------------------------------------------

_SMALL = 16384   # a body below this goes out in the same bytes object as its head


def body_allowed(method: str, status: int) -> bool:
    """Whether a response carries content (RFC 9110 §6.4.1): not for HEAD, 1xx, 204, 304."""
    return method != "HEAD" and status >= 200 and status != 204 and status != 304


class Connection:
    """One connection's HTTP/1.1 state machine: bytes in, events out; answers in, bytes out.

    :meth:`receive` parses (see :class:`RequestParser`); after it,
    :attr:`timer` says which timeout to arm.  Every answer goes through
    :meth:`response`, :meth:`file_response`, :meth:`error` or
    :meth:`timeout`, which decide the framing and whether the connection
    stays open: :attr:`closing` becomes True with the last response (the
    client asked to close, HTTP/1.0 without keep-alive, an error, an
    unframed body); the caller closes once that response is out.

    ``server_name`` gives the ``Server`` field; the ``Date`` line comes with
    each call (see :class:`DateClock`), so nothing here reads a clock.
    ``stream``: request bodies come as events (see :class:`RequestParser`).
    """

    __slots__ = ("_ok_prefix", "_server_line", "closing", "parser", "receive")

    def __init__(self, limits: Limits | None = None, *, budget: BodyBudget | None = None,
                 wants_body: Callable[[str, str], bool] | None = None,
                 server_name: str = "aem", stream: bool = False) -> None:
        self.parser = RequestParser(limits, budget=budget, wants_body=wants_body, stream=stream)
        #: ``receive(data)``: the events completed by the received bytes ``data``
        #: (:meth:`RequestParser.feed`: never raises; sets ``parser.timer``).
        self.receive = self.parser.feed
        #: True once the response after which the connection ends has been produced.
        self.closing = False
        self._server_line = f"Server: {server_name}\r\n".encode("latin-1")
        self._ok_prefix = b"HTTP/1.1 200 OK\r\n" + self._server_line

    @property
    def timer(self) -> int:
        """After :meth:`receive`: ``KEEP``, ``IDLE_TIMER``, ``HEADER_TIMER`` or ``BODY_TIMER``."""
        return self.parser.timer

    @property
    def idle(self) -> bool:
        """True between requests (no request head or body in progress)."""
        return self.parser.phase == IDLE

    def resume_timer(self) -> int:
        """The timeout to arm when reading resumes after a pause (the client took our output)."""
        phase = self.parser.phase
        return IDLE_TIMER if phase == IDLE else HEADER_TIMER if phase == HEAD else BODY_TIMER

    def response(self, req: Request, status: int, headers: list[tuple[str, str]], body: bytes,
                 date_line: bytes) -> tuple[bytes, bytes]:
        """The bytes answering ``req``: ``(first, second)``, to be sent in that order.

        ``second`` is a body too large to copy behind its head, else ``b""``.
        Raises ``ValueError`` / ``UnicodeEncodeError`` for a header field that
        cannot be sent (CR/LF, a bad name, not latin-1).
        """
        keep = req.keep_alive and not self.closing
        if not keep:
            self.closing = True
        n = len(body)
        if status == 200 and len(headers) == 1 and n < _SMALL and req.method != "HEAD":
            # the usual answer: one field (its Content-Type), a small body; what render_head
            # gives, without its list: kept alive (HTTP/1.1), or the last on its connection
            line = _LINES.get(headers[0])
            if line is not None:
                if not keep:
                    return b"%s%s%sContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
                        self._ok_prefix, date_line, line, n, body), b""
                if req.version == "1.1":
                    return b"%s%s%sContent-Length: %d\r\n\r\n%s" % (
                        self._ok_prefix, date_line, line, n, body), b""
        send = body_allowed(req.method, status)
        no_length = status < 200 or status == 204 or status == 304
        head = render_head(status, headers, None if no_length else n, keep, req.version,
                           date_line, self._server_line)
        if not send or not n:
            return head, b""
        if n < _SMALL:
            return head + body, b""
        return head, body

    def file_response(self, req: Request, status: int, headers: list[tuple[str, str]],
                      length: int, date_line: bytes) -> tuple[bytes, bool]:
        """The head of a response whose ``length`` content bytes the caller sends (a file).

        Returns the head and whether the content follows it (not for HEAD,
        204, 304).
        """
        keep = req.keep_alive and not self.closing
        if not keep:
            self.closing = True
        if status == 200:   # the usual case
            return render_head(200, headers, length, keep, req.version, date_line,
                               self._server_line), length > 0 and req.method != "HEAD"
        no_length = status < 200 or status == 204 or status == 304
        head = render_head(status, headers, None if no_length else length, keep, req.version,
                           date_line, self._server_line)
        return head, length > 0 and body_allowed(req.method, status)

    def error(self, err: HttpError, date_line: bytes) -> bytes:
        """The response to a broken stream; the connection closes after it."""
        self.closing = True
        return error_response(err.status, err.detail, False, "1.1", date_line, self._server_line,
                              extra=list(err.headers) or None)

    def timeout(self, date_line: bytes) -> bytes | None:
        """A deadline passed: the 408 to send if a request was arriving, else None; closes."""
        self.closing = True
        if self.parser.phase == IDLE or self.parser.dead:
            return None
        return error_response(408, "request not received in time", False, "1.1", date_line,
                              self._server_line)

    def close(self) -> None:
        """The connection is gone: release what the parser holds."""
        self.closing = True
        self.parser.close()
