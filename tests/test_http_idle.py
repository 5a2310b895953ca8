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


def _sw(t: float, cpu: int, prev: tuple[str, int, str], nxt: tuple[str, int]) -> str:
    return (f"{prev[1]:>6} [{cpu:03d}] {t:.6f}: sched:sched_switch: prev_comm={prev[0]} "
            f"prev_pid={prev[1]} prev_prio=120 prev_state={prev[2]} ==> next_comm={nxt[0]} "
            f"next_pid={nxt[1]} next_prio=120")


def test_trace_summary_takes_preemption_out_of_the_turns() -> None:
    """``aem bench idle``'s trace reading (python -m aem.bench.idle trace): a server turn's
    on-CPU time excludes the time another task held the CPU; who took it is named."""
    from aem.bench.idle import parse_trace

    srv = ("python", 100, "R")
    lines = [
        "   100 [000] 10.000000: syscalls:sys_exit_epoll_wait: 0x5",
        _sw(10.000100, 0, srv, ("kworker/0:1", 7)),           # preempted 100 µs into the turn
        _sw(10.002100, 0, ("kworker/0:1", 7, "I"), ("python", 100)),   # back 2 ms later
        "   100 [000] 10.002300: syscalls:sys_enter_epoll_wait: 0x3",  # turn: 300 µs on CPU
        "   100 [000] 10.002310: syscalls:sys_exit_epoll_wait: 0x1",
        "   100 [000] 10.002360: syscalls:sys_enter_epoll_wait: 0x3",  # turn: 50 µs
        _sw(10.002400, 0, ("python", 100, "S"), ("swapper/0", 0)),     # waits: CPU 0 idle
        _sw(10.003400, 0, ("swapper/0", 0, "R"), ("python", 100)),
        _sw(10.003000, 1, ("wrk", 200, "R"), ("rcu_preempt", 15)),
        _sw(10.003500, 1, ("rcu_preempt", 15, "S"), ("wrk", 200)),
    ]
    got = parse_trace("\n".join(sorted(lines, key=lambda ln: float(ln.split()[2][:-1]))), 100)
    assert got["turns_us"]["n"] == 2
    assert round(got["turns_us"]["max"]) == 300 and round(got["turns_us"]["p50"]) in (50, 300)
    assert got["events"]["max"] == 5
    server, client = got["preempted"]["server"], got["preempted"]["client"]
    assert server["n"] == 1 and round(server["max_us"]) == 2000
    assert server["by_ms"] == {"kworker/0:1": 2.0}
    assert client["n"] == 1 and client["by_ms"] == {"rcu_preempt": 0.5}
    assert got["idle_ms"] == {0: 1.0}
