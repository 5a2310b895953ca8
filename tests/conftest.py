"""Shared fixtures: a private engine per test, the process engine reset after each
test, and a check that no child process is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest

import aem
import aem.engine


@pytest.fixture
def engine() -> Iterator[aem.Engine]:
    """A private engine, closed after the test."""
    eng = aem.Engine()
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture(autouse=True)
def _fresh_process_engine() -> Iterator[None]:
    """Every test starts and ends without the process engine (no state leaks between tests)."""
    yield
    eng = aem.engine._current
    if eng is not None:
        eng.close()
        aem.engine._current = None


def processes() -> Iterator[tuple[int, str, int]]:
    """(pid, state letter, parent pid) of every process, from /proc."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        yield int(name), fields[0], int(fields[1])


def children_of(ppid: int) -> set[int]:
    """Pids whose parent is ``ppid`` (running and zombie alike)."""
    return {pid for pid, _state, parent in processes() if parent == ppid}


def _children() -> set[int]:
    return children_of(os.getpid())


@pytest.fixture(autouse=True)
def _no_leftover_children() -> Iterator[None]:
    """Fail a test that leaves a child process (running or zombie) behind; clean it up."""
    before = _children()
    yield
    left = _children() - before
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert not left, f"child processes left behind: {sorted(left)}"


#: Where the aem under test is imported from (the installed package under `make test`,
#: src/ in a development checkout): child Pythons must import the same one.
AEM_PATH = os.path.dirname(os.path.dirname(aem.__file__))


def fork_call(fn: Callable[[], None]) -> int:
    """Run ``fn`` in a forked child that exits 0 if it returns, 1 if it raises; its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        except BaseException as e:
            print(f"child {os.getpid()} failed: {e!r}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    return pid


def run_script(code: str, timeout: float = 30, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python with aem importable; return the completed process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = AEM_PATH
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env, **kw)  # type: ignore[call-overload]


def voluntary_switches(pid: int, tid: int | None = None) -> int:
    """How many times a thread (by default the process's main one) has slept so far."""
    with open(f"/proc/{pid}/task/{pid if tid is None else tid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


def run_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Dispatch on the process engine until ``cond()`` holds (fails after ``timeout``)."""
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for events"
        aem.run(timeout=0.05)


@pytest.fixture
def pool() -> Iterator[aem.CapsulePool]:
    """A capsule pool of 2, ready; closed after the test."""
    p = aem.CapsulePool(size=2, reserve=0)
    try:
        assert p.wait_ready(10)
        yield p
    finally:
        p.close()
