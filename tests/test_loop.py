"""aem.EventLoop: the loop core, written once and run on asyncio's loop and on aem's."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import pytest
from loopkit import LoopRunner, lr

import aem

__all__ = ["lr"]

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="none")


def test_call_soon_runs_in_order_with_args(lr: LoopRunner) -> None:
    seen: list[int] = []

    async def main() -> None:
        for i in range(100):
            lr.loop.call_soon(seen.append, i)
        await asyncio.sleep(0)

    lr.run(main())
    assert seen == list(range(100))


def test_call_later_order_cancel_and_when(lr: LoopRunner) -> None:
    seen: list[str] = []

    async def main() -> None:
        loop = lr.loop
        t0 = loop.time()
        loop.call_later(0.03, seen.append, "c")
        h = loop.call_later(0.02, seen.append, "never")
        loop.call_later(0.01, seen.append, "a")
        loop.call_at(t0 + 0.02, seen.append, "b")
        assert isinstance(h, asyncio.TimerHandle)
        assert h.when() >= t0 + 0.02
        h.cancel()
        assert h.cancelled()
        await asyncio.sleep(0.06)
        assert loop.time() - t0 >= 0.03

    lr.run(main())
    assert seen == ["a", "b", "c"]


def test_timers_never_fire_early(lr: LoopRunner) -> None:
    late: list[float] = []

    async def main() -> None:
        loop = lr.loop
        done = loop.create_future()
        start = loop.time()
        for k in range(50):
            delay = 0.001 * (k % 10)
            loop.call_later(delay, lambda d=delay: late.append(loop.time() - start - d))
        loop.call_later(0.05, done.set_result, None)
        await done

    lr.run(main())
    assert len(late) == 50 and min(late) >= -1e-3


def test_callbacks_run_in_their_context(lr: LoopRunner) -> None:
    seen: list[str] = []

    async def main() -> None:
        ctx = contextvars.copy_context()
        ctx.run(var.set, "ctx")
        lr.loop.call_soon(lambda: seen.append(var.get()), context=ctx)
        lr.loop.call_later(0.001, lambda: seen.append(var.get()), context=ctx)
        lr.loop.call_soon(lambda: seen.append(var.get()))
        await asyncio.sleep(0.01)

    lr.run(main())
    assert seen == ["ctx", "none", "ctx"]


def test_call_soon_threadsafe_wakes_the_loop(lr: LoopRunner) -> None:
    async def main() -> str:
        fut = lr.loop.create_future()
        threading.Timer(0.02, lambda: lr.loop.call_soon_threadsafe(fut.set_result, "woken")).start()
        return await fut

    assert lr.run(main()) == "woken"


def test_a_raising_callback_goes_to_the_exception_handler(lr: LoopRunner) -> None:
    async def main() -> None:
        lr.loop.call_soon(lambda: 1 / 0)
        await asyncio.sleep(0.01)

    lr.run(main())
    (ctx,) = lr.expect_errors(1)
    assert isinstance(ctx["exception"], ZeroDivisionError)


def test_tasks_and_futures_are_the_c_ones(lr: LoopRunner) -> None:
    async def child() -> int:
        await asyncio.sleep(0)
        return 7

    async def main() -> tuple[Any, Any]:
        t = lr.loop.create_task(child())
        return type(t), await t

    kind, value = lr.run(main())
    assert kind is asyncio.Task and value == 7


def test_run_in_executor_threads_and_processes(lr: LoopRunner) -> None:
    async def main() -> tuple[int, int, int]:
        a = await lr.loop.run_in_executor(None, sum, [1, 2, 3])
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            b = await lr.loop.run_in_executor(pool, pow, 2, 10)
        with concurrent.futures.ProcessPoolExecutor(1) as ppool:
            c = await lr.loop.run_in_executor(ppool, abs, -5)
        return a, b, c

    assert lr.run(main()) == (6, 1024, 5)


def test_getaddrinfo_and_getnameinfo(lr: LoopRunner) -> None:
    async def main() -> tuple[Any, Any]:
        infos = await lr.loop.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)
        name = await lr.loop.getnameinfo(("127.0.0.1", 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
        return infos[0][4], name

    assert lr.run(main()) == (("127.0.0.1", 80), ("127.0.0.1", "80"))


def test_shutdown_asyncgens_finalizes_generators(lr: LoopRunner) -> None:
    closed: list[bool] = []

    async def gen() -> Any:
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    async def main() -> Any:
        g = gen()
        return g, await g.__anext__()

    _gen, first = lr.run(main())
    assert first == 1
    lr.loop.run_until_complete(lr.loop.shutdown_asyncgens())
    assert closed == [True]


def test_debug_mode_warns_of_slow_callbacks(lr: LoopRunner, caplog: pytest.LogCaptureFixture) -> None:
    lr.loop.set_debug(True)
    lr.loop.slow_callback_duration = 0.01

    async def main() -> None:
        lr.loop.call_soon(time.sleep, 0.03)
        await asyncio.sleep(0.01)

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        lr.run(main())
    assert any("took" in r.getMessage() for r in caplog.records)


def test_stop_and_run_forever(lr: LoopRunner) -> None:
    seen: list[int] = []
    lr.loop.call_soon(seen.append, 1)
    lr.loop.call_soon(lr.loop.stop)
    lr.loop.call_soon(seen.append, 2)
    lr.loop.run_forever()
    assert seen == [1, 2]
    assert not lr.loop.is_running()


def test_close_running_loop_is_refused(lr: LoopRunner) -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError):
            lr.loop.close()
        coro = asyncio.sleep(0)
        with pytest.raises(RuntimeError):
            lr.loop.run_until_complete(coro)
        coro.close()

    lr.run(main())


# -- sockets and transports ------------------------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.mark.parametrize("size", [1, 1024, 1 << 20])
def test_tcp_streams_echo(lr: LoopRunner, size: int) -> None:
    async def main() -> bytes:
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        assert sock.family == socket.AF_INET and writer.get_extra_info("peername")[1] == port
        payload = os.urandom(size)
        writer.write(payload)
        got = await reader.readexactly(size)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return got == payload

    assert lr.run(main())


def test_protocol_reads_of_changing_sizes_arrive_whole(lr: LoopRunner) -> None:
    """Reads of every size reach data_received intact, in order: small ones, big ones (aem reads
    those into a bytes object sized by the last read), bigger and smaller than the last one."""
    sizes = [100, 40_000, 30_000, 200_000, 20_000, 5, 90_000, 150_000, 1, 70_000]

    class Sink(asyncio.Protocol):
        def __init__(self) -> None:
            self.data = bytearray()
            self.chunks: list[int] = []
            self.waiter: asyncio.Future[None] | None = None
            self.want = 0

        def data_received(self, data: bytes) -> None:
            assert type(data) is bytes
            self.data += data
            self.chunks.append(len(data))
            if self.waiter is not None and len(self.data) >= self.want and not self.waiter.done():
                self.waiter.set_result(None)

    async def main() -> tuple[bool, list[int]]:
        loop = asyncio.get_running_loop()
        sink = Sink()
        server = await loop.create_server(lambda: sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sent = bytearray()
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.setblocking(False)
            for n in sizes:
                chunk = os.urandom(n)
                sent += chunk
                sink.want, sink.waiter = len(sent), loop.create_future()
                await loop.sock_sendall(c, chunk)
                await sink.waiter
        server.close()
        await server.wait_closed()
        return bytes(sink.data) == bytes(sent), sink.chunks

    same, chunks = lr.run(main())
    assert same and sum(chunks) == sum(sizes)
    assert max(chunks) > 16 * 1024  # big reads happened


def test_unix_streams_and_connect_accepted_socket(lr: LoopRunner, tmp_path: Any) -> None:
    path = str(tmp_path / "s")

    async def main() -> bytes:
        server = await asyncio.start_unix_server(_echo, path)
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"unix")
        got = await reader.readexactly(4)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        a, b = socket.socketpair()
        proto_data: list[bytes] = []

        class P(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                proto_data.append(data)

        tr, _ = await lr.loop.connect_accepted_socket(P, a)
        assert isinstance(tr, asyncio.Transport)
        b.sendall(b"acc")
        for _ in range(100):
            if proto_data:
                break
            await asyncio.sleep(0.005)
        tr.close()
        b.close()
        return got + b"".join(proto_data)

    assert lr.run(main()) == b"unixacc"


def test_protocol_flow_control(lr: LoopRunner) -> None:
    async def main() -> tuple[bool, bool, int, int]:
        a, b = socket.socketpair()
        b.setblocking(False)
        paused = asyncio.Event()
        resumed = asyncio.Event()

        class P(asyncio.Protocol):
            def pause_writing(self) -> None:
                paused.set()

            def resume_writing(self) -> None:
                resumed.set()

        tr, _ = await lr.loop.connect_accepted_socket(P, a)
        tr.set_write_buffer_limits(high=64 * 1024)
        written = 0
        while not paused.is_set():
            tr.write(b"x" * 65536)
            written += 65536
        assert tr.get_write_buffer_size() > 64 * 1024
        total = 0
        while total < written:
            try:
                total += len(b.recv(1 << 20))
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await asyncio.wait_for(resumed.wait(), 5)
        left = tr.get_write_buffer_size()
        tr.close()
        b.close()
        return paused.is_set(), resumed.is_set(), total - written, left

    assert lr.run(main()) == (True, True, 0, 0)


def test_writes_of_one_turn_arrive_in_order_and_close_sends_them(lr: LoopRunner) -> None:
    async def main() -> bytes:
        a, b = socket.socketpair()
        tr, _ = await lr.loop.connect_accepted_socket(asyncio.Protocol, a)
        buf = bytearray(b"mutable")
        tr.write(b"one,")
        tr.write(buf)
        buf[:] = b"CHANGED"  # the transport kept what was written, not the caller's buffer
        tr.writelines([b",two", memoryview(b",three")])
        size = tr.get_write_buffer_size()
        tr.write_eof()
        tr.close()
        b.setblocking(False)
        chunks = []
        while True:
            try:
                data = b.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            if not data:
                break
            chunks.append(data)
        b.close()
        assert size in (0, len(b"one,mutable,two,three"))
        return b"".join(chunks)

    assert lr.run(main()) == b"one,mutable,two,three"


def test_a_lone_write_goes_out_at_once_and_the_writes_of_a_busy_turn_in_one_send(lr: LoopRunner) -> None:
    """Each send() on a SOCK_SEQPACKET socket is one record at the peer: the records show the sends.

    aem: a transport whose last writing turn wrote once sends its next write at once (as asyncio
    does every write); otherwise what a turn writes goes out in one send at the end of the turn."""

    async def main() -> list[tuple[list[bytes], list[bytes]]]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setblocking(False)
        waiter = lr.loop.create_future()
        tr = lr.loop._make_socket_transport(a, asyncio.Protocol(), waiter)  # type: ignore[attr-defined]
        await waiter

        def records() -> list[bytes]:
            got = []
            while True:
                try:
                    got.append(b.recv(100, socket.MSG_DONTWAIT))
                except BlockingIOError:
                    return got

        seen = []
        for writes in ([b"a", b"b"], [b"c"], [b"d", b"e", b"f"], [b"g"], [b"h"]):
            tr.write(writes[0])
            at_once = records()
            for w in writes[1:]:
                tr.write(w)
            await asyncio.sleep(0)  # the end of this turn
            seen.append((at_once, records()))
        tr.close()
        await asyncio.sleep(0)
        b.close()
        return seen

    if lr.kind == "aem":
        expected = [([], [b"ab"]),            # a fresh transport keeps its first turn's writes
                    ([], [b"c"]),             # the last turn wrote twice: kept for the turn's end
                    ([b"d"], [b"ef"]),        # the last turn wrote once: sent at once, the rest together
                    ([], [b"g"]),
                    ([b"h"], [])]
    else:  # asyncio sends every write at once
        expected = [([b"a"], [b"b"]), ([b"c"], []), ([b"d"], [b"e", b"f"]), ([b"g"], []), ([b"h"], [])]
    assert lr.run(main()) == expected


def test_abort_drops_what_was_not_sent(lr: LoopRunner) -> None:
    async def main() -> tuple[bytes, bool]:
        a, b = socket.socketpair()
        lost = lr.loop.create_future()

        class P(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                lost.set_result(exc)

        tr, _ = await lr.loop.connect_accepted_socket(P, a)
        tr.write(b"never sent" if lr.kind == "aem" else b"")
        tr.abort()
        await lost
        b.setblocking(False)
        try:
            data = b.recv(100)
        except BlockingIOError:
            data = b"?"
        b.close()
        return data, tr.is_closing()

    assert lr.run(main()) == (b"", True)


def test_udp_endpoint_and_sock_datagram_methods(lr: LoopRunner) -> None:
    async def main() -> tuple[bytes, bytes]:
        got: asyncio.Future[bytes] = lr.loop.create_future()

        class P(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                got.set_result(data)

        tr, _ = await lr.loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", 0))
        addr = tr.get_extra_info("sockname")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind(("127.0.0.1", 0))
        await lr.loop.sock_sendto(s, b"dgram", addr)
        first = await got
        tr.sendto(b"back", s.getsockname())
        data, frm = await lr.loop.sock_recvfrom(s, 100)
        assert frm == addr
        tr.close()
        s.close()
        return first, data

    assert lr.run(main()) == (b"dgram", b"back")


def test_sock_methods_and_sendfile(lr: LoopRunner, tmp_path: Any) -> None:
    f = tmp_path / "f"
    f.write_bytes(os.urandom(300_000))

    async def main() -> bool:
        loop = lr.loop
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        c = socket.socket()
        c.setblocking(False)
        conn_task = asyncio.ensure_future(loop.sock_accept(lsock))
        await loop.sock_connect(c, lsock.getsockname())
        s, _ = await conn_task
        s.setblocking(False)
        await loop.sock_sendall(c, b"ping")
        assert await loop.sock_recv(s, 4) == b"ping"
        buf = bytearray(4)
        await loop.sock_sendall(s, b"pong")
        assert await loop.sock_recv_into(c, buf) == 4 and buf == b"pong"
        with open(f, "rb") as fh:
            sent = await loop.sock_sendfile(s, fh)
        s.close()
        chunks = []
        while data := await loop.sock_recv(c, 65536):
            chunks.append(data)
        c.close()
        lsock.close()
        return sent == 300_000 and b"".join(chunks) == f.read_bytes()

    assert lr.run(main())


def test_loop_sendfile_over_a_transport(lr: LoopRunner, tmp_path: Any) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"s" * 100_000)

    async def main() -> int:
        received = bytearray()
        done = asyncio.Event()

        class Sink(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                received.extend(data)

            def eof_received(self) -> None:
                done.set()

        server = await lr.loop.create_server(Sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tr, _ = await lr.loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        with open(f, "rb") as fh:
            n = await lr.loop.sendfile(tr, fh)
        tr.write_eof()
        await done.wait()
        tr.close()
        server.close()
        await server.wait_closed()
        assert len(received) == n
        return n

    assert lr.run(main()) == 100_000


def test_pipes(lr: LoopRunner) -> None:
    async def main() -> bytes:
        r, w = os.pipe()
        reader = asyncio.StreamReader()
        rtr, _ = await lr.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                 os.fdopen(r, "rb"))
        wtr, _ = await lr.loop.connect_write_pipe(asyncio.Protocol, os.fdopen(w, "wb"))
        wtr.write(b"through a pipe")
        wtr.close()
        data = await reader.read()
        rtr.close()
        return data

    assert lr.run(main()) == b"through a pipe"


def test_start_tls_and_ssl_transports(lr: LoopRunner) -> None:
    import ssl

    from test.test_asyncio import utils as tu  # the interpreter's own test certificates

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tu.ONLYCERT, tu.ONLYKEY)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE

    async def main() -> bytes:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = await reader.readline()
            if line == b"STARTTLS\n":
                writer.write(b"OK\n")
                await writer.drain()
                await writer.start_tls(server_ctx)
            await _echo(reader, writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"STARTTLS\n")
        assert await reader.readline() == b"OK\n"
        await writer.start_tls(client_ctx)
        assert writer.get_extra_info("ssl_object") is not None
        writer.write(b"secret")
        got = await reader.readexactly(6)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return got

    assert lr.run(main()) == b"secret"


# -- subprocesses and signals -----------------------------------------------------------------


def test_subprocess_exec_shell_and_kill(lr: LoopRunner) -> None:
    async def main() -> tuple[Any, ...]:
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read().upper()); sys.exit(3)",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        out, _ = await p.communicate(b"abc")
        sh = await asyncio.create_subprocess_shell("echo $((6*7))", stdout=asyncio.subprocess.PIPE)
        shout, _ = await sh.communicate()
        k = await asyncio.create_subprocess_exec("sleep", "30")
        k.kill()
        krc = await k.wait()
        return out, p.returncode, shout, sh.returncode, krc

    assert lr.run(main()) == (b"ABC", 3, b"42\n", 0, -signal.SIGKILL)


def test_subprocess_of_a_missing_program_raises(lr: LoopRunner) -> None:
    async def main() -> None:
        with pytest.raises(FileNotFoundError):
            await asyncio.create_subprocess_exec("/nonexistent/program")

    lr.run(main())


def test_signal_handlers(lr: LoopRunner) -> None:
    async def main() -> list[int]:
        seen: list[int] = []
        fut = lr.loop.create_future()
        lr.loop.add_signal_handler(signal.SIGUSR1, lambda: (seen.append(1), fut.set_result(None)))
        os.kill(os.getpid(), signal.SIGUSR1)
        await fut
        assert lr.loop.remove_signal_handler(signal.SIGUSR1)
        assert not lr.loop.remove_signal_handler(signal.SIGUSR1)
        with pytest.raises(RuntimeError):
            lr.loop.add_signal_handler(signal.SIGKILL, print)
        with pytest.raises(TypeError):
            lr.loop.add_signal_handler(signal.SIGUSR2, main)
        with pytest.raises(ValueError):
            lr.loop.add_signal_handler(10_000, print)
        return seen

    assert lr.run(main()) == [1]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


# -- aem only -----------------------------------------------------------------------------------


def _aem_run(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=aem.new_event_loop) as r:
        return r.run(coro)


def test_runner_and_install_use_the_aem_loop() -> None:
    async def kind() -> type:
        return type(asyncio.get_running_loop())

    assert _aem_run(kind()) is aem.EventLoop
    old = asyncio.get_event_loop_policy()
    try:
        aem.install()
        assert isinstance(asyncio.get_event_loop_policy(), aem.EventLoopPolicy)
        assert asyncio.run(kind()) is aem.EventLoop
    finally:
        asyncio.set_event_loop_policy(old)


def test_await_an_aem_source_and_iterate_occurrences() -> None:
    async def main() -> tuple[Any, int, int]:
        ev = await aem.wait(aem.Timer(0.005))
        u = aem.UserEvent()
        # fired from another thread once aem.wait has registered it (a timer thread started
        # before could fire first on a loaded machine: UnknownEventError in that thread)
        fire = threading.Thread(target=u.fire, args=("payload",))
        asyncio.get_running_loop().call_later(0.01, fire.start)
        uev = await aem.wait(u, timeout=5)
        fire.join()
        n = 0
        async with aem.events(aem.Timer(0.001, 0.001)) as it:  # type: ignore[attr-defined]
            async for _ in it:
                n += 1
                if n == 5:
                    break
        left = aem.stats()["registered"]
        return (type(ev), uev.payload), n, left

    (kind, payload), n, left = _aem_run(main())
    assert kind is aem.TimerEvent and payload == "payload" and n == 5 and left == 0


def test_wait_times_out_and_unregisters() -> None:
    async def main() -> int:
        with pytest.raises(TimeoutError):
            await aem.wait(aem.UserEvent(), timeout=0.01)
        return int(aem.stats()["registered"])

    assert _aem_run(main()) == 0


def test_aem_handlers_and_asyncio_share_the_engine() -> None:
    seen: list[str] = []

    async def main() -> None:
        aem.register(aem.Timer(0.001), lambda ev: seen.append("aem"))
        await asyncio.sleep(0.02)
        seen.append("asyncio")

    _aem_run(main())
    assert seen == ["aem", "asyncio"]


def test_wait_needs_an_aem_loop_and_a_source() -> None:
    async def main() -> None:
        await aem.wait(aem.Timer(0.001))

    with pytest.raises(RuntimeError, match=r"aem\.EventLoop"):
        asyncio.run(main())

    async def bad() -> None:
        await aem.wait(42)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="event source"):
        _aem_run(bad())


def test_timers_due_together_run_in_scheduling_order() -> None:
    """aem promises FIFO order for equal deadlines (asyncio's heap does not)."""
    seen: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + 0.01
        for i in range(50):
            loop.call_at(when, seen.append, i)
        await asyncio.sleep(0.03)

    _aem_run(main())
    assert seen == list(range(50))


def test_loop_exports() -> None:
    import aem.loop

    for name in aem.loop.__all__:
        assert getattr(aem, name) is getattr(aem.loop, name)
        assert getattr(aem, name).__doc__


# -- the loop core: bad input and bookkeeping (both loops must agree) ----------------------------


def test_bad_scheduling_arguments_are_refused(lr: LoopRunner) -> None:
    loop = lr.loop
    with pytest.raises(TypeError):
        loop.call_later(None, print)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        loop.call_at(None, print)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        loop.call_soon(print, bogus=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        loop.call_soon()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        loop.call_later("soon", print)  # type: ignore[arg-type]


def test_a_closed_loop_refuses_callbacks(lr: LoopRunner) -> None:
    loop = lr.loop
    h = loop.call_later(10, print)
    loop.call_soon(print)
    loop.close()
    assert h.cancelled() is False
    with pytest.raises(RuntimeError, match="closed"):
        loop.call_soon(print)
    with pytest.raises(RuntimeError, match="closed"):
        loop.call_later(1, print)
    with pytest.raises(RuntimeError, match="closed"):
        loop.call_at(loop.time(), print)


def test_handles_that_ran_are_reused_only_when_nothing_refers_to_them(lr: LoopRunner) -> None:
    """aem reuses a handle that ran and that nothing refers to: one kept, or weakly referred to,
    stays what it was (and a weakly referred one dies)."""
    import gc
    import weakref

    async def main() -> None:
        got: list[int] = []
        kept = lr.loop.call_soon(got.append, 1)
        ref = weakref.ref(lr.loop.call_soon(got.append, 2))
        for i in range(3, 200):  # dropped at once: reusable once they ran
            lr.loop.call_soon(got.append, i)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        for i in range(200, 400):  # made from reused handles on aem
            lr.loop.call_soon(got.append, i)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        gc.collect()
        assert got == list(range(1, 400))
        assert ref() is None
        assert kept._callback == got.append and kept._args == (1,)  # type: ignore[attr-defined]
        assert "append" in repr(kept) and not kept.cancelled()
        again = lr.loop.call_soon(got.append, 400)
        assert again is not kept and isinstance(again, asyncio.Handle)
        assert again._args == (400,) and again._context is not None  # type: ignore[attr-defined]
        again.cancel()
        await asyncio.sleep(0)
        assert got[-1] == 399

    lr.run(main())


def test_many_cancelled_timers_are_dropped(lr: LoopRunner) -> None:
    async def main() -> tuple[int, int]:
        handles = [lr.loop.call_later(100 + i, print) for i in range(1000)]
        before = len(lr.loop._scheduled)  # type: ignore[attr-defined]
        for h in handles[:900]:
            h.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        after = len(lr.loop._scheduled)  # type: ignore[attr-defined]
        for h in handles[900:]:
            h.cancel()
        return before, after

    before, after = lr.run(main())
    assert before >= 1000 and after == before - 900


def test_a_callback_cancelling_a_later_ready_one(lr: LoopRunner) -> None:
    seen: list[str] = []

    async def main() -> None:
        h2: list[asyncio.Handle] = []
        lr.loop.call_soon(lambda: (seen.append("first"), h2[0].cancel()))
        h2.append(lr.loop.call_soon(seen.append, "second"))
        lr.loop.call_soon(seen.append, "third")
        await asyncio.sleep(0)

    lr.run(main())
    assert seen == ["first", "third"]


def test_keyboard_interrupt_in_a_callback_propagates(lr: LoopRunner) -> None:
    def interrupt() -> None:
        raise KeyboardInterrupt

    lr.loop.call_soon(interrupt)
    with pytest.raises(KeyboardInterrupt):
        lr.loop.run_forever()
    assert lr.errors == []


def test_handles_are_asyncios_own(lr: LoopRunner) -> None:
    h = lr.loop.call_soon(print, "x")
    t = lr.loop.call_later(5, print)
    assert type(h) is asyncio.Handle and type(t) is asyncio.TimerHandle
    assert "print" in repr(h) and t.when() > lr.loop.time()
    h.cancel()
    t.cancel()
    assert "cancelled" in repr(t)


def test_handles_in_reference_cycles_are_collected(lr: LoopRunner) -> None:
    """Handles the loop keeps away from the GC while queued are tracked again when they leave."""
    import gc
    import weakref

    class Owner:
        def __init__(self, loop: asyncio.AbstractEventLoop, delay: float | None) -> None:
            self.handle = (loop.call_soon(self.fire) if delay is None
                           else loop.call_later(delay, self.fire))

        def fire(self) -> None:
            pass

    async def main() -> list[Any]:
        ran, cancelled = Owner(lr.loop, None), Owner(lr.loop, 0.001)
        later = Owner(lr.loop, 100)
        later.handle.cancel()
        await asyncio.sleep(0.01)
        assert gc.is_tracked(ran.handle) and gc.is_tracked(cancelled.handle)
        return [weakref.ref(ran), weakref.ref(cancelled), weakref.ref(later)]

    refs = lr.run(main())
    lr.loop.run_until_complete(asyncio.sleep(0))
    for _ in range(3):
        gc.collect()
    assert [r() for r in refs][:2] == [None, None]


def test_asynchronous_delivery_does_not_break_a_running_loop() -> None:
    """aem.start() delivers aem events to the main thread between the loop's turns too."""
    seen: list[str] = []

    async def main() -> bytes:
        aem.register(aem.Timer(0.002, 0.002), lambda ev: seen.append("tick"))
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got = b""
        for i in range(20):
            writer.write(b"%02d" % i)
            got += await reader.readexactly(2)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 0.003:  # busy in a callback: async delivery interrupts it
                pass
            await asyncio.sleep(0.001)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return got

    aem.start()
    try:
        got = _aem_run(main())
    finally:
        aem.stop()
    assert got == b"".join(b"%02d" % i for i in range(20))
    assert len(seen) >= 5


def test_asynchronous_delivery_never_queues_a_ready_fds_handle_between_polls() -> None:
    """Regression: with aem.start() on, the doorbell rang for a level-triggered ready fd of the
    loop while callbacks ran, and each drain queued its handle once per drain step (64 steps a
    drain, a drain per ring): the ready queue filled with copies of one writer (asyncio's
    connect callback spun for seconds).  Now only the loop's own polls queue handles; between
    them the fd is parked (the doorbell rings at most once) and re-armed at the next poll."""
    async def until(cond: Any) -> None:
        deadline = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)  # an empty ready queue: the next turn polls

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        calls = 0

        def on_writable() -> None:
            nonlocal calls
            calls += 1

        try:
            loop.add_writer(a, on_writable)
            await until(lambda: calls > 0)
            rings0 = aem.stats()["rings"]
            t0 = time.monotonic()
            while time.monotonic() - t0 < 0.05:  # busy in a callback: the doorbell may ring
                pass
            queued, rings = len(loop._ready), aem.stats()["rings"] - rings0
            after = calls
            await until(lambda: calls > after)  # still watched: re-armed by the next poll
            loop.remove_writer(a)
            return queued, rings
        finally:
            a.close()
            b.close()

    aem.start()
    try:
        queued, rings = _aem_run(main())
    finally:
        aem.stop()
    assert queued <= 2  # at most the writer's handle, queued by this turn's poll
    assert rings <= 2


def test_aem_run_between_loop_runs_does_not_queue_the_loops_handles() -> None:
    """aem.run() on the loop's engine while the loop is not running delivers its other
    registrations; a ready fd of the loop is left for the loop's next poll (its handle was
    queued on every engine step before: the ready queue grew without bound)."""
    loop = aem.new_event_loop()
    a, b = socket.socketpair()
    calls: list[int] = []
    ticks: list[int] = []
    try:
        loop.add_writer(a, calls.append, 1)
        aem.register(aem.Timer(0.001, 0.001), lambda ev: ticks.append(1))
        assert aem.run(timeout=0.03) == "timeout"
        assert len(ticks) >= 5 and calls == [] and len(loop._ready) == 0
        loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(asyncio.sleep(0))
        assert 1 <= len(calls) <= 10  # once per polling turn (it was queued per engine step)
        loop.remove_writer(a)
    finally:
        a.close()
        b.close()
        loop.close()


def test_children_are_reaped_through_pidfds_never_sigchld() -> None:
    async def main() -> tuple[int, int, Any]:
        threads = threading.active_count()
        p = await asyncio.create_subprocess_exec(sys.executable, "-c", "raise SystemExit(5)")
        rc = await p.wait()
        return rc, threading.active_count() - threads, signal.getsignal(signal.SIGCHLD)

    before = signal.getsignal(signal.SIGCHLD)
    rc, new_threads, during = _aem_run(main())
    assert rc == 5 and new_threads == 0
    assert during == before == signal.getsignal(signal.SIGCHLD)
    assert not aem._core.signal_routed(signal.SIGCHLD)


def test_signal_handlers_use_the_engines_routing() -> None:
    async def main() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR2, print)
        routed = aem._core.signal_routed(signal.SIGUSR2)
        loop.remove_signal_handler(signal.SIGUSR2)
        return routed, aem._core.signal_routed(signal.SIGUSR2)

    assert _aem_run(main()) == (True, False)


def test_closing_the_loop_leaves_nothing_in_the_engine() -> None:
    loop = aem.new_event_loop()
    try:
        async def main() -> None:
            server = await asyncio.start_server(_echo, "127.0.0.1", 0)
            loop.add_signal_handler(signal.SIGUSR1, print)
            loop.call_later(100, print)
            server.close()
            await server.wait_closed()

        loop.run_until_complete(main())
    finally:
        loop.close()
    stats = loop.engine.stats()
    assert stats["registered"] == 0 and stats["internal"] == 0
    assert not aem._core.signal_routed(signal.SIGUSR1)


# -- the stream transport's C paths: bad input and failures ---------------------------------------


def test_transport_write_refuses_bad_input(lr: LoopRunner) -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        tr, _ = await lr.loop.connect_accepted_socket(asyncio.Protocol, a)
        with pytest.raises(TypeError, match="bytes-like"):
            tr.write("text")  # type: ignore[arg-type]
        tr.write(b"")
        assert tr.get_write_buffer_size() == 0
        tr.write_eof()
        with pytest.raises(RuntimeError, match="write_eof"):
            tr.write(b"late")
        tr.close()
        await asyncio.sleep(0.01)
        b.close()

    lr.run(main())


def test_a_raising_data_received_closes_the_transport(lr: LoopRunner) -> None:
    async def main() -> Any:
        a, b = socket.socketpair()
        lost = lr.loop.create_future()

        class P(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                raise ValueError("bad protocol")

            def connection_lost(self, exc: Exception | None) -> None:
                lost.set_result(exc)

        tr, _ = await lr.loop.connect_accepted_socket(P, a)
        b.sendall(b"x")
        exc = await lost
        b.close()
        return exc, tr.is_closing()

    exc, closing = lr.run(main())
    (ctx,) = lr.expect_errors(1)
    assert "data_received() call failed" in ctx["message"] and isinstance(ctx["exception"], ValueError)
    assert isinstance(exc, ValueError) and closing


def test_peer_reset_and_broken_pipe_reach_connection_lost(lr: LoopRunner) -> None:
    import struct

    async def main() -> tuple[Any, Any]:
        results = []
        for mode in ("reset-on-read", "write-to-closed"):
            lsock = socket.create_server(("127.0.0.1", 0))
            c = socket.create_connection(lsock.getsockname())
            s, _ = lsock.accept()
            lsock.close()
            lost = lr.loop.create_future()

            class P(asyncio.Protocol):
                def __init__(self, lost: asyncio.Future[Any]) -> None:
                    self.lost = lost

                def connection_lost(self, exc: Exception | None) -> None:
                    self.lost.set_result(exc)

            tr, _ = await lr.loop.connect_accepted_socket(lambda lost=lost: P(lost), s)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()  # RST
            if mode == "write-to-closed":
                await asyncio.sleep(0.01)
                for _ in range(5):
                    tr.write(b"y" * 1000)
                    await asyncio.sleep(0.005)
            results.append(await asyncio.wait_for(lost, 5))
        return results[0], results[1]

    on_read, on_write = lr.run(main())
    assert isinstance(on_read, ConnectionError) and isinstance(on_write, ConnectionError)


def test_loops_in_several_threads_at_once() -> None:
    """The first open loop runs on the process engine; a loop of another thread gets its own."""
    results: list[Any] = []

    def worker() -> None:
        async def m() -> tuple[bool, bool]:
            loop = asyncio.get_running_loop()
            await asyncio.sleep(0.03)
            ev = await aem.wait(aem.Timer(0.005))  # on the thread loop's own engine
            return loop.engine is aem.current(), isinstance(ev, aem.TimerEvent)

        with asyncio.Runner(loop_factory=aem.new_event_loop) as r:
            results.append(r.run(m()))

    async def main() -> bool:
        t = threading.Thread(target=worker)
        t.start()
        for _ in range(10):
            await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(None, t.join)
        return asyncio.get_running_loop().engine is aem.current()  # type: ignore[attr-defined,no-any-return]

    assert _aem_run(main()) is True
    assert results == [(False, True)]
    assert _aem_run(main()) is True  # the process engine is free again for the next loop


def test_closing_the_loop_closes_its_event_iterators() -> None:
    loop = aem.new_event_loop()
    try:
        async def main() -> Any:
            it = aem.events(aem.Timer(0.001, 0.001))
            await it.__anext__()
            return it

        it = loop.run_until_complete(main())
        assert aem.stats()["registered"] == 1
    finally:
        loop.close()
    assert aem.stats()["registered"] == 0
    assert it._eid is None  # type: ignore[attr-defined]


def _turns_until_served(lr: LoopRunner, write_at: int, spin_s: float) -> int:
    """An endless call_soon chain (each callback one loop turn, spinning spin_s); at turn
    write_at a byte makes a watched fd readable: how many turns later its reader ran."""
    loop = lr.loop
    a, b = socket.socketpair()
    turn = [0]
    served: list[int] = []

    def on_readable() -> None:
        a.recv(1)
        served.append(turn[0])
        loop.stop()

    def step() -> None:
        turn[0] += 1
        end = time.monotonic() + spin_s
        while time.monotonic() < end:
            pass
        if turn[0] == write_at:
            b.send(b"x")
        if turn[0] < 100_000:  # a backstop: the test fails rather than hangs
            loop.call_soon(step)
        else:
            loop.stop()

    try:
        loop.add_reader(a.fileno(), on_readable)
        loop.call_soon(step)
        loop.run_forever()
        loop.remove_reader(a.fileno())
    finally:
        a.close()
        b.close()
    assert served, "the readable fd was never served while callbacks kept coming"
    return served[0] - write_at


def test_io_is_polled_within_the_bound_during_an_endless_callback_chain(lr: LoopRunner) -> None:
    # aem.EventLoop skips the poll while callbacks are ready, but at most LOOP_POLL_TURNS turns
    # in a row; asyncio's loop polls on every turn.
    for write_at in (1, 5, 50, 333):
        assert 1 <= _turns_until_served(lr, write_at, 0.0) <= aem._core.LOOP_POLL_TURNS


def test_io_is_polled_on_every_turn_once_turns_take_longer_than_the_time_bound(lr: LoopRunner) -> None:
    spin = 2 * aem._core.LOOP_POLL_NS * 1e-9
    for write_at in (3, 20):
        assert _turns_until_served(lr, write_at, spin) == 1


def test_io_ready_when_run_forever_starts_is_served_in_its_first_turn(lr: LoopRunner) -> None:
    # As in asyncio: the turn that runs the first callback also polls, even right after a
    # chain of callbacks (the poll skipping never carries over from one run to the next).
    loop = lr.loop
    a, b = socket.socketpair()
    seen: list[str] = []
    try:
        loop.add_reader(a.fileno(), lambda: seen.append("read"))
        for _ in range(3):
            seen.clear()
            _chain(loop, 10)
            b.send(b"x")
            loop.call_soon(loop.stop)
            loop.run_forever()
            assert seen == ["read"]
            a.recv(1)
        loop.remove_reader(a.fileno())
    finally:
        a.close()
        b.close()


def _chain(loop: asyncio.AbstractEventLoop, n: int) -> None:
    """Run a chain of n callbacks, each scheduling the next, then stop."""
    left = [n]

    def step() -> None:
        left[0] -= 1
        loop.call_soon(step if left[0] else loop.stop)

    loop.call_soon(step)
    loop.run_forever()


class _Hello(asyncio.Protocol):
    """Answers ``hello`` and closes (a server's protocol for the accept tests)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"hello")
        transport.close()


async def _read_all(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("debug", [False, True])
def test_a_failing_protocol_factory_closes_that_connection_and_the_server_goes_on(debug: bool) -> None:
    """aem's loop only: asyncio leaves that connection open until the collector finds it
    (in debug mode its report holds it: the client waits forever)."""
    lr = LoopRunner("aem")
    made = 0

    def factory() -> asyncio.Protocol:
        nonlocal made
        made += 1
        if made == 1:
            raise RuntimeError("no protocol for you")
        return _Hello()

    async def main() -> tuple[bytes, bytes]:
        lr.loop.set_debug(debug)
        server = await lr.loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            first = await _read_all(port)      # closed at once: nothing, no hang
            second = await _read_all(port)
        finally:
            server.close()
            await server.wait_closed()
        return first, second

    try:
        assert lr.run(main(), timeout=10) == (b"", b"hello")
        errors = lr.expect_errors()
    finally:
        lr.close()
    if debug:   # asyncio's report, in debug mode only
        assert [e["message"] for e in errors] == ["Error on transport creation for incoming connection"]
        assert isinstance(errors[0]["exception"], RuntimeError)
    else:
        assert errors == []


class _Recorder(asyncio.Protocol):
    """Keeps what the transport tells of its connection, answers ``ok`` and closes."""

    seen: list[tuple[Any, Any, int, int]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        sock = transport.get_extra_info("socket")
        nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) \
            if sock.family != socket.AF_UNIX else -1
        self.seen.append((transport.get_extra_info("peername"), transport.get_extra_info("sockname"),
                          nodelay, sock.gettimeout() == 0.0))
        transport.write(b"ok")
        transport.close()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "unix", "abstract"])
def test_accepted_connections_carry_the_peer_address_and_options_accept_gives(
        lr: LoopRunner, family: str, tmp_path: Any) -> None:
    """peername as socket.accept() spells it (aem's loop takes it from its C accept), the
    socket non-blocking, TCP_NODELAY set on TCP: the same on both loops."""
    if family == "ipv6" and not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    _Recorder.seen = []

    async def main() -> tuple[Any, Any]:
        if family in ("ipv4", "ipv6"):
            host = "127.0.0.1" if family == "ipv4" else "::1"
            server = await lr.loop.create_server(_Recorder, host, 0)
            client = socket.socket(socket.AF_INET if family == "ipv4" else socket.AF_INET6)
            client.connect(server.sockets[0].getsockname()[:2])
        else:
            path: Any = str(tmp_path / "s") if family == "unix" else f"\0aem-test-{os.getpid()}"
            server = await lr.loop.create_unix_server(_Recorder, path)
            client = socket.socket(socket.AF_UNIX)
            if family == "abstract":
                client.bind(f"\0aem-client-{os.getpid()}")
            client.connect(path)
        try:
            client.setblocking(False)
            got = b""
            while not got.endswith(b"ok"):
                data = await lr.loop.sock_recv(client, 10)
                assert data
                got += data
            return client.getsockname(), client.getpeername()
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    client_name, server_name = lr.run(main())
    [(peer, sockname, nodelay, nonblocking)] = _Recorder.seen
    if family == "abstract":   # the abstract names come back as bytes, as from socket.accept()
        client_name = client_name.encode() if isinstance(client_name, str) else client_name
    assert peer == client_name and sockname == server_name
    assert nonblocking
    assert nodelay == (-1 if family in ("unix", "abstract") else 1)


def test_accepted_ipv4_peer_addresses_are_spelled_as_socket_accept_spells_them(lr: LoopRunner) -> None:
    """Clients bound to 127.x.y.z with one-, two- and three-digit octets: the peername each
    connection's transport gives is the client's own address (aem's loop writes it in C)."""
    _Recorder.seen = []
    octets = [(0, 0, 1), (1, 2, 3), (9, 10, 99), (100, 0, 255), (255, 254, 9), (10, 200, 20)]

    async def main() -> list[Any]:
        server = await lr.loop.create_server(_Recorder, "0.0.0.0", 0)
        port = server.sockets[0].getsockname()[1]
        names = []
        try:
            for a, b, c in octets:
                with socket.socket() as client:
                    client.bind((f"127.{a}.{b}.{c}", 0))
                    client.connect(("127.0.0.1", port))
                    names.append(client.getsockname())
                    client.setblocking(False)
                    while await lr.loop.sock_recv(client, 10):
                        pass
        finally:
            server.close()
            await server.wait_closed()
        return names

    names = lr.run(main())
    assert [peer for peer, _, _, _ in _Recorder.seen] == names


def test_a_burst_of_connections_waiting_in_the_backlog_is_all_served(lr: LoopRunner) -> None:
    """Connections that queue up before the loop looks are all accepted (in batches of the
    server's backlog at most per readiness), each answered."""

    async def main() -> list[bytes]:
        server = await lr.loop.create_server(_Hello, "127.0.0.1", 0, backlog=200)
        port = server.sockets[0].getsockname()[1]
        clients = []
        try:
            for _ in range(150):    # connected by the kernel before the loop accepts any
                c = socket.create_connection(("127.0.0.1", port))
                c.setblocking(False)
                clients.append(c)

            async def read(c: socket.socket) -> bytes:
                got = b""
                while data := await lr.loop.sock_recv(c, 10):
                    got += data
                return got

            return await asyncio.gather(*(read(c) for c in clients))
        finally:
            for c in clients:
                c.close()
            server.close()
            await server.wait_closed()

    assert lr.run(main()) == [b"hello"] * 150


def test_a_closed_connection_s_transport_is_freed_without_the_collector() -> None:
    """aem's loop: nothing keeps a transport in a reference cycle once its connection is
    lost (asyncio's reader callback, a bound method, does: the collector frees it)."""
    import gc
    import weakref

    lr = LoopRunner("aem")
    refs: list[weakref.ref[Any]] = []

    class Keep(_Hello):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            refs.append(weakref.ref(transport))
            super().connection_made(transport)

    async def main() -> None:
        server = await lr.loop.create_server(Keep, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for _ in range(3):
                assert await _read_all(port) == b"hello"
            await asyncio.sleep(0.01)
        finally:
            server.close()
            await server.wait_closed()

    gc.collect()
    gc.disable()
    try:
        lr.run(main(), timeout=10)
        assert len(refs) == 3 and all(r() is None for r in refs)
    finally:
        gc.enable()
        lr.close()


def test_the_transport_s_state_is_asyncio_s() -> None:
    """aem's SocketTransport sets its state in one constructor: the same attributes, with the
    same values, as asyncio's own transport constructors give (run on this Python)."""
    from asyncio import selector_events

    from aem.loop import transports

    lr = LoopRunner("aem")
    ours_buffer: list[Any] = []

    def state(tr: Any) -> dict[str, Any]:
        names = set(vars(tr)) | {n for c in type(tr).__mro__ for n in getattr(c, "__slots__", ())
                                 if hasattr(tr, n)}
        # ours are C methods on the instance; 3.12+ asyncio's writer is an instance attribute
        # working on its deque (aem's, a method of the class)
        names -= {"_io", "write", "_read_ready", "is_closing", "__weakref__", "__dict__", "_write_ready"}
        out = {}
        for n in names:
            v = getattr(tr, n)
            if n == "_extra":
                v = {k: (type(x) if k == "socket" else x) for k, x in v.items()}
            elif n == "_read_ready_cb":
                v = v.__func__.__name__
            elif n == "_buffer":   # aem's is a bytearray on every Python (3.12+ asyncio's: a deque)
                v = len(v)
            elif n in ("_loop", "_protocol", "_server", "_sock"):
                v = n   # each its own object: present is what is compared
            out[n] = v
        return out

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        got = []
        for cls in (transports.SocketTransport, selector_events._SelectorSocketTransport):  # type: ignore[attr-defined]
            a, b = socket.socketpair()
            waiter = lr.loop.create_future()
            tr = cls(lr.loop, a, asyncio.Protocol(), waiter)
            await waiter
            got.append(state(tr))
            if cls is transports.SocketTransport:
                ours_buffer.append(tr._buffer)
            tr.close()
            await asyncio.sleep(0)
            b.close()
        return got[0], got[1]

    try:
        ours, theirs = lr.run(main(), timeout=10)
    finally:
        lr.close()
    assert transports._INLINE_INIT == (sys.version_info[:2] == (3, 11))
    assert ours == theirs
    assert type(ours_buffer[0]) is bytearray


def test_accept_out_of_descriptors_is_reported_and_serving_resumes(lr: LoopRunner) -> None:
    """The kernel's own refusal (EMFILE under a lowered RLIMIT_NOFILE): reported, the
    listening socket left alone for a while, then the waiting client is served."""
    import resource

    async def main() -> bytes:
        server = await lr.loop.create_server(_Hello, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        client = socket.socket()
        client.setblocking(False)
        try:
            used = {int(fd) for fd in os.listdir("/proc/self/fd")}
            lowest_free = next(fd for fd in range(len(used) + 1) if fd not in used)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no new descriptor
            try:
                with pytest.raises(BlockingIOError):
                    client.connect(("127.0.0.1", port))
                deadline = time.monotonic() + 5
                while not lr.errors and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            errors = lr.expect_errors()   # aem: one; asyncio tries its whole backlog: 100
            assert errors and all(e["message"] == "socket.accept() out of system resource"
                                  and e["exception"].errno == errno.EMFILE for e in errors), errors
            assert len(errors) == 1 or lr.kind == "asyncio"
            got = b""
            while not got.endswith(b"hello"):   # served after asyncio's retry delay (1 s)
                data = await lr.loop.sock_recv(client, 100)
                if not data:
                    break
                got += data
            return got
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    assert lr.run(main(), timeout=15) == b"hello"
