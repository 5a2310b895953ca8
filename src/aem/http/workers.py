"""``aem serve --workers N``: N single-threaded servers in capsules sharing one port."""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Iterable
from typing import Any

import aem

from .server import HTTPServer

__all__ = ["serve_workers"]


def same_user(conn: socket.socket) -> bool:
    """Whether the peer of a connected Unix socket runs as this process's user (SO_PEERCRED).

    The fronts' abstract sockets (where WSGI workers report, where ASGI workers take the
    listening socket) have no file permissions: any local process could connect; only one of
    this user, as the workers are, is answered."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:   # not a connected Unix socket: not a worker
        return False
    uid: int = struct.unpack("3i", creds)[1]
    return uid == os.getuid()


def serve_workers(root: str | os.PathLike[str], host: str, port: int, workers: int,
                  quiet: bool = False, status_page: bool = False) -> int:
    """``aem serve --workers N``: N servers in ``EVF_CAPSULE | EVF_KEEPALIVE`` capsules.

    Each worker is one single-threaded engine in its own capsule, with its own
    listening socket on the same port (``SO_REUSEPORT``: the kernel spreads
    the connections).  Worker ``i`` is the job of its own user event, fired
    once; when a worker dies, its job's ``ChildExit`` fires the event again
    and a fresh capsule takes its place.  SIGINT/SIGTERM end the parent's
    ``run()``; the jobs are then shut down (``EVJOBSHTDN`` ends their
    processes).
    """
    # Fail early, in the parent, if the address cannot be had.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((host, port))
    pool = aem.CapsulePool(size=workers, reserve=0)
    flags = aem.EVF_CAPSULE | aem.EVF_KEEPALIVE

    def worker(ev: Any) -> None:
        server = HTTPServer(root=root, host=host, port=port, reuse_port=True, pool=None,
                            access_log=None if quiet else sys.stdout, status_page=status_page)
        try:
            server.run()
        finally:
            server.close()

    jobs: list[tuple[Any, int]] = []
    for _ in range(workers):
        start = aem.UserEvent()
        eid = aem.register(start, worker, flags=flags, pool=pool)

        def replace(ev: Any, start: Any = start) -> None:
            print(f"aem serve: worker {ev.pid} ended ({ev.returncode}); starting another",
                  file=sys.stderr, flush=True)
            start.fire()

        aem.register(aem.ChildExit(job=eid), replace)
        jobs.append((start, eid))
    for start, _ in jobs:
        start.fire()
    print(f"aem serve: http://{host}:{port}/ with {workers} workers (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    try:
        reason = aem.current().keepalive()
    finally:
        shut_down_jobs(eid for _, eid in jobs)
    print(f"aem serve: stopped ({reason})", file=sys.stderr)
    return 0


def shut_down_jobs(eids: Iterable[int]) -> None:
    """End the worker registrations ``eids`` and their processes (EVJOBSHTDN); those
    already gone are skipped."""
    for eid in eids:
        try:
            aem.control(eid, aem.EVJOBSHTDN)
        except (aem.AemError, aem.UnknownEventError):
            pass
