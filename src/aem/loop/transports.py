"""The loop's socket transport: asyncio's own, with its hot read path made cheaper.

:class:`SocketTransport` is asyncio's ``_SelectorSocketTransport`` (so a real
``asyncio.Transport`` with all its semantics: flow control, ``write_eof``,
buffered protocols, ``sendfile``) whose read of a ready socket goes through
the loop's C core: one read into a shared buffer, copied out at its exact
size, instead of ``socket.recv(256 KiB)`` allocating 256 KiB per read.
"""

from __future__ import annotations

from asyncio import selector_events
from typing import Any

_SelectorSocketTransport: Any = selector_events._SelectorSocketTransport  # type: ignore[attr-defined]


class SocketTransport(_SelectorSocketTransport):  # type: ignore[misc]
    """A TCP or Unix stream transport of :class:`aem.EventLoop`."""

    def __init__(self, loop: Any, sock: Any, protocol: Any, waiter: Any = None, extra: Any = None,
                 server: Any = None) -> None:
        self._recv = loop._core.recv
        super().__init__(loop, sock, protocol, waiter, extra, server)

    def _read_ready(self) -> None:
        if self._read_ready_cb != self._read_ready__data_received:
            self._read_ready_cb()
            return
        if self._conn_lost:
            return
        try:
            data = self._recv(self._sock_fd, self.max_size)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on socket transport")
            return
        if not data:
            self._read_ready__on_eof()
            return
        try:
            self._protocol.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")
