"""AEMhttpd over real sockets: a server in a child process on 127.0.0.1, always cleaned up.

The server runs with short timeouts (header 1 s, idle 1.5 s, body 1 s, send 1.5 s,
linger 0.5 s) and small limits, so that every bad-input case is quick to provoke.
After each test the server must still be alive: it never dies of a client.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import aem.http
from conftest import AEM_PATH

SECRET = b"SECRET-OUTSIDE-THE-ROOT"

SERVER_SCRIPT = textwrap.dedent("""
    import sys
    import aem.http
    from aem.http import HTTPServer, Limits, Response, Timeouts

    def app(req):
        p = req.path
        if p == "/hello":
            return Response("Hello, world!")
        if p == "/echo":
            return Response(req.body, headers=[("X-Method", req.method)],
                            content_type="application/octet-stream")
        if p == "/boom":
            raise RuntimeError("boom in the app")
        if p == "/big":
            return Response(b"x" * (4 << 20))
        if p == "/headers":
            return Response.json(dict(req.headers))
        return None

    server = HTTPServer(
        app, root=sys.argv[1], port=0,
        limits=Limits(max_request_line=1024, max_header_size=4096, max_headers=50,
                      max_body=64 * 1024, max_buffered=512 * 1024),
        timeouts=Timeouts(idle=1.5, header=1.0, body=1.0, send=1.5, linger=0.5),
        access_log=sys.stdout, status_page=True)
    server.start()
    with open(sys.argv[2], "w") as f:
        f.write(str(server.port))
    print("reason", server.run(), file=sys.stderr, flush=True)
    server.close()
""")


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, root: Path, logdir: Path) -> None:
        self.proc = proc
        self.port = port
        self.root = root
        self.logdir = logdir

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stdout(self) -> str:
        return (self.logdir / "stdout.log").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.logdir / "stderr.log").read_text(errors="replace")


def _start(tmp: Path, script: str, args: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    (tmp / "server.py").write_text(script)
    portfile = tmp / "port"
    env = dict(os.environ, PYTHONPATH=AEM_PATH)
    with open(tmp / "stdout.log", "wb") as out, open(tmp / "stderr.log", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(tmp / "server.py"), *args, str(portfile)],
                                stdout=out, stderr=err, env=env)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if portfile.exists() and portfile.read_text():
            return proc, int(portfile.read_text())
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError("server did not start: " + (tmp / "stderr.log").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("httpd")
    root = tmp / "root"
    (root / "dir").mkdir(parents=True)
    (root / "index.html").write_text("<h1>aem</h1>\n")
    (root / "a.txt").write_bytes(b"0123456789")
    (root / "dir" / "b.txt").write_text("bee\n")
    (root / "large.bin").write_bytes(os.urandom(8 << 20))
    (tmp / "secret.txt").write_bytes(SECRET)
    (root / "escape").symlink_to(tmp / "secret.txt")
    proc, port = _start(tmp, SERVER_SCRIPT, [str(root)])
    srv = Server(proc, port, root, tmp)
    try:
        yield srv
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(autouse=True)
def _still_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "server" in request.fixturenames:
        srv: Server = request.getfixturevalue("server")
        assert srv.alive(), "the server died:\n" + srv.stderr()


# -- a minimal client ----------------------------------------------------------------------------

class Conn:
    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before a full head: {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = 0 if head_only or status in (100, 204, 304) else int(headers.get("content-length", 0))
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed in the middle of a body")
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body

    def closed_by_peer(self, within: float = 5.0) -> bool:
        """True if the server closes the connection (EOF or reset) within ``within`` s."""
        self.sock.settimeout(within)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def get(port: int, path: str, headers: str = "",
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    c = Conn(port)
    try:
        c.send(f"{method} {path} HTTP/1.1\r\nHost: t\r\n{headers}"
               "Connection: close\r\n\r\n".encode())
        return c.response(head_only=method == "HEAD")
    finally:
        c.close()


# -- HTTP/1.1 ------------------------------------------------------------------------------------

def test_keep_alive_and_standard_headers(server: Server) -> None:
    c = Conn(server.port)
    for _ in range(3):
        c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        status, h, body = c.response()
        assert status == 200 and body == b"Hello, world!"
        assert h["server"] == "aem" and re.match(r"\w{3}, \d\d \w{3} \d{4} [\d:]{8} GMT", h["date"])
        assert h["content-length"] == "13" and "connection" not in h
    c.close()


def test_pipelined_responses_in_order(server: Server) -> None:
    reqs, expect = [], []
    for i in range(60):
        kind = i % 5
        if kind == 0:
            reqs.append(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            expect.append((200, b"Hello, world!"))
        elif kind == 1:
            body = f"body-{i}".encode()
            reqs.append(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(body), body))
            expect.append((200, body))
        elif kind == 2:
            reqs.append(b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n")
            expect.append((200, b"0123456789"))
        elif kind == 3:
            reqs.append(b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
            expect.append((404, None))
        else:
            reqs.append(b"PUT /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"4\r\nchun\r\n3\r\nked\r\n0\r\n\r\n")
            expect.append((200, b"chunked"))
    c = Conn(server.port)
    c.send(b"".join(reqs))
    for status, body in expect:
        got = c.response()
        assert got[0] == status
        if body is not None:
            assert got[2] == body
    c.close()


def test_pipelined_in_small_pieces(server: Server) -> None:
    data = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\nGET /dir/b.txt HTTP/1.1\r\nHost: t\r\n\r\n" * 3
    c = Conn(server.port)
    for i in range(0, len(data), 7):
        c.send(data[i:i + 7])
    for _ in range(3):
        assert c.response()[2] == b"Hello, world!"
        assert c.response()[2] == b"bee\n"
    c.close()


def test_head(server: Server) -> None:
    status, h, body = get(server.port, "/hello", method="HEAD")
    assert status == 200 and h["content-length"] == "13" and body == b""
    c = Conn(server.port)
    c.send(b"HEAD /large.bin HTTP/1.1\r\nHost: t\r\n\r\nGET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    status, h, _ = c.response(head_only=True)
    assert status == 200 and h["content-length"] == str(8 << 20)
    assert c.response()[2] == b"0123456789"  # nothing of the large file was sent before it
    c.close()


def test_http10_with_and_without_keep_alive(server: Server) -> None:
    c = Conn(server.port)
    c.send(b"GET /hello HTTP/1.0\r\n\r\n")
    status, h, body = c.response()
    assert status == 200 and body == b"Hello, world!" and h["connection"] == "close"
    assert c.closed_by_peer(3)
    c.close()
    c = Conn(server.port)
    for _ in range(2):
        c.send(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, h, body = c.response()
        assert status == 200 and h["connection"] == "keep-alive"
    c.close()


def test_connection_close_and_half_close(server: Server) -> None:
    c = Conn(server.port)
    c.send(b"GET /hello HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
           b"GET /hello HTTP/1.1\r\nHost: h\r\n\r\n")
    assert c.response()[0] == 200 and c.closed_by_peer(3)
    assert c.buf == b""  # the request after the closing one was not answered
    c.close()
    c = Conn(server.port)  # the client sends its request, then shuts its side
    c.send(b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    c.sock.shutdown(socket.SHUT_WR)
    assert c.response()[2] == b"0123456789" and c.closed_by_peer(3)
    c.close()


def test_expect_100_continue(server: Server) -> None:
    c = Conn(server.port)
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert c.response()[0] == 100
    c.send(b"data")
    assert c.response()[2] == b"data"
    c.close()


def test_app_errors_are_500_and_logged(server: Server) -> None:
    status, _, body = get(server.port, "/boom")
    assert status == 500 and b"Internal Server Error" in body
    assert "boom in the app" in server.stderr()
    assert get(server.port, "/hello")[0] == 200


def test_access_log(server: Server) -> None:
    get(server.port, "/hello?from=log-test")
    deadline = time.monotonic() + 3
    while "/hello?from=log-test" not in server.stdout() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(ln for ln in server.stdout().splitlines() if "/hello?from=log-test" in ln)
    assert re.match(r'127\.0\.0\.1 - - \[[^\]]+\] "GET /hello\?from=log-test HTTP/1\.1" 200 13$',
                    line)
    get(server.port, '/hello?q="quoted"')  # a quote cannot break the log's format
    deadline = time.monotonic() + 3
    while "q=\\x22quoted" not in server.stdout() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"GET /hello?q=\\x22quoted\\x22 HTTP/1.1" 200' in server.stdout()


# -- static files --------------------------------------------------------------------------------

def test_static_range_and_conditional(server: Server) -> None:
    status, h, body = get(server.port, "/a.txt", "Range: bytes=3-5\r\n")
    assert status == 206 and body == b"345" and h["content-range"] == "bytes 3-5/10"
    assert get(server.port, "/a.txt", "Range: bytes=50-\r\n")[0] == 416
    _, h, _ = get(server.port, "/a.txt")
    assert get(server.port, "/a.txt", f"If-Modified-Since: {h['last-modified']}\r\n")[0] == 304
    assert get(server.port, "/a.txt", f"If-None-Match: {h['etag']}\r\n")[0] == 304
    assert get(server.port, "/")[2] == b"<h1>aem</h1>\n"
    status, h, _ = get(server.port, "/dir")
    assert status == 301 and h["location"] == "/dir/"
    assert b"b.txt" in get(server.port, "/dir/")[2]


def test_large_file_by_sendfile(server: Server) -> None:
    status, _, body = get(server.port, "/large.bin")
    assert status == 200
    expected = (server.root / "large.bin").read_bytes()
    assert hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()
    status, _, body = get(server.port, "/large.bin", "Range: bytes=1000000-1000099\r\n")
    assert status == 206 and body == (server.root / "large.bin").read_bytes()[1000000:1000100]


@pytest.mark.parametrize("target", [
    "/../secret.txt", "/%2e%2e/secret.txt", "/dir/../../secret.txt", "/..%2Fsecret.txt",
    "/escape", "//secret.txt", "http://t/../secret.txt", "/%2e%2e%2fsecret.txt",
])
def test_traversal_over_the_wire(server: Server, target: str) -> None:
    status, _, body = get(server.port, target)
    assert status in (403, 404) and SECRET not in body


# -- bad input: each answered, the connection closed, the server alive -------------------------

@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nBad Header: x\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),  # a TLS hello
    (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(60)) + b"\r\n", 431),
    (b"FOO / HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    (b"PROPFIND / HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    (b"POST /a.txt HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", 405),
    (b"DELETE /a.txt HTTP/1.1\r\nHost: h\r\n\r\n", 405),
    (b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n", 413),
    (b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
     + (b"8000\r\n" + b"z" * 32768 + b"\r\n") * 3 + b"0\r\n\r\n", 413),
    (b"GET / HTTP/3.0\r\n\r\n", 505),
])
def test_bad_input(server: Server, raw: bytes, status: int) -> None:
    c = Conn(server.port)
    try:
        c.send(raw)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before taking everything: allowed
    got, h, _ = c.response()
    assert got == status
    if status == 405:
        assert "GET" in h["allow"]  # the connection may stay: 405 is an ordinary answer
    else:
        assert h["connection"] == "close" and c.closed_by_peer(3)
    c.close()
    assert get(server.port, "/hello")[0] == 200


def test_slowloris_is_cut_after_the_header_timeout(server: Server) -> None:
    c = Conn(server.port)
    c.send(b"GET /hello HTTP/1.1\r\nHost: h\r\n")
    t0 = time.monotonic()
    closed = False
    while time.monotonic() - t0 < 5:
        try:
            c.send(b"X")  # one header byte every 0.1 s: never finishes
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        c.sock.settimeout(0.1)
        try:
            if c.sock.recv(4096, socket.MSG_PEEK) is not None:
                closed = True
                break
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
            break
    elapsed = time.monotonic() - t0
    assert closed and 0.9 < elapsed < 3.0, elapsed
    c.close()


def test_idle_keep_alive_connections_are_closed(server: Server) -> None:
    c = Conn(server.port)
    c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
    c.response()
    t0 = time.monotonic()
    assert c.closed_by_peer(5)
    assert 1.3 < time.monotonic() - t0 < 3.5
    c.close()
    c = Conn(server.port)  # a connection that never sends anything
    t0 = time.monotonic()
    assert c.closed_by_peer(5) and time.monotonic() - t0 < 3.5
    c.close()


def test_slow_body_is_timed_out(server: Server) -> None:
    c = Conn(server.port)
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly a part")
    t0 = time.monotonic()
    assert c.closed_by_peer(5)
    assert b" 408 " in c.buf.split(b"\r\n", 1)[0] and time.monotonic() - t0 < 3
    c.close()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_client_reset_mid_response(server: Server) -> None:
    before = len(server.stderr())
    for path in ("/large.bin", "/big"):
        for _ in range(3):
            c = Conn(server.port)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.send(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode() * 3)
            c.sock.recv(1000)
            time.sleep(0.05)
            _reset(c.sock)
    time.sleep(0.2)
    assert get(server.port, "/hello")[0] == 200
    assert server.stderr()[before:] == ""  # resets are normal life: no error, no traceback


def test_a_client_that_does_not_read_does_not_stall_others(server: Server) -> None:
    slow = Conn(server.port)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sock.setblocking(False)
    sent = 0
    request = b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n"
    try:
        for _ in range(2000):  # far more responses than any buffer: the server must stop reading
            sent += slow.sock.send(request)
    except BlockingIOError:
        pass
    slow.sock.setblocking(True)
    t0 = time.monotonic()
    for _ in range(20):
        assert get(server.port, "/hello")[0] == 200
    assert time.monotonic() - t0 < 3
    # the stalled client is dropped after the send timeout
    assert slow.closed_by_peer(6) or slow.sock.fileno() == -1
    slow.close()


def test_two_thousand_concurrent_connections(server: Server) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    conns = []
    try:
        for _ in range(2000):
            conns.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        for s in conns:
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        ok = 0
        for s in conns:
            data = b""
            while not data.endswith(b"Hello, world!"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            ok += data.startswith(b"HTTP/1.1 200")
        assert ok == 2000
    finally:
        for s in conns:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- regressions of issue 9, over the wire (the adversarial client's exact bytes) ----------------

def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_superscript_range_does_not_leak_descriptors(server: Server) -> None:
    """``Range: bytes=\xb2-``: was no reply, a traceback and one leaked fd per request."""
    get(server.port, "/a.txt")
    before = _fds(server.proc.pid)
    errors = server.stderr().count("internal error")
    for _ in range(40):
        c = Conn(server.port)
        c.send(b"GET /large.bin HTTP/1.1\r\nHost: h\r\nRange: bytes=\xb2-\r\n"
               b"Connection: close\r\n\r\n")
        status, _, body = c.response()
        assert status == 200 and len(body) == 8 << 20
        c.close()
    time.sleep(0.2)
    assert _fds(server.proc.pid) <= before + 2
    assert server.stderr().count("internal error") == errors


@pytest.mark.parametrize("raw", [
    b"GET /hello HTTP/1.1\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost:\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: a b/c\r\n\r\n",
])
def test_bad_host_is_400(server: Server, raw: bytes) -> None:
    c = Conn(server.port)
    c.send(raw)
    status, h, _ = c.response()
    assert status == 400 and h["connection"] == "close" and c.closed_by_peer(3)
    c.close()


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /hello HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    (b"GET /hello HTTP/0.9\r\n\r\n", 505),
    (b"GET /hello RTSP/1.0\r\n\r\n", 505),
    (b"GET /hello HTTP/1.2\r\nHost: h\r\nConnection: close\r\n\r\n", 200),
    (b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity, chunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n", 501),
    (b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET /index.html/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 404),
    (b"GET /a.txt HTTP/1.1\r\nHost: h\r\nIf-Match: \"x\"\r\nConnection: close\r\n\r\n", 412),
])
def test_versions_codings_and_paths(server: Server, raw: bytes, status: int) -> None:
    c = Conn(server.port)
    c.send(raw)
    got, _, body = c.response()
    assert got == status, body
    c.close()


def test_http10_transfer_encoding_smuggles_nothing(server: Server) -> None:
    c = Conn(server.port)
    c.send(b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"0\r\n\r\nGET /hello HTTP/1.1\r\nHost: h\r\n\r\n")
    status, h, _ = c.response()
    assert status == 400 and h["connection"] == "close"
    assert c.closed_by_peer(3) and b"HTTP/1.1" not in c.buf   # no second response
    c.close()


def test_directory_redirect_stays_on_this_host(server: Server) -> None:
    status, h, _ = get(server.port, "//dir")
    assert status == 301 and h["location"] == "/dir/"


def test_endless_trailer_is_cut(server: Server) -> None:
    c = Conn(server.port)
    c.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n0\r\nX-T: ")
    sent = 0
    try:
        while sent < 1 << 20:
            c.send(b"y" * 4096)
            sent += 4096
            c.sock.settimeout(0.05)
            try:
                if c.sock.recv(1, socket.MSG_PEEK):
                    break        # the answer came: the server stopped reading the trailer
            except TimeoutError:
                pass
    except (BrokenPipeError, ConnectionResetError):
        pass
    c.sock.settimeout(5)
    status, h, _ = c.response()
    assert status == 431 and h["connection"] == "close" and sent <= 4096 + 64 * 1024
    c.close()


def test_unfinished_bodies_are_bounded_in_total(server: Server) -> None:
    """100 connections with unfinished bodies held ~1 MiB each; now max_buffered bounds them."""
    conns = []
    try:
        statuses = []
        for _ in range(12):   # 12 x 60 KiB > max_buffered (512 KiB), within the body timeout
            c = Conn(server.port)
            conns.append(c)
            c.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 65536\r\n\r\n"
                   + b"b" * 60000)
        for c in conns:
            c.sock.settimeout(0.05)
            try:
                statuses.append(c.response()[0])
            except (TimeoutError, ConnectionError):
                statuses.append(None)
        assert 503 in statuses and statuses.count(None) >= 8, repr(statuses)
    finally:
        for c in conns:
            c.close()
    # the budget comes back when those connections go
    time.sleep(0.3)
    c = Conn(server.port)
    c.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 60000\r\nConnection: close"
           b"\r\n\r\n" + b"e" * 60000)
    status, _, body = c.response()
    assert status == 200 and body == b"e" * 60000
    c.close()


# -- the status page ---------------------------------------------------------------------------

def test_status_json(server: Server) -> None:
    status, h, body = get(server.port, "/_aem/status", "Accept: application/json\r\n")
    assert status == 200 and h["content-type"] == "application/json"
    data = json.loads(body)
    assert data["engine"]["registered"] >= 2 and "delivered" in data["engine"]
    assert data["server"]["requests"] >= 1 and data["pid"] > 0
    status, h, body = get(server.port, "/_aem/status?format=json")
    assert status == 200 and h["content-type"] == "application/json" and json.loads(body)["pid"]
    status, h, body = get(server.port, "/_aem/status")
    assert status == 200 and h["content-type"].startswith("text/html") and b"<table>" in body
    # no capsule pool in this server: a sentence, not an empty table
    assert b'<section id="capsules"><h2>capsules</h2><p class="empty">No capsule pool' in body


def test_status_page_in_a_real_browser(server: Server, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/install-system-deps.sh installs it)")
    url = f"http://127.0.0.1:{server.port}/_aem/status"
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=4000",
            "--dump-dom", url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=90).stdout
    assert "<title>aem status</title>" in out
    # the script ran: it fetched the JSON and rendered it
    assert 'data-state="live"' in out, out[:2000]
    for key in ("registered", "delivered", "requests", "connections"):
        assert f'data-key="{key}"' in out
    m = re.search(r'data-key="requests">([\d,]+)<', out)   # thousands separated
    assert m and int(m.group(1).replace(",", "")) >= 1
    # the refreshed tables keep the server's formatting: no Python or JS spelling of booleans
    assert "True" not in out and "False" not in out and "true<" not in out
    shot = tmp_path / "status.png"
    subprocess.run([*argv[:-2], f"--screenshot={shot}", "--window-size=900,900", url],
                   capture_output=True, timeout=90)
    assert shot.exists() and shot.stat().st_size > 1000


# -- the command line --------------------------------------------------------------------------

def _aem(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=AEM_PATH)
    return subprocess.run([sys.executable, "-m", "aem.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_serve_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("from the cli\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=AEM_PATH)
    proc = subprocess.Popen([sys.executable, "-m", "aem.cli", "serve", "--root", str(tmp_path),
                             "--port", str(port), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                assert get(port, "/f.txt")[2] == b"from the cli\n"
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0 and "stopped (terminated)" in err and out == ""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _cli_server(root: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=AEM_PATH)
    proc = subprocess.Popen([sys.executable, "-m", "aem.cli", "serve", "--root", str(root),
                             "--port", str(port), "--quiet", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                proc.wait()
                raise
            time.sleep(0.1)


def test_cli_status_page_is_an_option(tmp_path: Path) -> None:
    """Regression (issue 9): /_aem/status answered anyone and hid a real file at that path."""
    (tmp_path / "_aem").mkdir()
    (tmp_path / "_aem" / "status").write_bytes(b"a real file\n")
    proc, port = _cli_server(tmp_path)
    try:
        assert get(port, "/_aem/status")[2] == b"a real file\n"       # off by default
    finally:
        proc.kill()
        proc.wait()
    proc, port = _cli_server(tmp_path, "--status")
    try:
        status, _, body = get(port, "/_aem/status?format=json")
        assert status == 200 and json.loads(body)["server"]["requests"] >= 1
        status, _, body = get(port, "/_aem/status")
        assert status == 200 and b"<title>aem status</title>" in body
    finally:
        proc.kill()
        proc.wait()


LOOPBACK_STATUS_SCRIPT = textwrap.dedent("""
    import sys
    from aem.http import HTTPServer
    server = HTTPServer(root=sys.argv[1], host="0.0.0.0", port=0)   # status_page="loopback"
    server.start()
    with open(sys.argv[2], "w") as f:
        f.write(str(server.port))
    server.run()
""")


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))     # no packet is sent: only picks the local address
            addr = str(s.getsockname()[0])
        except OSError:
            return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def test_status_page_by_default_only_for_this_machine(tmp_path: Path) -> None:
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    root = tmp_path / "root"
    (root / "_aem").mkdir(parents=True)
    (root / "_aem" / "status").write_bytes(b"the file\n")
    proc, port = _start(tmp_path, LOOPBACK_STATUS_SCRIPT, [str(root)])
    try:
        status, h, _ = get(port, "/_aem/status")
        assert status == 200 and h["content-type"].startswith("text/html")
        c = socket.create_connection((addr, port), timeout=5)
        try:
            c.sendall(b"GET /_aem/status HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := c.recv(65536):
                data += chunk
        finally:
            c.close()
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nthe file\n")
    finally:
        proc.kill()
        proc.wait()


def test_cli_static_server_answers_405_before_the_body(tmp_path: Path) -> None:
    """Regression (issue 9): a body was buffered in full even when the answer was 405."""
    (tmp_path / "f.txt").write_bytes(b"file\n")
    proc, port = _cli_server(tmp_path)
    try:
        c = Conn(port)
        c.send(b"POST /f.txt HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n")
        status, h, _ = c.response()          # before any body byte was sent
        assert status == 405 and "connection" not in h
        for _ in range(100):
            c.send(b"d" * 10000)             # read and dropped
        c.send(b"GET /f.txt HTTP/1.1\r\nHost: h\r\n\r\n")
        status, _, body = c.response()       # the same connection goes on
        assert status == 200 and body == b"file\n"
        c.close()
    finally:
        proc.kill()
        proc.wait()


def test_cli_serve_errors(tmp_path: Path) -> None:
    r = _aem("serve", "--root", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = _aem("serve", "--root", str(tmp_path), "--workers", "0")
    assert r.returncode == 2 and "--workers must be >= 1" in r.stderr


FD_LIMIT_SCRIPT = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
    from aem.http import HTTPServer, Response
    server = HTTPServer(lambda req: Response("ok"), port=0, error_log=sys.stderr)
    server.start()
    with open(sys.argv[1], "w") as f:
        f.write(str(server.port))
    server.run()
""")


def test_out_of_descriptors_the_server_pauses_accepting(tmp_path: Path) -> None:
    """More clients than descriptors: no spin, no crash; served again once some leave."""
    proc, port = _start(tmp_path, FD_LIMIT_SCRIPT, [])
    clients = []
    try:
        for _ in range(80):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)
        cpu = sum(int(x) for x in Path(f"/proc/{proc.pid}/stat").read_text()
                  .rsplit(")", 1)[1].split()[11:13])
        time.sleep(1.0)
        cpu2 = sum(int(x) for x in Path(f"/proc/{proc.pid}/stat").read_text()
                   .rsplit(")", 1)[1].split()[11:13])
        assert cpu2 - cpu < 50, "the server spins while it cannot accept"  # < 0.5 s of 1 s
        assert "accepting pauses briefly" in (tmp_path / "stderr.log").read_text()
        for c in clients:
            c.close()
        clients.clear()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert get(port, "/")[2] == b"ok"
                break
            except (OSError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert proc.poll() is None
    finally:
        for c in clients:
            c.close()
        proc.kill()
        proc.wait()


def test_workers_share_the_port_and_a_dead_one_is_replaced(tmp_path: Path) -> None:
    from conftest import children_of

    (tmp_path / "index.html").write_text("ok")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    errfile = tmp_path / "stderr.log"
    with open(errfile, "wb") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "aem.cli", "serve", "--root", str(tmp_path),
                                 "--port", str(port), "--workers", "2", "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=errf)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert get(port, "/")[2] == b"ok"
                break
            except (OSError, ConnectionError):
                assert time.monotonic() < deadline, "the workers never answered"
                time.sleep(0.2)

        def workers() -> set[int]:
            found: set[int] = set()
            for template in children_of(proc.pid):
                found |= children_of(template)
            return found

        first = workers()
        assert len(first) >= 2
        # the pool may hold warm spare capsules beside the workers (killing only a spare
        # ends no job): kill them all, and wait for fresh ones and the parent's message
        for victim in first:
            os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (first & workers() or len(workers()) < 2
               or "starting another" not in errfile.read_text()):
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.1)
        # the replacements bind their own SO_REUSEPORT sockets once they run: until the
        # first of them listens, the port refuses (every worker was killed)
        while True:
            try:
                assert get(port, "/")[2] == b"ok"
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the replacement workers never listened"
                time.sleep(0.05)
        for _ in range(10):
            assert get(port, "/")[2] == b"ok"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        err = errfile.read_text()
        assert proc.returncode == 0, err
        assert "starting another" in err and "stopped (terminated)" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("bad", [True, False, "5", None])
def test_timeouts_refuse_what_is_not_a_number_of_seconds(bad: object) -> None:
    """Timeouts(idle=True) once meant one second; a bool, str or None is refused by name."""
    with pytest.raises(TypeError, match="timeout idle must be a number of seconds"):
        aem.http.Timeouts(idle=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), 1e12])
def test_timeouts_refuse_a_value_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError, match="timeout header must be > 0 and <= "):
        aem.http.Timeouts(header=bad)
    assert aem.http.Timeouts(header=0.25).header == 0.25
