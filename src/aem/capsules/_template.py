"""What runs in the template (zygote) process: forking capsules, reaping, reporting exits."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from .. import _core
from ._child import capsule_main, child_signals
from ._handoff import flush_stdio, recv, send

# ---- the template process -----------------------------------------------------------------------


def template_main(ctl: socket.socket, table: dict[int, Callable[[Any], object]],
                  keep_fds: tuple[int, ...], sources: dict[int, Any] | None = None) -> NoReturn:
    """The zygote: forks capsules on request, reaps everything below it, reports exits.

    ``keep_fds``: the application's fds capsules keep (the engine's UserEvent
    channel, so that handlers in capsules can fire the application's events)."""
    code = 0
    try:
        # No parent-death signal here: when the application ends, the control socket reaches
        # end of file and the template ends its capsules (SIGTERM, then SIGKILL) before it goes.
        _core.set_child_subreaper(True)
        child_signals()
        # Let go of every file the application had open (listening sockets, files ...),
        # keeping the numbers taken by /dev/null so that a Python object of the
        # application that closes "its" fd later cannot close one of ours.
        keep = {0, 1, 2, ctl.fileno(), *keep_fds}
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        keep.add(devnull)
        for fd in open_fds():
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.dup2(devnull, fd, inheritable=False)
        from .. import engine as _engine_mod

        eng = _engine_mod.current()
        template_pid = os.getpid()
        children: set[int] = set()
        state = {"exit": False, "retiring": False}

        def tell(msg: tuple[Any, ...]) -> None:
            """Report to the application; if it is gone (closed its end), end quietly."""
            try:
                send(ctl, msg)
            except OSError:
                state["exit"] = True
                eng.stop()

        def reap(ev: object = None) -> None:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return
                if pid in children:
                    children.discard(pid)
                    tell(("exited", pid, os.waitstatus_to_exitcode(status)))
                    if state["retiring"] and not children:
                        state["exit"] = True
                        eng.stop()

        def command(ev: object) -> None:
            try:
                msg = recv(ctl, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the application is gone
                msg = None
            if msg is None:
                state["exit"] = True
                eng.stop()
                return
            (op, *args), fds = msg
            if op == "spawn":
                (token,) = args
                if state["retiring"]:
                    for fd in fds:
                        os.close(fd)
                    tell(("spawn_failed", token, 0, "template retired"))
                    return
                flush_stdio()
                try:
                    pid = os.fork()
                except OSError as e:
                    for fd in fds:
                        os.close(fd)
                    tell(("spawn_failed", token, e.errno, str(e)))
                    return
                if pid == 0:
                    # a capsule dies with its template (which is single-threaded)
                    _core.set_parent_death_signal(signal.SIGKILL)
                    if os.getppid() != template_pid:
                        os._exit(1)
                    chan = socket.socket(fileno=fds[0])
                    ctl.close()
                    capsule_main(chan, table, rehearse=True, channel_fds=keep_fds, sources=sources)
                for fd in fds:
                    os.close(fd)
                children.add(pid)
                tell(("spawned", token, pid))
            elif op == "kill":
                pid, sig = args
                if pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            elif op == "deny_fork":
                _core._deny_process_creation(args[0])
                tell(("denied",))
            elif op == "retire":  # no new capsules; end once the running ones have
                state["retiring"] = True
                if not children:
                    state["exit"] = True
                    eng.stop()
            elif op == "exit":
                state["exit"] = True
                eng.stop()

        ctl.setblocking(True)  # reports to the parent always go out; reads use MSG_DONTWAIT

        def fatal(exc: BaseException, ev: object) -> None:
            # The template cannot go on after a failed command (its socket would stay
            # readable and spin it): say why and end; the pool starts another.
            traceback.print_exception(exc)
            state["exit"] = True
            eng.stop()

        eng.set_error_handler(fatal)
        eng.register(engine_mod_signal(signal.SIGCHLD), reap)
        eng.register(engine_mod_readable(ctl), command)
        gc.freeze()  # pages shared with the capsules stay shared
        while not state["exit"]:
            _core.Engine.run(eng, None, False)  # the C loop: no SIGTERM/SIGINT handling of run()
        # end of the template: end the capsules (gently, then not), reap everything
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        while children and time.monotonic() < deadline:
            reap()
            time.sleep(0.01)
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)


def engine_mod_signal(signum: int) -> Any:
    from ..sources import Signal

    return Signal(signum)


def engine_mod_readable(sock: socket.socket) -> Any:
    from ..sources import Readable

    return Readable(sock)


def open_fds() -> list[int]:
    try:
        return [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # pragma: no cover
        return list(range(3, 1024))

