"""WSGI burst workers: a temporary capsule takes the requests that wait behind a slow handler,
within the ``--burst`` bound, and is retired when idle; ``--timeout`` still kills and replaces."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from appkit import Served, serve

WAIT = r"on http://127\.0\.0\.1:(\d+)/ with \d+ WSGI workers"


def workers(s: Served) -> dict[str, int]:
    status = json.loads(s.get("/_aem/status", headers={"Accept": "application/json"})[2])
    return dict(status["capsules"])


def wait_for(s: Served, what: str, n: int, timeout: float = 10.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        w = workers(s)
        if w[what] == n or time.monotonic() > deadline:
            return w
        time.sleep(0.05)


def in_background(s: Served, path: str, out: list[tuple[int, bytes]]) -> threading.Thread:
    def run() -> None:
        status, _, body = s.get(path)
        out.append((status, body))

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.fixture
def one(tmp_path: Path) -> Iterator[Served]:
    """One steady worker, at most one temporary one."""
    with serve(tmp_path, "flask_app:app", "--workers", "1", "--burst", "1", "--burst-after", "0.05",
               "--timeout", "1.5", "--status", wait=WAIT) as s:
        yield s


def test_a_slow_request_does_not_block_fast_ones_behind_it(one: Served) -> None:
    assert workers(one)["workers"] == 1
    slow: list[tuple[int, bytes]] = []
    t = in_background(one, "/sleep?s=1.2", slow)   # (below --timeout 1.5: never killed)
    time.sleep(0.2)
    t0 = time.monotonic()
    pids = set()
    for _ in range(10):
        status, _, body = one.get("/pid")
        assert status == 200
        pids.add(body)
    took = time.monotonic() - t0
    w = workers(one)
    t.join(10)
    assert slow == [(200, b"slept")]
    # the fast requests did not wait for the slow one: a temporary worker answered them
    assert took < 1.0, took
    assert len(pids) == 1
    assert w["bursts"] == 1 and w["extra"] == 1 and w["workers"] == 2


def test_the_temporary_worker_is_retired_when_idle(one: Served) -> None:
    slow: list[tuple[int, bytes]] = []
    t = in_background(one, "/sleep?s=0.5", slow)
    time.sleep(0.15)
    assert one.get("/")[0] == 200
    assert workers(one)["extra"] == 1
    t.join(10)
    wait_for(one, "retired", 1)
    w = wait_for(one, "extra", 0)
    assert (w["retired"], w["extra"], w["workers"]) == (1, 0, 1)
    assert w["replaced"] == 0          # retiring is not a death that gets replaced
    # and a later burst starts a fresh one
    t = in_background(one, "/sleep?s=0.5", slow)
    time.sleep(0.15)
    assert one.get("/")[0] == 200
    t.join(10)
    assert workers(one)["bursts"] == 2
    assert slow == [(200, b"slept")] * 2


def test_the_burst_bound_holds(one: Served) -> None:
    slow: list[tuple[int, bytes]] = []
    threads = [in_background(one, "/sleep?s=1.2", slow) for _ in range(3)]
    time.sleep(0.3)
    w = wait_for(one, "waiting", 1, timeout=0.6)
    # one steady and one temporary worker sleep; the third request waits for one of them
    assert (w["workers"], w["extra"], w["waiting"]) == (2, 1, 1)
    for t in threads:
        t.join(10)
    assert slow == [(200, b"slept")] * 3
    assert workers(one)["bursts"] == 1


def test_no_burst_without_waiting_requests_or_with_burst_0(tmp_path: Path) -> None:
    with serve(tmp_path, "flask_app:app", "--workers", "1", "--burst", "0", "--status",
               wait=WAIT) as s:
        slow: list[tuple[int, bytes]] = []
        t = in_background(s, "/sleep?s=0.4", slow)
        time.sleep(0.1)
        t0 = time.monotonic()
        assert s.get("/")[0] == 200        # waits for the one worker
        assert time.monotonic() - t0 > 0.15
        t.join(10)
        w = workers(s)
        assert (w["bursts"], w["extra"], w["workers"]) == (0, 0, 1)


def test_timeout_kills_both_kinds_and_replaces_only_the_steady_one(one: Served) -> None:
    hung: list[tuple[int, bytes]] = []
    first = in_background(one, "/sleep?s=30", hung)
    time.sleep(0.2)
    second = in_background(one, "/sleep?s=30", hung)   # waits, then a temporary worker takes it
    first.join(15)
    second.join(15)
    assert [status for status, _ in hung] == [504, 504]
    w = wait_for(one, "replaced", 1)
    assert w["killed"] == 2 and w["replaced"] == 1 and w["bursts"] == 1
    w = wait_for(one, "extra", 0)
    assert (w["extra"], w["workers"]) == (0, 1)
    assert one.get("/")[0] == 200
    assert one.stderr().count("took longer than 1.5 s: killed") == 2
    assert one.stderr().count("starting another") == 1


def test_one_temporary_worker_per_stuck_worker(tmp_path: Path) -> None:
    with serve(tmp_path, "flask_app:app", "--workers", "1", "--burst", "2", "--burst-after", "0.2",
               "--status", wait=WAIT) as s:
        out: list[tuple[int, bytes]] = []
        slow = in_background(s, "/sleep?s=1.2", out)
        time.sleep(0.1)
        # fast requests (50 ms, below --burst-after) keep waiting while the one worker is stuck:
        # one temporary worker takes them, and it never counts as stuck itself
        end = time.monotonic() + 0.8
        fast = [threading.Thread(target=lambda: [s.get("/sleep?s=0.05") for _ in iter(
            lambda: time.monotonic() < end, False)]) for _ in range(3)]
        for t in fast:
            t.start()
        for t in fast:
            t.join(10)
        w = workers(s)
        assert (w["bursts"], w["extra"]) == (1, 1)
        slow.join(10)
        # two slow handlers at once: each stuck worker gets its temporary one, up to --burst
        more = [in_background(s, "/sleep?s=1", out) for _ in range(3)]
        time.sleep(0.8)
        w = workers(s)
        assert w["extra"] == 2 and w["workers"] == 3
        for t in more:
            t.join(10)
        assert out == [(200, b"slept")] * 4


def test_fast_requests_keep_the_warm_worker_and_a_slow_path_takes_the_cold_one(tmp_path: Path) -> None:
    with serve(tmp_path, "flask_app:app", "--workers", "2", "--burst", "0", "--status",
               wait=WAIT) as s:
        out: list[tuple[int, bytes]] = []
        slow = in_background(s, "/sleep-pid", out)       # 0.3 s on one worker ...
        time.sleep(0.1)
        fast = {s.get("/pid")[2] for _ in range(3)}     # ... the fast ones on the other, at once
        slow.join(10)
        assert len(fast) == 1 and out[0][0] == 200 and out[0][1] not in fast
        cold, (warm,) = out[0][1], fast
        # the slow worker was given back last, but slept: the fast requests stay on the warm one
        assert {s.get("/pid")[2] for _ in range(3)} == {warm}
        # the path took long last time: it gets the worker that ran longest ago, not the warm one
        slow = in_background(s, "/sleep-pid", out)
        time.sleep(0.1)
        assert s.get("/pid")[2] == warm
        slow.join(10)
        assert out[1] == (200, cold)
        w = workers(s)
        assert (w["workers"], w["bursts"], w["waiting"]) == (2, 0, 0)
