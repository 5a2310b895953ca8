"""``aem serve module:app`` pieces without a server: interface detection, app loading, options,
the CLI's errors; and ``aem bench apps --quick`` runs (no speed is asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from appkit import APPS

import aem.bench
from aem.cli import main
from aem.http.appserver import AppConfig, detect_interface
from aem.http.wsgi import FileWrapper, load_app
from conftest import AEM_PATH


async def asgi_fn(scope: Any, receive: Any, send: Any) -> None:
    pass


class AsgiClass:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        pass


def wsgi_fn(environ: Any, start_response: Any) -> list[bytes]:
    return []


class WsgiClass:
    def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
        return []


def aem_fn(request: Any) -> None:
    return None


def test_detect_interface() -> None:
    assert detect_interface(asgi_fn) == "asgi"
    assert detect_interface(AsgiClass()) == "asgi"
    assert detect_interface(wsgi_fn) == "wsgi"
    assert detect_interface(WsgiClass()) == "wsgi"
    assert detect_interface(aem_fn) == "aem"
    with pytest.raises(ValueError, match="not callable"):
        detect_interface(42)
    with pytest.raises(ValueError, match="--interface"):
        detect_interface(lambda a, b, c, d: None)


def test_detect_real_frameworks() -> None:
    sys.path.insert(0, str(APPS))
    try:
        assert detect_interface(load_app("starlette_app:app")) == "asgi"
        assert detect_interface(load_app("fastapi_app:app")) == "asgi"
        assert detect_interface(load_app("flask_app:app")) == "wsgi"
    finally:
        sys.path.remove(str(APPS))


def test_load_app_errors() -> None:
    with pytest.raises(ValueError, match="module:app"):
        load_app("json")
    with pytest.raises(ValueError, match="no attribute"):
        load_app("json:nosuch")
    with pytest.raises(ImportError):
        load_app("no_such_module_here:app")
    assert load_app("json:decoder.JSONDecoder") is json.decoder.JSONDecoder


@pytest.mark.parametrize(("field", "value", "message"), [
    ("interface", "cgi", "--interface"), ("workers", 0, "--workers"),
    ("graceful_timeout", -1, "--graceful-timeout"), ("timeout", 0, "--timeout"),
    ("limit_concurrency", 0, "--limit-concurrency"), ("root", "/no/such/dir", "--root"),
    ("log_level", "loud", "--log-level"), ("burst", -1, "--burst"), ("burst_after", 0, "--burst-after"),
    ("ws_ping_interval", -1.0, "--ws-ping-interval"), ("ws_ping_timeout", float("nan"), "--ws-ping-timeout"),
])
def test_bad_options_are_refused(field: str, value: Any, message: str) -> None:
    cfg = AppConfig(app="x:y")
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=message):
        cfg.check()


def test_asgi_server_refuses_bad_websocket_ping_options() -> None:
    from aem.http.asgi import ASGIServer

    for kw in ({"ws_ping_interval": 0}, {"ws_ping_timeout": -2.0}, {"ws_ping_interval": float("inf")}):
        with pytest.raises(ValueError, match="must be > 0 seconds"):
            ASGIServer(lambda *a: None, **kw)  # type: ignore[arg-type]
    off = ASGIServer(lambda *a: None, ws_ping_interval=None, ws_ping_timeout=None)  # type: ignore[arg-type]
    assert (off.ws_ping_interval, off.ws_ping_timeout) == (None, None)


def test_wsgi_workers_refuse_bad_burst_options() -> None:
    from aem.http.wsgi import WSGIWorkers

    with pytest.raises(ValueError, match="burst must be"):
        WSGIWorkers("x:y", burst=-1)
    with pytest.raises(ValueError, match="burst_after and burst_idle"):
        WSGIWorkers("x:y", burst_after=0)
    with pytest.raises(ValueError, match="burst_after and burst_idle"):
        WSGIWorkers("x:y", burst_idle=-1)
    assert WSGIWorkers("x:y", workers=3).burst == 3      # default: as many as --workers


def test_cli_reports_an_app_that_cannot_load(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "no_such_module_here:app", "--port", "0"]) == 1
    assert "cannot load 'no_such_module_here:app'" in capsys.readouterr().err
    assert main(["serve", "json:dumps", "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err


def test_cli_reports_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "aem.cli", "serve", "starlette_app:app", "--port",
                            str(port)], cwd=APPS, capture_output=True, text=True, timeout=60,
                           env={"PYTHONPATH": f"{AEM_PATH}:{APPS}", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in p.stderr


def test_file_wrapper_iterates_when_there_is_no_fd() -> None:
    import io

    w = FileWrapper(io.BytesIO(b"abcdef"), 4)
    assert w.fileno() is None
    assert list(w) == [b"abcd", b"ef"]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_bench_apps_runs_quick(tmp_path: Path) -> None:
    aem.bench.run(["apps"], quick=True, out_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["suites"]["apps"]["rows"]
    variants = {r["variant"] for r in rows}
    assert "aem" in variants and variants & {"uvicorn", "granian", "gunicorn"}
    cases = {r["case"] for r in rows if r["variant"] == "aem"}
    assert {"asgi hello, 1 worker", "asgi json, 1 worker", "wsgi hello, 1 worker"} <= cases
    assert all(r["value"] == r["value"] and r["value"] >= 0 for r in rows)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
@pytest.mark.parametrize("pinned", [False, True])
def test_bench_apps_p99_case_runs_round_by_round(tmp_path: Path, pinned: bool) -> None:
    from aem.bench import apps, slowmix
    from aem.bench._harness import Context
    from aem.bench.http import start_servers

    tools = slowmix.binaries(tmp_path)
    if tools is None:
        pytest.skip("no C compiler")
    ctx = Context("apps", True, tmp_path)
    servers = [s for s in apps._servers("wsgi", 2) if s.name == "aem"]
    try:
        started = start_servers(ctx, servers, tmp_path)
        assert started
        if pinned:
            apps._set_cpus(started, {0})
        apps._p99_with_slow(ctx, started, tools, tmp_path, 2.0, 2, 0, conns=(1,), pinned=pinned)
    finally:
        for s in servers:
            s.stop()
    assert {r.variant for r in ctx.rows} == {"aem", "floor"}
    rows = {r.metric: r for r in ctx.rows if r.variant == "aem"}
    assert set(rows) == {"p99 alone", "p99 beside /slow", "p99 ratio beside/alone"}
    assert {r.case for r in ctx.rows} == {
        f"wsgi fast p99 (1 conn) + /slow, 2 workers, {'pinned' if pinned else 'CPUs shared'}"}
    assert len(rows["p99 ratio beside/alone"].samples) == 2          # one ratio per round
    assert all(v > 0 for r in rows.values() for v in r.samples)
    assert any("per round" in n for n in ctx.notes) and any("fast requests" in n for n in ctx.notes)


def test_gunicorn_runs_go_to_its_ports_in_turn() -> None:
    # a server that closes each connection gets a port per run (TIME_WAITs of earlier runs
    # would slow its new connections); one that keeps them alive keeps its one port
    from aem.bench import apps

    servers = {s.name: s for s in apps._servers("wsgi", 1)}
    gu = servers.get("gunicorn")
    if gu is None:
        pytest.skip("gunicorn is not installed")
    ports = [gu.port, *gu.spare_ports]
    assert len(set(ports)) == apps.GUNICORN_PORTS
    assert [a for a in gu.argv if a.startswith("127.0.0.1:")] == [f"127.0.0.1:{p}" for p in ports]
    turns = [gu.next_port() for _ in range(2 * len(ports))]
    assert turns == ports + ports
    aem_server = servers["aem"]
    assert {aem_server.next_port() for _ in range(3)} == {aem_server.port}
