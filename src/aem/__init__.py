"""aem — an asynchronous event mechanism for Linux.

Register callbacks for events — timers, sockets, signals, child exits, file
changes, memory pressure, events of your own — and have them run without
polling: in the main thread by interrupting its flow, in a forked process,
or in a capsule taken from a pool of ready processes.

General layout:

* ``aem._core``      the C core (engine, timers, signals, doorbell, vmtable)
* ``aem.engine``     registration and delivery: register, run, start, ...
* ``aem.sources``    the event sources: Timer, Readable, Read, Signal, ...
* ``aem.capsules``   handlers in other processes: EVF_FORK, CapsulePool
* ``aem.cli``        the ``aem`` command
* ``aem.loop``       asyncio on the engine: EventLoop, install, wait, events
* ``aem.bench``      ``aem bench``: aem measured beside its alternatives

Every public name is re-exported here, explicitly.
"""

import typing as _typing

from ._core import EPOLLIN as EPOLLIN
from ._core import EPOLLOUT as EPOLLOUT
from ._core import EPOLLPRI as EPOLLPRI
from ._core import EPOLLRDHUP as EPOLLRDHUP
from ._core import EVF_CAPSULE as EVF_CAPSULE
from ._core import EVF_FORK as EVF_FORK
from ._core import EVF_KEEPALIVE as EVF_KEEPALIVE
from ._core import EVF_NOCLDWAIT as EVF_NOCLDWAIT
from ._core import EVF_ONESHOT as EVF_ONESHOT
from ._core import EVJOBPRIO as EVJOBPRIO
from ._core import EVJOBSHTDN as EVJOBSHTDN
from ._core import EVJOBSTART as EVJOBSTART
from ._core import EVJOBSTOP as EVJOBSTOP
from ._core import EVTBLINIT as EVTBLINIT
from ._core import HELD_MAX as HELD_MAX
from ._core import AcceptEvent as AcceptEvent
from ._core import AemError as AemError
from ._core import ChildExitEvent as ChildExitEvent
from ._core import CloseEvent as CloseEvent
from ._core import CustomEvent as CustomEvent
from ._core import Event as Event
from ._core import FdEvent as FdEvent
from ._core import FileChangeEvent as FileChangeEvent
from ._core import MemoryPressureEvent as MemoryPressureEvent
from ._core import PayloadEvent as PayloadEvent
from ._core import ReadEvent as ReadEvent
from ._core import ShortageEvent as ShortageEvent
from ._core import SignalEvent as SignalEvent
from ._core import TimerEvent as TimerEvent
from ._core import UnknownEventError as UnknownEventError
from ._core import monotonic_ns as monotonic_ns
from .capsules import RESERVE_PRIORITY as RESERVE_PRIORITY
from .capsules import CapsulePool as CapsulePool
from .capsules import ProcessEvent as ProcessEvent
from .capsules import default_pool as default_pool
from .engine import DEFAULT_KICK_SIGNAL as DEFAULT_KICK_SIGNAL
from .engine import Engine as Engine
from .engine import control as control
from .engine import current as current
from .engine import default_error_handler as default_error_handler
from .engine import keepalive as keepalive
from .engine import register as register
from .engine import run as run
from .engine import set_error_handler as set_error_handler
from .engine import start as start
from .engine import stats as stats
from .engine import stop as stop
from .engine import unregister as unregister
from .sources import IN_ACCESS as IN_ACCESS
from .sources import IN_ALL_EVENTS as IN_ALL_EVENTS
from .sources import IN_ATTRIB as IN_ATTRIB
from .sources import IN_CLOSE_WRITE as IN_CLOSE_WRITE
from .sources import IN_CREATE as IN_CREATE
from .sources import IN_DELETE as IN_DELETE
from .sources import IN_DELETE_SELF as IN_DELETE_SELF
from .sources import IN_MODIFY as IN_MODIFY
from .sources import IN_MOVE_SELF as IN_MOVE_SELF
from .sources import IN_MOVED_FROM as IN_MOVED_FROM
from .sources import IN_MOVED_TO as IN_MOVED_TO
from .sources import Accept as Accept
from .sources import ChildExit as ChildExit
from .sources import Close as Close
from .sources import EventSource as EventSource
from .sources import FileChange as FileChange
from .sources import MemoryPressure as MemoryPressure
from .sources import Read as Read
from .sources import Readable as Readable
from .sources import Signal as Signal
from .sources import Source as Source
from .sources import Timer as Timer
from .sources import UserEvent as UserEvent
from .sources import Writable as Writable
from .vmtable import TBL_UZONE as TBL_UZONE
from .vmtable import TBL_VZONE as TBL_VZONE
from .vmtable import Block as Block
from .vmtable import VMTable as VMTable
from .vmtable import VMTableError as VMTableError
from .vmtable import vmtable as vmtable

if _typing.TYPE_CHECKING:  # asyncio on the engine (aem.loop) is imported on first use: asyncio is heavy
    from .loop import EventLoop as EventLoop
    from .loop import EventLoopPolicy as EventLoopPolicy
    from .loop import events as events
    from .loop import install as install
    from .loop import new_event_loop as new_event_loop
    from .loop import wait as wait

_LOOP_NAMES = frozenset({"EventLoop", "EventLoopPolicy", "events", "install", "new_event_loop", "wait"})


def __getattr__(name: str) -> _typing.Any:
    if name in _LOOP_NAMES:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'aem' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LOOP_NAMES)


__version__ = "0.1.0"
