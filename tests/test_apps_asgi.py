"""ASGI apps (Starlette, FastAPI, a bare one) served by ``aem serve module:app`` on the aem loop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from appkit import APPS, Served, abstract_sockets, connect_as, free_port, raw, serve
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    TextMessage,
)
from wsproto.events import Request as WSRequest

from conftest import AEM_PATH


@pytest.fixture(scope="module")
def marks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("marks")


@pytest.fixture(scope="module")
def star(tmp_path_factory: pytest.TempPathFactory, marks: Path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("star")
    with serve(tmp, "starlette_app:app", "--status", env={"AEM_TEST_MARKS": str(marks)}) as s:
        yield s


def test_hello_json_and_echo(star: Served) -> None:
    status, headers, body = star.get("/")
    assert (status, body) == (200, b"Hello, world!")
    assert headers["content-length"] == "13" and headers["server"] == "aem"
    assert headers["content-type"].startswith("text/plain")
    status, headers, body = star.get("/json")
    assert json.loads(body) == {"message": "Hello, world!"}
    assert headers["content-type"] == "application/json"
    data = os.urandom(300_000)
    status, _, body = star.get("/echo", method="POST", body=data)
    assert status == 200 and body == data


def test_request_body_read_as_a_stream(star: Served) -> None:
    status, _, body = star.get("/count", method="POST", body=b"x" * 123_457)
    assert (status, body) == (200, b"123457")


def test_streaming_response_is_chunked(star: Served) -> None:
    out = raw(star.port, b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"part 0\n" in body and b"part 4\n" in body and body.endswith(b"0\r\n\r\n")
    # http.client reassembles it
    _status, _, body = star.get("/stream")
    assert body == b"".join(f"part {i}\n".encode() for i in range(5))


def test_http10_streaming_response_ends_with_the_connection(star: Served) -> None:
    out = raw(star.port, b"GET /stream HTTP/1.0\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower() and b"connection: close" in head.lower()
    assert body == b"".join(f"part {i}\n".encode() for i in range(5))


def test_head_keeps_the_apps_content_length(star: Served) -> None:
    out = raw(star.port, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 13\r\n" in out and out.endswith(b"\r\n\r\n")


def test_scope_server_client_scheme_and_lifespan_state(star: Served) -> None:
    _status, _, body = star.get("/scope?a=1")
    info = json.loads(body)
    assert info["server"] == ["127.0.0.1", star.port]
    assert info["client"][0] == "127.0.0.1" and isinstance(info["client"][1], int)
    assert info["scheme"] == "http" and info["path"] == "/scope" and info["query"] == "a=1"
    assert info["state"] == "from lifespan" and info["http_version"] == "1.1"


def test_pipelined_requests_answered_in_order(star: Served) -> None:
    req = b"GET /slow?s=0.05 HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n" \
          b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw(star.port, req)
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert out.index(b"slow done") < out.index(b"Hello, world!") < out.index(b"Hello, world!\"}")


def test_expect_100_continue(star: Served) -> None:
    with socket.create_connection(("127.0.0.1", star.port), timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        out = s.recv(1000)
        assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"hello")


def test_app_exception_gives_500_and_the_server_goes_on(star: Served) -> None:
    status, _, _ = star.get("/boom")
    assert status == 500
    deadline = time.monotonic() + 5
    while "RuntimeError: boom" not in star.stderr() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "RuntimeError: boom" in star.stderr()
    assert star.get("/")[0] == 200


def test_bad_requests_get_the_parsers_answers(star: Served) -> None:
    assert raw(star.port, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")  # no Host
    assert raw(star.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
        b"HTTP/1.1 414")
    assert raw(star.port, b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 501")
    big = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"
    assert raw(star.port, big).startswith(b"HTTP/1.1 413")
    assert star.get("/")[0] == 200


def test_access_log_has_one_line_per_request(star: Served) -> None:
    star.get("/json?x=1")
    time.sleep(0.1)
    assert '"GET /json?x=1 HTTP/1.1" 200 27' in star.stdout()


def _ws_connect(port: int, path: str, subprotocols: list[str] | None = None
                ) -> tuple[socket.socket, WSConnection, list[object]]:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    ws = WSConnection(ConnectionType.CLIENT)
    s.sendall(ws.send(WSRequest(host="x", target=path, subprotocols=subprotocols or [])))
    events: list[object] = []
    while not events:
        data = s.recv(65536)
        if not data:
            break
        ws.receive_data(data)
        events.extend(ws.events())
    return s, ws, events


def _ws_next(s: socket.socket, ws: WSConnection) -> object:
    while True:
        for ev in ws.events():
            return ev
        data = s.recv(65536)
        ws.receive_data(data or None)
        if not data:
            return None


def test_websocket_echo_text_bytes_subprotocol_and_close(star: Served) -> None:
    s, ws, events = _ws_connect(star.port, "/ws", ["chat"])
    with s:
        assert isinstance(events[0], AcceptConnection) and events[0].subprotocol == "chat"
        s.sendall(ws.send(TextMessage(data="hi")))
        ev = _ws_next(s, ws)
        assert isinstance(ev, TextMessage) and ev.data == "echo: hi"
        s.sendall(ws.send(BytesMessage(data=b"abc")))
        ev = _ws_next(s, ws)
        assert isinstance(ev, BytesMessage) and ev.data == b"cba"
        big = "x" * 200_000
        s.sendall(ws.send(TextMessage(data=big)))
        got = ""
        while len(got) < len(big) + 6:
            ev = _ws_next(s, ws)
            assert isinstance(ev, TextMessage)
            got += ev.data
        assert got == "echo: " + big
        s.sendall(ws.send(TextMessage(data="bye")))
        ev = _ws_next(s, ws)
        assert isinstance(ev, CloseConnection) and ev.code == 1000


def test_websocket_client_disconnect_reaches_the_app(star: Served, marks: Path) -> None:
    s, ws, events = _ws_connect(star.port, "/ws")
    assert isinstance(events[0], AcceptConnection)
    s.sendall(ws.send(CloseConnection(code=1001)))
    ev = _ws_next(s, ws)
    assert isinstance(ev, CloseConnection)
    s.close()
    deadline = time.monotonic() + 5
    while not (marks / "ws_disconnect").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (marks / "ws_disconnect").exists()


def test_websocket_keepalive_drops_a_peer_that_stops_answering_pings(tmp_path: Path) -> None:
    """Pings every --ws-ping-interval: a peer that answers them stays connected; one that does
    not is closed (1011) once --ws-ping-timeout passes, and the app gets its disconnect."""
    marks = tmp_path / "marks"
    marks.mkdir()
    with serve(tmp_path, "starlette_app:app", "--ws-ping-interval", "0.2", "--ws-ping-timeout", "0.3",
               env={"AEM_TEST_MARKS": str(marks)}) as s:
        mute, wm, events = _ws_connect(s.port, "/ws")    # never sends a pong
        with mute:
            assert isinstance(events[0], AcceptConnection)
            got = []
            while (ev := _ws_next(mute, wm)) is not None:   # the server ends it (recv times out if not)
                got.append(ev)
        assert isinstance(got[0], Ping)
        assert [e.code for e in got if isinstance(e, CloseConnection)] == [1011]
        deadline = time.monotonic() + 5
        while not (marks / "ws_disconnect").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (marks / "ws_disconnect").exists()

        alive, wa, events = _ws_connect(s.port, "/ws")   # answers every ping
        with alive:
            assert isinstance(events[0], AcceptConnection)
            pings = 0
            while pings < 4:   # well past interval + timeout
                ev = _ws_next(alive, wa)
                assert isinstance(ev, Ping), ev
                pings += 1
                alive.sendall(wa.send(ev.response()))
            alive.sendall(wa.send(TextMessage(data="still here")))
            while isinstance(ev := _ws_next(alive, wa), Ping):
                alive.sendall(wa.send(ev.response()))
            assert isinstance(ev, TextMessage) and ev.data == "echo: still here"


def test_websocket_closed_before_accept_is_403(star: Served) -> None:
    s, _, events = _ws_connect(star.port, "/ws-reject")
    s.close()
    assert isinstance(events[0], RejectConnection) and events[0].status_code == 403


def test_fastapi_routes_body_validation_streaming_and_websocket(tmp_path: Path) -> None:
    with serve(tmp_path, "fastapi_app:app") as s:
        status, _, body = s.get("/items/5?q=x")
        assert status == 200 and json.loads(body) == {"item_id": 5, "q": "x"}
        status, _, body = s.get("/items", method="POST", body=b'{"name": "a", "price": 10}',
                                headers={"Content-Type": "application/json"})
        assert json.loads(body) == {"name": "a", "price_with_tax": 12.0}
        status, _, body = s.get("/items", method="POST", body=b'{"name": "a"}',
                                headers={"Content-Type": "application/json"})
        assert status == 422
        assert s.get("/numbers")[2] == b"0\n1\n2\n"
        sock, ws, events = _ws_connect(s.port, "/ws")
        with sock:
            assert isinstance(events[0], AcceptConnection)
            sock.sendall(ws.send(TextMessage(data='{"a": [1, 2]}')))
            ev = _ws_next(sock, ws)
            assert isinstance(ev, TextMessage) and json.loads(ev.data) == {"got": {"a": [1, 2]}}
        assert s.stop() == 0


def test_http_disconnect_and_a_streamed_content_length_body(tmp_path: Path) -> None:
    with serve(tmp_path, "starlette_app:raw", env={"AEM_TEST_MARKS": str(tmp_path)}) as s:
        status, headers, body = s.get("/")
        assert (status, body, headers["content-length"]) == (200, b"hello", "5")
        assert "transfer-encoding" not in headers
        c = socket.create_connection(("127.0.0.1", s.port))
        c.sendall(b"GET /wait-disconnect HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        c.close()
        deadline = time.monotonic() + 5
        while not (tmp_path / "http.disconnect").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (tmp_path / "http.disconnect").exists()


def test_lifespan_startup_and_shutdown_run_once(tmp_path: Path) -> None:
    with serve(tmp_path, "starlette_app:app", env={"AEM_TEST_MARKS": str(tmp_path)}) as s:
        assert (tmp_path / "startup").exists() and not (tmp_path / "shutdown").exists()
        assert s.stop() == 0
    assert (tmp_path / "shutdown").read_text() == str(s.proc.pid)


def test_lifespan_startup_failure_stops_the_server(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="exited"):
        with serve(tmp_path, "starlette_app:app", "--lifespan", "on",
                   env={"AEM_TEST_FAIL_STARTUP": "1"}):
            pass


def test_graceful_sigterm_finishes_requests_in_progress(tmp_path: Path) -> None:
    with serve(tmp_path, "starlette_app:app", "--graceful-timeout", "5") as s:
        result: list[tuple[int, bytes]] = []
        t = threading.Thread(target=lambda: result.append(s.get("/slow?s=0.6")[::2]))
        t.start()
        time.sleep(0.2)
        s.proc.send_signal(signal.SIGTERM)
        t.join(10)
        assert result == [(200, b"slow done")]
        assert s.proc.wait(10) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", s.port), timeout=1).close()


def test_graceful_timeout_bounds_the_wait(tmp_path: Path) -> None:
    with serve(tmp_path, "starlette_app:app", "--graceful-timeout", "0.3") as s:
        c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        c.sendall(b"GET /slow?s=30 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
        assert c.recv(100) == b""  # closed without an answer
        c.close()


def test_limit_concurrency_answers_503(tmp_path: Path) -> None:
    with serve(tmp_path, "starlette_app:app", "--limit-concurrency", "1") as s:
        c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        c.sendall(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.15)
        assert s.get("/")[0] == 503
        assert c.recv(1000).startswith(b"HTTP/1.1 200 OK")
        c.close()
        assert s.get("/")[0] == 200


def test_timeout_keep_alive_closes_idle_connections(tmp_path: Path) -> None:
    with serve(tmp_path, "starlette_app:app", "--timeout-keep-alive", "0.3") as s:
        c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.recv(1000).endswith(b"Hello, world!")
        t0 = time.monotonic()
        assert c.recv(100) == b""
        assert 0.2 < time.monotonic() - t0 < 3
        c.close()


def test_root_path_and_static_root_beside_the_app(tmp_path: Path) -> None:
    with serve(tmp_path, "starlette_app:app", "--root-path", "/api", "--root", "static") as s:
        info = json.loads(s.get("/scope")[2])
        assert info["root_path"] == "/api" and info["path"] == "/api/scope"
        status, headers, body = s.get("/hello.txt")
        assert (status, body) == (200, b"static hello\n")
        assert headers["content-type"].startswith("text/plain")
        assert s.get("/")[2] == b"Hello, world!"   # not a file: the app


def test_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    with serve(tmp_path, "starlette_app:app", "--uds", path, wait=r"on unix:()") as s:
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(5)
            c.connect(path)
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            out = b""
            while chunk := c.recv(1000):
                out += chunk
        assert out.endswith(b"Hello, world!")
        assert s.stop() == 0
    assert not os.path.exists(path)


def test_two_asgi_workers_share_the_port_and_stop_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    with serve(tmp_path, "starlette_app:app", "--workers", "2", port=port,
               wait=r"on http://127\.0\.0\.1:(\d+)/ with 2 workers") as s:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if s.get("/")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        assert s.get("/json")[0] == 200
        assert s.stop() == 0


def _get_over_unix(path: str, target: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(path)
        c.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := c.recv(1000):
            out += chunk
    return out.partition(b"\r\n\r\n")[2]


def test_two_asgi_workers_share_a_unix_socket_and_stop_on_sigterm(tmp_path: Path) -> None:
    """--uds with --workers: the supervisor listens on the path and hands the socket to each
    worker; both serve on it; SIGTERM stops them all and the path goes."""
    path = str(tmp_path / "app.sock")
    with serve(tmp_path, "starlette_app:app", "--uds", path, "--workers", "2",
               wait=r"on unix:\S+ with 2 workers()") as s:
        pids: set[bytes] = set()
        deadline = time.monotonic() + 15
        while len(pids) < 2 and time.monotonic() < deadline:
            try:
                pids.add(_get_over_unix(path, "/pid"))
            except OSError:
                time.sleep(0.02)   # the workers are still starting
        assert len(pids) == 2, pids
        assert _get_over_unix(path, "/") == b"Hello, world!"
        assert s.stop() == 0
    assert not os.path.exists(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_the_listening_socket_is_handed_only_to_processes_of_the_same_user(tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    with serve(tmp_path, "starlette_app:app", "--uds", path, "--workers", "2",
               wait=r"on unix:\S+ with 2 workers()") as s:
        [handout] = abstract_sockets(s.proc.pid, "aem-uds-")
        assert connect_as(handout, None) == ("L", 1)            # as a worker would
        assert connect_as(handout, 65534) == ("", 0)            # nobody: closed, nothing handed
        assert _get_over_unix(path, "/") == b"Hello, world!"


def test_uds_with_workers_reports_a_path_it_cannot_listen_on(tmp_path: Path) -> None:
    path = str(tmp_path / "missing-dir" / "app.sock")
    proc = subprocess.run([sys.executable, "-m", "aem.cli", "serve", "starlette_app:app", "--uds", path,
                           "--workers", "2"], cwd=APPS, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([AEM_PATH, str(APPS)])))
    assert proc.returncode == 1
    assert f"cannot listen on {path}" in proc.stderr


def test_aem_interface_app(tmp_path: Path) -> None:
    with serve(tmp_path, "aem_app:app", "--root", "static",
               wait=r"aem serve: http://127\.0\.0\.1:(\d+)/") as s:
        assert s.get("/")[2] == b"aem app"
        assert s.get("/hello.txt")[2] == b"static hello\n"


def test_reload_restarts_on_a_source_change(tmp_path: Path) -> None:
    mod = APPS / "reload_probe_app.py"
    mod.write_text("from starlette.responses import PlainTextResponse\napp = PlainTextResponse('one')\n")
    try:
        port = free_port()
        with serve(tmp_path, "reload_probe_app:app", "--reload", "--reload-dir", str(APPS), port=port) as s:
            assert s.get("/")[2] == b"one"
            mod.write_text("from starlette.responses import PlainTextResponse\n"
                           "app = PlainTextResponse('two')\n")
            deadline = time.monotonic() + 15
            body = b""
            while time.monotonic() < deadline:
                try:
                    body = s.get("/")[2]
                    if body == b"two":
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            assert body == b"two"
            assert s.stop() == 0
    finally:
        mod.unlink()


def test_status_page_counts_app_requests(star: Served) -> None:
    before = json.loads(star.get("/_aem/status?format=json")[2])
    for _ in range(3):
        star.get("/json")
    after = json.loads(star.get("/_aem/status?format=json")[2])
    assert after["server"]["requests"] - before["server"]["requests"] == 4
    assert after["server"]["responses"]["2xx"] >= 4
    status, headers, body = star.get("/_aem/status")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"requests" in body
