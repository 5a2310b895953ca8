"""``aem bench http``: AEMhttpd beside asyncio, uvloop, granian and nginx, loaded by wrk.

Cases (each server answers the same thing):

* ``hello keep-alive``: ``GET /hello`` → ``Hello, world!``, 64 keep-alive
  connections, one request in flight on each;
* ``hello pipelined x16``: the same, 16 requests per write (a wrk Lua
  script), so that the server, not the client, is the bottleneck;
* ``static 4KiB keep-alive`` / ``static 4KiB pipelined x16``: ``GET /4k.bin``
  from a directory.

Figures per case and server: requests/s (wrk), **server CPU µs per request**
(utime+stime of the server's process tree from ``/proc``, over the run,
divided by the requests served), and wrk's p50/p99 latency.  Servers run
pinned to CPU 0, wrk to CPU 1; rounds are interleaved (A B C A B C ...)
after a warm-up round; the table shows medians.

The anchors are written here to do the same work as aem's server:

* ``asyncio`` / ``uvloop``: an ``asyncio.Protocol`` with ``httptools``
  (callbacks for the URL and each header, method/version/keep-alive from the
  parser, a ``Date`` header cached per second, one ``transport.write`` per
  response — as uvicorn does); static files are resolved under the root
  with the same traversal check and read with ``os.pread``;
* ``granian``: one worker, RSGI, the same handler (``response_bytes`` /
  ``response_file``);
* ``nginx``: one worker process, ``return 200`` for hello and ``root`` with
  ``sendfile on`` for static files, access log off — the native ceiling;
* ``floor``: a minimal C epoll server (:data:`FLOOR_C`, compiled here) that
  only finds the end of each head and answers from memory with one ``recv``
  and one ``send`` per read — the kernel's share, which no server goes below.

``aem-full`` is AEMhttpd with its native fast path off (every request through
httptools and Python), to show what the fast path changes in the same run.

Run one server by hand: ``python -m aem.bench.http serve KIND PORT ROOT``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

from ._harness import Context, aem_pythonpath, compile_c, pin_to_cpu

HELLO = b"Hello, world!"
HELLO_PATH = "/hello"
STATIC_NAME = "4k.bin"
STATIC_SIZE = 4096
PIPELINE = 16
CONNECTIONS = 64
SERVER_CPU = 0
CLIENT_CPU = 1
ANCHORS = ("asyncio", "uvloop", "granian", "nginx", "floor")


# -- the servers (each runs in its own process) ------------------------------------------------

def serve_aem(port: int, root: str, idle_timeout: float = 15.0, fast_path: bool = True,
              log: str | None = None) -> None:
    """AEMhttpd: the hello app in front of the static files under ``root``.

    ``fast_path=False`` (the ``aem-full`` row): every request through httptools.
    ``log``: a file for the access log (the ``aem-log`` kind: what ``aem serve`` does by
    default), else none.
    """
    import aem.http
    from aem.http import Response, Timeouts

    def app(req: aem.http.Request) -> Response | None:
        if req.target == HELLO_PATH:
            return Response(HELLO)
        return None

    t = Timeouts(idle=idle_timeout, header=max(10.0, idle_timeout))
    if log is None:
        aem.http.serve(app, port=port, root=root, quiet=True, timeouts=t, backlog=65535,
                       fast_path=fast_path)
        return
    with open(log, "w") as f:
        aem.http.serve(app, port=port, root=root, timeouts=t, backlog=65535, fast_path=fast_path,
                       access_log=f)


def _protocol_server(kind: str, port: int, root: str) -> None:
    """An asyncio.Protocol + httptools server doing what aem's does (see the module doc)."""
    import asyncio

    import httptools

    real_root = os.path.realpath(root)
    date = [0, b""]

    def date_line() -> bytes:
        now = int(time.time())
        if now != date[0]:
            date[0] = now
            date[1] = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return date[1]  # type: ignore[return-value]

    def respond(url: bytes) -> tuple[int, bytes, bytes]:
        if url == HELLO_PATH.encode():
            return 200, b"text/plain; charset=utf-8", HELLO
        path = os.path.realpath(os.path.join(real_root, url.decode("latin-1").lstrip("/")))
        if not path.startswith(real_root + "/"):
            return 404, b"text/plain", b"not found\n"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return 404, b"text/plain", b"not found\n"
        try:
            size = os.fstat(fd).st_size
            return 200, b"application/octet-stream", os.pread(fd, size, 0)
        finally:
            os.close(fd)

    class HttpProtocol(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""
            self.headers: list[tuple[bytes, bytes]] = []

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                self.transport.close()

        def on_message_begin(self) -> None:
            self.url = b""
            self.headers = []

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_message_complete(self) -> None:
            p = self.parser
            method = p.get_method()
            p.get_http_version()
            keep = p.should_keep_alive()
            status, ctype, body = respond(self.url)
            head = (b"HTTP/1.1 %d %s\r\nServer: bench\r\n%sContent-Type: %s\r\n"
                    b"Content-Length: %d\r\n") % (
                status, b"OK" if status == 200 else b"Not Found", date_line(), ctype, len(body))
            if not keep:
                head += b"Connection: close\r\n"
            self.transport.write(head + b"\r\n" + (b"" if method == b"HEAD" else body))
            if not keep:
                self.transport.close()

    if kind == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(HttpProtocol, "127.0.0.1", port, backlog=65535, reuse_address=True))
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()


async def rsgi_app(scope: Any, proto: Any) -> None:
    """The granian (RSGI) handler: hello, or a file under ``AEM_BENCH_ROOT``."""
    path = scope.path
    if path == HELLO_PATH:
        proto.response_bytes(200, [("content-type", "text/plain; charset=utf-8")], HELLO)
        return
    root = os.path.realpath(os.environ.get("AEM_BENCH_ROOT", "."))
    real = os.path.realpath(os.path.join(root, path.lstrip("/")))
    if real.startswith(root + "/") and os.path.isfile(real):
        proto.response_file(200, [("content-type", "application/octet-stream")], real)
    else:
        proto.response_bytes(404, [("content-type", "text/plain")], b"not found\n")


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log crit;
worker_rlimit_nofile 1048576;
events {{ worker_connections 65535; multi_accept on; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout {idle}s;
    keepalive_requests 100000000;
    client_header_timeout {idle}s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=65535;
        location = {hello} {{
            default_type "text/plain; charset=utf-8";
            return 200 "Hello, world!";
        }}
        location / {{ root {root}; }}
    }}
}}
"""


#: The raw floor: a minimal C epoll server making the syscalls every server here makes (one
#: recv and one send per read, epoll_wait) and nothing else — no parsing beyond finding the
#: end of each head, responses from memory.  What a server costs above it is its own work.
FLOOR_C = r"""
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static char hello[256], file_head[256], out[1 << 20], carry[65536][32];
static size_t hello_len, head_len, carry_len[65536];
static char body[4096];

int main(int argc, char **argv) {
    FILE *f = fopen(argv[2], "rb");
    if (!f || fread(body, 1, sizeof body, f) != sizeof body) return 2;
    fclose(f);
    hello_len = (size_t)snprintf(hello, sizeof hello, "HTTP/1.1 200 OK\r\nServer: floor\r\n"
        "Date: Thu, 01 Jan 1970 00:00:00 GMT\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Length: 13\r\n\r\nHello, world!");
    head_len = (size_t)snprintf(file_head, sizeof file_head, "HTTP/1.1 200 OK\r\nServer: floor\r\n"
        "Date: Thu, 01 Jan 1970 00:00:00 GMT\r\nContent-Type: application/octet-stream\r\n"
        "Content-Length: 4096\r\n\r\n");
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1])),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 65535)) return 1;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls}, evs[512];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    static char in[65536 + 32];
    for (;;) {
        int n = epoll_wait(ep, evs, 512, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (c >= 65536) { close(c); continue; }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    carry_len[c] = 0;
                    ev.events = EPOLLIN;
                    ev.data.fd = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                }
                continue;
            }
            size_t k = carry_len[fd];
            memcpy(in, carry[fd], k);
            ssize_t r = recv(fd, in + k, 65536, 0);
            if (r <= 0) { close(fd); continue; }
            size_t len = k + (size_t)r, start = 0, o = 0;
            for (size_t j = 3; j < len; j++) {
                if (in[j] == '\n' && in[j - 1] == '\r' && in[j - 2] == '\n' && in[j - 3] == '\r') {
                    if (o + head_len + sizeof body > sizeof out) break;
                    if (memcmp(in + start, "GET /hello ", 11) == 0) {
                        memcpy(out + o, hello, hello_len); o += hello_len;
                    } else {
                        memcpy(out + o, file_head, head_len); o += head_len;
                        memcpy(out + o, body, sizeof body); o += sizeof body;
                    }
                    start = j + 1;
                }
            }
            carry_len[fd] = len - start < 32 ? len - start : 0;
            memcpy(carry[fd], in + start, carry_len[fd]);
            if (o && send(fd, out, o, MSG_NOSIGNAL) < 0) close(fd);
        }
    }
}
"""


def floor_binary(tmp: Path) -> str | None:
    """The raw-floor server, compiled with the C compiler here (None without one)."""
    return compile_c(tmp, "floor-server", FLOOR_C)


def nginx_binary() -> str | None:
    """The nginx executable, or None."""
    found = shutil.which("nginx")
    if found is None and os.path.exists("/usr/sbin/nginx"):
        found = "/usr/sbin/nginx"
    return found


# -- running servers and wrk ---------------------------------------------------------------------

def _pin_server() -> None:
    pin_to_cpu(SERVER_CPU)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 17, 1 << 17))
    except (ValueError, OSError):
        pass
    os.setpgrp()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server process under test: started, waited for, measured, stopped (always)."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log: Any = None
    #: more ports it listens on (its argv says so): :meth:`next_port` takes them in turn
    spare_ports: list[int] = field(default_factory=list)
    _turn: int = 0

    def next_port(self) -> int:
        """The port for the next run: ``port`` and the spare ones in turn.  A server that closes
        each connection leaves a TIME_WAIT behind per request; one load client on one port
        soon picks source ports whose pair with the server's is still in TIME_WAIT there, and
        those connections are slow to open (gunicorn's rate fell from ~2,700 to ~1,100 req/s
        over 7 rounds of 3 s on one port here, stayed at 2,300-2,900 with a port per round).
        Clients of a real server come from many addresses; spare ports keep that artefact
        out of the figures."""
        ports = [self.port, *self.spare_ports]
        port = ports[self._turn % len(ports)]
        self._turn += 1
        return port

    def start(self, tmp: Path) -> None:
        """Start the process and wait until it accepts connections (raises RuntimeError if not)."""
        self.log = open(tmp / f"{self.name.replace(' ', '_')}.log", "wb")
        env = dict(os.environ, **self.env)
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_pin_server)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see its log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(f"GET {HELLO_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer on port {self.port}")

    def pids(self) -> list[int]:
        """The process and its descendants."""
        if self.proc is None:
            return []
        return process_tree(self.proc.pid)

    def cpu_seconds(self) -> float:
        """utime+stime of the process tree so far."""
        return sum(proc_cpu(p) for p in self.pids())

    def stop(self) -> None:
        """Terminate the process group, then kill it; always waits."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
        finally:
            if self.log is not None:
                self.log.close()
            self.proc = None


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime+stime of process ``pid`` in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def make_servers(tmp: Path, root: Path, kinds: Sequence[str],
                 idle_timeout: float = 15.0) -> list[Server]:
    """Server objects (not started) for ``kinds`` among aem, aem-full (no native fast path),
    aem-log (an access log to a file, as ``aem serve`` keeps by default),
    asyncio, uvloop, granian, nginx, select, poll; kinds whose software is missing are left
    out."""
    py = sys.executable
    servers = []
    for kind in kinds:
        port = free_port()
        if kind in ("aem", "aem-full", "aem-log"):
            argv = [py, "-m", "aem.bench.http", "serve", kind, str(port), str(root),
                    str(idle_timeout)]
            if kind == "aem-log":
                argv.append(str(tmp / f"access-{port}.log"))
        elif kind in ("asyncio", "uvloop", "select", "poll"):
            if kind == "uvloop" and not _importable("uvloop"):
                continue
            module = "aem.bench.http" if kind in ("asyncio", "uvloop") else "aem.bench.idle"
            argv = [py, "-m", module, "serve", kind, str(port), str(root)]
        elif kind == "granian":
            exe = shutil.which("granian") or str(Path(py).with_name("granian"))
            if not os.path.exists(exe):
                continue
            argv = [exe, "--interface", "rsgi", "--workers", "1", "--http", "1", "--no-ws",
                    "--host", "127.0.0.1", "--port", str(port), "--backlog", "65535",
                    "--log-level", "warning", "aem.bench.http:rsgi_app"]
        elif kind == "floor":
            floor = floor_binary(tmp)
            if floor is None:
                continue
            argv = [floor, str(port), str(root / STATIC_NAME)]
        elif kind == "nginx":
            nginx = nginx_binary()
            if nginx is None:
                continue
            ntmp = tmp / f"nginx-{port}"
            ntmp.mkdir(parents=True, exist_ok=True)
            conf = ntmp / "nginx.conf"
            conf.write_text(NGINX_CONF.format(tmp=ntmp, port=port, root=root, hello=HELLO_PATH,
                                              idle=int(idle_timeout)))
            argv = [nginx, "-p", str(ntmp), "-c", str(conf)]
        else:
            raise ValueError(f"unknown server kind {kind!r}")
        env = {"AEM_BENCH_ROOT": str(root), "PYTHONPATH": _pythonpath()}
        servers.append(Server(kind, argv, port, env))
    return servers


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _pythonpath() -> str:
    return aem_pythonpath()


@dataclass
class WrkResult:
    """What one wrk run measured."""

    requests: int
    rps: float
    p50_us: float
    p99_us: float
    errors: int


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1e6}


def _lat_us(text: str) -> float:
    """A wrk latency (``"642.00us"``, ``"1.53ms"``) in µs; NaN when absent or 0.

    wrk sometimes prints ``0.00us`` percentiles for pipelined runs (its
    histogram loses the requests of a batch): such a figure is no measurement.
    """
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m or float(m.group(1)) == 0:
        return float("nan")
    return float(m.group(1)) * _UNITS[m.group(2)]


def finite_median(values: Sequence[float]) -> float | None:
    """The median of the values that are numbers (not NaN), or None."""
    ok = [v for v in values if v == v]
    return statistics.median(ok) if ok else None


def wrk_pipeline_script(tmp: Path, path: str, depth: int = PIPELINE) -> Path:
    """A wrk Lua script that sends ``depth`` requests for ``path`` in each write."""
    script = tmp / f"pipeline-{depth}-{path.strip('/').replace('/', '_') or 'root'}.lua"
    script.write_text(
        "init = function(args)\n"
        "  local r = {}\n"
        f"  for i = 1, {depth} do r[i] = wrk.format(nil, \"{path}\") end\n"
        "  req = table.concat(r)\n"
        "end\n"
        "request = function() return req end\n")
    return script


def run_wrk(port: int, path: str, seconds: float, connections: int,
            script: Path | None = None) -> WrkResult:
    """Run wrk (pinned to the client CPU) against ``127.0.0.1:port``; parse its report."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
            "--timeout", "10s"]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}{path}")
    if (os.cpu_count() or 1) > CLIENT_CPU:
        argv = ["taskset", "-c", str(CLIENT_CPU), *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    n_err = int(errs.group(1)) if errs else 0
    if sock:
        n_err += sum(int(g) for g in sock.groups())
    if not m or not rps:
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    return WrkResult(int(m.group(1)), float(rps.group(1)),
                     _lat_us(p50.group(1)) if p50 else float("nan"),
                     _lat_us(p99.group(1)) if p99 else float("nan"), n_err)


def start_servers(ctx: Context, servers: Sequence[Server], tmp: Path) -> list[Server]:
    """Start each server; one that cannot start is noted and left out."""
    started = []
    for s in servers:
        try:
            s.start(tmp)
            started.append(s)
        except (RuntimeError, OSError) as e:
            ctx.note(f"{s.name}: could not start ({e}); left out")
            s.stop()
    return started


def have_wrk() -> bool:
    """True when wrk is installed."""
    return shutil.which("wrk") is not None


def make_root(tmp: Path) -> Path:
    """The static directory: a 4 KiB file."""
    root = tmp / "root"
    root.mkdir(parents=True, exist_ok=True)
    (root / STATIC_NAME).write_bytes(os.urandom(STATIC_SIZE))
    (root / "index.html").write_text("<h1>aem bench</h1>\n")
    return root


# -- the suite ------------------------------------------------------------------------------------

@dataclass
class _Case:
    name: str
    path: str
    pipelined: bool


CASES = (
    _Case("hello keep-alive", HELLO_PATH, False),
    _Case(f"hello pipelined x{PIPELINE}", HELLO_PATH, True),
    _Case("static 4KiB keep-alive", "/" + STATIC_NAME, False),
    _Case(f"static 4KiB pipelined x{PIPELINE}", "/" + STATIC_NAME, True),
)


def run(ctx: Context) -> None:
    """The ``http`` suite (see the module doc)."""
    if not have_wrk():
        ctx.note("wrk is not installed (scripts/install-system-deps.sh): http suite skipped")
        return
    seconds = 1.0 if ctx.quick else 5.0
    rounds, warmup = (1, 0) if ctx.quick else (3, 1)
    cases = [c for c in CASES if not (ctx.quick and c.pipelined and c.path != HELLO_PATH)]
    with tempfile.TemporaryDirectory(prefix="aem-bench-http-") as td:
        tmp = Path(td)
        root = make_root(tmp)
        servers = make_servers(tmp, root, ("aem", "aem-full", *ANCHORS))
        started: list[Server] = []
        try:
            started = start_servers(ctx, servers, tmp)
            missing = [k for k in ANCHORS if k not in {s.name for s in started}]
            if missing:
                ctx.note("anchors not available here: " + ", ".join(missing))
            _measure(ctx, tmp, started, cases, seconds, rounds, warmup)
        finally:
            for s in servers:
                s.stop()
    _plot(ctx)


def _measure(ctx: Context, tmp: Path, servers: list[Server], cases: Sequence[_Case],
             seconds: float, rounds: int, warmup: int) -> None:
    for case in cases:
        script = wrk_pipeline_script(tmp, case.path) if case.pipelined else None
        results: dict[str, list[tuple[WrkResult, float]]] = {s.name: [] for s in servers}
        for r in range(warmup + rounds):
            for s in servers:  # interleaved: A B C ... A B C ...
                ctx.step(f"{case.name}: {s.name}, round {r + 1}/{warmup + rounds}")
                c0 = s.cpu_seconds()
                res = run_wrk(s.port, case.path, seconds, CONNECTIONS, script)
                cpu = s.cpu_seconds() - c0
                if r >= warmup:
                    results[s.name].append((res, cpu))
        for s in servers:
            runs = results[s.name]
            if not runs:
                continue
            variant = "aem" if s.name == "aem" else s.name
            rps = [r.rps for r, _ in runs]
            cpu_us = [cpu * 1e6 / r.requests if r.requests else float("nan") for r, cpu in runs]
            p50 = [r.p50_us for r, _ in runs]
            p99 = [r.p99_us for r, _ in runs]
            errors = sum(r.errors for r, _ in runs)
            note = f"{errors} errors/non-2xx" if errors else ""
            ctx.record(case.name, variant, "req/s", statistics.median(rps), "req/s", "higher", rps,
                       note)
            ctx.record(case.name, variant, "server CPU/req", statistics.median(cpu_us), "µs",
                       "lower", cpu_us)
            for metric, vals in (("p50 latency", p50), ("p99 latency", p99)):
                med = finite_median(vals)
                if med is not None:
                    ctx.record(case.name, variant, metric, med, "µs", "lower",
                               [v for v in vals if v == v])


def _plot(ctx: Context) -> None:
    rows = [r for r in ctx.rows if r.metric in ("req/s", "server CPU/req")]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in rows))
    variants = list(dict.fromkeys(r.variant for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, metric, label in ((axes[0], "req/s", "requests/s (higher is better)"),
                              (axes[1], "server CPU/req",
                               "server CPU µs per request (lower is better)")):
        width = 0.8 / max(1, len(variants))
        for i, v in enumerate(variants):
            vals = []
            for c in cases:
                match = [r.value for r in rows
                         if r.case == c and r.variant == v and r.metric == metric]
                vals.append(match[0] if match else 0.0)
            ax.bar([x + i * width for x in range(len(cases))], vals, width, label=v)
        ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(cases))])
        ax.set_xticklabels(cases, rotation=15, fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("aem bench http (wrk, 1 thread; server on CPU 0, client on CPU 1)", fontsize=11)
    fig.tight_layout()
    fig.savefig(ctx.plot_path("throughput"), dpi=110)
    plt.close(fig)


def main(argv: Sequence[str]) -> int:
    """``python -m aem.bench.http serve KIND PORT ROOT [IDLE_TIMEOUT]``: run one server."""
    if len(argv) >= 4 and argv[0] == "serve":
        kind, port, root = argv[1], int(argv[2]), argv[3]
        if kind in ("aem", "aem-full", "aem-log"):
            serve_aem(port, root, float(argv[4]) if len(argv) > 4 else 15.0, kind != "aem-full",
                      argv[5] if kind == "aem-log" and len(argv) > 5 else None)
        elif kind in ("asyncio", "uvloop"):
            _protocol_server(kind, port, root)
        else:
            print(f"unknown server {kind}", file=sys.stderr)
            return 2
        return 0
    print("usage: python -m aem.bench.http serve KIND PORT ROOT [IDLE_TIMEOUT]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
