"""``aem serve module:app``: run an ASGI, WSGI or aem app (the uvicorn/gunicorn/granian convention).

* ``asgi``: :class:`aem.http.asgi.ASGIServer` on :class:`aem.EventLoop`;
  ``workers > 1``: one such server per ``EVF_CAPSULE | EVF_KEEPALIVE``
  capsule, sharing the port (``SO_REUSEPORT``).
* ``wsgi``: the same front in this process, the app called in ``workers``
  capsules (:mod:`aem.http.wsgi`).
* ``aem``: the app is ``app(request) -> Response`` (:mod:`aem.http.app`),
  served by :class:`aem.http.HTTPServer`.

``--reload`` runs the server in a child process and starts a new one when a
``.py`` file under the app's directory changes (inotify, through
:class:`aem.FileChange`).  SIGTERM/SIGINT: graceful shutdown — stop
accepting, let requests in progress finish within ``graceful_timeout``, then
close the connections; lifespan shutdown last.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import aem

from .asgi import ASGIServer, LifespanFailed, listen_unix
from .protocol import Limits, Request
from .static import StaticFiles
from .workers import same_user, shut_down_jobs
from .wsgi import WSGIWorkers, load_app

__all__ = ["AppConfig", "detect_interface", "serve_app"]

INTERFACES = ("asgi", "wsgi", "aem")


@dataclass
class AppConfig:
    """The options of ``aem serve module:app`` (see ``aem serve --help``)."""

    app: str
    interface: str = "auto"
    workers: int = 1
    root: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    uds: str | None = None
    reload: bool = False
    reload_dirs: list[str] = field(default_factory=list)
    log_level: str = "info"
    access_log: bool = True
    graceful_timeout: float = 30.0
    limit_concurrency: int | None = None
    timeout_keep_alive: float = 5.0
    timeout: float = 30.0
    root_path: str = ""
    lifespan: str = "auto"
    status: bool = False
    max_body: int = 1 << 20
    burst: int | None = None
    burst_after: float = 0.02
    ws_ping_interval: float | None = 20.0
    ws_ping_timeout: float | None = 20.0

    def check(self) -> None:
        """Raise ``ValueError`` for an option out of range."""
        if self.interface not in ("auto", *INTERFACES):
            raise ValueError(f"--interface is one of auto, {', '.join(INTERFACES)}")
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if self.graceful_timeout < 0:
            raise ValueError("--graceful-timeout must be >= 0")
        if self.timeout <= 0 or self.timeout_keep_alive <= 0:
            raise ValueError("--timeout and --timeout-keep-alive must be > 0")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError("--limit-concurrency must be >= 1")
        if self.root is not None and not os.path.isdir(self.root):
            raise ValueError(f"--root {self.root!r} is not a directory")
        if self.burst is not None and self.burst < 0:
            raise ValueError("--burst must be >= 0")
        if not self.burst_after > 0:
            raise ValueError("--burst-after must be > 0")
        if self.max_body < 0:
            raise ValueError("--max-body must be >= 0")
        for name, v in (("--ws-ping-interval", self.ws_ping_interval),
                        ("--ws-ping-timeout", self.ws_ping_timeout)):
            if v is not None and not 0 < v < float("inf"):
                raise ValueError(f"{name} must be > 0 (0: none)")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError("--log-level is one of critical, error, warning, info, debug, trace")


def detect_interface(app: Any) -> str:
    """``"asgi"`` (a coroutine function of scope, receive, send), ``"wsgi"`` (environ,
    start_response) or ``"aem"`` (request); raises ``ValueError`` when it cannot tell."""
    if not callable(app):
        raise ValueError(f"the app is not callable ({type(app).__name__})")
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else type(app).__call__
    if inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(app):
        return "asgi"
    try:
        sig = inspect.signature(app)
    except (TypeError, ValueError):
        raise ValueError("cannot tell the app's interface: give --interface") from None
    params = [p for p in sig.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if len(params) == 2:
        return "wsgi"
    if len(params) == 1:
        return "aem"
    if len(params) == 3:
        return "asgi"   # e.g. an ASGI app wrapped by a decorator that hides the coroutine
    raise ValueError("cannot tell the app's interface: give --interface")


def _log(cfg: AppConfig, text: str) -> None:
    if cfg.log_level not in ("critical", "error"):
        print(f"aem serve: {text}", file=sys.stderr, flush=True)


def serve_app(cfg: AppConfig) -> int:
    """Serve ``cfg.app`` until SIGTERM/SIGINT; the exit status (0, or 1 if it could not start)."""
    cfg.check()
    if cfg.reload:
        return _reloader(cfg)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        app = load_app(cfg.app)
        interface = detect_interface(app) if cfg.interface == "auto" else cfg.interface
    except (ImportError, ValueError) as e:
        print(f"aem serve: cannot load {cfg.app!r}: {e}", file=sys.stderr)
        return 1
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.INFO)
                        if cfg.log_level != "trace" else logging.DEBUG)
    if interface == "aem":
        from . import serve as serve_aem

        if cfg.uds is not None:
            print("aem serve: --uds is for asgi and wsgi apps", file=sys.stderr)
            return 1
        reason = serve_aem(app, host=cfg.host, port=cfg.port, root=cfg.root,
                           quiet=not cfg.access_log, status_page=cfg.status)
        _log(cfg, f"stopped ({reason})")
        return 0
    if interface == "asgi" and cfg.workers > 1:
        return _asgi_workers(cfg, app)
    target = app if interface == "asgi" else WSGIWorkers(
        cfg.app, cfg.workers, cfg.timeout, burst=cfg.burst, burst_after=cfg.burst_after)
    runner = asyncio.Runner(loop_factory=aem.new_event_loop)
    try:
        return runner.run(_serve_one(cfg, target, interface))
    finally:
        runner.close()


def _file_test(root: str) -> Any:
    """``is_file(raw_path)``: whether a request path names a regular file under ``root``."""
    base = os.path.realpath(root)

    def is_file(raw_path: bytes) -> bool:
        rel = unquote(raw_path.decode("latin-1")).lstrip("/")
        return bool(rel) and os.path.isfile(os.path.join(base, rel))

    return is_file


async def _not_found(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI app behind the static files of a WSGI front (never reached for other paths)."""
    if scope["type"] != "http":
        return      # a WebSocket: refused (403)
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": b"404 Not Found\n"})


def _static(app: Any, root: str) -> Any:
    """An ASGI app answering GET/HEAD for the files under ``root``, else calling ``app``."""
    files = StaticFiles(root)
    is_file = _file_test(root)

    async def with_static(scope: Any, receive: Any, send: Any) -> None:
        # files only (no directory listings, no redirects): everything else is the app's
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and is_file(scope["raw_path"]):
            req = Request(scope["method"], scope["raw_path"].decode("latin-1"), scope["http_version"],
                          list(scope["headers"]))
            sr = files.respond(scope["method"], req.path, req.headers, "", time.time())
            if sr.status != 404:
                headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in sr.headers]
                headers.append((b"content-length", b"%d" % sr.length))
                await send({"type": "http.response.start", "status": sr.status, "headers": headers})
                if sr.fd >= 0:
                    with os.fdopen(sr.fd, "rb") as f:
                        sr.fd = -1
                        await send({"type": "http.response.zerocopysend", "file": f,
                                    "offset": sr.offset, "count": sr.length})
                else:
                    await send({"type": "http.response.body", "body": sr.body})
                return
        await app(scope, receive, send)

    return with_static


def _server(cfg: AppConfig, app: Any, interface: str, reuse_port: bool = False,
            sock: socket.socket | None = None) -> ASGIServer:
    direct: Any = None
    pool: WSGIWorkers | None = None
    if isinstance(app, WSGIWorkers):
        # the front hands requests to the workers itself (no ASGI messages in between); the
        # static files beside the app, if any, take the ASGI path
        pool = app
        direct = pool.direct
        app = _not_found
        if cfg.root is not None:
            is_file = _file_test(cfg.root)
            wsgi = pool.direct

            def direct(conn: Any, req: Request, body: Any) -> Any:
                if req.method in ("GET", "HEAD") and is_file(req.path.encode("latin-1")):
                    return None
                return wsgi(conn, req, body)

    if cfg.root is not None:
        app = _static(app, cfg.root)
    return ASGIServer(app, direct=direct, host=cfg.host, port=cfg.port, uds=cfg.uds, sock=sock,
                      reuse_port=reuse_port,
                      root_path=cfg.root_path,
                      limits=Limits(max_body=cfg.max_body, max_buffered=max(64 << 20, 4 * cfg.max_body)),
                      timeout_keep_alive=cfg.timeout_keep_alive,
                      limit_concurrency=cfg.limit_concurrency,
                      lifespan=cfg.lifespan if interface == "asgi" else "off",
                      access_log=sys.stdout if cfg.access_log else None,
                      status_page=cfg.status, pool=pool,
                      ws_ping_interval=cfg.ws_ping_interval, ws_ping_timeout=cfg.ws_ping_timeout)


async def _serve_one(cfg: AppConfig, app: Any, interface: str, reuse_port: bool = False,
                     quiet: bool = False, sock: socket.socket | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def on_signal(sig: int) -> None:
        if not stop.done():
            stop.set_result(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    workers = app if isinstance(app, WSGIWorkers) else None
    try:
        if workers is not None:
            # what the front holds now (the app imported, aem) lives as long as the process:
            # out of the collector's sight, a full collection in the front does not walk it
            # (~14 ms for a Flask app, seen as a stall of every request); the template and the
            # workers forked from it inherit that (and their pages are not written by it)
            gc.collect()
            gc.freeze()
            await workers.start()
        server = _server(cfg, app, interface, reuse_port, sock)
        try:
            await server.start()
        except LifespanFailed as e:
            print(f"aem serve: the app's startup failed: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            where = cfg.uds or f"{cfg.host}:{cfg.port}"
            print(f"aem serve: cannot listen on {where}: {e.strerror or e}", file=sys.stderr)
            return 1
        if not quiet:
            where = f"unix:{cfg.uds}" if cfg.uds else f"http://{cfg.host}:{server.port}/"
            extra = f" with {cfg.workers} WSGI workers" if workers is not None else ""
            _log(cfg, f"{interface} app {cfg.app} on {where}{extra} (pid {os.getpid()})")
        sig = await stop
        _log(cfg, f"{signal.Signals(sig).name}: finishing requests in progress "
                  f"(up to {cfg.graceful_timeout:g} s)")
        await server.shutdown(cfg.graceful_timeout)
        return 0
    finally:
        if workers is not None:
            await workers.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _asgi_worker(ev: Any) -> None:
    """One ASGI worker in its capsule: its own loop and server on the shared port, or on the
    supervisor's Unix socket (``--uds``), whose descriptor it asks the supervisor for."""
    cfg, ready, handout = ev.payload
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    app = load_app(cfg.app)
    sock = _take_listener(handout) if handout else None
    ready.fire(os.getpid())
    runner = asyncio.Runner(loop_factory=aem.new_event_loop)
    try:
        runner.run(_serve_one(cfg, app, "asgi", reuse_port=True, quiet=True, sock=sock))
    finally:
        runner.close()
    os._exit(0)


def _take_listener(handout: str) -> socket.socket:
    """The listening socket the supervisor hands out at ``handout`` (SCM_RIGHTS)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(handout)
        _, fds, _, _ = socket.recv_fds(s, 16, 1)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise RuntimeError("aem serve: the supervisor handed out no listening socket")
    return socket.socket(fileno=fds[0])


def _uds_listener(cfg: AppConfig) -> tuple[socket.socket, socket.socket, str]:
    """``--uds`` with several ASGI workers: the Unix socket, listened on here (the workers
    share it: a path has no SO_REUSEPORT), and a handout socket whose every connection gets
    its descriptor (capsules start without the application's files)."""
    assert cfg.uds is not None
    listener = listen_unix(cfg.uds)
    handout = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        address = f"\0aem-uds-{os.getpid()}-{id(listener):x}"
        handout.bind(address)
        handout.listen(64)
    except BaseException:
        listener.close()
        handout.close()
        raise
    return listener, handout, address


def _asgi_workers(cfg: AppConfig, app: Any) -> int:
    """``--workers N`` for an ASGI app: N servers in capsules on one port (SO_REUSEPORT), or
    on one Unix socket (``--uds``) listened on here and handed to each."""
    uds: tuple[socket.socket, socket.socket, str] | None = None
    try:
        if cfg.uds is not None:
            uds = _uds_listener(cfg)
        else:
            with socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                probe.bind((cfg.host, cfg.port))
    except OSError as e:
        where = cfg.uds or f"{cfg.host}:{cfg.port}"
        print(f"aem serve: cannot listen on {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        return _supervise_asgi_workers(cfg, uds)
    finally:
        if uds is not None:
            listener, handout, _ = uds
            handout.close()
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(cfg.uds or "")


def _supervise_asgi_workers(cfg: AppConfig, uds: tuple[socket.socket, socket.socket, str] | None) -> int:
    """Start the workers, replace those that end, stop them all on SIGTERM/SIGINT.  ``uds``:
    the Unix socket listened on here, the handout socket, its address (see :func:`_uds_listener`)."""
    handout_eid = 0
    address = ""
    if uds is not None:
        listener, handout, address = uds
        lfd = listener.fileno()

        def hand_out(ev: Any) -> None:
            with ev.conn as conn:
                with contextlib.suppress(OSError):  # a worker that went away meanwhile
                    if same_user(conn):
                        socket.send_fds(conn, [b"L"], [lfd])

        handout_eid = aem.register(aem.Accept(handout), hand_out)
    pool = aem.CapsulePool(size=cfg.workers, reserve=0)
    flags = aem.EVF_CAPSULE | aem.EVF_KEEPALIVE
    pids: set[int] = set()
    ready = aem.UserEvent()
    stopping = [False]

    def on_ready(ev: Any) -> None:
        pids.add(ev.payload)
        if stopping[0]:  # it became ready after the stop was asked: it stops too
            try:
                os.kill(ev.payload, signal.SIGTERM)
            except ProcessLookupError:
                pids.discard(ev.payload)

    aem.register(ready, on_ready)
    jobs: list[tuple[aem.UserEvent, int]] = []
    for _ in range(cfg.workers):
        start = aem.UserEvent()
        eid = aem.register(start, _asgi_worker, flags=flags, pool=pool)

        def replace(ev: Any, start: aem.UserEvent = start) -> None:
            pids.discard(ev.pid)
            if stopping[0]:
                if not pids:
                    aem.stop()
                return
            _log(cfg, f"worker {ev.pid} ended ({ev.returncode}); starting another")
            start.fire((cfg, ready, address))

        aem.register(aem.ChildExit(job=eid), replace)
        jobs.append((start, eid))
    for start, _ in jobs:
        start.fire((cfg, ready, address))
    where = f"unix:{cfg.uds}" if cfg.uds else f"http://{cfg.host}:{cfg.port}/"
    _log(cfg, f"asgi app {cfg.app} on {where} with {cfg.workers} workers (pid {os.getpid()})")

    def on_signal(ev: Any) -> None:
        if stopping[0]:
            return
        stopping[0] = True
        _log(cfg, f"stopping {len(pids)} workers (up to {cfg.graceful_timeout:g} s)")
        for pid in list(pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pids.discard(pid)
        if not pids:
            aem.stop()
        aem.register(aem.Timer(cfg.graceful_timeout + 2.0), lambda ev: aem.stop())

    for sig in (signal.SIGTERM, signal.SIGINT):
        aem.register(aem.Signal(sig), on_signal)
    try:
        aem.current().run(None, until_idle=False)
    finally:
        shut_down_jobs(eid for _, eid in jobs)
        pool.close(timeout=2.0)
        if handout_eid:
            aem.unregister(handout_eid)
    _log(cfg, "stopped")
    return 0


# ---- --reload -------------------------------------------------------------------------------


def _child_argv(argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "aem.cli", *[a for a in argv if a != "--reload"]]


def _reloader(cfg: AppConfig) -> int:
    """Run the server in a child; restart it when a ``.py`` file under the watched dirs changes."""
    argv = _child_argv(sys.argv[1:])
    dirs = cfg.reload_dirs or [os.getcwd()]
    changed = [False]

    def on_change(ev: Any) -> None:
        name = ev.name or ""
        if name.endswith(".py"):
            changed[0] = True
            aem.stop()

    watches = []
    for d in dirs:
        for path, subdirs, _files in os.walk(d):
            subdirs[:] = [s for s in subdirs if not s.startswith(".") and s != "__pycache__"]
            watches.append(aem.register(aem.FileChange(path), on_change))
    stop = [False]

    def on_signal(ev: Any) -> None:
        stop[0] = True
        aem.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        aem.register(aem.Signal(sig), on_signal)
    _log(cfg, f"reloading on changes under {', '.join(dirs)}")
    while True:
        child = subprocess.Popen(argv)
        changed[0] = False
        while not stop[0] and not changed[0] and child.poll() is None:
            aem.current().run(0.2, until_idle=False)
        if changed[0] and not stop[0]:
            _log(cfg, "a source file changed: restarting")
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(cfg.graceful_timeout + 5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        if stop[0] or not changed[0]:
            return 0 if stop[0] else (child.returncode or 0)
        time.sleep(0.1)
