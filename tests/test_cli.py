"""The ``aem`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from aem.cli import build_parser, main
from conftest import AEM_PATH, run_script


def test_stats_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["registered"] == 0 and "per_source" in data


def test_demo_runs_and_stops_by_itself() -> None:
    p = run_script("from aem.cli import main; raise SystemExit(main(['demo', '--duration', '1.5']))")
    assert p.returncode == 0, p.stderr
    assert "timer fired" in p.stdout and "socket:" in p.stdout


def test_demo_stops_on_sigterm() -> None:
    import os
    import time

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
