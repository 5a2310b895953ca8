"""WSGI apps (Flask, Django, bare PEP 3333 ones) served in capsules by ``aem serve module:app``."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from appkit import Served, abstract_sockets, connect_as, raw, serve

from conftest import run_script, voluntary_switches

WAIT = r"on http://127\.0\.0\.1:(\d+)/ with \d+ WSGI workers"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "data.bin"
    p.write_bytes(os.urandom(300_000))
    return p


@pytest.fixture(scope="module")
def flask(tmp_path_factory: pytest.TempPathFactory, data_file: Path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("flask")
    with serve(tmp, "flask_app:app", "--workers", "2", "--timeout", "1.5", "--status", wait=WAIT,
               env={"AEM_TEST_FILE": str(data_file)}) as s:
        yield s


def _pids(s: Served, n: int = 20) -> set[str]:
    return {s.get("/pid")[2].decode() for _ in range(n)}


def test_hello_and_headers(flask: Served) -> None:
    status, headers, body = flask.get("/")
    assert (status, body) == (200, b"Hello, world!")
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-length"] == "13" and headers["server"] == "aem"


def test_app_runs_in_worker_processes_not_the_front(flask: Served) -> None:
    pids = _pids(flask)
    assert str(flask.proc.pid) not in pids
    assert len(pids) in (1, 2)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_only_processes_of_the_same_user_can_pose_as_workers(flask: Served) -> None:
    """The front's worker socket is abstract (no file permissions): another user's process is
    closed at once; one of this user's is kept (waiting for its hello, as a worker's)."""
    [address] = abstract_sockets(flask.proc.pid, "aem-wsgi-")
    assert connect_as(address, 65534) == ("", 0)
    assert connect_as(address, None, wait=0.5) == ("timeout", 0)
    assert flask.get("/")[0] == 200


def test_request_body_streams_into_wsgi_input(flask: Served) -> None:
    data = os.urandom(700_000)            # many 64 KiB messages
    status, _, body = flask.get("/echo", method="POST", body=data)
    assert status == 200 and body == data
    status, _, body = flask.get("/lines", method="POST", body=b"a\nbb\n" * 30_000 + b"tail")
    assert body == b"60001"


def test_streamed_response_is_chunked(flask: Served) -> None:
    out = raw(flask.port, b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, _body = out.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert flask.get("/stream")[2] == b"".join(f"part {i}\n".encode() for i in range(4))


def test_file_wrapper_goes_out_with_sendfile(flask: Served, data_file: Path) -> None:
    status, headers, body = flask.get("/file")
    assert status == 200 and body == data_file.read_bytes()
    assert headers["content-length"] == str(len(body))


def test_environ(flask: Served) -> None:
    env = json.loads(flask.get("/environ?x=%20y", headers={"X-Test": "t"})[2])
    assert env == {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/environ",
                   "QUERY_STRING": "x=%20y", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
                   "wsgi.url_scheme": "http", "HTTP_X_TEST": "t", "multiprocess": True}


def test_app_exception_is_a_500_and_the_worker_goes_on(flask: Served) -> None:
    before = _pids(flask)
    assert flask.get("/boom")[0] == 500
    assert flask.get("/")[0] == 200
    assert _pids(flask) == before    # nobody died


def test_hung_worker_is_killed_client_gets_504_others_unaffected(flask: Served) -> None:
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(flask.get("/sleep?s=30")[0]))
    t0 = time.monotonic()
    t.start()
    time.sleep(0.2)
    # the other worker keeps answering meanwhile
    assert flask.get("/")[0] == 200
    t.join(15)
    assert results == [504]
    assert 1.3 < time.monotonic() - t0 < 10
    deadline = time.monotonic() + 10
    while "starting another" not in flask.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "took longer than 1.5 s: killed" in flask.stderr()
    assert "starting another" in flask.stderr()
    # the replacement serves: two idle workers again, and two requests run side by side
    deadline = time.monotonic() + 10
    while _workers(flask)["idle"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _workers(flask)["workers"] == 2
    pids: list[bytes] = []
    both = [threading.Thread(target=lambda: pids.append(flask.get("/sleep-pid")[2]))
            for _ in range(2)]
    for th in both:
        th.start()
    for th in both:
        th.join(10)
    assert len(set(pids)) == 2


def _workers(s: Served) -> dict[str, int]:
    status = json.loads(s.get("/_aem/status", headers={"Accept": "application/json"})[2])
    return dict(status["capsules"])


def test_worker_that_dies_fails_only_its_request(flask: Served) -> None:
    status, _, _ = flask.get("/exit")
    assert status == 502
    deadline = time.monotonic() + 10
    ok = 0
    while time.monotonic() < deadline and ok < 10:
        ok += flask.get("/")[0] == 200
    assert ok == 10


_FROZEN = """
import asyncio, gc, os, signal, sys
import aem
from aem.http.appserver import AppConfig, _serve_one
from aem.http.wsgi import WSGIWorkers

async def main() -> int:
    before = gc.get_freeze_count()
    async def watch() -> None:
        for _ in range(1000):
            if gc.get_freeze_count():
                break
            await asyncio.sleep(0.01)
        print(before, gc.get_freeze_count(), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    task = asyncio.get_running_loop().create_task(watch())
    cfg = AppConfig("flask_app:app", interface="wsgi", port=0, access_log=False, log_level="warning")
    rc = await _serve_one(cfg, WSGIWorkers("flask_app:app", 1), "wsgi", quiet=True)
    await task
    return rc

with asyncio.Runner(loop_factory=aem.new_event_loop) as runner:
    sys.exit(runner.run(main()))
"""


def test_the_front_freezes_its_startup_objects_out_of_the_collector(tmp_path: Path) -> None:
    # what the front holds before it forks the workers (the app imported) is frozen: a full
    # collection in the front walks none of it (the workers' template freezes its own)
    import subprocess
    import sys

    from appkit import APPS

    from conftest import AEM_PATH

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([AEM_PATH, str(APPS)]))
    out = subprocess.run([sys.executable, "-c", _FROZEN], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    # (Flask and aem: tens of thousands of objects; 3.12+ starts with a few hundred frozen)
    assert after - before > 10_000


def test_the_front_yields_to_its_workers(flask: Served) -> None:
    # the front's loop thread is SCHED_BATCH (its wake-ups do not preempt a worker's app
    # call); the workers, forked from a template made before that, keep the default policy
    assert os.sched_getscheduler(flask.proc.pid) == os.SCHED_BATCH
    for pid in _pids(flask, 4):
        assert os.sched_getscheduler(int(pid)) == os.SCHED_OTHER


_POLICY = """
import asyncio, os, sys
import aem
from aem.http.wsgi import WSGIWorkers

async def main() -> None:
    for yield_to_workers in (True, False):
        workers = WSGIWorkers("flask_app:app", 1, yield_to_workers=yield_to_workers)
        await workers.start()
        during = os.sched_getscheduler(0)
        await workers.close()
        print(during, os.sched_getscheduler(0), flush=True)

with asyncio.Runner(loop_factory=aem.new_event_loop) as runner:
    runner.run(main())
"""


def test_the_front_gets_its_scheduling_policy_back_on_close() -> None:
    from appkit import APPS

    out = run_script(_POLICY, timeout=60, cwd=str(APPS))    # (the app is imported from there)
    assert out.returncode == 0, out.stderr
    other, batch = os.SCHED_OTHER, os.SCHED_BATCH
    assert [tuple(map(int, line.split())) for line in out.stdout.splitlines()] == [
        (batch, other), (other, other)]


def test_an_idle_front_sleeps(tmp_path: Path) -> None:
    # no timer wakes the front's loop while no connection is open and no worker is busy (the
    # workers' watchdog and the connections' sweeper run only while there is work for them)
    with serve(tmp_path, "flask_app:app", "--workers", "1", "--timeout", "1", wait=WAIT) as s:
        assert s.get("/")[0] == 200              # (its connection closes after the answer)
        time.sleep(0.6)
        before = voluntary_switches(s.proc.pid)
        time.sleep(1.5)
        assert voluntary_switches(s.proc.pid) - before <= 1   # a ticking front woke >= 4 times meanwhile
        assert s.get("/")[0] == 200


def test_a_worker_hung_after_an_idle_spell_is_still_caught(tmp_path: Path) -> None:
    # the watchdog stops while the front is idle; the next request arms it again
    with serve(tmp_path, "flask_app:app", "--workers", "1", "--timeout", "0.5", wait=WAIT) as s:
        assert s.get("/")[0] == 200
        time.sleep(1.2)                          # idle: no tick runs
        t0 = time.monotonic()
        assert s.get("/sleep?s=5")[0] == 504
        assert time.monotonic() - t0 < 3
        assert s.get("/")[0] == 200              # a new worker took its place


def test_slow_handler_does_not_hold_up_fast_ones(flask: Served) -> None:
    t = threading.Thread(target=lambda: flask.get("/sleep?s=0.8"))
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    for _ in range(20):
        assert flask.get("/")[0] == 200
    assert time.monotonic() - t0 < 0.7  # all while the slow one sleeps, on the other worker
    t.join(10)


def test_bare_wsgi_exc_info_and_write(tmp_path: Path) -> None:
    with serve(tmp_path, "flask_app:exc_info_app", wait=WAIT) as s:
        status, _, body = s.get("/")
        assert (status, body) == (500, b"replaced by the error page")
    with serve(tmp_path, "flask_app:write_app", "--interface", "wsgi", wait=WAIT) as s:
        assert s.get("/")[2] == b"written and returned"


def test_django_app_with_a_form_and_script_name(tmp_path: Path) -> None:
    with serve(tmp_path, "django_app:app", "--root-path", "/site", wait=WAIT) as s:
        status, _, body = s.get("/site/")
        assert (status, body) == (200, b"Hello from Django")
        status, _, body = s.get("/site/form?q=1", method="POST", body=b"name=Ada",
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert json.loads(body) == {"method": "POST", "name": "Ada", "q": "1", "script": "/site"}


def test_graceful_sigterm_lets_the_wsgi_request_finish(tmp_path: Path) -> None:
    with serve(tmp_path, "flask_app:app", "--graceful-timeout", "5", wait=WAIT) as s:
        results: list[tuple[int, bytes]] = []
        t = threading.Thread(target=lambda: results.append(s.get("/sleep?s=0.5")[::2]))
        t.start()
        time.sleep(0.2)
        s.proc.send_signal(signal.SIGTERM)
        t.join(10)
        assert results == [(200, b"slept")]
        assert s.proc.wait(10) == 0


def test_status_page_counts_app_requests_and_shows_the_workers(flask: Served) -> None:
    before = json.loads(flask.get("/_aem/status", headers={"Accept": "application/json"})[2])
    for _ in range(5):
        flask.get("/")
    after = json.loads(flask.get("/_aem/status", headers={"Accept": "application/json"})[2])
    assert after["server"]["requests"] - before["server"]["requests"] == 6
    assert after["capsules"]["workers"] == 2
    assert after["pid"] == flask.proc.pid


def test_chunked_request_body_and_big_request_head(flask: Served) -> None:
    out = raw(flask.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                          b"Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"hello world")
    big = {f"X-Big-{i}": "v" * 150 for i in range(90)}   # ~15 KiB of header fields
    status, _, body = flask.get("/echo", method="POST", body=b"b" * 40_000, headers=big)
    assert status == 200 and body == b"b" * 40_000


def test_slow_reader_gets_a_big_stream_whole(flask: Served) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", flask.port), timeout=10) as c:
        c.sendall(b"GET /bigstream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(2.0)   # longer than --timeout: the worker waits for the client, is not killed
        got = 0
        while chunk := c.recv(1 << 20):
            got += len(chunk)
    assert got > 200 * 65536


def test_static_root_beside_a_wsgi_app(tmp_path: Path) -> None:
    """Files under --root are the front's (ASGI path); everything else goes to the workers."""
    with serve(tmp_path, "flask_app:app", "--root", "static", wait=WAIT) as s:
        status, headers, body = s.get("/hello.txt")
        assert (status, body) == (200, b"static hello\n")
        assert headers["content-type"].startswith("text/plain")
        assert s.get("/")[2] == b"Hello, world!"   # not a file: the app
        status, _, body = s.get("/hello.txt", method="POST", body=b"x")
        assert status == 404 and b"<!doctype html>" in body.lower()  # a POST is Flask's
        assert s.get("/pid")[2] != str(s.proc.pid).encode()
