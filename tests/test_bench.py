"""The benchmark suites run (--quick): they produce their table, results.json and plots.

These tests check that the benchmarks work, never how fast anything is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aem import bench
from conftest import run_script


@pytest.mark.parametrize("suite", ["dispatch", "delivery", "timers", "vmtable", "capsules"])
def test_suite_runs_quick(suite: str, tmp_path: Path) -> None:
    if suite == "capsules":
        # multiprocessing's forkserver and resource tracker outlive the suite: own process
        p = run_script(f"from aem.cli import main; raise SystemExit(main(['bench', 'capsules', '--quick', "
                       f"'--out', {str(tmp_path)!r}]))", timeout=240)
        assert p.returncode == 0, p.stderr
    else:
        bench.run([suite], quick=True, out_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["suites"][suite]["rows"]
    assert any(r["variant"].startswith("aem") for r in rows)
    assert any(not r["variant"].startswith("aem") for r in rows), "anchors measured side by side"
    assert all(r["value"] == r["value"] and r["value"] >= 0 for r in rows)  # no NaN
    for plot in data["suites"][suite]["plots"]:
        assert (tmp_path / plot).stat().st_size > 1000
    assert data["machine"]["cpu"]
    assert "|" in (tmp_path / "results.md").read_text()


def test_unknown_suite_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        bench.run(["nosuch"], quick=True, out_dir=tmp_path)


def test_soak_runs_quick(tmp_path: Path) -> None:
    import shutil

    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed")
    p = run_script(f"from aem.cli import main; raise SystemExit(main(['bench', 'soak', '--quick', "
                   f"'--out', {str(tmp_path)!r}]))", timeout=240)
    assert p.returncode == 0, p.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["suites"]["soak"]["rows"]
    metrics = {r["metric"]: r["value"] for r in rows}
    assert metrics["requests/s (median run)"] > 0 and metrics["socket errors + non-2xx/3xx"] == 0


def test_asyncio_suite_runs_quick(tmp_path: Path) -> None:
    """aem bench asyncio --quick: every case has aem.EventLoop beside asyncio (and uvloop)."""
    p = run_script(f"from aem.cli import main; raise SystemExit(main(['bench', 'asyncio', '--quick', "
                   f"'--out', {str(tmp_path)!r}]))", timeout=300)
    assert p.returncode == 0, p.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["suites"]["asyncio"]["rows"]
    cases = {r["case"] for r in rows}
    assert any(c.startswith("call_soon") for c in cases) and any(c.startswith("TCP echo") for c in cases)
    for case in cases:
        variants = {r["variant"] for r in rows if r["case"] == case}
        assert "aem.EventLoop" in variants and "asyncio" in variants, case
        if case.startswith("TCP echo"):  # the floors beside the loops
            assert "floor (Python epoll)" in variants, case
            assert ("floor (C epoll)" in variants) == (shutil.which("cc") is not None), case
    assert all(r["value"] == r["value"] and r["value"] > 0 for r in rows)
