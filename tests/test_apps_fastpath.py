"""The ASGI server's per-request shortcuts: a read that is one simple head is parsed in C
(``RequestParser.feed_simple``, ``aem._core.http_parse``), and response fields seen before are
looked up, not decoded again.  Each must give what the full way gives."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aem
from aem.http.asgi import ASGIServer, _HttpProtocol
from aem.http.protocol import IDLE_TIMER, Limits, Request, RequestParser

SIMPLE = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /a/b?c=d&e HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n",
    b"HEAD /x%20y HTTP/1.1\r\nhost: example.org\r\nX-Two: 1\r\nx-two: 2\r\n\r\n",
]
# simple too, with a Connection field the C parser reads (close: the connection ends)
CONNECTION = [
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /c HTTP/1.1\r\nconnection:Close\r\nHost: x\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: x\r\nCONNECTION: keep-alive\r\n\r\n",
]
NOT_SIMPLE = [
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close, TE\r\n\r\n",     # a list
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: closed\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",                                      # no Host
    b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n",                               # incomplete
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",   # two: full path
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",       # over max_request_line
]


def same(a: Request, b: Request) -> None:
    assert (a.method, a.target, a.version, a.raw_headers, a.body, a.keep_alive) == (
        b.method, b.target, b.version, b.raw_headers, b.body, b.keep_alive)


@pytest.mark.parametrize("data", SIMPLE + CONNECTION)
def test_feed_simple_gives_what_feed_gives(data: bytes) -> None:
    fast = RequestParser().feed_simple(data)
    assert fast is not None
    full = RequestParser().feed(data)
    assert len(full) == 1 and isinstance(full[0], Request)
    same(fast, full[0])


@pytest.mark.parametrize("data", NOT_SIMPLE)
def test_feed_simple_leaves_the_rest_to_feed(data: bytes) -> None:
    p = RequestParser()
    assert p.feed_simple(data) is None
    # nothing was consumed: the full parser sees what a fresh one sees
    got, want = p.feed(data), RequestParser().feed(data)
    assert [type(e) for e in got] == [type(e) for e in want]
    assert [getattr(e, "status", None) for e in got] == [getattr(e, "status", None) for e in want]


def test_feed_simple_only_between_requests() -> None:
    p = RequestParser()
    assert p.feed(b"GET / HTTP/1.1\r\nHo") == []
    assert p.feed_simple(SIMPLE[0]) is None            # a head is in progress
    assert p.feed(b"st: x\r\n\r\n")
    req = p.feed_simple(SIMPLE[1])
    assert req is not None and p.timer == IDLE_TIMER
    p.close()
    assert p.feed_simple(SIMPLE[0]) is None            # a closed (dead) parser takes nothing


def test_after_a_closing_request_feed_simple_and_feed_take_nothing_more() -> None:
    nxt = SIMPLE[0]
    p = RequestParser()
    req = p.feed_simple(CONNECTION[0])
    assert req is not None and not req.keep_alive
    assert p.feed_simple(nxt) is None and p.feed(nxt) == []
    full = RequestParser()
    events = full.feed(CONNECTION[0])
    assert len(events) == 1 and not events[0].keep_alive  # type: ignore[union-attr]
    assert not any(isinstance(e, Request) for e in full.feed(nxt))   # not answered either way


class _WithMore:
    """Request's slots and one more: the C side must call it (filling the slots in directly
    would leave ``seen`` unset)."""

    __slots__ = ("_headers", "body", "client", "keep_alive", "method", "raw_headers", "seen",
                 "target", "version")

    def __init__(self, method: str, target: str, version: str, raw_headers: Any, body: bytes,
                 keep_alive: bool = True, client: object = None) -> None:
        self.method, self.target, self.version = method, target, version
        self.raw_headers, self.body, self.keep_alive, self.client = raw_headers, body, keep_alive, client
        self._headers = None
        self.seen = True


def test_a_request_class_of_another_shape_is_called_not_filled_in() -> None:
    from aem._core import simple_request

    for cls in (_WithMore, Request, _WithMore):   # the shape is found again when the class changes
        req = simple_request(CONNECTION[0], 8192, 16384, 100, cls)
        assert type(req) is cls and req.target == "/" and req.keep_alive is False
        if cls is _WithMore:
            assert req.seen is True


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"GET", b"HEAD", b"POST", b" ", b"/", b"?", b"%", b"a", b"\r\n",
                                 b"HTTP/1.1", b"HTTP/1.0", b"Host: x", b"Host:", b":", b"\t",
                                 b"Content-Length: 0", b"Connection: keep-alive", b"\x00",
                                 b"Connection: close", b"Connection: ", b"close", b",",
                                 b"\xff", b"X-A: b", b"\r\n\r\n"]), max_size=16),
       st.integers(1, 200))
def test_feed_simple_never_disagrees_with_feed(parts: list[bytes], max_line: int) -> None:
    data = b"".join(parts)
    lim = Limits(max_request_line=max_line)
    fast = RequestParser(lim).feed_simple(data)
    if fast is None:
        return
    full = RequestParser(lim).feed(data)
    assert len(full) == 1 and isinstance(full[0], Request), (data, full)
    same(fast, full[0])


# -- the protocol, in process, with a transport that keeps what is written --------------------

class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.out.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


App = Callable[[Any, Any, Any], Awaitable[None]]


def exchange(app: App, reads: list[list[bytes]]) -> list[tuple[bytes, list[Any]]]:
    """Each item of ``reads``: the pieces of one request, fed as separate reads; what the
    server wrote for it (Date line cut) and the scopes the app saw."""
    async def main() -> list[tuple[bytes, list[Any]]]:
        scopes: list[Any] = []

        async def spy(scope: Any, receive: Any, send: Any) -> None:
            scopes.append(scope)
            await app(scope, receive, send)

        srv = ASGIServer(spy, port=0, lifespan="off")
        p = _HttpProtocol(srv)
        t = _Transport()
        p.connection_made(t)
        out = []
        for pieces in reads:
            scopes.clear()
            t.out.clear()
            for piece in pieces:
                p.data_received(piece)
            for _ in range(5):
                await asyncio.sleep(0)
            data = b"".join(t.out)
            head, sep, body = data.partition(b"\r\n\r\n")
            lines = [ln for ln in head.split(b"\r\n") if not ln.startswith(b"Date: ")]
            out.append((b"\r\n".join(lines) + sep + body, list(scopes)))
        p.connection_lost(None)
        return out

    runner = asyncio.Runner(loop_factory=aem.new_event_loop)
    try:
        return runner.run(main())
    finally:
        runner.close()


async def echo_app(scope: Any, receive: Any, send: Any) -> None:
    msg = await receive()
    body = repr((scope["method"], scope["path"], scope["raw_path"], scope["query_string"],
                 scope["headers"], scope["http_version"], msg)).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), [b"x-list", b"pair"],
                            (b"Content-Length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize("data", SIMPLE)
def test_one_read_and_split_reads_answer_alike(data: bytes) -> None:
    # one read: the C head parser; the same bytes in two reads: httptools
    (fast, fast_scopes), (full, full_scopes) = exchange(echo_app, [[data], [data[:7], data[7:]]])
    assert fast.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-list: pair\r\n" in fast
    assert fast == full
    assert [dict(s, state=None) for s in fast_scopes] == [dict(s, state=None) for s in full_scopes]


@pytest.mark.parametrize("data", CONNECTION)
def test_a_connection_field_is_answered_alike_in_one_read_or_two(data: bytes) -> None:
    (fast, fast_scopes), = exchange(echo_app, [[data]])
    (full, full_scopes), = exchange(echo_app, [[data[:7], data[7:]]])
    assert fast == full and fast.startswith(b"HTTP/1.1 200 OK\r\n")
    assert (b"\r\nConnection: close\r\n" in fast) == (b"keep-alive" not in data)
    assert [dict(s, state=None) for s in fast_scopes] == [dict(s, state=None) for s in full_scopes]


def test_response_fields_are_the_same_every_time() -> None:
    # the first answer decodes the fields, the next ones find them: same bytes
    answers = exchange(echo_app, [[SIMPLE[1]]] * 4)
    assert len({a for a, _ in answers}) == 1
    assert b"Content-Length: " in answers[0][0]


def test_a_bad_response_field_fails_every_time() -> None:
    async def bad(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-bad", b"a\r\nInjected: yes")]})
        await send({"type": "http.response.body", "body": b"no"})

    for answer, _ in exchange(bad, [[SIMPLE[0]], [SIMPLE[0]]]):
        assert answer.startswith(b"HTTP/1.1 500 ") and b"Injected" not in answer
