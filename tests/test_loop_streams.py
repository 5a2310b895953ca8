"""asyncio streams on both loops: what StreamReaderProtocol.data_received does, and the cases
aem.EventLoop hands back to it (aem does the common case in C, aem/_core/loop_feed.c)."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
from loopkit import LoopRunner, lr

__all__ = ["lr"]


async def _stream(lr: LoopRunner, limit: int = 1 << 16, protocol: Any = asyncio.StreamReaderProtocol,
                  reader: Any = asyncio.StreamReader) -> tuple[Any, Any, Any, socket.socket]:
    """(reader, protocol, transport, peer): a stream over a socketpair, the peer a blocking socket."""
    a, b = socket.socketpair()
    r = reader(limit=limit, loop=lr.loop)
    p = protocol(r, loop=lr.loop)
    tr, _ = await lr.loop.connect_accepted_socket(lambda: p, a)
    return r, p, tr, b


async def _until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


def _close(tr: Any, peer: socket.socket) -> None:
    tr.close()
    peer.close()


def test_reads_wake_the_reader_in_order(lr: LoopRunner) -> None:
    async def main() -> list[bytes]:
        reader, _, tr, peer = await _stream(lr)
        got = []
        for i in range(50):
            peer.sendall(b"%d." % i)
            got.append(await reader.readuntil(b"."))
        _close(tr, peer)
        return got

    assert lr.run(main()) == [b"%d." % i for i in range(50)]


def test_the_transport_pauses_past_twice_the_limit_and_resumes(lr: LoopRunner) -> None:
    async def main() -> None:
        reader, _, tr, peer = await _stream(lr, limit=1024)
        peer.sendall(b"a" * 1500)
        await _until(lambda: len(reader._buffer) == 1500, "the first read")
        assert tr.is_reading() and not reader._paused  # 1500 <= 2 x 1024
        peer.sendall(b"b" * 1500)
        await _until(lambda: len(reader._buffer) == 3000, "the second read")
        assert not tr.is_reading() and reader._paused  # 3000 > 2 x 1024: paused by feed_data
        assert await reader.read(2500) == b"a" * 1500 + b"b" * 1000
        assert tr.is_reading() and not reader._paused  # 500 <= 1024: resumed
        assert await reader.read(1000) == b"b" * 500
        _close(tr, peer)

    lr.run(main())


def test_reads_of_changing_sizes_arrive_whole(lr: LoopRunner) -> None:
    """Big reads go straight into the reader's buffer on aem; smaller and bigger than the last."""
    sizes = [20_000, 100_000, 17_000, 3, 70_000, 200_000, 1, 65_536, 300_000]

    async def main() -> None:
        reader, _, tr, peer = await _stream(lr, limit=1 << 20)
        peer.setblocking(False)
        for n in sizes:
            payload = bytes([n % 251]) * n
            _, got = await asyncio.gather(lr.loop.sock_sendall(peer, payload), reader.readexactly(n))
            assert got == payload
        _close(tr, peer)

    lr.run(main())


def test_a_big_read_pauses_the_transport(lr: LoopRunner) -> None:
    async def main() -> None:
        reader, _, tr, peer = await _stream(lr, limit=16_384)
        peer.sendall(b"x" * 20_000)  # the next read is expected big
        assert await reader.readexactly(20_000) == b"x" * 20_000
        peer.sendall(b"y" * 40_000)
        await _until(lambda: reader._paused, "the pause")
        assert not tr.is_reading()
        assert await reader.readexactly(40_000) == b"y" * 40_000
        assert tr.is_reading()
        _close(tr, peer)

    lr.run(main())


def test_a_transport_that_cannot_pause_is_forgotten(lr: LoopRunner) -> None:
    def cannot() -> None:
        raise NotImplementedError

    async def main() -> None:
        reader, _, tr, peer = await _stream(lr, limit=1024)
        tr.pause_reading = cannot
        peer.sendall(b"z" * 4096)
        await _until(lambda: len(reader._buffer) == 4096, "the read")
        assert reader._transport is None and not reader._paused and tr.is_reading()
        assert await reader.read(5000) == b"z" * 4096
        _close(tr, peer)

    lr.run(main())


def test_a_buffer_held_by_a_memoryview_is_a_protocol_error(lr: LoopRunner) -> None:
    async def main() -> None:
        reader, _, tr, peer = await _stream(lr)
        peer.sendall(b"first")
        await _until(lambda: len(reader._buffer) == 5, "the read")
        view = memoryview(reader._buffer)
        peer.sendall(b"second")
        await _until(tr.is_closing, "the transport to close")
        view.release()
        assert bytes(reader._buffer) == b"first"
        peer.close()

    lr.run(main())
    (ctx,) = lr.expect_errors(1)
    assert "data_received() call failed" in ctx["message"] and isinstance(ctx["exception"], BufferError)


def test_eof_after_data(lr: LoopRunner) -> None:
    async def main() -> None:
        reader, _, tr, peer = await _stream(lr)
        peer.sendall(b"last words")
        peer.shutdown(socket.SHUT_WR)
        assert await reader.read() == b"last words"
        assert reader.at_eof()
        _close(tr, peer)

    lr.run(main())


def test_data_after_an_exception_is_kept_and_read_raises(lr: LoopRunner) -> None:
    async def main() -> None:
        reader, _, tr, peer = await _stream(lr)
        waiting = asyncio.ensure_future(reader.read(10))
        await asyncio.sleep(0)
        reader.set_exception(ValueError("broken"))
        with pytest.raises(ValueError):
            await waiting
        peer.sendall(b"more")
        await _until(lambda: len(reader._buffer) == 4, "the read")
        with pytest.raises(ValueError):
            await reader.read(10)
        _close(tr, peer)

    lr.run(main())


def test_a_cancelled_waiter_is_left_alone(lr: LoopRunner) -> None:
    async def main() -> None:
        reader, _, tr, peer = await _stream(lr)
        waiter = lr.loop.create_future()
        waiter.cancel()
        reader._waiter = waiter  # as _wait_for_data leaves it between a cancel and its finally
        peer.sendall(b"data")
        await _until(lambda: len(reader._buffer) == 4, "the read")
        assert reader._waiter is None and waiter.cancelled()
        assert await reader.read(10) == b"data"
        _close(tr, peer)

    lr.run(main())


def test_data_after_feed_eof_is_a_protocol_error(lr: LoopRunner) -> None:
    async def main() -> Any:
        reader, _, tr, peer = await _stream(lr)
        reader.feed_eof()
        peer.sendall(b"late")
        await _until(tr.is_closing, "the transport to close")
        peer.close()

    lr.run(main())
    (ctx,) = lr.expect_errors(1)
    assert "data_received() call failed" in ctx["message"] and isinstance(ctx["exception"], AssertionError)


class _CountingProtocol(asyncio.StreamReaderProtocol):
    fed: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.fed.append(data)
        super().data_received(data)


class _CountingReader(asyncio.StreamReader):
    fed: list[bytes] = []

    def feed_data(self, data: bytes) -> None:
        self.fed.append(data)
        super().feed_data(data)


@pytest.mark.parametrize("how", ["protocol subclass", "reader subclass", "instance attribute",
                                 "class patched", "_wakeup_waiter patched"])
def test_what_is_not_asyncios_own_is_called(lr: LoopRunner, how: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    fed: list[bytes] = []
    _CountingProtocol.fed = _CountingReader.fed = fed

    async def main() -> bytes:
        kw: dict[str, Any] = {}
        if how == "protocol subclass":
            kw["protocol"] = _CountingProtocol
        elif how == "reader subclass":
            kw["reader"] = _CountingReader
        elif how == "class patched":
            feed = asyncio.StreamReader.feed_data

            def counting(self: asyncio.StreamReader, data: bytes) -> None:
                fed.append(data)
                feed(self, data)

            monkeypatch.setattr(asyncio.StreamReader, "feed_data", counting)
        elif how == "_wakeup_waiter patched":
            wake = asyncio.StreamReader._wakeup_waiter  # type: ignore[attr-defined]

            def waking(self: asyncio.StreamReader) -> None:
                fed.append(bytes(self._buffer))  # type: ignore[attr-defined]
                wake(self)

            monkeypatch.setattr(asyncio.StreamReader, "_wakeup_waiter", waking)
        reader, proto, tr, peer = await _stream(lr, **kw)
        if how == "instance attribute":
            own = proto.data_received

            def data_received(data: bytes) -> None:
                fed.append(data)
                own(data)

            proto.data_received = data_received
        peer.sendall(b"hello")
        got: bytes = await reader.read(10)
        _close(tr, peer)
        return got

    assert lr.run(main()) == b"hello"
    assert fed == [b"hello"]


def test_a_profiler_sees_data_received(lr: LoopRunner) -> None:
    calls: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            calls.append(frame.f_code.co_name)

    async def main() -> bytes:
        reader, _, tr, peer = await _stream(lr)
        sys.setprofile(profile)
        try:
            peer.sendall(b"seen")
            got: bytes = await reader.read(10)
        finally:
            sys.setprofile(None)
        _close(tr, peer)
        return got

    assert lr.run(main()) == b"seen"
    assert "data_received" in calls and "feed_data" in calls


def test_aem_feeds_asyncios_own_stream_reader_in_c() -> None:
    """On aem.EventLoop the common case is fed in C: its count moves once per read."""
    lr = LoopRunner("aem")

    async def main() -> int:
        reader, _, tr, peer = await _stream(lr)
        core = lr.loop._core  # type: ignore[attr-defined]
        before = core.streams_fed
        for _ in range(10):
            peer.sendall(b"x")
            assert await reader.read(10) == b"x"
        _close(tr, peer)
        return int(core.streams_fed - before)

    try:
        assert lr.run(main()) == 10
    finally:
        lr.close()
    assert not lr.errors
