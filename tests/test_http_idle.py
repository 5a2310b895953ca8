"""AEMhttpd with many connections: the deadline heap does not keep closed connections."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

import aem
from aem.http import HTTPServer, Timeouts
from aem.http import server as server_mod


def _step(srv: HTTPServer, until: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the server did not get there in time"
        srv.engine.run(timeout=0.002)


def _read(sock: socket.socket, got: bytearray) -> bytes:
    try:
        got += sock.recv(65536)
    except BlockingIOError:
        pass
    return bytes(got)


def test_closed_connections_leave_the_deadline_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_mod, "_HEAP_SLACK", 8)
    srv = HTTPServer(port=0, timeouts=Timeouts(idle=1.0), engine=aem.Engine())
    srv.start()
    keeper = socket.create_connection(("127.0.0.1", srv.port))
    keeper.setblocking(False)
    try:
        _step(srv, lambda: len(srv._conns) == 1)
        biggest = 0
        for _ in range(200):  # connections come and go while the keeper keeps asking
            keeper.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            got = bytearray()
            _step(srv, lambda got=got: _read(keeper, got).endswith(b"404 Not Found\n"))
            c = socket.create_connection(("127.0.0.1", srv.port))
            _step(srv, lambda: len(srv._conns) == 2)
            c.close()
            _step(srv, lambda: len(srv._conns) == 1)
            biggest = max(biggest, len(srv._heap))
        assert biggest <= 2 * 2 + 8 + 1, f"{biggest} heap entries for at most 2 connections"
        keeper_conn = next(iter(srv._conns))
        assert any(e[2] is keeper_conn and e[0] == keeper_conn.check for e in srv._heap)
        # the open connection's deadline still works after the compactions
        _step(srv, lambda: not srv._conns, timeout=5)  # idle for a second: closed
        assert srv.timeouts_fired >= 1
        keeper.settimeout(5)
        assert keeper.recv(100) == b""
    finally:
        keeper.close()
        srv.close()
        srv.engine.close()


def test_heap_without_closed_connections_is_left_alone() -> None:
    srv = HTTPServer(port=0, timeouts=Timeouts(idle=3600), engine=aem.Engine())
    srv.start()
    socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(20)]
    try:
        _step(srv, lambda: len(srv._conns) == 20)
        before = sorted(e[0] for e in srv._heap)
        srv._compact_heap()
        assert sorted(e[0] for e in srv._heap) == before  # nothing live is dropped
        assert {e[2] for e in srv._heap} == srv._conns
    finally:
        for s in socks:
            s.close()
        srv.close()
        srv.engine.close()
