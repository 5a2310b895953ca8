"""AEMhttpd's access log with the native path on: buffered in C, written on the tick, at
64 KiB and at shutdown; a failed write is reported and the server goes on.

(That both paths write the same line for the same request is checked on every input of
``test_http_fast_diff.py``: its servers keep access logs, compared at the end.)
"""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aem.http import HTTPServer, Response
from aem.http.server import _Conn
from conftest import AEM_PATH

HI = b"GET /hi HTTP/1.1\r\nHost: a\r\n\r\n"
FILE = b"GET /f.txt HTTP/1.1\r\nHost: a\r\n\r\n"
_STAMP = re.compile(r"\[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000\]")


def _app(req: object) -> Response | None:
    return Response("hi") if getattr(req, "target", None) == "/hi" else None


class FailingLog(io.StringIO):
    """A log stream whose writes fail, as on a full disk, until ``fail`` is cleared."""

    fail = True

    def write(self, s: str) -> int:
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(s)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "f.txt").write_bytes(b"file\n")
    return tmp_path


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _lines(text: str) -> list[str]:
    return [_STAMP.sub("[-]", line) for line in text.splitlines()]


def test_c_lines_are_buffered_and_written_on_the_tick_and_at_close(
        site: Path, pair: tuple[socket.socket, socket.socket]) -> None:
    log = io.StringIO()
    server = HTTPServer(_app, root=site, port=0, access_log=log)
    server.start()
    try:
        assert server._fastpath is not None  # on, with the log kept
        conn = _Conn(server, pair[0], ("127.0.0.1", 1))
        assert server._fast is not None
        assert server._fast(conn, HI + HI.replace(b"GET", b"HEAD")) == b""
        assert server._fastpath._core.answered == 2
        assert log.getvalue() == ""           # buffered: no Python per request
        server._flush_log()                    # the tick
        assert _lines(log.getvalue()) == ['127.0.0.1 - - [-] "GET /hi HTTP/1.1" 200 2',
                                          '127.0.0.1 - - [-] "HEAD /hi HTTP/1.1" 200 2']
        assert server._fast(conn, FILE) == b""  # the full path's line (cache miss: the glue)
        assert server._fast(conn, FILE) == b""  # then the C path's, from the cache
        assert server._fastpath._core.answered == 3
    finally:
        server.close()                          # flushes what is left
    assert _lines(log.getvalue())[2:] == ['127.0.0.1 - - [-] "GET /f.txt HTTP/1.1" 200 5'] * 2


def test_a_full_buffer_is_written_without_waiting_for_the_tick(
        site: Path, pair: tuple[socket.socket, socket.socket]) -> None:
    log = io.StringIO()
    server = HTTPServer(_app, root=site, port=0, access_log=log)
    server.start()
    try:
        conn = _Conn(server, pair[0], ("127.0.0.1", 1))
        assert server._fast is not None
        n = 0
        while not log.getvalue():
            assert server._fast(conn, HI * 50) == b""
            pair[1].recv(1 << 20)
            n += 50
            assert n < 2000, "the C path never flushed its log buffer"
        assert len(log.getvalue()) >= 64 * 1024  # at the high-water mark, not before
        assert len(log.getvalue().splitlines()) == n
        assert len(log.getvalue()) < 64 * 1024 + 50 * 80
        assert server._fast(conn, HI) == b""
    finally:
        server.close()
    assert len(log.getvalue().splitlines()) == n + 1


@pytest.mark.parametrize("fast", [True, False])
def test_a_log_that_cannot_be_written_is_reported_and_the_server_goes_on(
        site: Path, pair: tuple[socket.socket, socket.socket], fast: bool) -> None:
    log, errors = FailingLog(), io.StringIO()
    server = HTTPServer(_app, root=site, port=0, access_log=log, error_log=errors,
                        fast_path=fast)
    server.start()
    try:
        conn = _Conn(server, pair[0], ("127.0.0.1", 1))
        server._conns.add(conn)
        for _ in range(2):  # the C path (when on), then the full path
            events = conn.http.receive(HI)
            if fast:
                assert server._fast is not None
                assert server._fast(conn, HI) == b""
            server._dispatch(conn, events)
            server._flush_log()
        assert not conn.closed
        assert pair[1].recv(1 << 16).count(b"HTTP/1.1 200 OK") == (4 if fast else 2)
        assert "cannot write the access log" in errors.getvalue()
        assert "No space left on device" in errors.getvalue()
        assert errors.getvalue().count("cannot write") == 1  # at most once a second
        log.fail = False
        server._dispatch(conn, conn.http.receive(HI))
        server._flush_log()
        # the lines that could not be written are dropped; the server logs again
        assert _lines(log.getvalue()) == ['127.0.0.1 - - [-] "GET /hi HTTP/1.1" 200 2']
    finally:
        server.close()


def test_log_method_takes_str_only() -> None:
    from aem import _core

    fast = _core.HttpFast(None, None, object, Response, {}, [0] * 6, b"Server: x\r\n", b"/_aem/",
                          print, 100, 100, 10)
    with pytest.raises(TypeError):
        fast.log(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fast.set_log(42)  # type: ignore[arg-type]
    fast.log("a line\n")
    fast.log("é\n")
    assert fast.take_log() == "a line\né\n".encode() and fast.take_log() == b""


def test_aem_serve_logs_by_default_and_writes_the_log_when_stopped(site: Path) -> None:
    """``aem serve`` keeps an access log by default, with the native path on: a request it
    answers in C (a cached file, asked twice) is in the log when SIGTERM stops it."""
    env = dict(os.environ, PYTHONPATH=AEM_PATH)
    code = ("import sys; from aem.cli import main; import aem.http.server as s; "
            "orig = s.HTTPServer.start\n"
            "def start(self):\n"
            "    orig(self); print('fast', self._fastpath is not None, file=sys.stderr, flush=True)\n"
            "s.HTTPServer.start = start\n"
            f"sys.exit(main(['serve', '--root', {str(site)!r}, '--port', '0']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        first = proc.stderr.readline()
        assert first == "fast True\n", first + proc.stderr.read()
        url = proc.stderr.readline()
        port = int(re.search(r":(\d+)/", url).group(1))  # type: ignore[union-attr]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            for _ in range(2):
                c.sendall(FILE)
                got = b""
                while not got.endswith(b"file\n"):
                    got += c.recv(4096)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _lines(out) == ['127.0.0.1 - - [-] "GET /f.txt HTTP/1.1" 200 5'] * 2
    time.sleep(0)
