"""Running ``aem serve module:app`` for the apps tests: a server process, a client, raw requests."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import AEM_PATH

APPS = Path(__file__).parent / "apps"


class Served:
    """A running ``aem serve`` process: its port, its logs."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, err: Path, out: Path) -> None:
        self.proc = proc
        self.port = port
        self.err = err
        self.out = out

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def get(self, path: str, headers: dict[str, str] | None = None,
            method: str = "GET", body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(tmp: Path, app: str, *args: str, env: dict[str, str] | None = None,
          wait: str = r"on http://127\.0\.0\.1:(\d+)/|on unix:", port: int = 0) -> Iterator[Served]:
    """Start ``aem serve app *args`` in ``tests/apps``; stop it (SIGTERM, then SIGKILL) at the end."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([AEM_PATH, str(APPS)])
    e.update(env or {})
    err, out = tmp / f"stderr-{time.monotonic_ns()}", tmp / f"stdout-{time.monotonic_ns()}"
    with open(err, "wb") as ferr, open(out, "wb") as fout:
        proc = subprocess.Popen([sys.executable, "-m", "aem.cli", "serve", app, "--port", str(port),
                                 *args], cwd=APPS, env=e, stdout=fout, stderr=ferr)
    try:
        deadline = time.monotonic() + 30
        found = 0
        while time.monotonic() < deadline:
            m = re.search(wait, err.read_text(errors="replace"))
            if m:
                found = int(m.group(1)) if m.groups() and m.group(1) else port
                break
            if proc.poll() is not None:
                raise AssertionError(f"aem serve exited ({proc.returncode}):\n{err.read_text()}")
            time.sleep(0.02)
        else:
            raise AssertionError(f"aem serve did not start:\n{err.read_text()}")
        yield Served(proc, found, err, out)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def raw(port: int, data: bytes, timeout: float = 5.0, until_close: bool = True) -> bytes:
    """Send ``data`` on a new connection; what comes back until the server closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
                if not until_close:
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)


def abstract_sockets(pid: int, prefix: str) -> list[str]:
    """The abstract Unix socket names (``\\0...``) starting with ``prefix`` that ``pid`` listens on
    (its accepted connections carry the same name: only the listening one counts)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    names = []
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            listening = int(parts[3], 16) & 0x10000 if len(parts) >= 8 else 0   # __SO_ACCEPTCON
            if listening and parts[6] in inodes and parts[7].startswith("@" + prefix):
                names.append("\0" + parts[7][1:])
    return names


def connect_as(address: str, uid: int | None, wait: float = 5.0) -> tuple[str, int]:
    """Connect to the SEQPACKET socket ``address`` from a process of user ``uid`` (None: this
    one's; a forked child that drops to ``uid``) and read one message: (its text, the number
    of descriptors it carried); ``("", 0)`` when the other side closed, ``("timeout", 0)`` when
    nothing came within ``wait`` seconds."""
    import json

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 1
        try:
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
                c.settimeout(wait)
                c.connect(address)
                try:
                    msg, fds, _, _ = socket.recv_fds(c, 64, 1)
                    for fd in fds:
                        os.close(fd)
                    got = [msg.decode("latin-1"), len(fds)]
                except TimeoutError:
                    got = ["timeout", 0]
            os.write(w, json.dumps(got).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            data = f.read()
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the client process failed"
    msg, nfds = json.loads(data)
    return msg, nfds
