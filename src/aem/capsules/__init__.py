"""Handlers in their own processes: ``EVF_FORK``, capsules, ``EVF_NOCLDWAIT``, ``EVF_KEEPALIVE``.

Creating a process on demand is slow (``fork()`` of a Python process costs
~0.7 ms at 10 MB and grows with its memory), blocks the parent, and fails
exactly when it is needed most: under memory shortage.  A *capsule* is a
process already created, initialised and waiting in a pool; handing it an
event takes microseconds.

How a pool works (``CapsulePool``)::

    application (parent)                template (zygote)            capsules
    ────────────────────                ─────────────────            ────────
    main thread: the handler of an      forked from the parent       forked from the
    EVF_CAPSULE event sends the event   when the pool starts, so it  template; each waits
    to an idle capsule over its         has the application's        on its own socket for
    socket (SOCK_SEQPACKET)             imports and handlers; small,  one event (or, attached
                                        single-threaded; the         to an EVF_KEEPALIVE
    capsule manager thread: keeps the   subreaper of everything the  event, for all of its
    pool filled (asks the template to   capsules create; reaps them  occurrences)
    fork), learns of exits, reports     and reports each exit
    them as ChildExit(job=eid) events

* Handlers are handed over by event id: the template holds a snapshot of the
  registrations that existed when it was made.  A handler registered later is
  sent by importable reference (pickle); if it cannot be pickled (a lambda, a
  closure), the pool is *refreshed*: a new template is forked from the
  application (one fork of the parent, once) and new capsules come from it.
* Event data is copied (pickled); sockets in an event (``AcceptEvent.conn``)
  are handed over as file descriptors and closed in the parent.
* The template lets go of every file descriptor but stdin/stdout/stderr
  and the engine's UserEvent channel: a handler in a capsule gets what it
  needs through its event, and may ``fire()`` the application's
  user events to send results back.
* ``reserve`` extra capsules are kept for events of priority at least
  ``reserve_priority`` (default :data:`RESERVE_PRIORITY`): a graceful
  shutdown handler still runs in its own process when the kernel refuses to
  create any.
* A capsule that dies is replaced; the event it ran is reported as failed
  (``ChildExit(job=eid)`` with the signal as a negative return code).  When
  no capsule is available and none can be created for ``spawn_timeout``
  seconds, the activation is reported as failed (``pid`` 0,
  ``returncode`` None, the kernel's refusal in ``error``).  Nothing is lost
  silently and the main thread never waits for a process.
* The application's ``SIGCHLD`` disposition is never touched: ``subprocess``
  keeps reporting exit codes correctly.

``EVF_FORK`` handlers run in a process forked from the application at the
moment of the event (so they see its current state); the parent reaps them
through a pidfd.  Processes created by aem end when the application ends.

Which process runs which code is told by the module's name:

* ``_handoff``  the hand-off format (written by the parent, read by the child);
* ``_child``    a capsule's loop and the handler runner (capsules, EVF_FORK children);
* ``_template`` the template (zygote) process;
* ``_pool``     the application's side of a pool (``CapsulePool``, its manager thread);
* ``_fork``     the application's side of EVF_FORK.

This package plugs itself into the engine at import (``engine.set_process_support``):
the engine never imports it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _core
from .. import engine as _engine
from ._fork import end_fork_job, fork_handler
from ._handoff import ProcessEvent
from ._pool import RESERVE_PRIORITY, CapsulePool, pools

if TYPE_CHECKING:
    from ..engine import Engine

__all__ = ["RESERVE_PRIORITY", "CapsulePool", "ProcessEvent", "default_pool"]


# ---- the process's default pool, hooks, clean exit -----------------------------------------------

_default: CapsulePool | None = None
_default_lock = threading.Lock()


def default_pool() -> CapsulePool:
    """The process's default pool (``size`` = number of CPUs, ``reserve`` = 1), started on first use."""
    global _default
    with _default_lock:
        if _default is None or _default.closed or _default._pid != os.getpid():
            _default = CapsulePool(size=os.cpu_count() or 2, reserve=1)
            _core.handoff_set_default(_default._table)  # the engine hands pool=None events to it
        return _default


class _Support:
    """The engine's process support (see :class:`aem.engine.ProcessSupport`)."""

    @staticmethod
    def spawn(engine: Engine, eid: int, handler: Callable[[Any], object], event: Any, flags: int,
              pool: Any, priority: int) -> None:
        """Run an EVF_FORK or EVF_CAPSULE handler in another process."""
        if flags & _core.EVF_FORK:
            fork_handler(engine, eid, handler, event, flags)
            return
        target = pool if pool is not None else default_pool()
        target._activate(eid, handler, event, flags, priority)

    @staticmethod
    def check_pool(pool: Any) -> None:
        """A registration's ``pool=``: an open CapsulePool of this process, or an error now."""
        if not isinstance(pool, CapsulePool):
            raise TypeError(f"pool must be an aem.CapsulePool, not {type(pool).__name__}")
        pool._check_open()

    @staticmethod
    def end_job(engine: Engine, eid: int, kill: bool) -> None:
        """Registration ``eid`` of ``engine`` is gone (kill: shut down) — tell pools and forks."""
        for pool in list(pools):
            if pool._engine is engine:
                pool._end_job(eid, kill)
        end_fork_job(engine, eid, kill)

    @staticmethod
    def stats() -> dict[str, int]:
        """The capsule pools' counters, summed (for aem.stats())."""
        total: dict[str, int] = {}
        for pool in list(pools):
            if pool.closed or pool._pid != os.getpid():
                continue
            for k, v in pool.stats().items():
                total[k] = total.get(k, 0) + v
        return total


def _after_fork_in_child() -> None:
    global _default
    _default = None
    _core.handoff_set_default(None)
    for pool in list(pools):
        pool._closed = True  # the parent's pools are not ours; their sockets close with us
        for t in pool._templates:
            with contextlib.suppress(OSError):
                t.ctl.close()
        for cap in pool._capsules.values():
            with contextlib.suppress(OSError):
                cap.chan.close()
    pools.clear()


def _at_exit() -> None:
    for pool in list(pools):
        if pool._pid == os.getpid():
            with contextlib.suppress(Exception):
                pool.close(timeout=1.0)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
_engine.set_process_support(_Support())
