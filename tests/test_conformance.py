"""CPython's own asyncio test suite (test.test_asyncio) bound to aem.EventLoop.

tests/conformance/runner.py runs each module in its own process with a time
limit, in parallel; here the whole run must pass ≥ 95% of the bound tests,
every failure must be a known one with its reason, and no module may hang or
crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import AEM_PATH

RUNNER = os.path.join(os.path.dirname(__file__), "conformance", "runner.py")
sys.path.insert(0, os.path.dirname(RUNNER))
import runner  # noqa: E402


@pytest.mark.timeout(900)
def test_cpython_asyncio_suite_on_aem_loop(tmp_path: object) -> None:
    out = os.path.join(str(tmp_path), "conformance.json")
    env = {**os.environ, "PYTHONPATH": AEM_PATH}
    proc = subprocess.run([sys.executable, RUNNER, "--jobs", "2", "--timeout", "300", "--out", out],
                          env=env, capture_output=True, text=True, timeout=880)
    print(proc.stdout[-6000:], proc.stderr[-2000:])
    assert proc.returncode == 0
    with open(out) as f:
        results = json.load(f)
    problems = {m["module"]: m["problem"] for m in results["modules"] if m["problem"]}
    assert not problems
    unknown = [(t["id"], t.get("detail", "")[-400:]) for m in results["modules"] for t in m["tests"]
               if t["bound"] and t["outcome"] in ("failed", "error") and t["id"] not in runner.KNOWN_FAILURES]
    assert not unknown
    summary = results["summary"]
    assert sum(summary["bound"].values()) > 500  # the binding really reached the suite
    assert summary["pass_rate"] >= 0.95, summary


def test_runner_reports_a_hanging_module(tmp_path: object) -> None:
    """A module that does not finish in time is reported as a problem, with the test it hung in."""
    result = runner.run_module("test_tasks", timeout=1.0)
    assert result["problem"] and result["problem"].startswith("timed out after 1.0s in ")
