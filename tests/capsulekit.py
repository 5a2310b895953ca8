"""Helpers shared by the capsule tests: native records built by hand (see
aem/_core/handoff.h), a SOCK_SEQPACKET pair like a capsule's socket, and the two
executors the executor tests run against alike."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import aem
from aem import _core

#: aem_ho_header: magic, version, op, kind, flags, data_len, reserved, eid, time_ns, a, b, i0, i1, i2
HEADER = "=IBBBBIIQqQQqqq"
MAGIC = 0x484D4541
P_INT, P_BYTES, HAS_FD = 1, 2, 4


def header(kind: int, flags: int = 0, data_len: int = 0, op: int = 1, magic: int = MAGIC,
           version: int = 1, eid: int = 7, a: int = 0, b: int = 0, i0: int = 0, i1: int = 0,
           i2: int = 0) -> bytes:
    """A record's header, every field settable (malformed ones too)."""
    return struct.pack(HEADER, magic, version, op, kind, flags, data_len, 0, eid, 123, a, b, i0, i1, i2)


def user(op: int, payload: int, eid: int = 7) -> bytes:
    """A UserEvent record with an int payload."""
    return header(_core.K_USER, P_INT, op=op, eid=eid, i0=payload)


@pytest.fixture(name="pair")
def pair_fixture() -> Iterator[tuple[socket.socket, socket.socket]]:
    """``pair``: two ends of a SOCK_SEQPACKET socketpair (a capsule's socket), closed after the
    test.  Import ``pair_fixture`` to use it."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


#: The executors the executor tests run against, written once for both.
EXECUTORS = ["ProcessPoolExecutor", "CapsulePool"]


@contextlib.contextmanager
def executor_of(kind: str, workers: int) -> Iterator[cf.Executor]:
    """A ``CapsulePool`` or a fork ``ProcessPoolExecutor`` of ``workers``, shut down after."""
    ex: cf.Executor
    if kind == "CapsulePool":
        ex = aem.CapsulePool(size=workers)
    else:
        ex = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def wait_for_file(path: Path, timeout: float = 10) -> int:
    """The pid a call wrote to ``path`` when it started (waits for it)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, "the call never started"
        time.sleep(0.01)
    return int(path.read_text())
