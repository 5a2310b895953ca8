"""The loop's socket transport: asyncio's own, with its hot paths made cheaper.

:class:`SocketTransport` is asyncio's ``_SelectorSocketTransport`` (so a real
``asyncio.Transport`` with all its semantics: flow control, ``write_eof``,
buffered protocols, ``sendfile``) with two changes:

* reading a ready socket goes through the loop's C core: one read into a
  shared buffer, copied out at its exact size, instead of
  ``socket.recv(256 KiB)`` allocating 256 KiB per read;
* writes are coalesced: what is written during one loop turn goes out at the
  end of the turn in one ``send``/``sendmsg`` (a ``writev``), not one ``send``
  per ``write()``.  The first write of a turn is kept as is (no copy of
  ``bytes``); later ones are appended to asyncio's buffer.  Everything that
  looks at the buffer (``get_write_buffer_size``, flow control, ``close``,
  ``write_eof``, ``sendfile``, ``abort``) sees the pending bytes.
"""

from __future__ import annotations

import socket
from asyncio import selector_events
from typing import Any

_SelectorSocketTransport: Any = selector_events._SelectorSocketTransport  # type: ignore[attr-defined]


class SocketTransport(_SelectorSocketTransport):  # type: ignore[misc]
    """A TCP or Unix stream transport of :class:`aem.EventLoop`."""

    def __init__(self, loop: Any, sock: Any, protocol: Any, waiter: Any = None, extra: Any = None,
                 server: Any = None) -> None:
        self._recv = loop._core.recv
        self._flush_later = loop._core.flush_later
        self._first: bytes | None = None  # the first write of this turn, not yet sent
        self._flush_queued = False
        super().__init__(loop, sock, protocol, waiter, extra, server)

    # -- writing: coalesced per loop turn ------------------------------------------------------

    def write(self, data: Any) -> None:
        """Queue ``data``; it is sent at the end of this loop turn with the turn's other writes."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._empty_waiter is not None:
            raise RuntimeError("unable to write; sendfile is in progress")
        if not data:
            return
        if self._conn_lost:
            super().write(data)  # asyncio's accounting (and warning) of writes to a lost connection
            return
        if self._buffer or self._first is not None:
            self._buffer.extend(data)
        else:
            self._first = data if type(data) is bytes else bytes(data)
            if not self._flush_queued:
                self._flush_queued = True
                self._flush_later(self)
        if self._flush_queued and self.get_write_buffer_size() > self._high_water:
            self._aem_flush()  # past the high-water mark: send now, as asyncio would (no pause for that)
        else:
            self._maybe_pause_protocol()

    def _spill(self) -> None:
        """Move the pending first write into asyncio's buffer (in front)."""
        if self._first is not None:
            self._buffer[:0] = self._first
            self._first = None

    def _aem_flush(self) -> None:
        """End of the turn: send what was written, in one call; the rest waits for writability."""
        if not self._flush_queued:  # flushed early (write past the high-water mark)
            return
        self._flush_queued = False
        first, self._first = self._first, None
        buf = self._buffer
        if self._conn_lost or (first is None and not buf):
            return
        try:
            if first is None:
                n = self._sock.send(buf)
            elif buf:
                n = self._sock.sendmsg([first, buf])
            else:
                n = self._sock.send(first)
        except (BlockingIOError, InterruptedError):
            n = 0
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            buf.clear()
            self._fatal_error(exc, "Fatal write error on socket transport")
            if self._empty_waiter is not None and not self._empty_waiter.done():
                self._empty_waiter.set_exception(exc)
            return
        if first is not None:
            if n < len(first):
                buf[:0] = memoryview(first)[n:]
                n = 0
            else:
                n -= len(first)
        if n:
            del buf[:n]
        if buf:
            self._loop._add_writer(self._sock_fd, self._write_ready)
            self._maybe_pause_protocol()
            return
        self._maybe_resume_protocol()
        if self._empty_waiter is not None and not self._empty_waiter.done():
            self._empty_waiter.set_result(None)
        if self._closing:
            self._call_connection_lost(None)
        elif self._eof:
            self._sock.shutdown(socket.SHUT_WR)

    def get_write_buffer_size(self) -> int:
        """Bytes written and not yet sent."""
        first = self._first
        return len(self._buffer) + (len(first) if first is not None else 0)

    def close(self) -> None:
        """Close once what was written is sent (asyncio's semantics)."""
        self._spill()
        super().close()

    def write_eof(self) -> None:
        """Shut the write side down once what was written is sent."""
        self._spill()
        super().write_eof()

    def _make_empty_waiter(self) -> Any:
        self._spill()
        return super()._make_empty_waiter()

    def _force_close(self, exc: BaseException | None) -> None:
        self._first = None
        super()._force_close(exc)

    # -- reading ---------------------------------------------------------------------------------

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
