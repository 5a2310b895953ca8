"""Engine behaviour AEMhttpd relies on: accept() out of descriptors must not spin."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import AEM_PATH

EMFILE_SCRIPT = textwrap.dedent("""
    import os, resource, socket
    import aem

    eng = aem.Engine()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    reports = []
    eng.set_error_handler(lambda exc, ev: reports.append(exc))
    accepted = []
    eng.register(aem.Accept(ls), lambda ev: accepted.append(ev.conn))
    client = socket.create_connection(ls.getsockname())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    hog = []
    try:
        while True:
            hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    eng.run(timeout=0.2)
    print(len(reports), len(accepted))
""")


def test_accept_emfile_does_not_spin() -> None:
    """With the fd table full, an Accept registration must not turn the loop into a busy spin.

    Today (pyengine.c, deliver_accept): accept4() fails with EMFILE, the error is
    reported and the connection left in the backlog; the listening socket stays
    readable, so the next epoll_wait returns at once and the same error is reported
    again — ~250,000 reports per second on this machine.  Expected: a bounded number
    of reports (e.g. the registration paused for a moment, as nginx does for 500 ms,
    or libuv's spare-descriptor trick that accepts and closes the connection).
    AEMhttpd pauses its Accept registration itself for 0.25 s on such an error.
    """
    env = dict(os.environ, PYTHONPATH=AEM_PATH)
    out = subprocess.run([sys.executable, "-c", EMFILE_SCRIPT], capture_output=True, text=True,
                         timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    reports, _ = map(int, out.stdout.split())
    assert reports < 100, f"{reports} EMFILE reports in 0.2 s"
