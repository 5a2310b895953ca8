"""``aem bench asyncio``: asyncio programs on aem.EventLoop beside asyncio's own loop and uvloop.

Every case runs the same code on the three loops, in interleaved rounds
(A B C A B C ...), and reports the median:

* ``call_soon``: one million callbacks scheduled then run (batch), and a
  chain of callbacks each scheduling the next (one loop turn per callback);
  callbacks per second, scheduling and running included.
* ``call_later``: one million timers registered in a fresh process per
  measurement: registrations/s and RSS growth per timer (handles kept, as a
  program keeps them to cancel them).
* TCP echo, through streams (``start_server``, ``read``/``write``/``drain``)
  and through a ``Protocol`` (``data_received`` -> ``transport.write``), with
  1 KiB and 64 KiB messages: the server runs in its own process pinned to CPU
  0, a blocking client pinned to CPU 1 sends one message and reads it back,
  over and over.  Messages/s and the server's CPU µs per message.  Two floors
  beside the loops: a bare C epoll echo server (:data:`ECHO_FLOOR_C`, compiled
  here: the same system calls per message as every loop, nothing else) and a
  plain Python one (``select.epoll``, ``socket.recv``/``send``: the interpreter's
  share of the floor).
* uvicorn's plaintext hello (httptools parser) on each loop, loaded by wrk.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._harness import Context, aem_pythonpath, compile_c, interleave, json_from_child, pin_to_cpu
from ._plot import bars

LOOPS = ("asyncio", "uvloop", "aem")
#: The echo's floors (anchors beside the loops): a bare C epoll server, a plain Python epoll one.
FLOORS = ("floor (C epoll)", "floor (Python epoll)")
SERVER_CPU = 0
CLIENT_CPU = 1


def new_loop(kind: str) -> Any:
    """A new event loop of ``kind`` (``asyncio``, ``uvloop`` or ``aem``)."""
    import asyncio

    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    if kind == "aem":
        import aem

        return aem.new_event_loop()
    return asyncio.SelectorEventLoop()


def _available() -> list[str]:
    import importlib.util

    return [k for k in LOOPS if k != "uvloop" or importlib.util.find_spec("uvloop") is not None]


def _variant(kind: str) -> str:
    return "aem.EventLoop" if kind == "aem" else kind


# -- call_soon ------------------------------------------------------------------------------------


def call_soon_batch(kind: str, n: int) -> float:
    """Callbacks/s: n call_soon() then run them all."""
    loop = new_loop(kind)
    count = [0]

    def cb() -> None:
        count[0] += 1

    call_soon = loop.call_soon
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(n):
        call_soon(cb)
    call_soon(loop.stop)
    loop.run_forever()
    dt = time.perf_counter() - t0
    loop.close()
    assert count[0] == n
    return n / dt


def call_soon_chain(kind: str, n: int) -> float:
    """Callbacks/s: each callback schedules the next (one loop turn per callback)."""
    loop = new_loop(kind)
    left = [n]

    def cb() -> None:
        left[0] -= 1
        if left[0]:
            loop.call_soon(cb)
        else:
            loop.stop()

    gc.collect()
    t0 = time.perf_counter()
    loop.call_soon(cb)
    loop.run_forever()
    dt = time.perf_counter() - t0
    loop.close()
    return n / dt


# -- call_later: 1M timers ------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timers_child(kind: str, n: int) -> None:
    """In a fresh process: register n timers, print seconds and RSS growth as JSON."""
    loop = new_loop(kind)

    def noop() -> None:
        pass

    call_later = loop.call_later
    gc.collect()
    before = _rss()
    t0 = time.perf_counter()
    handles = [call_later(3600.0 + (i & 1023), noop) for i in range(n)]
    dt = time.perf_counter() - t0
    gc.collect()
    grown = _rss() - before
    assert len(handles) == n
    print(json.dumps({"seconds": dt, "bytes": grown}))


# -- TCP echo servers ---------------------------------------------------------------------------------


def echo_server(kind: str, mode: str, port: int) -> None:
    """Serve TCP echo on 127.0.0.1:port with ``mode`` streams or protocol, until killed."""
    import asyncio

    loop = new_loop(kind)
    asyncio.set_event_loop(loop)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(262144):
            writer.write(data)
            await writer.drain()
        writer.close()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    sock = socket.create_server(("127.0.0.1", port), backlog=128)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "streams":
        loop.run_until_complete(asyncio.start_server(handle, sock=sock))
    else:
        loop.run_until_complete(loop.create_server(Echo, sock=sock))
    print("ready", flush=True)
    loop.run_forever()


#: The raw floor of the echo: level-triggered epoll, one recv into a 256 KiB buffer and one send
#: per message, as every loop here does (strace/perf: 1 epoll_wait, 1 recv, 1 send per message).
ECHO_FLOOR_C = r"""
#define _GNU_SOURCE
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static char buf[262144];

int main(int argc, char **argv) {
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1])),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (argc < 2 || bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 128)) return 1;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls}, evs[64];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, evs, 64, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                if (c < 0) continue;
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                ev.events = EPOLLIN;
                ev.data.fd = c;
                epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                continue;
            }
            ssize_t r = recv(fd, buf, sizeof buf, 0);
            if (r <= 0) {
                close(fd);
                continue;
            }
            for (ssize_t o = 0; o < r;) {  /* loopback takes it at once unless the peer stops reading */
                ssize_t w = send(fd, buf + o, (size_t)(r - o), MSG_NOSIGNAL);
                if (w > 0) {
                    o += w;
                    continue;
                }
                struct pollfd p = {.fd = fd, .events = POLLOUT};
                if (w < 0 && poll(&p, 1, 1000) <= 0) break;
            }
        }
    }
}
"""


def echo_floor_binary(tmp: Path) -> str | None:
    """The C echo floor, compiled with the C compiler here (None without one)."""
    return compile_c(tmp, "echo-floor", ECHO_FLOOR_C)


def echo_server_python_epoll(port: int) -> None:
    """The plain Python floor of the echo: select.epoll and socket methods, no event loop."""
    import select

    ls = socket.create_server(("127.0.0.1", port), backlog=128)
    ls.setblocking(False)
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        for fd, _ in ep.poll():
            if fd == ls.fileno():
                c, _ = ls.accept()
                c.setblocking(False)
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[c.fileno()] = c
                ep.register(c.fileno(), select.EPOLLIN)
                continue
            c = conns[fd]
            data = c.recv(262144)
            if not data:
                ep.unregister(fd)
                del conns[fd]
                c.close()
                continue
            c.setblocking(True)  # loopback takes it at once unless the peer stops reading
            c.sendall(data)
            c.setblocking(False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid``, all its threads: the scheduler's own count
    (/proc/PID/task/*/schedstat, ns), not /proc/PID/stat's 10 ms ticks, which read 0 for a
    server as light as the C floor over a short round."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):  # no schedstat in this kernel: the ticks
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Child:
    """A server process (pinned to SERVER_CPU) started from ``code``; always stopped."""

    def __init__(self, code: str | list[str], tmp: Path, name: str) -> None:
        self.log = open(tmp / f"{name}.log", "wb")
        env = dict(os.environ, PYTHONPATH=aem_pythonpath())
        argv = [sys.executable, "-c", code] if isinstance(code, str) else code
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log,
                                     env=env, preexec_fn=lambda: pin_to_cpu(SERVER_CPU))

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"server did not start (exit {self.proc.poll()}); see {self.log.name}")

    def cpu(self) -> float:
        return _proc_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


def echo_client(port: int, size: int, seconds: float) -> tuple[int, float]:
    """Ping-pong ``size``-byte messages for ``seconds``: (messages, elapsed)."""
    msg = os.urandom(size)
    buf = bytearray(max(size, 65536))
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        n = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            s.sendall(msg)
            got = 0
            while got < size:
                k = s.recv_into(view[got:size])
                if not k:
                    raise RuntimeError("the echo server closed the connection")
                got += k
            n += 1
            if n & 15 == 0 and time.perf_counter() >= end:
                break
        return n, time.perf_counter() - t0


# -- uvicorn --------------------------------------------------------------------------------------


async def hello_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The plaintext hello ASGI app."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")]})
    await send({"type": "http.response.body", "body": b"Hello, world!"})


def uvicorn_server(kind: str, port: int) -> None:
    """uvicorn serving :func:`hello_app` on a ``kind`` loop, until killed."""
    import asyncio

    import uvicorn

    config = uvicorn.Config(hello_app, host="127.0.0.1", port=port, loop="none", http="httptools",
                            lifespan="off", log_level="error", access_log=False)
    server = uvicorn.Server(config)
    loop = new_loop(kind)
    asyncio.set_event_loop(loop)

    async def main() -> None:
        task = asyncio.ensure_future(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await task

    loop.run_until_complete(main())


# -- the suite ------------------------------------------------------------------------------------------


def run(ctx: Context) -> None:
    """Every case, the three loops side by side."""
    kinds = _available()
    rounds = 1 if ctx.quick else 3
    _bench_call_soon(ctx, kinds, rounds)
    _bench_timers(ctx, kinds, rounds)
    with tempfile.TemporaryDirectory() as tmp:
        _bench_echo(ctx, kinds, 1 if ctx.quick else 13, Path(tmp))  # more, shorter rounds: a sturdier median
        _bench_uvicorn(ctx, kinds, rounds, Path(tmp))
    ctx.note("ratios within this run; asyncio = asyncio.SelectorEventLoop (epoll)")


def _bench_call_soon(ctx: Context, kinds: list[str], rounds: int) -> None:
    n = 50_000 if ctx.quick else 1_000_000
    for case, fn in (("call_soon, batch of %s", call_soon_batch), ("call_soon chain of %s", call_soon_chain)):
        res = interleave({k: functools.partial(fn, k, n) for k in kinds}, rounds=rounds,
                         warmup=0 if ctx.quick else 1)
        label = case % f"{n:,}"
        for k, samples in res.items():
            ctx.record(label, _variant(k), "callbacks/s", sorted(samples)[len(samples) // 2], "1/s", "higher",
                       samples)


def _bench_timers(ctx: Context, kinds: list[str], rounds: int) -> None:
    n = 50_000 if ctx.quick else 1_000_000
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}

    def one(k: str) -> float:
        r = json_from_child(f"from aem.bench.asyncio import timers_child; timers_child({k!r}, {n})", 600)
        results[k].append(r)
        return r["seconds"]

    interleave({k: functools.partial(one, k) for k in kinds}, rounds=rounds, warmup=0)
    case = f"call_later, {n:,} timers"
    rates, mem = {}, {}
    for k, rs in results.items():
        rate = sorted(n / r["seconds"] for r in rs)[len(rs) // 2]
        per = sorted(r["bytes"] / n for r in rs)[len(rs) // 2]
        rates[_variant(k)], mem[_variant(k)] = rate, per
        ctx.record(case, _variant(k), "registrations/s", rate, "1/s", "higher",
                   [n / r["seconds"] for r in rs])
        ctx.record(case, _variant(k), "memory per timer", per, "B", "lower", [r["bytes"] / n for r in rs])
    bars(ctx.plot_path("timers-rate"), f"call_later registrations/s, {n:,} timers (higher is better)",
         list(rates), list(rates.values()), "registrations/s")
    bars(ctx.plot_path("timers-memory"), f"memory per timer, {n:,} timers (lower is better)",
         list(mem), list(mem.values()), "bytes (RSS growth)")


def _echo_case(ctx: Context, kinds: list[str], rounds: int, tmp: Path, mode: str, size: int,
               seconds: float) -> None:
    servers: dict[str, tuple[_Child, int]] = {}
    floor = echo_floor_binary(tmp)
    kinds = [*kinds, *FLOORS] if floor is not None else [*kinds, FLOORS[1]]
    cpu: dict[str, list[float]] = {k: [] for k in kinds}

    def one(k: str) -> float:
        child, port = servers[k]
        c0 = child.cpu()
        msgs, dt = echo_client(port, size, seconds)
        cpu[k].append((child.cpu() - c0) / msgs * 1e6)
        return msgs / dt

    try:
        for k in kinds:
            port = _free_port()
            code: str | list[str]
            if k == FLOORS[0] and floor is not None:
                code = [floor, str(port)]
            elif k == FLOORS[1]:
                code = f"from aem.bench.asyncio import echo_server_python_epoll as s; s({port})"
            else:
                code = f"from aem.bench.asyncio import echo_server; echo_server({k!r}, {mode!r}, {port})"
            child = _Child(code, tmp, f"echo-{k.split()[0]}-{mode}")
            servers[k] = (child, port)
            child.wait_ready()
        warmup = 0 if ctx.quick else 1
        res = interleave({k: functools.partial(one, k) for k in kinds}, rounds=rounds, warmup=warmup)
    finally:
        for child, _ in servers.values():
            child.stop()
    case = f"TCP echo, {mode}, {size // 1024} KiB"
    for k, samples in res.items():
        ctx.record(case, _variant(k), "messages/s", sorted(samples)[len(samples) // 2], "1/s", "higher",
                   samples)
        cs = cpu[k][-len(samples):]
        ctx.record(case, _variant(k), "server CPU per message", sorted(cs)[len(cs) // 2], "µs", "lower", cs)


def _bench_echo(ctx: Context, kinds: list[str], rounds: int, tmp: Path) -> None:
    seconds = 0.3 if ctx.quick else 1.0
    pin_to_cpu(CLIENT_CPU)
    try:
        for mode in ("streams", "protocol"):
            for size in (1024, 65536):
                _echo_case(ctx, kinds, rounds, tmp, mode, size, seconds)
    finally:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    ctx.note("echo: server pinned to CPU 0, one blocking client on CPU 1, one message in flight; "
             "floors: a bare C epoll echo server and a plain Python select.epoll one (same syscalls)")


def _bench_uvicorn(ctx: Context, kinds: list[str], rounds: int, tmp: Path) -> None:
    import importlib.util

    from .http import have_wrk, run_wrk

    if importlib.util.find_spec("uvicorn") is None or not have_wrk():
        ctx.note("uvicorn hello: skipped (needs uvicorn and wrk)")
        return
    seconds = 1.0 if ctx.quick else 5.0
    servers: dict[str, tuple[_Child, int]] = {}
    try:
        for k in kinds:
            port = _free_port()
            child = _Child(f"from aem.bench.asyncio import uvicorn_server; uvicorn_server({k!r}, {port})",
                           tmp, f"uvicorn-{k}")
            servers[k] = (child, port)
            child.wait_ready()
        cpu: dict[str, list[float]] = {k: [] for k in kinds}

        def one(k: str) -> float:
            child, port = servers[k]
            c0 = child.cpu()
            r = run_wrk(port, "/", seconds, 32)
            if r.errors:
                raise RuntimeError(f"uvicorn on {k}: {r.errors} errors under wrk")
            cpu[k].append((child.cpu() - c0) / max(r.requests, 1) * 1e6)
            return r.rps

        res = interleave({k: functools.partial(one, k) for k in kinds}, rounds=rounds, warmup=0)
    finally:
        for child, _ in servers.values():
            child.stop()
    case = "uvicorn plaintext hello (httptools), wrk -c32"
    for k, samples in res.items():
        ctx.record(case, _variant(k), "requests/s", sorted(samples)[len(samples) // 2], "1/s", "higher",
                   samples)
        cs = cpu[k]
        ctx.record(case, _variant(k), "server CPU per request", sorted(cs)[len(cs) // 2], "µs", "lower", cs)


