"""The loop's socket transport: asyncio's own, with its hot paths made cheaper.

:class:`SocketTransport` is asyncio's ``_SelectorSocketTransport`` (so a real
``asyncio.Transport`` with all its semantics: flow control, ``write_eof``,
buffered protocols, ``sendfile``) with two changes:

* reading a ready socket goes through the loop's C core: one read into a
  shared buffer, copied out at its exact size, instead of
  ``socket.recv(256 KiB)`` allocating 256 KiB per read;
* writes are coalesced: what is written during one loop turn goes out at the
  end of the turn in one ``send``/``sendmsg`` (a ``writev``), not one ``send``
  per ``write()``.  Both are C (``aem._core.StreamIO``).  The first write of a
  turn is kept as is (no copy of ``bytes``); later ones are appended to the
  transport's buffer, a ``bytearray`` on every Python (asyncio 3.12+'s own is
  a deque of chunks; what a send leaves over goes out through
  :meth:`SocketTransport._write_buffered`).  Everything that looks at the
  buffer (``get_write_buffer_size``, flow control, ``close``, ``write_eof``,
  ``sendfile``, ``abort``) sees the pending bytes.
"""

from __future__ import annotations

import _socket
import socket
import sys
import weakref
from asyncio import BufferedProtocol, futures, selector_events, trsock
from typing import Any

_SelectorSocketTransport: Any = selector_events._SelectorSocketTransport  # type: ignore[attr-defined]
#: The constructor is asyncio 3.11's, inline (its state differs in later versions: theirs is used).
_INLINE_INIT = sys.version_info[:2] == (3, 11)
_HIGH_WATER = 64 * 1024  # asyncio's default write buffer limits: high, and low = high // 4
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# A socket's family and type as plain ints (socket.socket's properties convert them to enums).
_raw_family = _socket.socket.family.__get__  # type: ignore[attr-defined]
_raw_type = _socket.socket.type.__get__  # type: ignore[attr-defined]
_STATE_SLOTS = ("_buffer", "_closing", "_conn_lost", "_empty_waiter", "_eof", "_protocol")


class SocketTransport(_SelectorSocketTransport):  # type: ignore[misc]
    """A TCP or Unix stream transport of :class:`aem.EventLoop`.

    ``write`` and the reader callback are the C methods of the transport's
    ``StreamIO`` (aem/_core/loop_stream.c), set on the instance; the rest is
    asyncio's, plus the few ``_aem_*`` methods the C side calls on uncommon paths.
    """

    # The state the C side reads on every message lives in slots (read at their offsets, no
    # dictionary lookup); _protocol_paused and _high_water already are asyncio's slots.  (A name,
    # not a literal: mypy would otherwise forbid every attribute that lives in the __dict__.)
    __slots__ = _STATE_SLOTS

    def __init__(self, loop: Any, sock: Any, protocol: Any, waiter: Any = None, extra: Any = None,
                 server: Any = None) -> None:
        fd = sock.fileno()
        io = loop._core.stream_io(self, fd)
        self._io = io
        self._read_ready = io.read_ready  # asyncio's __init__ registers this reader
        self.write = io.write
        self.is_closing = io.is_closing  # StreamWriter.drain() asks on every message
        if not _INLINE_INIT:
            super().__init__(loop, sock, protocol, waiter, extra, server)
            # 3.12+: asyncio's buffer is a deque of chunks and its writer an instance attribute
            # working on it; the C side appends to one bytearray, on every Python
            self._buffer = bytearray()
            self.__dict__.pop("_write_ready", None)
            return
        # What asyncio 3.11's four constructors (BaseTransport, _FlowControlMixin,
        # _SelectorTransport, _SelectorSocketTransport) do, in one: a server's every new
        # connection runs this.  tests/test_loop.py checks it leaves the state theirs leaves.
        if extra is None:
            extra = {}
        self._extra = extra
        self._loop = loop
        self._protocol_paused = False
        self._high_water = _HIGH_WATER
        self._low_water = _HIGH_WATER // 4
        extra["socket"] = trsock.TransportSocket(sock)
        try:
            extra["sockname"] = sock.getsockname()
        except OSError:
            extra["sockname"] = None
        if "peername" not in extra:
            try:
                extra["peername"] = sock.getpeername()
            except OSError:
                extra["peername"] = None
        self._sock = sock
        self._sock_fd = fd
        buffered = isinstance(protocol, BufferedProtocol)  # set_protocol(protocol), inline
        self._read_ready_cb = self._read_ready__get_buffer if buffered else self._read_ready__data_received
        self._protocol = protocol
        self._protocol_connected = True
        if buffered:
            io.set_buffered(True)
        self._server = server
        self._buffer = bytearray()
        self._conn_lost = 0
        self._closing = False
        self._paused = False
        if server is not None:
            server._attach()
        # loop._transports is a WeakValueDictionary; a plain weak reference in its data is what
        # its lookups read (a dead one reads as absent), without its Python __setitem__ and
        # KeyedRef; the next transport on the same fd replaces it.
        loop._transports.data[fd] = weakref.ref(self)
        self._eof = False
        self._empty_waiter = None
        if _raw_family(sock) in _TCP_FAMILIES and _raw_type(sock) == socket.SOCK_STREAM \
                and sock.proto == socket.IPPROTO_TCP:  # asyncio's _set_nodelay, without its enums
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop.call_soon(protocol.connection_made, self)
        loop.call_soon(self._add_reader, fd, self._read_ready)  # reading starts after connection_made
        if waiter is not None:
            loop.call_soon(futures._set_result_unless_cancelled, waiter, None)  # type: ignore[attr-defined]

    def set_protocol(self, protocol: Any) -> None:
        """Set the protocol (a BufferedProtocol is read through asyncio's Python path)."""
        super().set_protocol(protocol)
        self._io.set_buffered(isinstance(protocol, BufferedProtocol))

    def _add_reader(self, fd: int, callback: Any, *args: Any) -> None:
        if not self._closing and not self._paused:  # asyncio's is_reading(), inline
            self._loop._add_reader(fd, callback, *args)

    # -- what the C side hands back on uncommon paths ----------------------------------------------

    def _aem_write_lost(self, data: Any) -> None:
        """write() on a lost connection: asyncio's accounting (and warning)."""
        super().write(data)

    def _aem_flush_failed(self, exc: BaseException) -> None:
        self._buffer.clear()
        self._fatal_error(exc, "Fatal write error on socket transport")
        if self._empty_waiter is not None and not self._empty_waiter.done():
            self._empty_waiter.set_exception(exc)

    def _aem_flush_partial(self) -> None:
        """The socket took part of the turn's writes: the rest waits for writability."""
        self._loop._add_writer(self._sock_fd, self._write_buffered)
        self._maybe_pause_protocol()

    def _write_buffered(self) -> None:
        """The socket is writable again: send what the buffer holds; once it is empty, stop
        watching and do what waited for it (resume the protocol, close, shut down writing)."""
        if self._conn_lost:
            return
        buf = self._buffer
        try:
            n = self._sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop._remove_writer(self._sock_fd)
            self._aem_flush_failed(exc)
            return
        del buf[:n]
        self._maybe_resume_protocol()
        if not buf:
            self._loop._remove_writer(self._sock_fd)
            self._aem_flush_done()

    _write_ready = _write_buffered  # the name asyncio's own methods register

    def writelines(self, list_of_data: Any) -> None:
        """Write the buffers in order (one write: the turn's writes go out in one send)."""
        if not _INLINE_INIT:  # asyncio 3.12+'s own checks (3.11's writelines is a join and a write)
            if self._eof:
                raise RuntimeError("Cannot call writelines() after write_eof()")
            if self._empty_waiter is not None:
                raise RuntimeError("unable to writelines; sendfile is in progress")
            if not list_of_data:
                return
        self.write(b"".join(list_of_data))

    def _aem_flush_done(self) -> None:
        """Everything was sent and someone waits for that (flow control, close, write_eof, sendfile)."""
        if self._protocol_paused:
            self._maybe_resume_protocol()
        if self._empty_waiter is not None and not self._empty_waiter.done():
            self._empty_waiter.set_result(None)
        if self._closing:
            self._call_connection_lost(None)
        elif self._eof:
            self._sock.shutdown(socket.SHUT_WR)

    # -- asyncio's methods that must see the pending first write ----------------------------------------

    def _spill(self) -> None:
        """Move the pending first write into asyncio's buffer (in front)."""
        first = self._io.take_first()
        if first is not None:
            self._buffer[:0] = first

    def get_write_buffer_size(self) -> int:
        """Bytes written and not yet sent."""
        return len(self._buffer) + int(self._io.pending())

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
        self._io.take_first()
        super()._force_close(exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            if _INLINE_INIT:  # asyncio 3.11's two _call_connection_lost, inline
                try:
                    if self._protocol_connected:
                        self._protocol.connection_lost(exc)
                finally:
                    self._sock.close()
                    self._sock = None
                    self._protocol = None
                    self._loop = None
                    server = self._server
                    if server is not None:
                        server._detach()
                        self._server = None
                if self._empty_waiter is not None:
                    self._empty_waiter.set_exception(ConnectionError("Connection is closed by peer"))
            else:
                super()._call_connection_lost(exc)
        finally:
            self._io.detach()  # no cycle left through the C side ...
            for name in ("write", "_read_ready", "is_closing"):
                self.__dict__.pop(name, None)
            self._read_ready_cb = None  # ... nor through a bound method: freed without the GC
