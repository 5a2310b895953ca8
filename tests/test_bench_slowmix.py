"""aem.bench.slowmix, the p99 cases' load client: which fast requests count as beside the slow
handler and which as alone, and that the C client measures both kinds of server (keep-alive and
closing).  Behaviour only, never a speed."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aem.bench import slowmix
from aem.bench.http import floor_binary, free_port

MS = 1_000_000


def test_split_sorts_fast_requests_by_the_slow_stretches() -> None:
    # two stretches: slow requests at 100–200 and 205–300 ms (one stretch: gap < GAP), 1000–1100 ms
    slow = [(205 * MS, 300 * MS), (100 * MS, 200 * MS), (1000 * MS, 1100 * MS)]
    fast = [
        (10 * MS, 1 * MS),        # before any: alone
        (95 * MS, 10 * MS),       # overlaps the first stretch's start: beside
        (150 * MS, 1 * MS),       # inside: beside
        (302 * MS, 1 * MS),       # within MARGIN after its end: beside
        (400 * MS, 1 * MS),       # well after: alone
        (999 * MS, 2 * MS),       # ends inside the second: beside
        (1200 * MS, 1 * MS),      # after the last: alone
    ]
    alone, beside = slowmix.split(fast, slow)
    assert sorted(alone) == [1 * MS, 1 * MS, 1 * MS]
    assert sorted(beside) == [1 * MS, 1 * MS, 2 * MS, 10 * MS]


def test_split_without_slow_requests_is_all_alone() -> None:
    assert slowmix.split([(1, 5), (10, 7)], []) == ([5, 7], [])


@pytest.fixture
def tools(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    got = slowmix.binaries(tmp_path)
    assert got is not None, "the load client and the sleep server compile"
    yield got[0], got[1], tmp_path


def _started(argv: list[str], port: int) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p
        except OSError:
            time.sleep(0.05)
    p.kill()
    p.wait()
    raise AssertionError("the server did not listen")


def test_the_load_client_measures_fast_requests_beside_and_without_slow_ones(
        tools: tuple[str, str, Path]) -> None:
    load, sleep_exe, tmp = tools
    fast_exe = floor_binary(tmp)
    assert fast_exe is not None
    fast_port, slow_port = free_port(), free_port()
    root = tmp / "root"
    root.mkdir()
    (root / "4k.bin").write_bytes(b"x" * 4096)
    fast = _started([fast_exe, str(fast_port), str(root / "4k.bin")], fast_port)
    sleeper = _started([sleep_exe, str(slow_port)], slow_port)
    try:
        mix = slowmix.run_mix(load, fast_port, slow_port, 2, 2.0, 0, -1, tmp / "out.bin")
    finally:
        for p in (fast, sleeper):
            p.kill()
            p.wait()
    # 2 s: slow requests in the first half of each second, ~100 ms each (the connect
    # made within a half second counts)
    assert 6 <= mix.slow <= 12, mix
    assert mix.alone >= 100 and mix.beside >= 100, mix
    assert mix.p99_alone_us > 0 and mix.p99_beside_us > 0


def test_the_load_client_reconnects_when_the_server_closes(tools: tuple[str, str, Path]) -> None:
    """The sleep server answers and closes (as gunicorn's sync workers do): every answer counts."""
    load, sleep_exe, tmp = tools
    port = free_port()
    sleeper = _started([sleep_exe, str(port)], port)
    try:
        mix = slowmix.run_mix(load, port, 0, 1, 0.65, 0, -1, tmp / "out.bin")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert mix.slow == 0 and mix.beside == 0
    assert 5 <= mix.alone <= 7, mix   # one answer per ~100 ms, each on a new connection
