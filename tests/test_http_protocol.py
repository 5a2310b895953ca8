"""aem.http.protocol driven with bytes only: no socket, no clock (h11 style)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aem.http.protocol import (
    BODY,
    CONTINUE,
    HEAD,
    IDLE,
    DateClock,
    Headers,
    HttpError,
    Limits,
    Request,
    RequestParser,
    error_response,
    render_head,
)


def feed_all(data: bytes, limits: Limits | None = None, chunks: list[int] | None = None) -> list:
    p = RequestParser(limits)
    if chunks is None:
        return p.feed(data)
    out, pos = [], 0
    for n in chunks:
        out += p.feed(data[pos:pos + n])
        pos += n
    out += p.feed(data[pos:])
    return out


def only_error(events: list) -> HttpError:
    assert events and isinstance(events[-1], HttpError), events
    return events[-1]


# -- valid requests ------------------------------------------------------------------------

def test_simple_get() -> None:
    [req] = feed_all(b"GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n")
    assert isinstance(req, Request)
    assert req.method == "GET" and req.target == "/a/b?x=1&y=2" and req.version == "1.1"
    assert req.path == "/a/b" and req.query == "x=1&y=2"
    assert req.headers["host"] == "example" and req.headers.get("ACCEPT") == "*/*"
    assert req.raw_headers == [(b"Host", b"example"), (b"Accept", b"*/*")]
    assert req.keep_alive and req.body == b""


def test_headers_mapping_joins_repeated_fields() -> None:
    h = Headers([(b"X-A", b"1"), (b"x-a", b"2"), (b"Y", b"z")])
    assert h["x-a"] == "1, 2" and len(h) == 2 and "Y" in h and "nope" not in h
    assert sorted(h) == ["x-a", "y"] and h.get("missing", "d") == "d"


def test_absolute_form_and_asterisk() -> None:
    [req] = feed_all(b"GET http://host:8080/p/q?z HTTP/1.1\r\nHost: host\r\n\r\n")
    assert req.path == "/p/q" and req.query == "z"
    [req] = feed_all(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
    assert req.method == "OPTIONS" and req.path == "*"


def test_content_length_body() -> None:
    [req] = feed_all(b"POST /e HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    assert req.method == "POST" and req.body == b"hello"


def test_chunked_body() -> None:
    data = b"PUT /e HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    [req] = feed_all(data)
    assert req.body == b"abcde"


def test_keep_alive_rules() -> None:
    cases = [(b"GET / HTTP/1.1\r\n\r\n", True),
             (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
             (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False),
             (b"GET / HTTP/1.0\r\n\r\n", False)]
    for data, keep in cases:
        [req] = feed_all(data)
        assert req.keep_alive is keep


def test_version_without_connection_field_is_inferred() -> None:
    """See the module doc: a 2.0/0.9 line without Connection is answered, then closed."""
    for line in (b"GET / HTTP/2.0\r\n\r\n", b"GET / HTTP/0.9\r\n\r\n"):
        [req] = feed_all(line)
        assert req.version == "1.0" and not req.keep_alive
    [req] = feed_all(b"GET / HTTP/1.0\r\n\r\n")
    assert req.version == "1.0" and not req.keep_alive
    [req] = feed_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert req.version == "1.1" and not req.keep_alive


def test_nothing_after_a_closing_request() -> None:
    p = RequestParser()
    events = p.feed(b"GET /1 HTTP/1.1\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
    assert [e.target for e in events] == ["/1"] and p.dead


def test_pipelined_requests_in_order() -> None:
    data = b"".join(f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(20))
    reqs = feed_all(data)
    assert [r.target for r in reqs] == [f"/{i}" for i in range(20)]


def test_expect_100_continue() -> None:
    p = RequestParser()
    events = p.feed(b"POST /u HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert events == [CONTINUE] and p.phase == BODY
    [req] = p.feed(b"abc")
    assert req.body == b"abc" and p.phase == IDLE
    # no body announced: no interim response
    assert feed_all(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n")[0] is not CONTINUE


def test_phases_and_new_head() -> None:
    p = RequestParser()
    assert p.feed(b"GET / HT") == [] and p.phase == HEAD and p.new_head
    p.new_head = False
    assert p.feed(b"TP/1.1\r\nHost:") == [] and p.phase == HEAD and not p.new_head
    assert len(p.feed(b" x\r\n\r\n")) == 1 and p.phase == IDLE
    assert not p.feed_eof()
    p.feed(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab")
    assert p.phase == BODY and p.feed_eof()


def test_upgrade_is_answered_then_closed() -> None:
    p = RequestParser()
    [req] = p.feed(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nxx")
    assert req.keep_alive is False and p.dead and p.feed(b"GET / HTTP/1.1\r\n\r\n") == []


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"GET /a b HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\n\n",
    b"\x00\x01\x02garbage\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_is_400(data: bytes) -> None:
    assert only_error(feed_all(data)).status == 400


def test_long_request_target_is_414() -> None:
    lim = Limits(max_request_line=100)
    assert only_error(feed_all(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n\r\n", lim)).status == 414
    # also when the target trickles in
    p = RequestParser(lim)
    events: list = p.feed(b"GET /")
    for _ in range(30):
        events += p.feed(b"aaaaaaa")
    assert only_error(events).status == 414


def test_large_headers_are_431() -> None:
    lim = Limits(max_header_size=256, max_headers=5)
    big = b"GET / HTTP/1.1\r\nX: " + b"v" * 300 + b"\r\n\r\n"
    assert only_error(feed_all(big, lim)).status == 431
    many = b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: 1\r\n" % i for i in range(6)) + b"\r\n"
    assert only_error(feed_all(many, lim)).status == 431


def test_one_header_trickled_forever_is_431() -> None:
    """llhttp buffers an unfinished header value: the feed-level bound stops it."""
    lim = Limits(max_request_line=64, max_header_size=256)
    p = RequestParser(lim)
    events: list = p.feed(b"GET / HTTP/1.1\r\nX: ")
    for _ in range(100):
        events += p.feed(b"y" * 10)
        if events:
            break
    assert only_error(events).status == 431


def test_body_limit_is_413() -> None:
    lim = Limits(max_body=10)
    # announced: refused before any body byte
    assert only_error(feed_all(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", lim)).status == 413
    # chunked: refused once the decoded body passes the limit
    chunked = (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"8\r\n12345678\r\n8\r\n12345678\r\n")
    assert only_error(feed_all(chunked, lim)).status == 413
    # exactly at the limit is fine
    [req] = feed_all(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789", lim)
    assert req.body == b"0123456789"


@pytest.mark.parametrize(("data", "status"), [
    (b"FOO / HTTP/1.1\r\n\r\n", 501),
    (b"BREW /pot HTTP/1.1\r\n\r\n", 501),
    (b"PROPFIND / HTTP/1.1\r\n\r\n", 501),
    (b"CONNECT example:443 HTTP/1.1\r\n\r\n", 501),
    (b"TRACE / HTTP/1.1\r\n\r\n", 501),
    (b"get / HTTP/1.1\r\n\r\n", 501),
    (b"GET / HTTP/3.0\r\n\r\n", 505),
    (b"GET / HTTP/2.0\r\nConnection: keep-alive\r\n\r\n", 505),
    (b"GET / HTTP/0.9\r\nConnection: close\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nExpect: something\r\n\r\n", 417),
])
def test_method_version_expect(data: bytes, status: int) -> None:
    assert only_error(feed_all(data)).status == status


def test_unknown_method_after_pipelined_requests() -> None:
    events = feed_all(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nFOO / HTTP/1.1\r\n\r\n")
    assert [type(e) for e in events] == [Request, Request, HttpError]
    assert events[-1].status == 501
    events = feed_all(b"GET /1 HTTP/1.1\r\n\r\n\x01\x02 junk\r\n\r\n")
    assert events[-1].status == 400
    # the bad request begins in a later feed than the previous one's start
    p = RequestParser()
    assert p.feed(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\na") == []
    events = p.feed(b"bcFOO / HTTP/1.1\r\n\r\n")
    assert [type(e) for e in events] == [Request, HttpError] and events[-1].status == 501


def test_dead_parser_ignores_input() -> None:
    p = RequestParser()
    assert only_error(p.feed(b"\x00\r\n\r\n")).status == 400
    assert p.dead and p.feed(b"GET / HTTP/1.1\r\n\r\n") == []


# -- properties -------------------------------------------------------------------------------

_request_strategy = st.builds(
    lambda method, path, hdrs, body: (method, path, hdrs, body),
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/%", min_size=0, max_size=30),
    st.lists(st.tuples(st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12),
                       st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ;=,", max_size=20)),
             max_size=5),
    st.binary(max_size=40),
)


def _encode(method: str, path: str, hdrs: list[tuple[str, str]], body: bytes,
            chunked: bool) -> bytes:
    lines = [f"{method} /{path} HTTP/1.1", "Host: test"]
    lines += [f"X-{k}: {v.strip()}" for k, v in hdrs]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


@settings(max_examples=150, deadline=None)
@given(st.lists(_request_strategy, min_size=1, max_size=6), st.booleans(),
       st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_any_split_of_a_pipelined_stream_gives_the_same_requests(
        reqs: list, chunked: bool, cuts: list[int]) -> None:
    stream = b"".join(_encode(m, p, h, b, chunked) for m, p, h, b in reqs)
    whole = feed_all(stream)
    split = feed_all(stream, chunks=cuts)
    assert all(isinstance(e, Request) for e in whole)
    assert len(whole) == len(reqs)
    key = [(r.method, r.target, r.raw_headers, r.body, r.keep_alive) for r in whole]
    assert key == [(r.method, r.target, r.raw_headers, r.body, r.keep_alive) for r in split]
    assert [r.body for r in whole] == [b for _, _, _, b in reqs]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=1, max_value=50), max_size=10))
def test_garbage_never_crashes(data: bytes, cuts: list[int]) -> None:
    events = feed_all(data, Limits(max_request_line=64, max_header_size=128), chunks=cuts)
    for e in events[:-1]:
        assert isinstance(e, (Request, type(CONTINUE)))
    if events and isinstance(events[-1], HttpError):
        assert events[-1].status in (400, 413, 414, 417, 431, 501, 505)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200).filter(
    lambda b: b[:1] not in b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrs"
                           b"tuvwxyz\r\n"))
def test_garbage_not_starting_like_a_method_is_400(data: bytes) -> None:
    """Bytes that cannot begin a method token are a 400, never a 501."""
    events = feed_all(data)
    assert events == [] or only_error(events).status == 400


# -- responses --------------------------------------------------------------------------------

def test_render_head() -> None:
    date, server = b"Date: D\r\n", b"Server: aem\r\n"
    head = render_head(200, [("Content-Type", "text/plain")], 5, True, "1.1", date, server)
    assert head == (b"HTTP/1.1 200 OK\r\nServer: aem\r\nDate: D\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: 5\r\n\r\n")
    head = render_head(404, [], 0, False, "1.1", date, server)
    assert head.endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    head = render_head(200, [], 1, True, "1.0", date, server)
    assert head.endswith(b"Connection: keep-alive\r\n\r\n")
    head = render_head(304, [], None, True, "1.1", date, server)
    assert b"Content-Length" not in head and head.endswith(b"Date: D\r\n\r\n")
    for bad in ([("X", "a\r\nSet-Cookie: evil")], [("Bad:Name", "v")], [("", "v")]):
        with pytest.raises(ValueError):
            render_head(200, bad, 0, True, "1.1", date, server)


def test_error_response_and_date() -> None:
    clock = DateClock()
    line = clock.line(784111777.0)
    assert line == b"Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
    assert clock.line(784111777.5) is line
    resp = error_response(413, "too big", False, "1.1", line, b"Server: aem\r\n")
    assert resp.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"Connection: close" in resp and resp.endswith(b"413 Content Too Large\ntoo big\n")
    assert error_response(400, "", False, "1.1", line, b"", head_only=True).endswith(b"\r\n\r\n")


def test_public_names_are_exported() -> None:
    import aem.http

    for name in aem.http.__all__:
        assert getattr(aem.http, name) is not None
    assert aem.http.Request is Request and aem.http.Limits is Limits
