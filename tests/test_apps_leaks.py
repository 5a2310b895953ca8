"""No descriptor is left behind by the error paths of the app servers (ASGI and WSGI fronts)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from appkit import Served, raw, serve


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _settled(s: Served, want: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    n = _fds(s.proc.pid)
    while n > want and time.monotonic() < deadline:
        time.sleep(0.05)
        n = _fds(s.proc.pid)
    return n


def _abandon(port: int, data: bytes, wait: float = 0.0) -> None:
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(data)
        if wait:
            time.sleep(wait)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST


def test_asgi_error_paths_leak_no_fd(tmp_path: Path) -> None:
    with serve(tmp_path, "starlette_app:app", "--timeout-keep-alive", "0.5") as s:
        assert s.get("/")[0] == 200
        base = _fds(s.proc.pid)
        for _ in range(10):
            raw(s.port, b"GET / HTTP/1.1\r\n\r\n")                               # 400
            raw(s.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
            _abandon(s.port, b"GET / HTTP/1.1\r\nHo")                            # reset mid-head
            _abandon(s.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
            _abandon(s.port, b"GET /slow?s=0.2 HTTP/1.1\r\nHost: x\r\n\r\n", 0.05)  # reset mid-app
            _abandon(s.port, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n", 0.01)       # mid-stream
            _abandon(s.port, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                             b"Sec-WebSocket-Version: 13\r\n\r\n", 0.05)
            assert s.get("/boom")[0] == 500
        time.sleep(0.5)
        assert s.get("/")[0] == 200
        assert _settled(s, base) <= base


def test_wsgi_error_paths_leak_no_fd(tmp_path: Path) -> None:
    with serve(tmp_path, "flask_app:app", "--workers", "2", "--timeout", "0.5",
               wait=r"on http://127\.0\.0\.1:(\d+)/ with \d+ WSGI workers") as s:
        assert s.get("/")[0] == 200
        base = _fds(s.proc.pid)
        for i in range(3):
            assert s.get("/sleep?s=5")[0] == 504                 # killed past --timeout, replaced
            assert s.get("/exit")[0] == 502                      # died, replaced
            _abandon(s.port, b"GET /sleep?s=0.2 HTTP/1.1\r\nHost: x\r\n\r\n", 0.05)
            _abandon(s.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
            assert s.get("/boom")[0] == 500
            deadline = time.monotonic() + 10
            while s.stderr().count("starting another") < 2 * (i + 1) and time.monotonic() < deadline:
                time.sleep(0.05)
        time.sleep(0.5)
        ok = sum(s.get("/")[0] == 200 for _ in range(10))
        assert ok == 10
        assert _settled(s, base) <= base
