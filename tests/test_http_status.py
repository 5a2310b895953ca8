"""aem.http.status: what people see on /_aem/status (formatting, order, empty sections)."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from aem.http import status


def test_values_are_shown_one_way() -> None:
    f = status.format_value
    assert f(True) == "yes" and f(False) == "no"
    assert f(1234567) == "1,234,567" and f(0) == "0" and f(-5) == "-5"
    assert f(2.0) == "2" and f(0.123456) == "0.123" and f(12.3456) == "12.3"
    assert f(1234.5678) == "1,234.6" and f(None) == "—" and f("text") == "text"


def test_rows_in_natural_order_and_empty_sections_explained() -> None:
    data = {"pid": 1, "time": 0.0,
            "engine": {"size.512": 1, "size.64": 2, "size.4096": 3, "flag": True, "ratio": 0.333333},
            "server": {"responses": {}}, "capsules": {}}
    page = status.render_html(data).decode()
    keys = re.findall(r'data-key="([^"]+)"', page)
    assert keys == ["flag", "ratio", "size.64", "size.512", "size.4096", "responses"]
    assert 'data-key="flag">yes<' in page and 'data-key="ratio">0.333<' in page
    assert 'data-key="responses">none yet<' in page
    for section in ("capsules", "vmtable"):   # empty, and absent
        assert f'<section id="{section}"><h2>{section}</h2><p class="empty">' in page
    assert "True" not in page


def test_json_is_asked_for_by_query_or_accept() -> None:
    assert status.wants_json(None, "format=json")
    assert status.wants_json("text/html", "a=1&format=json")
    assert not status.wants_json("application/json", "format=html")
    assert status.wants_json("application/json", "")
    assert not status.wants_json("text/html,application/json;q=0.9", "")
    assert not status.wants_json(None, "")
    data = status.collect({"requests": 3})
    assert json.loads(status.render_json(data))["server"] == {"requests": 3}


_LOOK_ONLY = """
import aem
from aem.http import status
assert aem.vmtable.existing() is None
data = status.collect({"requests": 1})
assert "vmtable" not in data and aem.vmtable.existing() is None   # looking made none
t = aem.vmtable()
assert aem.vmtable.existing() is t
assert "vmtable" in status.collect({"requests": 1})
print("ok")
"""


def test_the_page_shows_a_vmtable_only_when_one_was_made() -> None:
    """Looking at the status must not make the process's vmtable (64 MiB of memory): in a
    fresh process, where no vmtable exists yet."""
    import subprocess
    import sys

    from conftest import AEM_PATH

    out = subprocess.run([sys.executable, "-c", _LOOK_ONLY], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=AEM_PATH))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_who_sees_the_page() -> None:
    from aem.http import HTTPServer
    from aem.http.server import _is_loopback

    assert _is_loopback(("127.0.0.1", 5)) and _is_loopback(("::1", 5, 0, 0))
    assert _is_loopback(("127.8.9.10", 1)) and _is_loopback("")     # a Unix socket peer
    assert not _is_loopback(("10.1.2.3", 5)) and not _is_loopback(("2001:db8::1", 5, 0, 0))
    assert not _is_loopback(("not an address", 1))
    with pytest.raises(ValueError):
        HTTPServer(status_page="everyone", port=0)


# -- the status JSON answered by the native path (src/aem/_core/http_status.c) ---------------

STATUS_JSON = b"GET /_aem/status?format=json HTTP/1.1\r\nHost: a\r\n\r\n"


def _keys(value: object) -> object:
    """The shape of a JSON value: its keys, recursively (values aside)."""
    if isinstance(value, dict):
        return {k: _keys(v) for k, v in value.items()}
    return type(value).__name__ if isinstance(value, (dict, list)) else None


def _status_server(status_page: bool | str = True):  # type: ignore[no-untyped-def]
    from aem.http import HTTPServer, Response

    server = HTTPServer(lambda r: Response("hi") if r.target == "/hi" else None, port=0,
                        status_page=status_page)
    server.start()
    return server


def _split(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def test_the_c_path_answers_the_status_json_like_the_full_path() -> None:
    """The first request goes the full way (no snapshot yet) and leaves a snapshot; the next
    ones are answered in C: same head, same keys all the way down, the server's counters
    as HTTPServer.stats() gives them (this request counted), the JSON written alike."""
    import socket

    from aem.http.server import _Conn

    server = _status_server()
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        conn = _Conn(server, a, ("127.0.0.1", 1))
        assert server._fast is not None and server._fastpath is not None
        assert server._fast(conn, b"GET /hi HTTP/1.1\r\nHost: a\r\n\r\n") == b""  # a 2xx first
        b.recv(1 << 16)
        assert server._fast(conn, STATUS_JSON) == STATUS_JSON   # no snapshot: the full path
        server._dispatch(conn, conn.http.receive(STATUS_JSON))
        py_head, py_body = _split(b.recv(1 << 20))
        before = server.stats()
        assert server._fast(conn, b"GET /hi HTTP/1.1\r\nHost: a\r\n\r\n" + STATUS_JSON) == b""
        assert server._fastpath.status_served == 1
        raw = b.recv(1 << 20)
        c_head, c_body = _split(raw[raw.index(b"HTTP/1.1 200 OK", 10):])
        strip = re.compile(rb"Date: [^\r]*|Content-Length: \d+")
        assert strip.sub(b"", c_head) == strip.sub(b"", py_head)
        assert int(re.search(rb"Content-Length: (\d+)", c_head).group(1)) == len(c_body)  # type: ignore[union-attr]
        c_data, py_data = json.loads(c_body), json.loads(py_body)
        assert _keys(c_data) == _keys(py_data)
        expected = dict(before, requests=before["requests"] + 2,       # /hi and this one
                        responses={"2xx": before["responses"]["2xx"] + 1})  # /hi's
        assert abs(c_data["server"].pop("uptime_s") - expected.pop("uptime_s")) <= 0.2
        assert c_data["server"] == expected
        assert abs(c_data["time"] - time.time()) < 5 and c_data["pid"] == os.getpid()
        # written as render_json writes it (the server section has str keys only: re-rendered)
        c_data = json.loads(c_body)
        assert b'"server": ' + status.render_json(c_data["server"]) + b', "time": ' in c_body
        assert b'"time": ' + json.dumps(c_data["time"]).encode() in c_body
        # HEAD: the same head, no body
        assert server._fast(conn, STATUS_JSON.replace(b"GET", b"HEAD")) == b""
        h, body = _split(b.recv(1 << 20))
        assert body == b"" and h.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        a.close()
        b.close()
        server.close()


def test_who_the_c_path_answers_the_status_json_for() -> None:
    """The option's rules hold in C: "loopback" only for 127/8, ::1 and Unix peers; True for
    all; a stale snapshot, mode 0 or another spelling of the target go the full way; the
    server's tick refreshes the snapshot while the page is being asked for."""
    import socket

    from aem.http.server import _Conn

    cases = [("loopback", ("127.0.0.1", 1), True), ("loopback", ("127.9.9.9", 1), True),
             ("loopback", ("::1", 1, 0, 0), True), ("loopback", "", True),
             ("loopback", ("10.0.0.1", 1), False), ("loopback", ("::ffff:127.0.0.1", 1, 0, 0), False),
             ("loopback", ("2001:db8::1", 1, 0, 0), False), (True, ("10.0.0.1", 1), True)]
    for option, addr, in_c in cases:
        server = _status_server(option)
        a, b = socket.socketpair()
        try:
            a.setblocking(False)
            conn = _Conn(server, a, addr)
            assert server._fastpath is not None and server._fast is not None
            server._fastpath.snapshot_status(status.collect(server.stats()))
            rest = server._fast(conn, STATUS_JSON)
            assert (rest == b"") == in_c, (option, addr)
            if in_c:
                assert json.loads(_split(b.recv(1 << 20))[1])["server"]["requests"] == 1
        finally:
            a.close()
            b.close()
            server.close()

    server = _status_server()
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        conn = _Conn(server, a, ("127.0.0.1", 1))
        fp = server._fastpath
        assert fp is not None and server._fast is not None
        head, mid, tail = status.json_parts(status.collect(server.stats()))
        for other in (b"GET /_aem/status HTTP/1.1\r\nHost: a\r\n\r\n",
                      b"GET /_aem/status?format=json&x=1 HTTP/1.1\r\nHost: a\r\n\r\n",
                      b"GET /_aem/status/?format=json HTTP/1.1\r\nHost: a\r\n\r\n"):
            fp._core.set_status(1, head, mid, tail, time.monotonic(), 2.0)
            assert server._fast(conn, other) == other
        fp._core.set_status(0, head, mid, tail, time.monotonic(), 2.0)
        assert server._fast(conn, STATUS_JSON) == STATUS_JSON            # mode 0: never in C
        fp._core.set_status(1, head, mid, tail, time.monotonic() - 10, 2.0)
        assert server._fast(conn, STATUS_JSON) == STATUS_JSON            # stale
        with pytest.raises(ValueError):
            fp._core.set_status(3, head, mid, tail, 0.0, 2.0)
        server._sweep(None)          # not asked lately: the tick leaves the snapshot alone
        assert server._fast(conn, STATUS_JSON) == STATUS_JSON
        server._dispatch(conn, conn.http.receive(STATUS_JSON))   # asked (the full path) ...
        fp._core.set_status(1, head, mid, tail, time.monotonic() - 10, 2.0)
        server._sweep(None)          # ... so the tick refreshes it
        assert server._fast(conn, STATUS_JSON) == b""
        assert fp.status_served == 1
    finally:
        a.close()
        b.close()
        server.close()


def test_json_parts_put_together_are_render_json() -> None:
    data = status.collect({"requests": 3, "responses": {"2xx": 1}})
    head, mid, tail = status.json_parts(data)
    assert (head + status.render_json(data["server"]) + mid + json.dumps(data["time"]).encode()
            + tail) == status.render_json(data)
    with pytest.raises(ValueError):
        status.json_parts({"pid": 1})
