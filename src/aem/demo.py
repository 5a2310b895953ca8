"""``aem demo``: events interrupting a busy main thread.

The main thread counts primes, a pure-Python loop that never polls.  Meanwhile
a timer ticks, a forked process writes to a socket, a thread fires a user
event, and SIGINT/SIGTERM are registered as events that stop the demo.  Every
handler runs in the main thread, between two bytecodes of the prime loop.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import aem


def main(duration: float | None = None) -> int:
    """Run the demo; returns the exit status."""
    t0 = time.monotonic()
    state = {"primes": 0, "stop": False}

    def log(what: str) -> None:
        try:
            print(f"[{time.monotonic() - t0:7.3f}s] {what:<52} (primes so far: {state['primes']})",
                  flush=True)
        except BrokenPipeError:  # the reader went away (aem demo | head): stop, quietly
            state["stop"] = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)

    def on_timer(ev: aem.TimerEvent) -> None:
        log(f"timer fired (count={ev.count})")

    def on_data(ev: aem.ReadEvent) -> None:
        if ev.eof:
            log("socket: the writer closed its end")
            aem.unregister(ev.eid)
        else:
            log(f"socket: {bytes(ev.data).decode().strip()!r}")

    def on_user(ev: aem.PayloadEvent) -> None:
        log(f"user event from a thread: {ev.payload!r}")

    def on_signal(ev: aem.SignalEvent) -> None:
        state["stop"] = True
        log(f"signal {signal.Signals(ev.signum).name} from pid {ev.info['pid']}: stopping")

    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the writer: a separate process, feeding the socket now and then
        # Ctrl-C reaches the whole process group: the demo (the parent) handles it and ends
        # this process with SIGTERM, so it ignores SIGINT and dies quietly on SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        ours.close()
        try:
            for i in range(1000):
                time.sleep(0.7)
                theirs.send(f"message {i} from process {os.getpid()}\n".encode())
        except BaseException:  # the parent went away (EPIPE) or anything else: no traceback
            pass
        os._exit(0)
    theirs.close()

    user = aem.UserEvent()
    eids = [
        aem.register(aem.Timer(0.5, interval=1.0), on_timer),
        aem.register(aem.Read(ours), on_data),
        aem.register(user, on_user),
        aem.register(aem.Signal(signal.SIGINT), on_signal),
        aem.register(aem.Signal(signal.SIGTERM), on_signal),
    ]
    aem.register(aem.ChildExit(pid), lambda ev: log(f"writer process {ev.pid} exited ({ev.returncode})"))

    def firer() -> None:
        for i in range(1000):
            time.sleep(1.3)
            try:
                user.fire({"n": i, "thread": threading.current_thread().name})
            except aem.UnknownEventError:
                return

    threading.Thread(target=firer, name="firer", daemon=True).start()
    print("aem demo: the main thread counts primes; events interrupt it. Ctrl-C to stop.", flush=True)
    aem.start()
    try:
        n = 2
        while not state["stop"]:
            if duration is not None and time.monotonic() - t0 > duration:
                log("duration reached: stopping")
                break
            if all(n % d for d in range(2, int(n**0.5) + 1)):
                state["primes"] += 1
            n += 1
    finally:
        aem.stop()
        for eid in eids:
            aem.unregister(eid, missing_ok=True)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        aem.run(timeout=2.0)  # collects the writer's exit, then nothing is left
        ours.close()
    delivered = aem.stats()["delivered"]
    print(f"done: {state['primes']} primes, engine stats: delivered={delivered}", file=sys.stderr)
    return 0
