"""asyncio on the aem engine: :class:`EventLoop`, its policy, and aem sources in coroutines.

* :mod:`aem.loop.selector`   the engine as asyncio's selector (one engine turn per loop turn)
* :mod:`aem.loop.eventloop`  ``EventLoop``, ``new_event_loop``, ``EventLoopPolicy``, ``install``
* :mod:`aem.loop.awaiting`   ``wait(source)``, ``events(source)``
"""

from __future__ import annotations

from .awaiting import events as events
from .awaiting import wait as wait
from .eventloop import EventLoop as EventLoop
from .eventloop import EventLoopPolicy as EventLoopPolicy
from .eventloop import install as install
from .eventloop import new_event_loop as new_event_loop

__all__ = ["EventLoop", "EventLoopPolicy", "events", "install", "new_event_loop", "wait"]
