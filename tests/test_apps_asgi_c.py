"""The C half of the ASGI server (asgi_cycle.c, asgi_scope.c) against its Python half.

The usual ``receive()``/``send()`` and the scope are C; what they decline goes to the Python
half.  Every response framed in C must be the bytes the Python half frames; every scope built
in C the dict ``make_scope`` builds; a response held to the end of the loop turn must still
leave in order with the connection's other output.  Driven in-process through a transport
that records what is written (on the aem loop, which holds responses to the end of the turn,
and on asyncio's, which has no turn to wait for).
"""

from __future__ import annotations

import asyncio
import inspect
import types
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aem.loop
from aem import _core
from aem.http import asgi as A
from aem.http.protocol import Request

LOOPS = ["aem", "asyncio"]


class Recorder(asyncio.Transport):
    """A transport that keeps what is written (and ``<close>`` where it closed)."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.out.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.out.append(b"<close>")

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def write_eof(self) -> None:
        self.out.append(b"<eof>")

    def can_write_eof(self) -> bool:
        return True


def run(kind: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    loop = aem.loop.new_event_loop() if kind == "aem" else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def exchange(app: Any, data: bytes, turns: int = 20) -> bytes:
    """Feed ``data`` to a connection serving ``app``; everything written, in order."""
    srv = A.ASGIServer(app, lifespan="off")
    srv._server_addr = ["127.0.0.1", 8000]
    conn = A._HttpProtocol(srv)
    t = Recorder()
    conn.connection_made(t)
    conn.data_received(data)
    for _ in range(turns):
        await asyncio.sleep(0)
    return b"".join(t.out)


def no_date(data: bytes) -> bytes:
    return b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(b"Date: "))


def whole_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes, c_half: bool) -> Any:
    """An app answering with one start and one body; the Python half is made to frame it by
    giving what the C half declines (an iterator of list pairs, a bytearray body)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        fields: Any = headers if c_half else iter([list(p) for p in headers])
        await send({"type": "http.response.start", "status": status, "headers": fields})
        await send({"type": "http.response.body", "body": body if c_half else bytearray(body)})

    return app


CASES = [
    (200, [(b"content-type", b"text/plain")], b"Hello, world!"),
    (200, [(b"Content-Type", b"application/json"), (b"Content-Length", b"2")], b"{}"),
    (201, [(b"x-a", b""), (b"X-B", b"b c"), (b"server", b"other"), (b"date", b"yesterday"),
           (b"connection", b"keep-alive"), (b"keep-alive", b"5")], b"created"),
    (204, [], b""),
    (304, [(b"etag", b'"x"')], b""),
    (404, [(b"content-type", b"text/plain")], b""),
    (599, [], b"odd"),
    (200, [], b"x" * 70_000),
]
REQUESTS = [
    b"GET /p?q=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /p HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /p HTTP/1.0\r\n\r\n",
    b"GET /p HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
]


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("request_bytes", REQUESTS)
def test_the_c_half_frames_as_the_python_half(kind: str, case: int, request_bytes: bytes,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    status, headers, body = CASES[case]
    slow: list[str] = []
    orig = A._Cycle._send_slow

    def counting(self: A._Cycle, message: Any) -> Any:
        slow.append(message["type"])
        return orig(self, message)

    monkeypatch.setattr(A._Cycle, "_send_slow", counting)
    fast = run(kind, lambda: exchange(whole_response(status, headers, body, True), request_bytes))
    assert slow == []                                   # the C half answered alone
    py = run(kind, lambda: exchange(whole_response(status, headers, body, False), request_bytes))
    assert slow == ["http.response.start", "http.response.body"]
    assert fast.startswith(b"HTTP/1.1 %d " % status)
    assert no_date(fast) == no_date(py)


@pytest.mark.parametrize("kind", LOOPS)
def test_what_the_c_half_declines_still_works(kind: str) -> None:
    """A start with a bad field, a Content-Length the body breaks, a HEAD: the Python half."""

    def app_of(headers: list[tuple[bytes, bytes]], body: bytes) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        return app

    out = run(kind, lambda: exchange(app_of([(b"x", b"a\r\nevil: 1")], b"hi"),
                                     b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert out.startswith(b"HTTP/1.1 500 ") and b"evil" not in out
    out = run(kind, lambda: exchange(app_of([(b"content-length", b"5")], b"hi"),
                                     b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"hi<close>")   # framing broken: closed
    out = run(kind, lambda: exchange(app_of([(b"content-length", b"2")], b"hi"),
                                     b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert out.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 2\r\n" in out and not out.endswith(b"hi")
    out = run(kind, lambda: exchange(app_of([(b"content-length", b"x2")], b"hi"),
                                     b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert out.startswith(b"HTTP/1.1 500 ")   # int("x2") raised in the app's send


@pytest.mark.parametrize("kind", LOOPS)
def test_held_responses_leave_in_order(kind: str) -> None:
    """Pipelined: answered by the app (held to the end of the turn), then a malformed request
    answered at once, then the close: on the wire in that order."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    data = (b"GET /one HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            b"GET /two HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            b"BAD\x00 / HTTP/1.1\r\n\r\n")
    out = run(kind, lambda: exchange(app, data))
    marks = [out.index(m) for m in (b"/one", b"/two", b"HTTP/1.1 400 ", b"<close>")]
    assert marks == sorted(marks)
    data = b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = run(kind, lambda: exchange(app, data))
    assert out.endswith(b"/last<close>") and b"Connection: close\r\n" in out


def test_receive_and_send_are_awaitables_of_every_kind() -> None:
    """What receive()/send() return works with await, asyncio.wait_for and ensure_future."""
    got: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        r = receive()
        assert inspect.isawaitable(r)
        got.append(await asyncio.wait_for(r, 1))
        s = send({"type": "http.response.start", "status": 200, "headers": []})
        got.append(await asyncio.ensure_future(s))
        await send({"type": "http.response.body", "body": b"ok"})

    out = run("aem", lambda: exchange(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert out.endswith(b"ok")
    assert got == [{"type": "http.request", "body": b"", "more_body": False}, None]
    with pytest.raises(AttributeError, match="_send_slow"):   # a bare C half: no Python half to ask
        _core.AsgiCycle().send({"type": "http.response.start"})


def test_a_done_awaitable_behaves_as_a_finished_coroutine() -> None:
    async def main() -> Any:
        srv = A.ASGIServer(lambda *a: None, lifespan="off")
        conn = A._HttpProtocol(srv)
        conn.connection_made(Recorder())
        req = Request("GET", "/", "1.1", [(b"Host", b"x")], b"data")
        cyc = _core.AsgiCycle()
        cyc._setup(conn, req, None)
        return cyc.receive()

    d = run("asyncio", main)
    with pytest.raises(StopIteration) as e:
        d.send(None)
    assert e.value.value == {"type": "http.request", "body": b"data", "more_body": False}
    with pytest.raises(KeyError):
        d.throw(KeyError("k"))
    assert d.close() is None


_TCHAR = st.sampled_from(list("abcxyzABCXYZ-_0129"))
_PATHCHARS = st.text(st.sampled_from(list("abc/XYZ-._~!$&'()*+,;=:@%20é")), max_size=12)


@settings(max_examples=300, deadline=None)
@given(path=_PATHCHARS, query=st.none() | st.text(st.sampled_from(list("a=b&c%é?/")), max_size=8),
       names=st.lists(st.text(_TCHAR, min_size=1, max_size=8), max_size=5),
       root=st.sampled_from(["", "/api", "/é"]), method=st.sampled_from(["GET", "POST", "HEAD"]),
       version=st.sampled_from(["1.1", "1.0"]))
def test_the_c_scope_is_make_scope(path: str, query: str | None, names: list[str], root: str, method: str,
                                   version: str) -> None:
    target = "/" + path + ("" if query is None else "?" + query)
    raw = [(n.encode(), b"v%d" % i) for i, n in enumerate(names)]
    req = Request(method, target, version, raw, b"")
    server = types.SimpleNamespace(root_path=root, state={"k": 1})
    conn = types.SimpleNamespace(server=server, server_addr=["127.0.0.1", 80], client=["1.2.3.4", 5])
    scope = _core.asgi_scope(req, root, conn.server_addr, conn.client, server.state)
    want = A.make_scope(conn, req, "http")  # type: ignore[arg-type]
    if scope is None:
        assert "%" in target.partition("?")[0]   # only a percent-encoded path is left to Python
        return
    assert scope == want
    assert list(scope) == list(want)
    assert scope["state"] is not server.state and scope["extensions"] is not want["extensions"]


def test_lowering_a_one_letter_name_leaves_the_shared_bytes_alone() -> None:
    """b"X" made from a string is the interpreter's one shared object: never lowered in place."""
    name = bytes([ord("X")])
    req = Request("GET", "/", "1.1", [(name, b"1"), (b"Y", b"2")], b"")
    scope = _core.asgi_scope(req, "", None, None, {})
    assert scope is not None and scope["headers"] == [(b"x", b"1"), (b"y", b"2")]
    assert bytes([88])[0] == 88 and bytes([89])[0] == 89   # (the shared objects' own bytes)


def test_the_c_scope_declines_what_it_does_not_build() -> None:
    state: dict[str, Any] = {}
    for target in ("*", "http://h/p", "/a%20b"):
        req = Request("GET", target, "1.1", [], b"")
        assert _core.asgi_scope(req, "", None, None, state) is None
    req = Request("GET", "/", "1.1", [[b"Host", b"x"]], b"")   # type: ignore[list-item]
    assert _core.asgi_scope(req, "", None, None, state) is None
    with pytest.raises(TypeError):
        _core.asgi_scope(req, b"", None, None, state)  # type: ignore[arg-type]
