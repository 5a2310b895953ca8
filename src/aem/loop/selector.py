"""The loop's view of file descriptors: a ``selectors`` selector on the aem engine.

asyncio's selector event loop asks its selector which descriptors are ready;
here the answer comes from the aem engine itself.  Each watched descriptor is
one internal engine registration per direction (``Readable``/``Writable``,
level-triggered); :meth:`EngineSelector.select` runs one engine turn, which
also delivers every other aem registration of the process — aem handlers and
asyncio callbacks share one engine and one ``epoll_wait``.
"""

from __future__ import annotations

import math
import selectors
from typing import Any

from .. import _core
from ..engine import Engine

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


# selectors' own bookkeeping of keys (_fd_to_key, _fileobj_lookup) is not in typeshed.
_SelectorImpl: Any = selectors._BaseSelectorImpl


class EngineSelector(_SelectorImpl):  # type: ignore[misc]
    """A selector whose ``select()`` is one turn of an aem engine."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self._engine = engine
        #: fd -> [eid of its Readable registration or 0, eid of its Writable or 0]
        self._eids: dict[int, list[int]] = {}
        #: fd -> EVENT_* mask seen ready during the current turn
        self._ready: dict[int, int] = {}
        #: the loop's C core once attached: its wakers are the fds' handlers (no select() then)
        self._core: _core.LoopCore | None = None

    def attach(self, core: _core.LoopCore) -> None:
        """Hand readiness straight to ``core`` (an aem.EventLoop's): its wakers become the
        engine handlers of the fds, and the core runs engine turns itself."""
        self._core = core
        for fd, (r, w) in list(self._eids.items()):
            events = (_READ if r else 0) | (_WRITE if w else 0)
            self._disarm(fd, events)
            self._arm(fd, events)

    def _on_read(self, ev: Any) -> None:
        fd = ev.fd
        self._ready[fd] = self._ready.get(fd, 0) | _READ

    def _on_write(self, ev: Any) -> None:
        fd = ev.fd
        self._ready[fd] = self._ready.get(fd, 0) | _WRITE

    def _arm(self, fd: int, events: int) -> None:
        eids = self._eids.setdefault(fd, [0, 0])
        engine = self._engine
        core = self._core
        try:
            if events & _READ and not eids[0]:
                on_read = core.waker(fd, False) if core is not None else self._on_read
                eids[0] = engine._add(_core.K_READABLE, fd, _core.EPOLLIN, on_read, 0, 0, None, 0, True)
            if events & _WRITE and not eids[1]:
                on_write = core.waker(fd, True) if core is not None else self._on_write
                eids[1] = engine._add(_core.K_WRITABLE, fd, _core.EPOLLOUT, on_write, 0, 0, None, 0, True)
        except ValueError as exc:  # not watchable by epoll (a regular file): as selectors.EpollSelector
            self._disarm(fd, _READ | _WRITE)
            raise PermissionError(1, str(exc)) from None
        if not events & _READ and eids[0]:
            engine._remove(eids[0])
            eids[0] = 0
        if not events & _WRITE and eids[1]:
            engine._remove(eids[1])
            eids[1] = 0

    def _disarm(self, fd: int, events: int) -> None:
        eids = self._eids.pop(fd, None)
        if eids is None:
            return
        for eid in eids:
            if eid:
                self._engine._remove(eid)
        self._ready.pop(fd, None)

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key: selectors.SelectorKey = super().register(fileobj, events, data)
        try:
            self._arm(key.fd, events)
        except BaseException:
            super().unregister(fileobj)
            raise
        return key

    def register_fd(self, fd: int, events: int, data: Any) -> None:
        """``register`` for an int fd not registered yet (the loop's own readers and writers)."""
        if fd < 0:
            raise ValueError(f"Invalid file descriptor: {fd}")
        self._fd_to_key[fd] = selectors.SelectorKey(fd, fd, events, data)
        try:
            self._arm(fd, events)
        except BaseException:
            del self._fd_to_key[fd]
            raise

    def unregister_fd(self, fd: int) -> None:
        """``unregister`` for a registered int fd."""
        key = self._fd_to_key.pop(fd)
        self._disarm(fd, key.events)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        key: selectors.SelectorKey = super().unregister(fileobj)
        self._disarm(key.fd, key.events)
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = self._fileobj_lookup(fileobj)
        key = self._fd_to_key.get(fd)
        if key is None:
            raise KeyError(f"{fileobj!r} is not registered")
        if events != key.events:
            if not events or events & ~(_READ | _WRITE):
                raise ValueError(f"Invalid events: {events!r}")
            self._arm(fd, events)
        key = key._replace(events=events, data=data)
        self._fd_to_key[fd] = key
        return key  # type: ignore[no-any-return]

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            ms = -1
        elif timeout <= 0:
            ms = 0
        else:
            ms = math.ceil(timeout * 1e3)
        self._engine._turn(ms)
        ready = self._ready
        if not ready:
            return []
        self._ready = {}
        keys = self._fd_to_key
        out = []
        for fd, mask in ready.items():
            key = keys.get(fd)
            if key is not None and mask & key.events:
                out.append((key, mask & key.events))
        return out

    def close(self) -> None:
        for fd in list(self._eids):
            self._disarm(fd, _READ | _WRITE)
        super().close()
