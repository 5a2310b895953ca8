"""HTTP/1.1 without I/O: bytes in, request events out; responses rendered to bytes.

Nothing here touches a socket, a file or a clock of its own (the caller
passes the time when it matters), so every protocol decision can be tested by
feeding bytes (``tests/test_http_protocol.py``).  The server (:mod:`.server`)
moves the bytes; this module decides what they mean and what to answer.

Strategy (after h11's readers): :meth:`RequestParser.feed` takes the bytes
that arrived and returns the events they complete, in order:

* :class:`Request` — one complete request (head and body);
* :data:`CONTINUE` — the client waits for ``100 Continue`` before its body;
* :class:`HttpError` — the stream is broken or over a limit: answer
  ``status`` and close.  It is always the last event; the parser ignores
  everything fed after it.

An empty list means "need more data".  Parsing is done by llhttp (through
``httptools``); this module adds the limits llhttp does not have and turns
its errors into status codes:

============================================  ======
what                                          status
============================================  ======
malformed request line, header or framing     400
request target longer than ``max_request_line``  414
headers over ``max_header_size`` / ``max_headers``  431
unknown method token                          501
method known to llhttp but not implemented    501
body over ``max_body``                        413
HTTP version other than 1.0 / 1.1             505
============================================  ======

llhttp also accepts ``HTTP/0.9`` and ``HTTP/2.0`` request lines (and
``RTSP/1.0``).  They get 505 when the request has a ``Connection`` field;
without one, the version is inferred from llhttp's keep-alive verdict
(``1.1`` if it keeps the connection, else ``1.0``) and the request is
answered as such — reading the exact version from llhttp costs more than the
rest of the head's processing, and RFC 9112 lets a server answer a
request of another minor version as its own.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Final

import httptools

__all__ = [
    "CONTINUE", "CONTINUE_RESPONSE", "IMPLEMENTED_METHODS", "REASONS", "DateClock", "Headers",
    "HttpError", "Limits", "Request", "RequestParser", "error_response", "render_head",
]

#: Methods the server implements; llhttp knows ~40 more (WebDAV, RTSP ...): those get 501.
IMPLEMENTED_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

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
    502: "Bad Gateway", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}

#: The interim response sent when a client asked for ``Expect: 100-continue``.
CONTINUE_RESPONSE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

_TOKEN_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64} [\x21-\x7e]")
_METHOD_STR = {m.encode(): m for m in IMPLEMENTED_METHODS}


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits of a request (bytes unless said otherwise).

    ``max_request_line``: the request target (URL) as sent — over it, 414.
    ``max_header_size``: the header lines together — over it, 431;
    ``max_headers``: their number — over it, 431.  ``max_body``: the body,
    after chunked decoding — over it, 413 (checked against
    ``Content-Length`` before any body byte is read).
    """

    max_request_line: int = 8192
    max_header_size: int = 16384
    max_headers: int = 100
    max_body: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("max_request_line", "max_header_size", "max_headers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_body < 0:
            raise ValueError("max_body must be >= 0")


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
    :attr:`path` and :attr:`query` split the target; ``client`` is the
    peer's address when the server knows it.
    """

    __slots__ = ("_headers", "body", "client", "keep_alive", "method", "raw_headers", "target",
                 "version")

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


class HttpError:
    """The request stream cannot go on: answer ``status`` (with ``detail`` as body) and close."""

    __slots__ = ("detail", "status")

    def __init__(self, status: int, detail: str = "") -> None:
        self.status = status
        self.detail = detail

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

Event = Request | HttpError | _Continue


class _Reject(Exception):
    """Raised from a parser callback: stop parsing, answer ``status``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail


_DEFAULT_LIMITS = Limits()
# len(b"expect"), len(b"connection"), len(b"content-length")
_SPECIAL_LENGTHS = frozenset({6, 10, 14})

# Parser phases (RequestParser.phase).
IDLE: Final = 0   # between requests
HEAD: Final = 1   # request line and headers arriving
BODY: Final = 2   # body arriving


class RequestParser:
    """Turns the bytes of one connection into :class:`Request` events (see the module doc).

    ``phase`` tells where the stream stands after the last :meth:`feed`:
    ``IDLE`` (0, between requests), ``HEAD`` (1, a request line or headers
    are incomplete) or ``BODY`` (2, a body is arriving); ``new_head`` is set
    when a request head began during the last feed (the server resets it).
    Used by the server to pick the timeout that applies.
    """

    __slots__ = (
        "_begins", "_body", "_body_len", "_events", "_head_raw", "_head_size", "_headers",
        "_keep_alive", "_limits", "_max_body", "_max_head", "_max_headers", "_max_url", "_method",
        "_parser", "_partial", "_partial_len", "_url", "_version", "dead", "new_head", "phase",
    )

    def __init__(self, limits: Limits | None = None) -> None:
        lim = self._limits = limits or _DEFAULT_LIMITS
        self._max_url = lim.max_request_line
        self._max_head = lim.max_header_size
        self._max_headers = lim.max_headers
        self._max_body = lim.max_body
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self.phase = IDLE
        self.new_head = False
        #: True after an HttpError (or an upgrade): nothing more is parsed.
        self.dead = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._head_raw = 0
        self._body: list[bytes] | None = None
        self._body_len = 0
        self._method = ""
        self._version = "1.1"
        self._keep_alive = True
        self._begins = 0
        # Bytes fed since the stream was last between requests at the end of a feed
        # (only to tell an unknown method from garbage, on the error path).
        self._partial: list[bytes] = []
        self._partial_len = 0

    # -- the llhttp callbacks (hot: one request calls each at least once) ----------------

    def on_message_begin(self) -> None:
        self.phase = HEAD
        self.new_head = True
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
        method = _METHOD_STR.get(p.get_method())
        keep = p.should_keep_alive()
        expect: bytes | None = None
        exact = False
        for name, value in self._headers:
            if len(name) in _SPECIAL_LENGTHS:
                lname = name.lower()
                if lname == b"content-length":
                    if int(value) > self._max_body:
                        raise _Reject(413, f"body larger than {self._max_body} bytes")
                elif lname == b"expect":
                    expect = value
                elif lname == b"connection":
                    exact = True
        if exact:
            # Connection was given: only the version tells 1.0 keep-alive from 1.1
            version = p.get_http_version()
            if version != "1.1" and version != "1.0":
                raise _Reject(505, f"HTTP/{version} is not supported (HTTP/1.1 and 1.0 are)")
        else:
            # without Connection, llhttp keeps 1.1 alive and closes 1.0 (asking the
            # parser for the version string costs more than the rest of this callback)
            version = "1.1" if keep else "1.0"
        if method is None:
            raise _Reject(501, f"method {p.get_method().decode('latin-1')} is not implemented")
        self._method = method
        self._version = version
        self._keep_alive = keep
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise _Reject(417, "only 'Expect: 100-continue' is understood")
            if version == "1.1" and self._expects_body():
                self._events.append(CONTINUE)

    def _expects_body(self) -> bool:
        for name, value in self._headers:
            n = name.lower()
            if n == b"transfer-encoding" or (n == b"content-length" and int(value) > 0):
                return True
        return False

    def on_body(self, body: bytes) -> None:
        n = self._body_len + len(body)
        self._body_len = n
        if n > self._max_body:
            raise _Reject(413, f"body larger than {self._max_body} bytes")
        if self._body is None:
            self._body = [body]
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self.phase = IDLE
        body = self._body
        if body is not None:
            self._body = None
            self._body_len = 0
            data = b"".join(body)
        else:
            data = b""
        self._events.append(Request(self._method, self._url.decode("latin-1"), self._version,
                                    self._headers, data, self._keep_alive))

    # -- feeding ---------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse ``data`` (the next bytes of the stream); return the events it completes.

        Never raises for any input: a broken stream gives an :class:`HttpError`
        as the last event and the parser ignores what follows.
        """
        if self.dead:
            return []
        events = self._events = []
        phase0 = self.phase
        self._begins = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade/CONNECT: not supported; the request was answered normally, then close.
            self.dead = True
            for ev in events:
                if type(ev) is Request:
                    ev.keep_alive = False
            return events
        except httptools.HttpParserCallbackError as e:
            ctx = e.__context__
            if not isinstance(ctx, _Reject):
                raise
            return self._fail(ctx.status, ctx.detail)
        except httptools.HttpParserInvalidMethodError:
            return self._fail(self._unknown_method_status(data, phase0), "unknown method")
        except httptools.HttpParserError as e:
            detail = str(e) or "malformed request"
            if detail == "Invalid HTTP version":  # well-formed HTTP/d.d, but not 1.0/1.1
                return self._fail(505, "only HTTP/1.1 and HTTP/1.0 are supported")
            return self._fail(400, detail)
        if self.phase == HEAD:
            if self._begins == 0:  # every byte of this feed belongs to the same head
                self._head_raw += len(data)
                lim = self._limits
                if self._head_raw > lim.max_request_line + lim.max_header_size:
                    return self._fail(431, "request head too large")
        if self.phase == IDLE:
            if self._partial_len:
                self._partial.clear()
                self._partial_len = 0
        elif self._partial_len < 16384:
            self._partial.append(bytes(data))
            self._partial_len += len(data)
        return events

    def feed_eof(self) -> bool:
        """The peer closed its side.  True if a request was cut short (nothing to answer)."""
        return not self.dead and self.phase != IDLE

    def _fail(self, status: int, detail: str) -> list[Event]:
        self.dead = True
        last = self._events[-1] if self._events else None
        if type(last) is Request and not last.keep_alive:
            return self._events  # bytes after a closing request are not answered
        self._events.append(HttpError(status, detail))
        return self._events

    def _unknown_method_status(self, data: bytes | bytearray | memoryview, phase0: int) -> int:
        """501 if the offending request starts with a method-like token, else 400."""
        if phase0 == IDLE and self._begins <= 1:
            start = bytes(memoryview(data)[:200]).lstrip(b"\r\n")  # the bad request opens this feed
        elif self._partial_len >= 16384:
            return 400
        else:
            window = b"".join(self._partial) + bytes(data)
            start = _last_message_start(window[:16384])
        return 501 if _TOKEN_LINE.match(start) else 400


def _last_message_start(window: bytes) -> bytes:
    """The bytes from where the last request began in ``window`` (re-parsed byte by byte)."""
    marks: list[int] = []

    class _Probe:
        def on_message_begin(self) -> None:
            marks.append(pos)

    p = httptools.HttpRequestParser(_Probe())
    pos = 0
    try:
        for pos in range(len(window)):
            p.feed_data(window[pos:pos + 1])
    except httptools.HttpParserError:
        pass
    return window[marks[-1]:marks[-1] + 80] if marks else b""


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
