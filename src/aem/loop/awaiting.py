"""aem sources in coroutines: ``await aem.wait(source)`` and ``async for ev in aem.events(source)``.

Both need the running loop to be an :class:`aem.EventLoop`: the source is
registered on that loop's engine, and its occurrences are delivered by the
same engine turns that run the loop.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

from .._core import Event
from ..sources import EventSource
from .eventloop import EventLoop

__all__ = ["events", "wait"]


def _aem_loop(what: str) -> EventLoop:
    loop = asyncio.get_running_loop()
    if not isinstance(loop, EventLoop):
        raise RuntimeError(f"{what} needs the running loop to be an aem.EventLoop, not "
                           f"{type(loop).__module__}.{type(loop).__qualname__} "
                           "(asyncio.Runner(loop_factory=aem.new_event_loop) or aem.install())")
    return loop


def _check_source(source: object) -> None:
    if not isinstance(source, EventSource):
        raise TypeError(f"expected an aem event source (aem.Timer, aem.Readable ...), not "
                        f"{type(source).__name__}")


async def wait(source: EventSource, timeout: float | None = None) -> Event:
    """The next occurrence of ``source``, awaited in the running aem loop.

    ``timeout`` (seconds): raise :class:`TimeoutError` if nothing came by then.
    The registration exists only while waiting: cancelled or timed out, it is gone.
    If the engine gives the source up (its ``collect()`` failed again and again),
    the :class:`aem.AemError` saying so is raised here.
    """
    _check_source(source)
    loop = _aem_loop("aem.wait()")
    fut: asyncio.Future[Event] = loop.create_future()

    def deliver(ev: Event) -> None:
        if not fut.done():
            ev.keep()
            fut.set_result(ev)

    def given_up(error: BaseException) -> None:
        if not fut.done():
            fut.set_exception(error)

    engine = loop.engine
    eid = engine.register(source, deliver)
    engine._watch_give_up(eid, given_up)
    try:
        if timeout is None:
            return await fut
        async with asyncio.timeout(timeout):
            return await fut
    finally:
        engine._watch_give_up(eid, None)
        engine.unregister(eid, missing_ok=True)


class _Occurrences:
    """The async iterator of :func:`events`."""

    def __init__(self, source: EventSource, maxlen: int | None) -> None:
        _check_source(source)
        self._loop = _aem_loop("aem.events()")
        self._queue: collections.deque[Event] = collections.deque()
        self._maxlen = maxlen
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.dropped = 0
        self._eid: int | None = self._loop.engine.register(source, self._deliver)
        self._loop.engine._watch_give_up(self._eid, self._given_up)
        self._loop._aem_iterators.add(self)

    def _deliver(self, ev: Event) -> None:
        if self._maxlen is not None and len(self._queue) >= self._maxlen:
            self.dropped += 1
            return
        ev.keep()
        self._queue.append(ev)
        self._wake()

    def _given_up(self, error: BaseException) -> None:
        """The engine unregistered the source (it kept failing): the iteration ends with
        ``error`` once the queued occurrences are consumed."""
        self._error = error
        self._eid = None
        self._wake()

    def _wake(self) -> None:
        """Let a pending ``__anext__`` look again (at the queue, or at the end)."""
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __aiter__(self) -> _Occurrences:
        return self

    async def __anext__(self) -> Event:
        while not self._queue:
            if self._eid is None:
                error, self._error = self._error, None
                if error is not None:
                    raise error
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    async def aclose(self) -> None:
        """Unregister the source; occurrences already queued are still returned."""
        self.close()

    def close(self) -> None:
        """Unregister the source (also done by ``async with`` and when the loop closes)."""
        if self._eid is not None:
            self._loop.engine._watch_give_up(self._eid, None)
            self._loop.engine.unregister(self._eid, missing_ok=True)
            self._eid = None
            self._wake()

    async def __aenter__(self) -> _Occurrences:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def events(source: EventSource, maxlen: int | None = None) -> AsyncIterator[Event]:
    """Every occurrence of ``source``, as an async iterator (``async for ev in aem.events(src)``).

    The source stays registered until the iterator is closed (``aclose()``, or
    ``async with aem.events(src) as it``); the iteration ends after closing,
    once queued occurrences are consumed.  ``maxlen`` bounds the queue of
    occurrences not yet consumed (more are dropped and counted in ``dropped``).
    If the engine gives the source up (its ``collect()`` failed again and again),
    the iteration ends with the :class:`aem.AemError` saying so.
    """
    return _Occurrences(source, maxlen)


