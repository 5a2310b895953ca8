"""Request bodies stream to apps (ASGI and WSGI): as they arrive, with back-pressure, within
the limits; ``Expect: 100-continue`` answered when the app asks for the body."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from appkit import Served, serve
from hypothesis import given
from hypothesis import strategies as st

import aem
from aem.http.asgi import ASGIServer
from aem.http.protocol import BODY_END, CONTINUE, HttpError, Limits, Request, RequestParser

MB = 1 << 20
WSGI_WAIT = r"on http://127\.0\.0\.1:(\d+)/ with \d+ WSGI workers"


def _wait_mark(marks: Path, name: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = marks / name
        if p.exists():
            return p.read_text()
        time.sleep(0.01)
    raise AssertionError(f"mark {name!r} not made within {timeout} s")


def _clear(marks: Path) -> None:
    for p in marks.iterdir():
        p.unlink(missing_ok=True)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _response(s: socket.socket) -> bytes:
    """One response with a Content-Length body (or what comes until the close)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _chunked(data: bytes, piece: int = 65536) -> Iterator[bytes]:
    for i in range(0, len(data), piece):
        part = data[i:i + piece]
        yield b"%x\r\n%s\r\n" % (len(part), part)
    yield b"0\r\n\r\n"


@pytest.fixture(scope="module")
def marks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bodymarks")


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory, marks: Path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("bare")
    with serve(tmp, "body_app:asgi", "--no-access-log", "--max-body", str(100 * MB),
               env={"AEM_TEST_MARKS": str(marks)}) as s:
        yield s


@pytest.fixture(scope="module")
def star(tmp_path_factory: pytest.TempPathFactory, marks: Path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("starbody")
    with serve(tmp, "body_app:starlette", "--no-access-log", "--max-body", str(100 * MB),
               env={"AEM_TEST_MARKS": str(marks)}) as s:
        yield s


def _head(path: str, extra: bytes = b"") -> bytes:
    return b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"


# -- ASGI: streaming ----------------------------------------------------------------------------


def test_the_app_gets_the_body_before_it_is_complete(bare: Served, marks: Path) -> None:
    _clear(marks)
    with socket.create_connection(("127.0.0.1", bare.port), timeout=10) as s:
        s.sendall(_head("/count", b"Content-Length: 300000\r\n") + b"a" * 100_000)
        # the app runs and has the first 100 kB while 200 kB are still to come
        assert 0 < int(_wait_mark(marks, "first")) <= 100_000
        s.sendall(b"b" * 200_000)
        total, messages = _response(s).rpartition(b"\r\n\r\n")[2].split()
        assert int(total) == 300_000 and int(messages) >= 2


def test_a_chunked_body_streams_to_starlette(star: Served, marks: Path) -> None:
    _clear(marks)
    data = bytes(range(256)) * 4000
    with socket.create_connection(("127.0.0.1", star.port), timeout=10) as s:
        parts = list(_chunked(data, 50_000))
        s.sendall(_head("/count", b"Transfer-Encoding: chunked\r\n") + parts[0])
        assert int(_wait_mark(marks, "starlette-first")) == 50_000
        s.sendall(b"".join(parts[1:]))
        out = _response(s)
        assert out.startswith(b"HTTP/1.1 200 OK")
        total, chunks = out.rpartition(b"\r\n\r\n")[2].split()
        assert int(total) == len(data) and int(chunks) >= 2
        # the connection stays usable: a Content-Length body next
        s.sendall(_head("/count", b"Content-Length: 5\r\n") + b"hello")
        assert _response(s).endswith(b"\r\n\r\n5 1")


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_50_mb_body_does_not_grow_the_server(star: Served, framing: str) -> None:
    size = 50 * MB
    piece = b"x" * MB
    before = _rss(star.proc.pid)
    with socket.create_connection(("127.0.0.1", star.port), timeout=30) as s:
        if framing == "length":
            s.sendall(_head("/count", b"Content-Length: %d\r\n" % size))
            for _ in range(50):
                s.sendall(piece)
        else:
            s.sendall(_head("/count", b"Transfer-Encoding: chunked\r\n"))
            for _ in range(50):
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            s.sendall(b"0\r\n\r\n")
        out = _response(s)
    assert out.startswith(b"HTTP/1.1 200 OK") and out.rpartition(b"\r\n\r\n")[2].split()[0] == b"%d" % size
    grew = _rss(star.proc.pid) - before
    assert grew < 16 * MB, f"the server grew by {grew / MB:.1f} MB for a 50 MB body"


def test_reading_pauses_while_the_app_leaves_the_body_unread(bare: Served, marks: Path) -> None:
    _clear(marks)
    before = _rss(bare.proc.pid)
    with socket.create_connection(("127.0.0.1", bare.port), timeout=10) as s:
        s.sendall(_head("/stall", b"Content-Length: %d\r\n" % (60 * MB)) + b"y" * 1000)
        _wait_mark(marks, "first")
        s.setblocking(False)
        sent = 0
        piece = b"y" * 65536
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and sent < 60 * MB:
            try:
                sent += s.send(piece)
            except BlockingIOError:
                time.sleep(0.01)
        # what the kernel's socket buffers take, plus the server's bound: far from 60 MB
        assert sent < 24 * MB, f"{sent / MB:.1f} MB accepted while the app reads nothing"
        assert _rss(bare.proc.pid) - before < 8 * MB
    assert _wait_mark(marks, "stall-end") == "http.disconnect"


def test_a_client_leaving_mid_body_gives_http_disconnect(bare: Served, marks: Path) -> None:
    _clear(marks)
    with socket.create_connection(("127.0.0.1", bare.port), timeout=10) as s:
        s.sendall(_head("/count", b"Content-Length: 1000000\r\n") + b"z" * 120_000)
        _wait_mark(marks, "first")
    assert 0 < int(_wait_mark(marks, "disconnect")) <= 120_000
    assert bare.get("/count", method="POST", body=b"ok")[2] == b"2 1"   # the server goes on


def test_a_chunked_body_over_max_body_is_413_and_the_app_disconnected(tmp_path: Path) -> None:
    with serve(tmp_path, "body_app:asgi", "--max-body", "100000",
               env={"AEM_TEST_MARKS": str(tmp_path)}) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            parts = list(_chunked(b"q" * 200_000, 40_000))
            c.sendall(_head("/count", b"Transfer-Encoding: chunked\r\n") + parts[0])
            _wait_mark(tmp_path, "first")
            c.sendall(b"".join(parts[1:]))
            out = _response(c)
            assert out.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in out
            assert c.recv(100) == b""
        assert int(_wait_mark(tmp_path, "disconnect")) <= 100_000
        # a Content-Length over the limit: 413 before the app runs
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            c.sendall(_head("/count", b"Content-Length: 100001\r\n"))
            assert _response(c).startswith(b"HTTP/1.1 413 ")
        assert s.get("/count", method="POST", body=b"x" * 100_000)[2] == b"100000 1"


def test_a_stalled_body_times_out_with_408() -> None:
    """In-process (the body timeout is not a CLI option): a client that stops sending."""
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            seen.append(msg)
            if msg["type"] != "http.request" or not msg.get("more_body"):
                return

    async def main() -> bytes:
        server = ASGIServer(app, port=0, lifespan="off", body_timeout=0.3)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(_head("/", b"Content-Length: 100\r\n") + b"x" * 10)
            out = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return out
        finally:
            await server.shutdown(1)

    with asyncio.Runner(loop_factory=aem.new_event_loop) as r:
        out = r.run(main())
    assert out.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in out
    assert seen == [{"type": "http.request", "body": b"x" * 10, "more_body": True},
                    {"type": "http.disconnect"}]


# -- Expect: 100-continue -------------------------------------------------------------------------


def test_100_continue_goes_out_when_the_app_asks_for_the_body(bare: Served, marks: Path) -> None:
    _clear(marks)
    with socket.create_connection(("127.0.0.1", bare.port), timeout=5) as s:
        s.sendall(_head("/late-read?s=0.4", b"Content-Length: 5\r\nExpect: 100-continue\r\n"))
        s.settimeout(0.25)
        with pytest.raises(TimeoutError):
            s.recv(100)             # not at the head: the app has not asked yet
        s.settimeout(5)
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert (marks / "late-read-receive").exists()
        s.sendall(b"hello")
        out = _response(s)
        assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"5 1")
        assert b"Connection: close" not in out
        # and the connection goes on
        s.sendall(_head("/count", b"Content-Length: 2\r\n") + b"ab")
        assert _response(s).endswith(b"2 1")


def test_no_100_continue_when_the_app_answers_without_the_body(bare: Served) -> None:
    with socket.create_connection(("127.0.0.1", bare.port), timeout=5) as s:
        s.sendall(_head("/no-read", b"Content-Length: 5\r\nExpect: 100-continue\r\n"))
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200 OK") and b"100 Continue" not in out
    assert b"Connection: close" in out and out.endswith(b"not read")


def test_an_unread_body_without_expect_is_drained_and_the_connection_goes_on(bare: Served) -> None:
    with socket.create_connection(("127.0.0.1", bare.port), timeout=5) as s:
        s.sendall(_head("/no-read", b"Content-Length: 200000\r\n") + b"n" * 1000)
        out = _response(s)
        assert out.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" not in out
        s.sendall(b"n" * 199_000 + _head("/count", b"Content-Length: 3\r\n") + b"abc")
        assert _response(s).endswith(b"3 1")


def test_starlette_405_to_an_expect_request_sends_no_100(star: Served) -> None:
    with socket.create_connection(("127.0.0.1", star.port), timeout=5) as s:
        s.sendall(b"PUT /count HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    assert out.startswith(b"HTTP/1.1 405 ") and b"100 Continue" not in out


# -- WSGI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wsgi(tmp_path_factory: pytest.TempPathFactory, marks: Path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("wsgibody")
    with serve(tmp, "body_app:wsgi", "--interface", "wsgi", "--workers", "1", "--no-access-log",
               "--max-body", str(100 * MB), wait=WSGI_WAIT,
               env={"AEM_TEST_MARKS": str(marks)}) as s:
        yield s


def test_wsgi_input_gets_the_body_as_it_arrives(wsgi: Served, marks: Path) -> None:
    _clear(marks)
    data = b"w" * 400_000
    with socket.create_connection(("127.0.0.1", wsgi.port), timeout=10) as s:
        parts = list(_chunked(data, 100_000))
        s.sendall(_head("/count", b"Transfer-Encoding: chunked\r\n") + parts[0])
        assert 0 < int(_wait_mark(marks, "wsgi-first")) <= 100_000
        s.sendall(b"".join(parts[1:]))
        out = _response(s)
        assert out.startswith(b"HTTP/1.1 200 OK")
        assert out.rpartition(b"\r\n\r\n")[2].split()[0] == b"400000"


def test_wsgi_100_continue_when_the_app_reads_wsgi_input_and_not_before(wsgi: Served) -> None:
    with socket.create_connection(("127.0.0.1", wsgi.port), timeout=5) as s:
        s.sendall(_head("/count", b"Content-Length: 5\r\nExpect: 100-continue\r\n"))
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        out = _response(s)
        assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"5 1")
        s.sendall(_head("/no-read", b"Content-Length: 5\r\nExpect: 100-continue\r\n"))
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200 OK") and b"100 Continue" not in out
    assert b"Connection: close" in out and out.endswith(b"not read")
    assert wsgi.get("/count", method="POST", body=b"abc")[2] == b"3 1"   # the worker goes on


def test_wsgi_a_50_mb_body_does_not_grow_the_front(wsgi: Served) -> None:
    before = _rss(wsgi.proc.pid)
    piece = b"v" * MB
    with socket.create_connection(("127.0.0.1", wsgi.port), timeout=30) as s:
        s.sendall(_head("/count", b"Content-Length: %d\r\n" % (50 * MB)))
        for _ in range(50):
            s.sendall(piece)
        out = _response(s)
    assert out.rpartition(b"\r\n\r\n")[2].split()[0] == b"%d" % (50 * MB)
    assert _rss(wsgi.proc.pid) - before < 16 * MB


def test_wsgi_client_leaving_mid_body_reaches_the_app_and_the_worker_goes_on(
        wsgi: Served, marks: Path) -> None:
    _clear(marks)
    pid_before = wsgi.get("/count", method="POST", body=b"1")[2]
    with socket.create_connection(("127.0.0.1", wsgi.port), timeout=10) as s:
        s.sendall(_head("/count", b"Content-Length: 1000000\r\n") + b"z" * 100_000)
        _wait_mark(marks, "wsgi-first")
    kind, _, total = _wait_mark(marks, "wsgi-disconnect").partition(" ")
    assert kind == "ClientDisconnected" and int(total) <= 100_000
    assert pid_before == b"1 1"
    assert wsgi.get("/count", method="POST", body=b"12345")[2] == b"5 1"
    assert "worker" not in wsgi.stderr() or "starting another" not in wsgi.stderr()


def test_wsgi_chunked_body_over_max_body_is_413(tmp_path: Path) -> None:
    with serve(tmp_path, "body_app:wsgi", "--interface", "wsgi", "--max-body", "100000",
               wait=WSGI_WAIT, env={"AEM_TEST_MARKS": str(tmp_path)}) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            parts = list(_chunked(b"q" * 200_000, 40_000))
            c.sendall(_head("/count", b"Transfer-Encoding: chunked\r\n") + parts[0] + parts[1])
            _wait_mark(tmp_path, "wsgi-first")    # (the app reads 64 KiB at a time)
            c.sendall(b"".join(parts[2:]))
            out = _response(c)
            assert out.startswith(b"HTTP/1.1 413 ")
        assert _wait_mark(tmp_path, "wsgi-disconnect").startswith("ClientDisconnected")
        assert s.get("/count", method="POST", body=b"x" * 100_000)[2] == b"100000 2"


# -- the parser's streaming mode (no server) ---------------------------------------------------

_STREAMED = (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nTrailer: t\r\n\r\n"
             b"PUT /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
             b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")


@given(st.lists(st.integers(1, len(_STREAMED) - 1), max_size=12))
def test_stream_parser_gives_heads_then_bodies_however_the_bytes_are_cut(cuts: list[int]) -> None:
    p = RequestParser(stream=True)
    events: list[object] = []
    edges = [0, *sorted(set(cuts)), len(_STREAMED)]
    for a, b in itertools.pairwise(edges):
        events += p.feed(_STREAMED[a:b])
    shape: list[object] = []
    body = b""
    for ev in events:
        if type(ev) is bytes:
            body += ev
            continue
        if body:
            shape.append(body)
            body = b""
        shape.append((ev.method, ev.more_body, ev.body) if isinstance(ev, Request) else ev)
    assert shape == [("POST", True, b""), b"hello world!", BODY_END, ("PUT", True, b""), b"abc",
                     BODY_END, ("GET", False, b"")]


def test_stream_parser_limits_continue_and_no_budget() -> None:
    p = RequestParser(Limits(max_body=10), stream=True)
    ev = p.feed(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
    assert len(ev) == 2 and isinstance(ev[0], Request) and ev[0].more_body and ev[1] is CONTINUE
    assert p.feed(b"0123456789") == [b"0123456789", BODY_END]
    assert p.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n") == [HttpError(413)]
    p = RequestParser(Limits(max_body=10), stream=True)
    ev = p.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n")
    assert ev[1:] == [b"abcdef"]
    assert p.feed(b"6\r\nghijkl\r\n") == [HttpError(413)]
    # a body that ends a Connection: close request, then garbage: not answered
    p = RequestParser(stream=True)
    ev = p.feed(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1\r\n\r\nz")
    assert ev[1:] == [b"z", BODY_END] and not ev[0].keep_alive
