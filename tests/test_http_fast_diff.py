"""The native fast path against the full (httptools) path: same verdict, same bytes.

One child process runs two pairs of HTTPServers on one engine, alike in all
but ``fast_path``: with the same app and files, and with files only (no app:
bodies are not read, the C path answers from its file cache with no Python);
each with its own access log, no status page.  Every input — generated requests, pipelines
of them, byte-level mutations, the adversarial cases of issue 9, and every
request-shaped byte string of the full path's own regression tests
(``tests/test_http_protocol.py``, ``test_http_server.py``,
``test_http_static.py``, ``test_http_status.py``) — is sent to both servers
of a pair on a fresh connection, the client half-closes, and the whole byte
stream each sends back (up to its close) must be the same, ``Date`` aside.
The fast path may defer anything; it must never answer differently.  At the
end, the access logs of the two servers of each pair must hold the same lines
(the time aside): the C path writes the full path's line for what it answers.
"""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import AEM_PATH

SERVER_SCRIPT = textwrap.dedent("""
    import sys
    import aem
    from aem.http import HTTPServer, Limits, Response, Timeouts

    servers = []

    def app(req):
        t = req.target
        if t == "/hello":
            return Response("Hello, world!")
        if t == "/boom":
            raise RuntimeError("boom")
        if t == "/bytes":
            return b"raw bytes"
        if t == "/json":
            return Response.json({"method": req.method, "n": len(req.raw_headers)})
        if t == "/created":
            return Response("made", status=201, headers=[("Location", "/x"), ("X-A", "b c")])
        if t == "/empty":
            return Response(b"", status=204)
        if t == "/odd":
            return Response("?", status=299)
        if t == "/split":
            return Response("x", headers=[("X-Bad", "a\\r\\nInjected: 1")])
        if t == "/latin":
            return Response("x", headers=[("X-L", "caf\\u00e9")])
        if t == "/wide":
            return Response("x", headers=[("X-W", "\\u20ac")])
        if t == "/big":
            return Response(b"y" * 70000)
        if t == "/echo":
            return Response(repr(req.raw_headers) + req.method + req.version)
        if t.startswith("/req"):
            return Response(repr((req.method, req.target, req.version, req.raw_headers, req.body,
                                  req.keep_alive, type(req.client).__name__, dict(req.headers),
                                  req.path, req.query)))
        if t == "/answered":
            return Response(str(servers[0]._fast.__self__.answered))
        return None

    limits = Limits(max_request_line=256, max_header_size=1024, max_headers=12, max_body=4096)
    timeouts = Timeouts(idle=5, header=5, body=5, send=5, linger=0.5)
    for a in (app, None):
        for fast in (True, False):
            log = open(f"{sys.argv[3]}/access{len(servers)}.log", "w")
            s = HTTPServer(a, root=sys.argv[1], port=0, limits=limits, timeouts=timeouts,
                           status_page=False, fast_path=fast, access_log=log)
            s.start()
            servers.append(s)
    assert servers[0]._fast is not None and servers[1]._fast is None
    assert servers[2]._fast is not None and servers[3]._fast is None
    with open(sys.argv[2], "w") as f:
        f.write(" ".join(str(s.port) for s in servers))
    aem.run()
""")


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("httpfast-logs")


@pytest.fixture(scope="module")
def ports(tmp_path_factory: pytest.TempPathFactory, logdir: Path) -> Iterator[tuple[int, int]]:
    tmp = tmp_path_factory.mktemp("httpfast")
    root = tmp / "root"
    (root / "sub").mkdir(parents=True)
    (root / "list").mkdir()
    (root / "index.html").write_text("<h1>aem</h1>\n")
    (root / "4k.bin").write_bytes(os.urandom(4096))
    (root / "a.txt").write_bytes(b"0123456789")
    (root / "sub" / "index.html").write_text("sub\n")
    (root / "list" / "x.txt").write_text("x\n")
    (root / "large.bin").write_bytes(os.urandom(200_000))
    (tmp / "server.py").write_text(SERVER_SCRIPT)
    portfile = tmp / "ports"
    env = dict(os.environ, PYTHONPATH=AEM_PATH)
    with open(tmp / "stderr.log", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(tmp / "server.py"), str(root), str(portfile),
                                 str(logdir)],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        deadline = time.monotonic() + 15
        while not (portfile.exists() and len(portfile.read_text().split()) == 4):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start: " + (tmp / "stderr.log").read_text())
            time.sleep(0.05)
        p = [int(x) for x in portfile.read_text().split()]
        yield p[0], p[1], p[2], p[3]
        assert proc.poll() is None, "the server died:\n" + (tmp / "stderr.log").read_text()
    finally:
        proc.kill()
        proc.wait()


_DATE = re.compile(rb"\r\nDate: [A-Za-z]{3}, \d\d [A-Za-z]{3} \d{4} \d\d:\d\d:\d\d GMT\r\n")


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection, half-close, return all the server sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close first (an error answered early)
        chunks = []
        while True:
            try:
                d = s.recv(1 << 16)
            except ConnectionResetError:
                chunks.append(b"<reset>")
                break
            if not d:
                break
            chunks.append(d)
    return _DATE.sub(b"\r\nDate: -\r\n", b"".join(chunks))


def same(ports: tuple[int, int, int, int], data: bytes) -> bytes:
    """The fast and the full server of each pair answer ``data`` alike; the app pair's answer."""
    fast = exchange(ports[0], data)
    full = exchange(ports[1], data)
    assert fast == full, f"input {data!r} (with the app)"
    fast_files = exchange(ports[2], data)
    full_files = exchange(ports[3], data)
    assert fast_files == full_files, f"input {data!r} (files only)"
    return fast


# -- the inputs -------------------------------------------------------------------------------

TARGETS = [
    b"/hello", b"/boom", b"/bytes", b"/json", b"/created", b"/empty", b"/odd", b"/split",
    b"/latin", b"/wide", b"/big", b"/echo", b"/req", b"/req?a=b&c=%20", b"/4k.bin", b"/a.txt",
    b"/", b"/index.html",
    b"/sub", b"/sub/", b"/list/", b"/large.bin", b"/nope", b"//a.txt", b"/./a.txt", b"/%61.txt",
    b"/a.txt?x=1", b"/a.txt#f", b"/sub/../a.txt", b"/_aem/status", b"/index.html/",
    b"http://h/a.txt", b"*", b"/a%zz", b"/a%2", b"/" + b"x" * 300, b"/a b", b"/\x7f", b"/\xff",
]
METHODS = [b"GET", b"HEAD", b"POST", b"OPTIONS", b"DELETE", b"get", b"FOO", b"PRI", b"CONNECT"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"RTSP/1.0",
            b"http/1.1", b"HTTP/1.1 "]
FIELDS = [
    b"Host: a", b"Host: localhost:8080", b"Host: [::1]:80", b"Host:", b"Host: a b/c", b"Host: a",
    b"host:x", b"HOST: \tb\t", b"User-Agent: wrk", b"Accept: */*", b"X-Empty:", b"X: a\tb",
    b"Content-Length: 0", b"Content-Length: 5", b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: identity, chunked", b"Connection: close", b"Connection: keep-alive",
    b"Expect: 100-continue", b"Upgrade: h2c", b"If-None-Match: *", b"If-Modified-Since: x",
    b"Range: bytes=0-3", b"Range: bytes=\xb2-", b"X-Bin: \xe9", b" folded", b"Bad Name: x",
    b"X-Long: " + b"v" * 600, b"Cookie: a=b; c=d",
]
BENIGN = [b"User-Agent: wrk", b"Accept: */*", b"X-Empty:", b"X: a\tb", b"Cookie: a=b; c=d",
          b"If-None-Match: *", b"Range: bytes=0-3", b"Host: b"]
EOLS = [b"\r\n", b"\n"]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    # mostly what the fast path takes (so that it is exercised), sometimes anything
    odd = draw(st.integers(0, 3)) == 0
    method = draw(st.sampled_from(METHODS if odd else METHODS[:2]))
    target = draw(st.sampled_from(TARGETS))
    version = draw(st.sampled_from(VERSIONS)) if odd else b"HTTP/1.1"
    eol = draw(st.sampled_from(EOLS)) if odd else b"\r\n"
    fields = draw(st.lists(st.sampled_from(FIELDS if odd else BENIGN), max_size=6))
    if draw(st.integers(0, 3)):  # mostly valid: one Host first
        fields = [b"Host: a", *fields]
    head = method + b" " + target + b" " + version + eol + b"".join(f + eol for f in fields) + eol
    if any(f.lower().startswith(b"content-length: 5") for f in fields):
        head += draw(st.sampled_from([b"", b"hello"]))
    return head


pipelines = st.lists(requests(), min_size=1, max_size=4).map(b"".join)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(pipelines))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:
            data[i] = draw(st.integers(0, 255))
        elif op == 1:
            data[i:i] = draw(st.sampled_from([b"\r", b"\n", b" ", b"\t", b":", b"\x00", b"%",
                                              b"\r\n", b"Host: b\r\n", b"\xb2"]))
        elif op == 2 and data:
            del data[i:i + draw(st.integers(1, 8))]
        else:
            data = data[:i]
    return bytes(data)


# issue 9's adversarial requests, as exact bytes
ADVERSARIAL = [
    b"GET /4k.bin HTTP/1.1\r\nHost: a\r\nRange: bytes=\xb2-\r\n\r\n",
    b"GET /a.txt HTTP/1.1\r\n\r\n",
    b"GET /a.txt HTTP/1.1\r\nHost:\r\n\r\n",
    b"GET /a.txt HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /a.txt HTTP/1.1\r\nHost: a b/c\r\n\r\n",
    b"GET //sub HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a.txt HTTP/2.0\r\nHost: a\r\n\r\n",
    b"GET /a.txt HTTP/0.9\r\nHost: a\r\n\r\n",
    b"GET /a.txt RTSP/1.0\r\nHost: a\r\n\r\n",
    b"GET /a.txt HTTP/1.2\r\nHost: a\r\n\r\n",
    b"GET /index.html/ HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a.txt HTTP/1.1\r\nHost: a\r\nIf-Modified-Since: Sun, 06 Nov 2044 08:49:37\r\n\r\n",
    b"GET /a.txt HTTP/1.1\r\nHost: a\r\nIf-Match: \"nope\"\r\n\r\n",
    b"GET /_aem/status HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a.txt HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /a.txt HTTP/1.1\r\n"
    b"Host: a\r\n\r\n",
    b"POST /a.txt HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
    b"GET /a.txt HTTP/1.1\r\nHost: a\r\n\r\nFOO /a.txt HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /./a.txt HTTP/1.1\r\nHost: a\r\n\r\nGET /%2e/a.txt HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n" * 20,
    b"GET /4k.bin HTTP/1.1\r\nHost: a\r\n\r\n" * 20,
    b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\nGET /hello HTTP/1.1\r\nHost: a\r\nConnection: close"
    b"\r\n\r\nGET /hello HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n" * 3,
    b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n\x01\x02\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n\r\nGET /hello HTTP/1.1\r\nHost: a\r\n\r\n",
]


@pytest.mark.parametrize("data", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_cases_agree(ports: tuple[int, int, int, int], data: bytes) -> None:
    same(ports, data)


# -- the full path's own regression inputs ----------------------------------------------------

_HERE = Path(__file__).parent
_REGRESSION_MODULES = ("test_http_protocol.py", "test_http_server.py", "test_http_static.py",
                       "test_http_status.py")
_REQUEST_LIKE = re.compile(rb"[A-Z][A-Za-z_-]{0,19} [^\r\n]*\r?\n")


def _constant(node: ast.AST) -> object:
    """The value of a constant bytes expression (literals, ``+``, ``*`` by an int), else None."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _constant(node.left), _constant(node.right)
        if isinstance(node.op, ast.Add) and isinstance(left, bytes) and isinstance(right, bytes):
            return left + right
        if isinstance(node.op, ast.Mult):
            if isinstance(left, bytes) and isinstance(right, int) and 0 <= right <= 1000:
                return left * right
            if isinstance(right, bytes) and isinstance(left, int) and 0 <= left <= 1000:
                return right * left
    return None


def regression_inputs() -> list[bytes]:
    """Every request-shaped bytes constant of the full path's tests (the exact bytes of its
    regression cases, issue 9's among them), in order, without repeats; and the static
    files' test paths (``"/..."``) and ``Range`` values (``"bytes=..."``), which those tests
    give as ``str``, in GET requests."""
    found: dict[bytes, None] = {}
    for name in _REGRESSION_MODULES:
        tree = ast.parse((_HERE / name).read_text(), name)
        for node in ast.walk(tree):
            value = _constant(node)
            if isinstance(value, bytes) and len(value) <= 1 << 16 and _REQUEST_LIKE.match(value):
                found[value] = None
            elif name == "test_http_static.py" and isinstance(value, str) and value.isprintable():
                raw = value.encode("latin-1", "replace")
                if value.startswith("/") and " " not in value:
                    found[b"GET " + raw + b" HTTP/1.1\r\nHost: a\r\n\r\n"] = None
                elif value.startswith("bytes="):
                    found[b"GET /4k.bin HTTP/1.1\r\nHost: a\r\nRange: " + raw + b"\r\n\r\n"] = None
    return list(found)


REGRESSION = regression_inputs()


def test_the_regression_inputs_are_found() -> None:
    """Not vacuous: the harvest finds the full path's byte cases (a few known ones among them)."""
    assert len(REGRESSION) > 50
    assert any(b"Range: bytes=\xb2-" in r for r in REGRESSION)
    assert any(r.startswith(b"GET //sub ") for r in REGRESSION)


@pytest.mark.parametrize("data", REGRESSION, ids=range(len(REGRESSION)))
def test_the_full_paths_regression_inputs_agree(ports: tuple[int, int, int, int],
                                                 data: bytes) -> None:
    same(ports, data)


_SETTINGS = settings(max_examples=250, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_SETTINGS
@given(data=pipelines)
@example(data=b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
def test_generated_requests_agree(ports: tuple[int, int, int, int], data: bytes) -> None:
    same(ports, data)


@_SETTINGS
@given(data=mutated())
def test_mutated_requests_agree(ports: tuple[int, int, int, int], data: bytes) -> None:
    same(ports, data)


def test_the_fast_path_answers_simple_requests(ports: tuple[int, int, int, int]) -> None:
    """Not vacuous: the simple requests above are answered by the C path."""
    def answered() -> int:
        body = exchange(ports[0], b"GET /answered HTTP/1.1\r\nHost: a\r\n\r\n").split(b"\r\n\r\n")[1]
        return int(body)

    before = answered()
    out = same(ports, b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n" * 3
               + b"HEAD /a.txt HTTP/1.1\r\nHost: a\r\n\r\nGET /a.txt HTTP/1.1\r\nHost: a\r\n\r\n")
    assert out.count(b"Hello, world!") == 3 and out.endswith(b"0123456789")
    # /answered itself, 3 hellos, and the file (from the second request on: the first fills the cache)
    assert answered() - before >= 1 + 3 + 1


def test_requests_are_built_like_the_full_paths() -> None:
    """The C path fills a Request's slots directly only for a class shaped like Request."""
    from aem import _core
    from aem.http import Request, Response

    class Other:
        __slots__ = ("method", "target")

        def __init__(self, *args: object) -> None:
            self.method, self.target = args[0], args[1]

    def make(rt: type) -> _core.HttpFast:
        return _core.HttpFast(None, None, rt, Response, {}, [0] * 6, b"Server: x\r\n", b"/_aem/",
                              print, 100, 100, 10)

    assert make(Request).direct_requests == 1
    assert make(Other).direct_requests == 0


def test_counters_count_what_the_c_path_answers(tmp_path: Path) -> None:
    """requests, responses by class and bytes_out include the C path's answers."""
    from aem.http import HTTPServer, Response
    from aem.http.server import _Conn

    (tmp_path / "f.txt").write_bytes(b"file\n")
    server = HTTPServer(lambda r: Response("hi") if r.target == "/hi" else None,
                        root=tmp_path, port=0)
    server.start()
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        conn = _Conn(server, a, ("127.0.0.1", 1))
        assert server._fast is not None
        rest = server._fast(conn, b"GET /hi HTTP/1.1\r\nHost: a\r\n\r\n" * 3
                            + b"GET /f.txt HTTP/1.1\r\nHost: a\r\n\r\nGET /hi HTTP/1.0\r\n\r\n")
        assert rest == b"GET /hi HTTP/1.0\r\n\r\n"  # HTTP/1.0: the full path's
        out = b.recv(1 << 16)
        assert out.count(b"HTTP/1.1 200 OK") == 4 and out.endswith(b"file\n")
        stats = server.stats()
        assert stats["requests"] == 4 and stats["responses"] == {"2xx": 4}
        assert stats["bytes_out"] == len(out)
        assert server._fastpath is not None and server._fastpath._core.answered == 3
    finally:
        a.close()
        b.close()
        server.close()


def test_files_only_the_c_path_answers_from_the_resolved_cache(tmp_path: Path) -> None:
    """With no app, a file the full path served from the static cache (keyed by the resolved
    path) is answered by the C path next time; other spellings, conditional requests and the
    status page's prefix still go the full way."""
    from aem.http import HTTPServer
    from aem.http.server import _Conn

    (tmp_path / "f.txt").write_bytes(b"file\n")
    server = HTTPServer(root=tmp_path, port=0)
    server.start()
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        conn = _Conn(server, a, ("127.0.0.1", 1))
        assert server._fast is not None and server._fastpath is not None
        req = b"GET /f.txt HTTP/1.1\r\nHost: a\r\n\r\n"
        assert server._fast(conn, req) == req            # not cached yet: all for the full path
        server._dispatch(conn, conn.http.receive(b"GET /./f.txt HTTP/1.1\r\nHost: a\r\n\r\n"))
        full = b.recv(1 << 16)
        assert full.startswith(b"HTTP/1.1 200 OK\r\n") and full.endswith(b"file\n")
        assert "/f.txt" not in server._fastpath.cache     # "/./f.txt" is not a canonical target
        server._dispatch(conn, conn.http.receive(req))
        assert _DATE.sub(b"\r\nDate: -\r\n", b.recv(1 << 16)) == _DATE.sub(b"\r\nDate: -\r\n", full)
        assert set(server._fastpath.cache) == {"/f.txt"}  # the resolved entry "f.txt", copied
        assert server._fast(conn, req + req) == b""       # both answered in C
        assert _DATE.sub(b"\r\nDate: -\r\n", b.recv(1 << 16)) == 2 * _DATE.sub(b"\r\nDate: -\r\n",
                                                                                full)
        for other in (b"GET /f.txt HTTP/1.1\r\nHost: a\r\nIf-Match: \"x\"\r\n\r\n",
                      b"GET /_aem/status HTTP/1.1\r\nHost: a\r\n\r\n",
                      b"GET /f.txt HTTP/1.1\r\nHost: a b\r\n\r\n",
                      b"GET /f.txt/ HTTP/1.1\r\nHost: a\r\n\r\n"):
            assert server._fast(conn, other) == other
        assert server._fastpath._core.answered == 2
    finally:
        a.close()
        b.close()
        server.close()


_STAMP = re.compile(r" - - \[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000\] ")


def _log_lines(path: Path) -> list[str]:
    return [_STAMP.sub(" - - [-] ", line) for line in path.read_text().splitlines()
            if "/answered " not in line]  # asked of the app pair's fast server only


def test_access_logs_agree(ports: tuple[int, int, int, int], logdir: Path) -> None:
    """Every answer of the module so far (and a few here, answered by the C path: a hello, a
    HEAD, a cached file, pipelined) has the same access log line from both servers of a pair,
    in the same order; the lines reach the file within the server's tick (here 0.125 s)."""
    end = f"/a.txt?end={time.monotonic_ns()}"
    for data in (b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n" * 2,
                 b"HEAD /hello HTTP/1.1\r\nHost: a\r\n\r\nGET /a.txt HTTP/1.1\r\nHost: a\r\n\r\n",
                 b"GET /a.txt HTTP/1.1\r\nHost: a\r\n\r\nGET /a%zz HTTP/1.1\r\nHost: a\r\n\r\n",
                 f"GET {end} HTTP/1.0\r\n\r\n".encode()):
        same(ports, data)
    logs = [logdir / f"access{i}.log" for i in range(4)]
    deadline = time.monotonic() + 5
    while True:  # until the last line reached every file
        lines = [_log_lines(p) for p in logs]
        if all(ls and end in ls[-1] for ls in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert lines[0] == lines[1]
    assert lines[2] == lines[3]
    assert lines[0][-7:] == [
        '127.0.0.1 - - [-] "GET /hello HTTP/1.1" 200 13',
        '127.0.0.1 - - [-] "GET /hello HTTP/1.1" 200 13',
        '127.0.0.1 - - [-] "HEAD /hello HTTP/1.1" 200 13',
        '127.0.0.1 - - [-] "GET /a.txt HTTP/1.1" 200 10',
        '127.0.0.1 - - [-] "GET /a.txt HTTP/1.1" 200 10',
        '127.0.0.1 - - [-] "GET /a%zz HTTP/1.1" 404 10',
        f'127.0.0.1 - - [-] "GET {end} HTTP/1.0" 200 10',
    ]
