"""CPython's own asyncio tests (test.test_asyncio, shipped with the interpreter) on aem.EventLoop.

    python runner.py [--jobs N] [--timeout S] [--out results.json] [MODULE ...]

Each test module runs in its own process with a time limit (a hang is a
failure, not a stuck run); modules run in parallel.  In the child, the test
classes that make their loop through a factory (``create_event_loop``,
``new_loop``) are bound to ``aem.new_event_loop`` — of the variants a module
defines for several selectors only the epoll one is kept, since aem replaces
the selector — and aem's policy is installed, so tests that call
``asyncio.new_event_loop()`` get an aem loop too.  A test counts as *bound*
when it created at least one aem.EventLoop; tests that never did (pure unit
tests of futures, mocks, asyncio's TestLoop) are reported apart as unbound.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import warnings
from typing import Any

MODULES = [
    "test_events", "test_sock_lowlevel", "test_server", "test_buffered_proto", "test_sendfile",
    "test_subprocess", "test_streams", "test_ssl", "test_sslproto", "test_unix_events", "test_runners",
    "test_taskgroups", "test_timeouts", "test_waitfor", "test_context", "test_pep492", "test_locks",
    "test_queues", "test_tasks", "test_futures", "test_threads", "test_base_events", "test_selector_events",
    "test_protocols", "test_transports",
]

#: Variants of one mixin for several loops or child watchers: aem has its own, so one is enough.
#: Keep only the first of these names present in a module.
PREFERRED = ["EPollEventLoopTests", "SubprocessPidfdWatcherTests"]
DUPLICATES = ("SelectEventLoopTests", "PollEventLoopTests", "KqueueEventLoopTests",
              "SubprocessThreadedWatcherTests", "SubprocessSafeWatcherTests",
              "SubprocessFastWatcherTests", "SubprocessMultiLoopWatcherTests")
FACTORIES = ("create_event_loop", "new_loop")
#: Modules whose `new_loop` makes a mock loop, not a real one: not rebound (their tests stay unbound).
MOCK_FACTORIES = {"test_runners"}
#: Bound tests that fail by design, with the reason (reported, and allowed by tests/test_conformance.py).
KNOWN_FAILURES = {
    "test.test_asyncio.test_subprocess.GenericWatcherTests.test_create_subprocess_fails_with_inactive_watcher":
        "aem.EventLoop reaps children through pidfds and never consults asyncio's child watcher, so an "
        "inactive watcher does not make subprocess creation fail",
}
PER_TEST_TIMEOUT = 30


# -- the child: one module ---------------------------------------------------------------------


class _Result(unittest.TestResult):
    def __init__(self, progress: str, counter: list[int]) -> None:
        super().__init__()
        self.progress = progress
        self.counter = counter
        self.records: list[dict[str, Any]] = []
        self._cur: dict[str, Any] = {}

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        with open(self.progress, "w") as f:
            f.write(test.id())
        self._cur = {"id": test.id(), "loops0": self.counter[0], "t0": time.monotonic()}
        signal.alarm(PER_TEST_TIMEOUT)

    def stopTest(self, test: unittest.TestCase) -> None:
        signal.alarm(0)
        super().stopTest(test)
        # (3.12+ may stop a test it did not start: a class whose set-up failed)
        cur = self._cur if "id" in self._cur else {"id": test.id(), "loops0": self.counter[0],
                                                   "t0": time.monotonic(), **self._cur}
        self._cur = {}
        rec = {"id": cur["id"], "outcome": cur.get("outcome", "passed"),
               "bound": self.counter[0] > cur["loops0"], "seconds": round(time.monotonic() - cur["t0"], 3)}
        if "detail" in cur:
            rec["detail"] = cur["detail"]
        self.records.append(rec)

    def _set(self, outcome: str, detail: str | None = None) -> None:
        if self._cur.get("outcome") in ("failed", "error"):
            return
        self._cur["outcome"] = outcome
        if detail is not None:
            self._cur["detail"] = detail[-2000:]

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)
        self._set("error", self._exc_info_to_string(err, test))

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self._set("failed", self._exc_info_to_string(err, test))

    def addSubTest(self, test: unittest.TestCase, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self._set("failed" if failed else "error", self._exc_info_to_string(err, test))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self._set("skipped", reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._set("expected-failure")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        self._set("failed", "unexpected success")


class _PerTestTimeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _PerTestTimeout(f"the test ran longer than {PER_TEST_TIMEOUT}s")


def _bind(module: Any) -> list[type]:
    import aem

    names = {n for n, o in vars(module).items() if isinstance(o, type) and issubclass(o, unittest.TestCase)}
    keep_only = next((p for p in PREFERRED if p in names), None)
    classes = []
    rebind = module.__name__.rsplit(".", 1)[-1] not in MOCK_FACTORIES
    for name in sorted(names):
        cls = vars(module)[name]
        if cls.__module__ != module.__name__:
            continue
        if keep_only and name in DUPLICATES:
            continue
        if rebind and any(hasattr(cls, f) for f in FACTORIES):
            attrs = {f: (lambda self: aem.new_event_loop()) for f in FACTORIES if hasattr(cls, f)}
            cls = type(name, (cls,), {**attrs, "__module__": module.__name__, "__qualname__": name})
        classes.append(cls)
    return classes


def child(module_name: str, progress: str, out: str) -> None:
    import importlib

    import aem
    import aem.loop.eventloop as el

    counter = [0]
    init = el.EventLoop.__init__

    def counting_init(self: Any, *a: Any, **k: Any) -> None:
        counter[0] += 1
        init(self, *a, **k)

    el.EventLoop.__init__ = counting_init  # type: ignore[method-assign]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        aem.install()
    signal.signal(signal.SIGALRM, _alarm)
    module = importlib.import_module(f"test.test_asyncio.{module_name}")
    loader = unittest.TestLoader()
    suite = unittest.TestSuite(loader.loadTestsFromTestCase(c) for c in _bind(module))
    result = _Result(progress, counter)
    suite.run(result)
    with open(out, "w") as f:
        json.dump(result.records, f)


# -- the parent: every module, in parallel -------------------------------------------------------


def run_module(name: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        progress, out = os.path.join(tmp, "progress"), os.path.join(tmp, "out.json")
        cmd = [sys.executable, "-X", "faulthandler", os.path.abspath(__file__), "--child", name,
               "--progress", progress, "--results", out]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            timed_out = True
        seconds = round(time.monotonic() - t0, 1)
        records: list[dict[str, Any]] = []
        if os.path.exists(out):
            with open(out) as f:
                records = json.load(f)
        problem = None
        if timed_out or not os.path.exists(out):
            last = open(progress).read() if os.path.exists(progress) else "?"
            why = f"timed out after {timeout}s" if timed_out else f"exited with {proc.returncode}"
            problem = f"{why} in {last}: {log.decode(errors='replace')[-1500:]}"
        return {"module": name, "seconds": seconds, "tests": records, "problem": problem}


def summarize(modules: list[dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    unbound = 0
    for m in modules:
        for t in m["tests"]:
            if not t["bound"]:
                unbound += 1
                continue
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    problems = sum(1 for m in modules if m["problem"])
    ran = counts.get("passed", 0) + counts.get("failed", 0) + counts.get("error", 0) + problems
    rate = counts.get("passed", 0) / ran if ran else 0.0
    return {"bound": counts, "unbound": unbound, "module_problems": problems, "pass_rate": rate}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", default=MODULES)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per module")
    ap.add_argument("--out", help="write the full results (JSON) here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--progress", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.progress, args.results)
        return 0
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        modules = list(pool.map(lambda m: run_module(m, args.timeout), args.modules))
    summary = summarize(modules)
    for m in modules:
        c: dict[str, int] = {}
        for t in m["tests"]:
            if t["bound"]:
                c[t["outcome"]] = c.get(t["outcome"], 0) + 1
        print(f"{m['module']:24} {m['seconds']:6.1f}s  {c}  unbound={sum(not t['bound'] for t in m['tests'])}"
              + (f"  PROBLEM: {m['problem'][:200]}" if m["problem"] else ""))
        for t in m["tests"]:
            if t["bound"] and t["outcome"] in ("failed", "error"):
                why = KNOWN_FAILURES.get(t["id"]) or t.get("detail", "").strip().splitlines()[-1:]
                print(f"    {t['outcome']}: {t['id']}: {why}")
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "modules": modules}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
