"""aem.http.protocol driven with bytes only: no socket, no clock (h11 style)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aem.http.protocol import (
    ALLOW_METHODS,
    BODY,
    BODY_TIMER,
    CONTINUE,
    HEAD,
    HEADER_TIMER,
    IDLE,
    IDLE_TIMER,
    KEEP,
    BodyBudget,
    Connection,
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
    [req] = feed_all(b"POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
    assert req.method == "POST" and req.body == b"hello"


def test_chunked_body() -> None:
    data = b"PUT /e HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    [req] = feed_all(data)
    assert req.body == b"abcde"


def test_keep_alive_rules() -> None:
    cases = [(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", True),
             (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
             (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", False),
             (b"GET / HTTP/1.0\r\n\r\n", False)]
    for data, keep in cases:
        [req] = feed_all(data)
        assert req.keep_alive is keep


@pytest.mark.parametrize("line", [
    b"GET / HTTP/2.0\r\n\r\n", b"GET / HTTP/0.9\r\n\r\n", b"GET / RTSP/1.0\r\n\r\n",
    b"GET / HTTP/3.0\r\nHost: h\r\n\r\n", b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
])
def test_other_protocols_and_versions_are_505(line: bytes) -> None:
    """Regression (issue 9): these request lines were answered 200 as if HTTP/1.0."""
    assert only_error(feed_all(line)).status == 505
    # split anywhere, the verdict is the same
    for cut in range(1, len(line)):
        assert only_error(feed_all(line, chunks=[cut])).status == 505


def test_rtsp_among_pipelined_http10_requests() -> None:
    ka = b"Connection: keep-alive\r\n\r\n"
    stream = (b"GET /a HTTP/1.0\r\n" + ka + b"GET /b HTTP/1.0\r\n" + ka
              + b"GET /b RTSP/1.0\r\n" + ka)
    events = feed_all(stream)
    assert [type(e) for e in events] == [Request, Request, HttpError] and events[-1].status == 505
    assert [type(e) for e in feed_all(stream, chunks=[30, 7, 40])] == [Request, Request, HttpError]


def test_http_1_x_is_answered_as_1_1() -> None:
    """Regression (issue 9): HTTP/1.2 got 505; RFC 9112 §2.5 reads 1.x as 1.1."""
    [req] = feed_all(b"GET / HTTP/1.2\r\nHost: h\r\n\r\n")
    assert req.version == "1.1" and req.keep_alive
    assert only_error(feed_all(b"GET / HTTP/1.2\r\n\r\n")).status == 400  # Host as for 1.1
    # after other requests in the same feed, split anywhere, and again on the same connection
    stream = (b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n\r\nGET /2 HTTP/1.2\r\nHost: h\r\n\r\n"
              b"POST /3 HTTP/1.9\r\nHost: h\r\nContent-Length: 2\r\n\r\nab"
              b"GET /4 HTTP/1.1\r\nHost: h\r\n\r\n")
    for cut in range(1, len(stream), 7):
        events = feed_all(stream, chunks=[cut])
        assert [(e.target, e.version, e.body) for e in events] == [
            ("/1", "1.1", b""), ("/2", "1.1", b""), ("/3", "1.1", b"ab"), ("/4", "1.1", b"")]
    for line in (b"GET / HTTP/2.1\r\nHost: h\r\n\r\n", b"GET / HTTP/9.9\r\nHost: h\r\n\r\n"):
        assert only_error(feed_all(line)).status == 505
        assert only_error(feed_all(b"GET / HTTP/1.2\r\nHost: h\r\n\r\n" + line)).status == 505


def test_versions() -> None:
    [req] = feed_all(b"GET / HTTP/1.0\r\n\r\n")
    assert req.version == "1.0" and not req.keep_alive
    [req] = feed_all(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert req.version == "1.1" and not req.keep_alive


def test_nothing_after_a_closing_request() -> None:
    p = RequestParser()
    events = p.feed(b"GET /1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
                    b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [e.target for e in events] == ["/1"] and p.dead


def test_pipelined_requests_in_order() -> None:
    data = b"".join(f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(20))
    reqs = feed_all(data)
    assert [r.target for r in reqs] == [f"/{i}" for i in range(20)]


def test_expect_100_continue() -> None:
    p = RequestParser()
    events = p.feed(b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert events == [CONTINUE] and p.phase == BODY
    [req] = p.feed(b"abc")
    assert req.body == b"abc" and p.phase == IDLE
    # no body announced: no interim response
    assert feed_all(b"GET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n")[0] is not CONTINUE


def test_phases_and_timers() -> None:
    p = RequestParser()
    assert p.feed(b"GET / HT") == [] and p.phase == HEAD and p.timer == HEADER_TIMER
    # the header deadline runs from the head's first byte: more of it keeps the deadline
    assert p.feed(b"TP/1.1\r\nHost:") == [] and p.phase == HEAD and p.timer == KEEP
    assert len(p.feed(b" x\r\n\r\n")) == 1 and p.phase == IDLE and p.timer == IDLE_TIMER
    assert not p.feed_eof()
    p.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nab")
    assert p.phase == BODY and p.timer == BODY_TIMER and p.feed_eof()
    p.feed(b"c")
    assert p.timer == BODY_TIMER     # body bytes are progress
    p = RequestParser()
    p.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    p.feed(b"2\r\nab\r\n")
    assert p.timer == BODY_TIMER
    p.feed(b"0\r\nX-T")
    assert p.timer == KEEP           # framing and trailers without a body byte are not


def test_upgrade_is_answered_then_closed() -> None:
    p = RequestParser()
    [req] = p.feed(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nxx")
    assert req.keep_alive is False and p.dead and p.feed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n") == []


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nBad Header: x\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\n\n",
    b"\x00\x01\x02garbage\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_is_400(data: bytes) -> None:
    assert only_error(feed_all(data)).status == 400


def test_long_request_target_is_414() -> None:
    lim = Limits(max_request_line=100)
    assert only_error(feed_all(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: h\r\n\r\n", lim)).status == 414
    # also when the target trickles in
    p = RequestParser(lim)
    events: list = p.feed(b"GET /")
    for _ in range(30):
        events += p.feed(b"aaaaaaa")
    assert only_error(events).status == 414


def test_large_headers_are_431() -> None:
    lim = Limits(max_header_size=256, max_headers=5)
    big = b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"v" * 300 + b"\r\n\r\n"
    assert only_error(feed_all(big, lim)).status == 431
    many = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"H%d: 1\r\n" % i for i in range(6)) + b"\r\n"
    assert only_error(feed_all(many, lim)).status == 431


def test_one_header_trickled_forever_is_431() -> None:
    """llhttp buffers an unfinished header value: the feed-level bound stops it."""
    lim = Limits(max_request_line=64, max_header_size=256)
    p = RequestParser(lim)
    events: list = p.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX: ")
    for _ in range(100):
        events += p.feed(b"y" * 10)
        if events:
            break
    assert only_error(events).status == 431


def test_body_limit_is_413() -> None:
    lim = Limits(max_body=10)
    # announced: refused before any body byte
    announced = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n"
    assert only_error(feed_all(announced, lim)).status == 413
    # chunked: refused once the decoded body passes the limit
    chunked = (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"8\r\n12345678\r\n8\r\n12345678\r\n")
    assert only_error(feed_all(chunked, lim)).status == 413
    # exactly at the limit is fine
    [req] = feed_all(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789", lim)
    assert req.body == b"0123456789"


@pytest.mark.parametrize(("data", "status"), [
    (b"FOO / HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    (b"BREW /pot HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    (b"PROPFIND / HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    (b"CONNECT example:443 HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    (b"TRACE / HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    (b"get / HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    (b"GET / HTTP/3.0\r\n\r\n", 505),
    (b"GET / HTTP/2.0\r\nConnection: keep-alive\r\n\r\n", 505),
    (b"GET / HTTP/0.9\r\nConnection: close\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nHost: h\r\nExpect: something\r\n\r\n", 417),
])
def test_method_version_expect(data: bytes, status: int) -> None:
    assert only_error(feed_all(data)).status == status


def test_unknown_method_after_pipelined_requests() -> None:
    events = feed_all(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n"
                      b"FOO / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [type(e) for e in events] == [Request, Request, HttpError]
    assert events[-1].status == 501
    events = feed_all(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n\x01\x02 junk\r\n\r\n")
    assert events[-1].status == 400
    # the bad request begins in a later feed than the previous one's start
    p = RequestParser()
    assert p.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\na") == []
    events = p.feed(b"bcFOO / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [type(e) for e in events] == [Request, HttpError] and events[-1].status == 501


def test_dead_parser_ignores_input() -> None:
    p = RequestParser()
    assert only_error(p.feed(b"\x00\r\n\r\n")).status == 400
    assert p.dead and p.feed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n") == []


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


# -- regressions of issue 9 (the adversarial client's bytes) -------------------------------------

@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n\r\n",                                   # no Host
    b"GET / HTTP/1.1\r\nHost:\r\n\r\n",                          # empty Host
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",             # two Host fields
    b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n",                    # not a host
    b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",             # two, even in 1.0
    b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n",
])
def test_host_is_validated(data: bytes) -> None:
    assert only_error(feed_all(data)).status == 400


@pytest.mark.parametrize("host", [b"example.com", b"example.com:8080", b"127.0.0.1:1",
                                  b"[::1]:8080", b"xn--bcher-kva.example", b"a_b.local:"])
def test_valid_hosts_pass(host: bytes) -> None:
    [req] = feed_all(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert req.headers["host"] == host.decode()
    [req] = feed_all(b"GET / HTTP/1.0\r\n\r\n")  # HTTP/1.0 may omit it
    assert req.version == "1.0"


def test_http10_with_transfer_encoding_is_faulty_framing() -> None:
    """RFC 9112 §6.1: 400 and close; the smuggled request after it is never answered."""
    data = (b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n")
    events = feed_all(data)
    assert len(events) == 1 and only_error(events).status == 400


@pytest.mark.parametrize(("te", "status"), [
    (b"identity, chunked", 501), (b"gzip", 501), (b"gzip, chunked", 501), (b"x-unknown", 501),
    (b"chunked, chunked", 400),
])
def test_transfer_codings(te: bytes, status: int) -> None:
    data = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: " + te + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert only_error(feed_all(data)).status == status
    # two fields are one list
    [k, v] = te.split(b", ") if b", " in te else [te, None]
    if v is not None:
        two = (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: " + k +
               b"\r\nTransfer-Encoding: " + v + b"\r\n\r\n")
        assert only_error(feed_all(two)).status == status


def test_chunked_with_trailers_is_fine() -> None:
    data = (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")
    [req] = feed_all(data)
    assert req.body == b"abc"


def test_endless_trailer_is_cut_in_linear_time() -> None:
    """Regression (issue 9): ``0\\r\\nX-T: `` then endless bytes cost quadratic CPU and memory."""
    lim = Limits(max_header_size=4096)
    p = RequestParser(lim)
    events = p.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n0\r\nX-T: ")
    assert events == []
    fed = 0
    while not events and fed < 1 << 20:
        events = p.feed(b"y" * 1024)
        fed += 1024
        assert p.timer == KEEP  # the trailer does not renew the body deadline
    assert only_error(events).status == 431 and fed <= 4096 + 1024
    # many small trailer fields count with the headers too
    many = (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
            + b"".join(b"T%d: v\r\n" % i for i in range(200)) + b"\r\n")
    assert only_error(feed_all(many)).status == 431


def test_chunk_extensions_alone_are_bounded() -> None:
    p = RequestParser(Limits(max_header_size=1000))
    p.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;")
    events: list = []
    for _ in range(100):
        events = p.feed(b"e=x;" * 50)
        if events:
            break
    assert events and events[-1].status in (400, 431)


def test_a_body_in_tiny_chunks_holds_its_size_not_more() -> None:
    """Regression (issue 9): 2-byte chunks held ~6x their size as a list of bytes objects."""
    import tracemalloc

    n = 20000
    data = (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"2\r\nab\r\n" * n)
    p = RequestParser(Limits(max_body=1 << 20))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    assert p.feed(data) == []
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert held < 4 * 2 * n, held       # the 40 KB decoded, in one buffer (not ~1 MB)
    [req] = p.feed(b"0\r\n\r\n")
    assert req.body == b"ab" * n


def test_body_budget_is_shared_and_given_back() -> None:
    budget = BodyBudget(100)
    a, b = RequestParser(budget=budget), RequestParser(budget=budget)
    head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 80\r\n\r\n"
    assert a.feed(head + b"x" * 60) == [] and budget.used == 60
    events = b.feed(head + b"y" * 60)
    assert only_error(events).status == 503 and budget.used == 60
    [req] = a.feed(b"x" * 20)
    assert req.body == b"x" * 80 and budget.used == 0
    c = RequestParser(budget=budget)
    c.feed(head + b"z" * 50)
    assert budget.used == 50
    c.close()                      # the connection went away with its body unfinished
    assert budget.used == 0
    with pytest.raises(ValueError):
        BodyBudget(-1)


def test_unwanted_body_is_answered_first_and_dropped() -> None:
    """Regression (issue 9): bodies were buffered in full even when the answer was 405."""
    asked: list[tuple[str, str]] = []

    def wants(method: str, target: str) -> bool:
        asked.append((method, target))
        return False

    budget = BodyBudget(1 << 20)
    p = RequestParser(Limits(max_body=1 << 20), budget=budget, wants_body=wants)
    [req] = p.feed(b"POST /f HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n")
    assert req.body == b"" and req.keep_alive and asked == [("POST", "/f")]
    for _ in range(10):
        assert p.feed(b"x" * 10000) == [] or True
    assert budget.used == 0
    [nxt] = p.feed(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    assert nxt.target == "/next"       # the body was dropped and the stream goes on
    assert len(asked) == 1             # a request without a body is not asked about
    # chunked, or waiting for 100-continue: answered, then the connection closes
    for extra in (b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\nExpect: 100-continue\r\n"):
        p = RequestParser(wants_body=wants)
        events = p.feed(b"POST / HTTP/1.1\r\nHost: h\r\n" + extra + b"\r\n")
        assert [type(e) for e in events] == [Request] and not events[0].keep_alive and p.dead


def test_unknown_method_late_in_a_big_window_is_quick() -> None:
    """Regression (issue 9): the 400-or-501 choice re-parsed up to 16 KB one byte at a time."""
    import time

    p = RequestParser()
    body = b"x" * 15000
    p.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:100])
    t = time.perf_counter()
    events = p.feed(body[100:] + b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nBREW /pot HTTP/1.1\r\n\r\n")
    elapsed = time.perf_counter() - t
    assert [type(e) for e in events] == [Request, Request, HttpError] and events[-1].status == 501
    p = RequestParser()
    p.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\na")
    events = p.feed(b"bc\x01\x02 junk\r\n\r\n")
    assert events[-1].status == 400
    assert elapsed < 5   # not a speed test: only that it ends (the old path took 16 K parses)


def test_method_501_carries_allow() -> None:
    err = only_error(feed_all(b"BREW /pot HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert err.status == 501 and ("Allow", ALLOW_METHODS) in err.headers
    err = only_error(feed_all(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n"))
    assert err.status == 501 and not err.headers


# -- the connection state machine ---------------------------------------------------------------

DATE = b"Date: D\r\n"


def _conn_request(raw: bytes) -> tuple[Connection, Request]:
    c = Connection()
    [req] = c.receive(raw)
    assert isinstance(req, Request)
    return c, req


@pytest.mark.parametrize(("method", "status", "length_sent", "body_sent"), [
    ("GET", 200, True, True), ("HEAD", 200, True, False), ("GET", 204, False, False),
    ("GET", 304, False, False), ("HEAD", 404, True, False), ("POST", 201, True, True),
    ("GET", 101, False, False),
])
def test_connection_framing(method: str, status: int, length_sent: bool, body_sent: bool) -> None:
    c, req = _conn_request(f"{method} / HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    first, second = c.response(req, status, [("X-A", "b")], b"hello", DATE)
    head, _, rest = (first + second).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert (b"Content-Length: 5" in head) is length_sent
    assert rest == (b"hello" if body_sent else b"")
    assert not c.closing


def test_connection_keep_alive_and_close() -> None:
    c, req = _conn_request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    first, _ = c.response(req, 200, [], b"x", DATE)
    assert b"Connection: keep-alive\r\n" in first and not c.closing
    c, req = _conn_request(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    first, _ = c.response(req, 200, [("Content-Type", "text/plain")], b"x", DATE)
    assert b"Connection: close\r\n" in first and c.closing
    # a big body comes apart from its head; a file's head says whether content follows
    c, req = _conn_request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    first, second = c.response(req, 200, [], b"z" * 100000, DATE)
    assert second == b"z" * 100000 and first.endswith(b"Content-Length: 100000\r\n\r\n")
    head, follows = c.file_response(req, 206, [("Content-Range", "bytes 0-9/20")], 10, DATE)
    assert follows and b"Content-Length: 10\r\n" in head
    head, follows = c.file_response(req, 304, [], 10, DATE)
    assert not follows and b"Content-Length" not in head


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("connection", ["", "close", "keep-alive"])
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
@pytest.mark.parametrize("status", [200, 404])
def test_connection_response_shortcuts_give_what_render_head_gives(
        version: str, connection: str, method: str, status: int) -> None:
    """The usual answers skip render_head (one field, small body, kept alive or closing):
    the bytes are the same as its, for every combination around them (the field seen
    before, so that the shortcut applies where it can)."""
    field = ("Content-Type", "text/plain; charset=utf-8")
    render_head(200, [field], 1, True, "1.1", DATE, b"S: s\r\n")  # the field's line is known
    head = f"{method} / HTTP/{version}\r\nHost: h\r\n"
    if connection:
        head += f"Connection: {connection}\r\n"
    c, req = _conn_request((head + "\r\n").encode())
    keep = req.keep_alive
    body = b"hello"
    first, second = c.response(req, status, [field], body, DATE)
    want = render_head(status, [field], len(body), keep, version, DATE, c._server_line)
    assert first + second == want + (b"" if method == "HEAD" else body)
    assert c.closing is (not keep)


def test_connection_errors_and_timeouts() -> None:
    c = Connection()
    [err] = c.receive(b"BREW / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert isinstance(err, HttpError)
    data = c.error(err, DATE)
    assert data.startswith(b"HTTP/1.1 501 ") and b"\r\nAllow: GET, HEAD, POST" in data
    assert c.closing
    c = Connection()
    assert c.timeout(DATE) is None and c.closing      # idle: closed without a word
    c = Connection()
    c.receive(b"GET / HT")
    assert c.timer == HEADER_TIMER and c.resume_timer() == HEADER_TIMER
    assert (c.timeout(DATE) or b"").startswith(b"HTTP/1.1 408 ")


@settings(max_examples=100, deadline=None)
@given(st.lists(_request_strategy, min_size=1, max_size=5),
       st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_dropped_bodies_do_not_depend_on_the_split(reqs: list, cuts: list[int]) -> None:
    """With no body wanted, every request is delivered at its head and the stream goes on."""
    stream = b"".join(_encode(m, p, h, b, False) for m, p, h, b in reqs)

    def run(chunks: list[int] | None) -> list:
        budget = BodyBudget(0)     # nothing may be buffered: dropped bodies take no budget
        p = RequestParser(budget=budget, wants_body=lambda m, t: False)
        out, pos = [], 0
        for n in chunks or []:
            out += p.feed(stream[pos:pos + n])
            pos += n
        out += p.feed(stream[pos:])
        assert budget.used == 0
        return [(e.method, e.target, e.body, e.keep_alive) for e in out]

    whole = run(None)
    assert whole == run(cuts)
    assert [t for _, t, _, _ in whole] == [f"/{p}" for _, p, _, _ in reqs]
    assert all(body == b"" and keep for _, _, body, keep in whole)
