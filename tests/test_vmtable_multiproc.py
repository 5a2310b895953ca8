"""Processes sharing a VZONE: four processes hammering one pool, and processes
killed while they hold its lock (the others go on; the structure stays whole).

Every child is forked from the test and always killed and reaped by it, even
when the test fails.
"""

from __future__ import annotations

import os
import random
import select
import signal
import struct
import time
from collections.abc import Callable, Iterator

import pytest

import aem
from conftest import fork_call

POOL = 8 << 20
OPS = 2500


@pytest.fixture
def children() -> Iterator[list[int]]:
    """Pids of forked children: whatever happens, killed and reaped at the end."""
    pids: list[int] = []
    try:
        yield pids
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def fork(children: list[int], fn: Callable[[], None]) -> int:
    """Run ``fn`` in a forked child (exit 0 if it returns, 1 if it raises), remembered."""
    pid = fork_call(fn)
    children.append(pid)
    return pid


def wait(children: list[int], pids: list[int], timeout: float) -> dict[int, int]:
    """Exit codes of ``pids``; fails the test if they are not done within ``timeout``."""
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                children.remove(pid)
        if time.monotonic() > deadline:
            raise AssertionError(f"children {sorted(set(pids) - set(codes))} still running after "
                                 f"{timeout} s (a lock never recovered?)")
        time.sleep(0.005)
    return codes


def worker(vmt: aem.VMTable, seed: int, ops: int) -> None:
    """Random allocations and frees; each block carries (pid, serial) and is verified
    before it is freed, so a block granted twice or lost is noticed."""
    rnd = random.Random(seed)
    me = os.getpid()
    mine: list[tuple[int, int, bytes, aem.Block | None]] = []
    for i in range(ops):
        if mine and (len(mine) > 48 or rnd.random() < 0.45):
            j = rnd.randrange(len(mine))
            mine[j], mine[-1] = mine[-1], mine[j]
            off, n, pattern, blk = mine.pop()
            got = bytes(blk) if blk is not None else bytes(vmt.view(off, n))
            if got != pattern:
                raise AssertionError(f"block at {off} ({n} bytes) was overwritten by another owner")
            if blk is not None:
                blk.free()
            else:
                vmt.free_offset(off)
            continue
        n = rnd.choice((rnd.randint(1, 256), rnd.randint(257, 8192), rnd.randint(8193, 65536)))
        pattern = (struct.pack("<II", me, i) * (n // 8 + 1))[:n]
        blk = None
        try:
            if i % 3 == 0:
                blk = vmt.alloc(n)
                off = blk.offset
                if blk.fallback:
                    blk.free()
                    continue
                memoryview(blk)[:] = pattern
            else:
                off = vmt.alloc_offset(n)
                vmt.view(off, n)[:] = pattern
        except MemoryError:
            continue
        mine.append((off, n, pattern, blk))
    for off, n, pattern, blk in mine:
        got = bytes(blk) if blk is not None else bytes(vmt.view(off, n))
        if got != pattern:
            raise AssertionError(f"block at {off} was overwritten by another owner")
        if blk is not None:
            blk.free()
        else:
            vmt.free_offset(off)


def test_four_processes_share_one_pool(children: list[int]) -> None:
    with aem.VMTable(POOL, zone=aem.TBL_VZONE, fallback=False) as vmt:
        pids = [fork(children, lambda s=s: worker(vmt, s, OPS)) for s in range(4)]
        codes = wait(children, pids, timeout=60)
        assert list(codes.values()) == [0, 0, 0, 0], "a worker found a block granted twice"
        vmt.check()
        st = vmt.stats()
        assert st["used"] == 0 and st["free"] == st["size"], "memory lost"
        assert st["largest_free"] == POOL
        assert st["recoveries"] == 0


def hold_the_lock(vmt: aem.VMTable, op: str, arg: int, writes: int) -> tuple[int, int]:
    """A child that takes the lock, performs ``writes`` writes of ``op`` and hangs;
    returns (pipe read end, pid) once it hangs."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            vmt._debug_hang(op, arg, writes, w)
        finally:
            os._exit(3)
    os.close(w)
    return r, pid


@pytest.mark.parametrize(("op", "writes"), [
    ("alloc", 0), ("alloc", 1), ("alloc", 7), ("alloc", 40), ("alloc", 10_000),
    ("free", 2), ("free", 9), ("free", 10_000),
])
def test_holder_killed_with_the_lock(children: list[int], op: str, writes: int) -> None:
    with aem.VMTable(4 << 20, zone=aem.TBL_VZONE, fallback=False) as vmt:
        # A 256 KiB block has no cache in a 4 MiB pool: freeing it merges up to the top.
        victim = vmt.alloc_offset(256 << 10)
        vmt.view(victim, 4)[:] = b"live"
        before = vmt.stats(drain=False)
        r, hanger = hold_the_lock(vmt, op, 64 if op == "alloc" else victim, writes)
        children.append(hanger)
        try:
            ready, _, _ = select.select([r], [], [], 10)
            assert ready and os.read(r, 1) == b"h", "the child never took the lock"
        finally:
            os.close(r)
        # Workers start while the lock is held: they wait for it.
        pids = [fork(children, lambda s=s: worker(vmt, s, 400)) for s in range(3)]
        time.sleep(0.05)
        os.kill(hanger, signal.SIGKILL)
        os.waitpid(hanger, 0)
        children.remove(hanger)
        codes = wait(children, pids, timeout=60)
        assert list(codes.values()) == [0, 0, 0]
        vmt.check()
        st = vmt.stats(drain=False)
        assert st["recoveries"] == 1
        # The interrupted operation was rolled back: the victim is still allocated.
        assert bytes(vmt.view(victim, 4)) == b"live"
        assert st["used"] == before["used"] == 256 << 10
        vmt.free_offset(victim)
        end = vmt.stats()
        assert end["free"] == end["size"] and end["largest_free"] == 4 << 20
        vmt.check()


def test_random_kills_under_traffic(children: list[int]) -> None:
    """Kill workers at random moments of heavy traffic: whatever they were doing,
    the structure stays whole (their blocks are lost to them, not corrupted)."""
    rnd = random.Random(7)
    with aem.VMTable(POOL, zone=aem.TBL_VZONE, fallback=False) as vmt:
        survivors = [fork(children, lambda s=s: worker(vmt, 100 + s, 1500)) for s in range(2)]
        for round_ in range(6):
            victim = fork(children, lambda r=round_: worker(vmt, 200 + r, 10**9))
            time.sleep(rnd.uniform(0.005, 0.04))
            os.kill(victim, signal.SIGKILL)
            os.waitpid(victim, 0)
            children.remove(victim)
            vmt.check()
        codes = wait(children, survivors, timeout=60)
        assert list(codes.values()) == [0, 0]
        vmt.check()
