"""Coverage-guided fuzz target (atheris) for the capsule record parser (aem/_core/handoff.c).

Run by tests/test_capsules_handoff.py for a few seconds against an instrumented build of
aem._core; by hand: ``python fuzz_handoff.py -max_total_time=60`` with that build first on
the path (see the test for the build).
"""

from __future__ import annotations

import os
import socket
import struct
import sys

import atheris

from aem import _core  # the instrumented build (libFuzzer coverage, ASan) when run by the test

HEADER = "=IBBBBIIQqQQqqq"
KINDS = [_core.K_USER, _core.K_TIMER, _core.K_SIGNAL, _core.K_READABLE, _core.K_WRITABLE, _core.K_ACCEPT,
         _core.K_READ, _core.K_CHILD, _core.K_JOB, _core.K_FILE, _core.K_CLOSE, 0, 255]
_pair = socket.socketpair()
SOURCES = {1: "a source"}


def record(fdp: atheris.FuzzedDataProvider) -> bytes:
    """Mostly well-formed headers (so the fuzzer reaches every kind), with fuzzed fields."""
    kind = KINDS[fdp.ConsumeIntInRange(0, len(KINDS) - 1)]
    flags = fdp.ConsumeIntInRange(0, 255)
    data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    data_len = len(data) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 2**32 - 1)
    head = struct.pack(HEADER, 0x484D4541, 1, fdp.ConsumeIntInRange(0, 3), kind, flags, data_len, 0,
                       fdp.ConsumeIntInRange(0, 3), fdp.ConsumeInt(8), fdp.ConsumeIntInRange(0, 2**64 - 1),
                       fdp.ConsumeIntInRange(0, 2**64 - 1), fdp.ConsumeInt(8), fdp.ConsumeInt(8),
                       fdp.ConsumeInt(8))
    return head + data


def release(event: object) -> None:
    conn = getattr(event, "conn", None)
    if conn is not None:
        conn.close()
    fd = getattr(event, "fd", None)
    if isinstance(fd, int) and fd > 2 and type(event).__name__ in ("FdEvent", "ReadEvent"):
        os.close(fd)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    structured = fdp.ConsumeBool()
    nfds = fdp.ConsumeIntInRange(0, 2)
    buf = record(fdp) if structured else fdp.ConsumeBytes(fdp.remaining_bytes())
    fds = [os.dup(_pair[0].fileno()) for _ in range(nfds)]
    try:
        _op, _eid, event = _core._handoff_parse(buf, fds, SOURCES)
    except (ValueError, UnicodeDecodeError):
        for fd in fds:
            os.close(fd)
        return
    # accepted: the event owns the one fd it uses; any other is ours
    release(event)
    owned = 1 if type(event).__name__ in ("FdEvent", "ReadEvent", "AcceptEvent") else 0
    for fd in fds[owned:]:
        os.close(fd)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
