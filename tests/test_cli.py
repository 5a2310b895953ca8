"""The ``aem`` command line."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aem.cli import build_parser, main
from conftest import AEM_PATH, run_script


class _StatusServer:
    """A stand-in HTTP server on loopback answering ``/_aem/status`` as AEMhttpd does."""

    def __init__(self, body: bytes | None) -> None:
        body_ = body

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if body_ is None or self.path != "/_aem/status":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body_)))
                self.end_headers()
                self.wfile.write(body_)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _StatusServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def test_stats_shows_a_running_servers_statistics(capsys: pytest.CaptureFixture[str]) -> None:
    from aem.http import status

    body = status.render_json(status.collect(server={"requests": 7, "connections": 2}))
    with _StatusServer(body) as srv:
        assert main(["stats", "--url", srv.url]) == 0
        out = capsys.readouterr().out
        assert f"pid {os.getpid()}" in out
        assert re.search(r"^server\.requests\s+7$", out, re.M), out
        assert re.search(r"^engine\.registered\s+\d+$", out, re.M), out
        assert main(["stats", "--url", srv.url + "/_aem/status", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["server"]["requests"] == 7


def test_stats_looks_where_the_server_publishes() -> None:
    from aem import cli
    from aem.http import status

    assert cli.STATUS_PATH == status.PATH


def test_stats_says_when_the_server_publishes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with _StatusServer(None) as srv:
        assert main(["stats", "--url", srv.url]) == 1
    assert "does not publish its statistics" in capsys.readouterr().err


def test_stats_says_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # a port nobody listens on
        port = s.getsockname()[1]
        assert main(["stats", "--url", f"127.0.0.1:{port}", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach http://127.0.0.1:{port}/_aem/status" in err and "Traceback" not in err


def test_stats_refuses_a_non_http_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--url", "ftp://example.invalid/"]) == 1
    assert "is not an http:// address" in capsys.readouterr().err


def test_demo_exits_cleanly_on_ctrl_c() -> None:
    """Ctrl-C reaches the demo's whole process group, its forked writer included."""
    env = dict(os.environ, PYTHONPATH=AEM_PATH)
    p = subprocess.Popen([sys.executable, "-c", "from aem.cli import main; raise SystemExit(main(['demo']))"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        time.sleep(1.5)  # the writer has sent a message: both processes run
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, err
    assert "signal SIGINT" in out and "socket:" in out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_bench_help_lists_the_suites(capsys: pytest.CaptureFixture[str]) -> None:
    from aem import bench

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    for name in bench.SUITES + bench.EXTRA_SUITES:
        assert re.search(rf"^  {name}\s+\S", out, re.M), name
    assert "aem[bench]" in out
    assert "``" not in out, "reST markup from the suites' docstrings"


def test_bench_without_its_extra_says_what_to_install_before_measuring(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from aem import bench

    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(bench.importlib, "import_module", lambda name: pytest.fail(f"imported {name}"))
    assert main(["bench", "dispatch", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "missing: matplotlib" in err and "pip install 'aem[bench]'" in err


def test_bench_shows_what_runs_now(capsys: pytest.CaptureFixture[str]) -> None:
    from aem.bench._harness import interleave, progress

    with progress("[1/1] demo-suite"):
        interleave({"a": lambda: 1.0}, rounds=1)
    out = capsys.readouterr().out
    assert "[1/1] demo-suite" in out and "done" in out


def test_demo_runs_and_stops_by_itself() -> None:
    p = run_script("from aem.cli import main; raise SystemExit(main(['demo', '--duration', '1.5']))")
    assert p.returncode == 0, p.stderr
    assert "timer fired" in p.stdout and "socket:" in p.stdout


def test_demo_stops_on_sigterm() -> None:
    env = dict(os.environ)

    env["PYTHONPATH"] = AEM_PATH
    p = subprocess.Popen([sys.executable, "-c", "from aem.cli import main; raise SystemExit(main(['demo']))"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        time.sleep(1.2)
        p.terminate()
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "signal SIGTERM" in out


def test_unknown_subcommand_is_an_error() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["frobnicate"])


def test_bench_rejects_unknown_suite(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "nosuch", "--quick"]) == 2
    assert "unknown bench suite" in capsys.readouterr().err


def _make_dry_run(target: str, tmp_path: Path) -> str:
    """What ``make TARGET`` would run on a fresh machine (a venv that does not exist yet)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run(["make", "-n", "-C", str(root), target, f"VENV={tmp_path / 'venv'}"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_make_run_installs_only_what_the_server_needs(tmp_path: Path) -> None:
    out = _make_dry_run("run", tmp_path)
    assert "pip install --quiet '.'" in out and "aem serve" in out
    assert "install-system-deps" not in out and "sudo" not in out
    assert "[test" not in out and "bench" not in out


def test_make_test_and_bench_install_their_own_extras(tmp_path: Path) -> None:
    out = _make_dry_run("test", tmp_path)
    assert "install-system-deps" in out and "'.[test,bench,docs]'" in out
    assert "mkdocs build --strict" in out and "pytest" in out
    out = _make_dry_run("bench", tmp_path)
    assert "install-system-deps" in out and "'.[bench]'" in out and "aem bench" in out


def test_every_bench_suite_says_what_runs_now() -> None:
    """A suite's progress line shows what it measures now: the suite goes through
    ``interleave()`` (which says it) or says it itself with ``ctx.step()``."""
    from aem import bench

    silent = []
    for name in bench.SUITES + bench.EXTRA_SUITES:
        spec = importlib.util.find_spec(f"aem.bench.{name}")
        assert spec is not None and spec.origin is not None
        text = Path(spec.origin).read_text()
        if "interleave(" not in text and "ctx.step(" not in text:
            silent.append(name)
    assert not silent, f"bench suites that never say what runs now: {silent}"


def test_bench_step_shows_in_the_progress_line(tmp_path: Path) -> None:
    from aem.bench import _harness

    pytest.importorskip("rich")
    with _harness.progress("[1/1] demo-suite"):
        _harness.Context("demo-suite", True, tmp_path).step("case x: server y, round 2/3")
        (task,) = _harness._progress.bar.tasks  # what a terminal shows on the suite's line
        assert task.description == "[1/1] demo-suite"
        assert task.fields["status"] == "case x: server y, round 2/3"


def test_make_docs_installs_only_the_docs_extra(tmp_path: Path) -> None:
    out = _make_dry_run("docs", tmp_path)
    assert "'.[docs]'" in out and "mkdocs build --strict" in out
    assert "install-system-deps" not in out and "[test" not in out and "bench" not in out


def test_demo_ends_quietly_when_its_reader_goes_away() -> None:
    """``aem demo | head -2``: once head exits, the demo stops (it went on forever, printing a
    BrokenPipeError traceback per event, and then could not even be stopped by SIGTERM)."""
    env = dict(os.environ, PYTHONPATH=AEM_PATH)
    p = subprocess.Popen([sys.executable, "-c", "from aem.cli import main; raise SystemExit(main(['demo']))"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        assert p.stdout is not None and p.stderr is not None
        assert "aem demo" in p.stdout.readline()
        p.stdout.close()  # the reader goes away
        p.wait(timeout=10)
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
