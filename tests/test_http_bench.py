"""``aem bench http idle --quick`` runs and writes its report (no speed is asserted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import aem.bench


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed "
                    "(scripts/install-system-deps.sh installs it)")
def test_http_and_idle_suites_run_quick(tmp_path: Path) -> None:
    aem.bench.run(["http", "idle"], quick=True, out_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    http_rows = data["suites"]["http"]["rows"]
    idle_rows = data["suites"]["idle"]["rows"]
    assert {r["variant"] for r in http_rows} >= {"aem", "asyncio"}
    assert {r["metric"] for r in http_rows} == {"req/s", "server CPU/req", "p50 latency",
                                                 "p99 latency"}
    aem_rps = [r["value"] for r in http_rows if r["variant"] == "aem" and r["metric"] == "req/s"]
    assert aem_rps and all(v > 0 for v in aem_rps)
    assert {r["case"] for r in idle_rows if r["variant"] == "aem"} == {"0 idle", "500 idle"}
    assert {r["metric"] for r in idle_rows if r["variant"] == "aem"} == {
        "p50 latency", "p99 latency", "req/s", "server CPU/req",
        "p50 latency, paced", "p99 latency, paced", "req/s, paced"}
    # paced: each connection waits PACE_MS after each response, which bounds the rate
    from aem.bench.idle import ACTIVE, PACE_MS
    paced = [r["value"] for r in idle_rows if r["metric"] == "req/s, paced"]
    assert paced and all(0 < v <= ACTIVE * 1000 / PACE_MS * 1.02 for v in paced)
    assert (tmp_path / "http-throughput.png").stat().st_size > 0
    assert (tmp_path / "idle-response-time.png").stat().st_size > 0
    assert "## http" in (tmp_path / "results.md").read_text()
