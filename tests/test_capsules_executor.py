"""CapsulePool as a concurrent.futures.Executor: every test runs against ProcessPoolExecutor
too, so each difference from the executor users know is deliberate (see docs/capsules.md)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from capsulekit import EXECUTORS, executor_of, wait_for_file

import aem
from conftest import voluntary_switches


@pytest.fixture(params=EXECUTORS)
def executor(request: pytest.FixtureRequest) -> Iterator[cf.Executor]:
    with executor_of(request.param, 2) as ex:
        yield ex


def is_capsules(ex: cf.Executor) -> bool:
    return isinstance(ex, aem.CapsulePool)


# -- module-level functions: they travel by reference --------------------------------------------


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0, *, c: int = 0) -> int:
    return a + b + c


def fails(x: int) -> int:
    raise ValueError(f"bad value {x}")


def pid_then_sleep(path: str, seconds: float) -> int:
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def sleep_then(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


# -- the contract --------------------------------------------------------------------------------


def test_submit_returns_the_result(executor: cf.Executor) -> None:
    assert executor.submit(square, 12).result(timeout=10) == 144
    assert executor.submit(add, 1, 2, c=3).result(timeout=10) == 6


def test_calls_run_in_other_processes(executor: cf.Executor) -> None:
    pid = executor.submit(os.getpid).result(timeout=10)
    assert pid != os.getpid()


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_map_keeps_order_whatever_the_chunksize(executor: cf.Executor, chunksize: int) -> None:
    assert list(executor.map(square, range(25), chunksize=chunksize)) == [x * x for x in range(25)]
    assert list(executor.map(add, [1, 2, 3], [10, 20], chunksize=chunksize)) == [11, 22]


def test_map_rejects_a_bad_chunksize(executor: cf.Executor) -> None:
    with pytest.raises(ValueError):
        executor.map(square, range(3), chunksize=0)


def test_map_timeout(executor: cf.Executor) -> None:
    results = executor.map(sleep_then, [1, 2], [2.0, 2.0], timeout=0.2)
    with pytest.raises(TimeoutError):
        list(results)


def test_exception_comes_back_with_its_remote_traceback(executor: cf.Executor) -> None:
    fut = executor.submit(fails, 7)
    with pytest.raises(ValueError, match="bad value 7") as info:
        fut.result(timeout=10)
    cause = info.value.__cause__
    assert cause is not None and "Traceback" in str(cause) and "in fails" in str(cause)
    assert isinstance(fut.exception(), ValueError)
    # the executor goes on
    assert executor.submit(square, 3).result(timeout=10) == 9


def test_map_raises_the_first_exception_in_order(executor: cf.Executor) -> None:
    results = executor.map(fails, [1, 2])
    with pytest.raises(ValueError, match="bad value 1"):
        list(results)


def test_as_completed_and_wait(executor: cf.Executor) -> None:
    futures = [executor.submit(sleep_then, i, 0.05 * (4 - i)) for i in range(4)]
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=20)) == [0, 1, 2, 3]
    done, not_done = cf.wait(futures, timeout=20)
    assert len(done) == 4 and not not_done
    first = [executor.submit(sleep_then, 1, 0.05), executor.submit(sleep_then, 2, 2.0)]
    done, not_done = cf.wait(first, timeout=20, return_when=cf.FIRST_COMPLETED)
    assert [f.result() for f in done] == [1] and len(not_done) == 1


def test_a_result_that_times_out_is_completed_later(executor: cf.Executor) -> None:
    # CapsulePool: the thread waiting in result() reads the answer itself; when it gives up,
    # the pool's manager thread must take over, or the callbacks would never run
    fut = executor.submit(sleep_then, 7, 0.3)
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.05)
    done = threading.Event()
    fut.add_done_callback(lambda f: done.set())
    assert done.wait(10) and fut.result() == 7


def test_unpicklable_call_fails_its_future(executor: cf.Executor) -> None:
    local = 5
    fut = executor.submit(lambda: local)
    with pytest.raises(Exception, match=r"(?i)pickle"):
        fut.result(timeout=10)
    assert executor.submit(square, 2).result(timeout=10) == 4


def test_shutdown_waits_and_refuses_new_calls(executor: cf.Executor) -> None:
    futures = [executor.submit(sleep_then, i, 0.2) for i in range(3)]
    executor.shutdown(wait=True)
    assert all(f.done() for f in futures) and [f.result() for f in futures] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(square, 1)


def test_shutdown_cancel_futures_cancels_what_did_not_start(executor: cf.Executor, tmp_path: Path) -> None:
    running = [executor.submit(pid_then_sleep, str(tmp_path / f"p{i}"), 0.5) for i in range(2)]
    for i in range(2):
        wait_for_file(tmp_path / f"p{i}")
    waiting = [executor.submit(square, i) for i in range(6)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert all(f.result() > 0 for f in running)
    # both executors hand calls ahead to busy workers (ProcessPoolExecutor: up to its workers
    # + 1; CapsulePool: one per worker); the rest were cancelled
    assert all(f.cancelled() for f in waiting[3:])
    assert all(f.cancelled() or f.result() == i * i for i, f in enumerate(waiting))


def test_shutdown_without_wait_returns_at_once(executor: cf.Executor) -> None:
    fut = executor.submit(sleep_then, 5, 0.5)
    workers = list((getattr(executor, "_processes", None) or {}).values())
    t0 = time.monotonic()
    executor.shutdown(wait=False)
    assert time.monotonic() - t0 < 0.4
    assert fut.result(timeout=10) == 5
    executor.shutdown(wait=True)  # CapsulePool: waits for the background close
    for w in workers:  # ProcessPoolExecutor forgot its workers: join them here
        w.join(10)


def test_a_killed_worker(executor: cf.Executor, tmp_path: Path) -> None:
    victim = executor.submit(pid_then_sleep, str(tmp_path / "victim"), 30)
    bystander = executor.submit(sleep_then, "alive", 0.5)
    pid = wait_for_file(tmp_path / "victim")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(Exception) as info:
        victim.result(timeout=20)
    if is_capsules(executor):
        # only the killed call fails, saying why; the others go on, the pool stays usable
        assert isinstance(info.value, aem.AemError) and "SIGKILL" in str(info.value)
        assert bystander.result(timeout=20) == "alive"
        assert executor.submit(square, 4).result(timeout=20) == 16
    else:
        # ProcessPoolExecutor: the whole pool is broken
        assert isinstance(info.value, cf.process.BrokenProcessPool)
        with pytest.raises(cf.process.BrokenProcessPool):
            bystander.result(timeout=20)


def test_run_in_executor(executor: cf.Executor) -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(executor, square, i) for i in range(5))))

    assert asyncio.run(main()) == [0, 1, 4, 9, 16]


def test_with_block_waits_for_the_calls(executor: cf.Executor) -> None:
    with executor as ex:
        fut = ex.submit(sleep_then, 3, 0.2)
    assert fut.done() and fut.result() == 3


# -- CapsulePool only ------------------------------------------------------------------------------


def test_closing_the_pool_fails_running_calls_and_cancels_waiting_ones(tmp_path: Path) -> None:
    pool = aem.CapsulePool(size=1)
    try:
        running = pool.submit(pid_then_sleep, str(tmp_path / "p"), 30)
        wait_for_file(tmp_path / "p")
        waiting = pool.submit(square, 2)
    finally:
        pool.close(timeout=1.0)
    # a call waiting in the pool is cancelled; one already handed to the busy worker (one
    # call ahead) fails, saying it never ran
    if not waiting.cancelled():
        with pytest.raises(aem.AemError, match="closed before the call ran"):
            waiting.result(timeout=5)
    with pytest.raises(aem.AemError, match="closed while the call ran"):
        running.result(timeout=5)


def test_workers_and_event_capsules_share_the_pool() -> None:
    with aem.CapsulePool(size=2) as pool:
        assert pool.wait_ready(10)
        assert list(pool.map(square, range(4))) == [0, 1, 4, 9]
        assert 1 <= pool.stats()["workers"] <= 2
        assert pool.wait_ready(10), "capsules taken as workers were replaced for events"
        got: list[Any] = []
        results = aem.UserEvent()
        aem.register(results, lambda ev: got.append(ev.payload))
        ue = aem.UserEvent()
        aem.register(ue, _report, flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=pool)
        ue.fire(results)
        deadline = time.monotonic() + 10
        while not got:
            assert time.monotonic() < deadline
            aem.run(timeout=0.05)
        assert got[0] != os.getpid()


def _report(ev: Any) -> None:
    ev.payload.fire(os.getpid())


def test_a_call_queued_behind_a_killed_call_runs_elsewhere(tmp_path: Path) -> None:
    with aem.CapsulePool(size=1) as pool:
        assert pool.wait_ready(10)
        victim = pool.submit(pid_then_sleep, str(tmp_path / "victim"), 30)
        pid = wait_for_file(tmp_path / "victim")
        behind = pool.submit(square, 5)  # handed ahead to the same (only) worker
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(aem.AemError, match="SIGKILL"):
            victim.result(timeout=20)
        assert behind.result(timeout=20) == 25


def test_the_executor_half_declares_what_the_pool_provides() -> None:
    from aem.capsules._executor import ExecutorPart

    assert ExecutorPart.__abstractmethods__ == {"close", "_take_idle", "_wake", "_workers_pending"}
    assert not aem.CapsulePool.__abstractmethods__
    with pytest.raises(TypeError, match="abstract"):
        ExecutorPart()  # type: ignore[abstract]


def test_stats_keys_are_the_documented_ones() -> None:
    with aem.CapsulePool(size=2) as pool:
        assert pool.wait_ready(10)
        assert pool.submit(square, 3).result(timeout=20) == 9
        st = pool.stats()
        assert set(st) == {"size", "reserve", "idle", "busy", "attached", "workers", "starting", "pending",
                           "templates", "spawned", "reaped", "failed", "refills", "activations",
                           "refreshes", "spawn_failures"}
        assert st["workers"] == 1, "the capsule that ran the call stays, as a worker"
        docs = (Path(__file__).parent.parent / "docs" / "capsules.md").read_text()
        assert all(f"`{key}`" in docs for key in st), "every key is in docs/capsules.md"


def _sleeps_of_this_thread() -> int:
    return voluntary_switches(os.getpid(), threading.get_native_id())


def test_a_thread_waiting_for_a_result_sleeps_until_it_comes() -> None:
    # result() sleeps on the worker's socket and its thread's bell, with no time-out slices
    # (it used to wake every 50 ms to look whether another thread had completed its call)
    with aem.CapsulePool(size=1) as pool:
        assert pool.wait_ready(10)
        assert pool.submit(square, 1).result(timeout=10) == 1
        fut = pool.submit(sleep_then, 7, 1.0)
        before = _sleeps_of_this_thread()
        assert fut.result() == 7
        assert _sleeps_of_this_thread() - before <= 3   # 50 ms slices: ~20


def test_waiters_sharing_a_worker_are_woken_by_the_one_that_reads_their_answers() -> None:
    # two calls on the only worker (the second sent ahead), each awaited by its own thread:
    # whichever thread reads both answers completes the other's future and rings its bell
    # (a missed ring would leave the other asleep past its time-out: result() would raise)
    with aem.CapsulePool(size=1) as pool:
        assert pool.wait_ready(10)
        for _ in range(20):
            first = pool.submit(sleep_then, 1, 0.05)
            second = pool.submit(square, 3)
            got: dict[str, Any] = {}

            def wait(name: str, fut: cf.Future[Any], got: dict[str, Any] = got) -> None:
                got[name] = fut.result(timeout=10)

            threads = [threading.Thread(target=wait, args=("second", second)),
                       threading.Thread(target=wait, args=("first", first))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert got == {"first": 1, "second": 9}


def test_a_threads_bell_is_its_own_after_fork() -> None:
    from aem.capsules._executor import _bell

    mine = _bell()
    assert _bell() is mine
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        child = _bell()
        os.write(w, b"1" if child is not mine and child.fd != mine.fd else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)
