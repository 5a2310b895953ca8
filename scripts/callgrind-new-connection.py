#!/usr/bin/env python3
"""User-space instructions a loop spends per new server connection, by callgrind.

    .venv/bin/python scripts/callgrind-new-connection.py [aem asyncio uvloop]

For each loop: a server (under ``valgrind --tool=callgrind``) whose protocol
answers one request and closes, and a client in another process (not
measured) that opens connections one at a time, sends a request and reads
until the server closes.  Run once with 200 and once with 1,200 connections;
the difference divided by 1,000 is the cost of one connection (accept,
transport and protocol set-up, one read, one write, close), without the
start-up.  Instruction counts do not drift with the machine's load, so two
runs of one loop agree within a few hundred instructions.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEW, MANY = 200, 1200

SERVER = """
import asyncio, sys
kind, n, port, ready = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok"
done = 0

class Answer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.transport.write(ANSWER)
        self.transport.close()
    def connection_lost(self, exc):
        global done
        done += 1
        if done >= n:
            loop.stop()

if kind == "aem":
    import aem
    loop = aem.new_event_loop()
elif kind == "uvloop":
    import uvloop
    loop = uvloop.new_event_loop()
else:
    loop = asyncio.new_event_loop()
server = loop.run_until_complete(loop.create_server(Answer, "127.0.0.1", port))
open(ready, "w").close()
loop.run_forever()
server.close()
"""


def _client(port: int, n: int, ready: Path, deadline: float) -> None:
    while not ready.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            while s.recv(4096):
                pass


def _instructions(kind: str, n: int, tmp: Path) -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ready = tmp / f"ready-{kind}-{n}"
    script = tmp / "server.py"
    script.write_text(SERVER)
    out = tmp / f"callgrind.{kind}.{n}"
    server = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                               sys.executable, str(script), kind, str(n), str(port), str(ready)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _client(port, n, ready, time.monotonic() + 120)
        _, err = server.communicate(timeout=300)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    found = re.search(r"Collected : ([\d,]+)", err)
    if server.returncode != 0 or found is None:
        raise SystemExit(f"{kind}: the server under callgrind failed:\n{err[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    kinds = sys.argv[1:] or ["aem", "asyncio", "uvloop"]
    with tempfile.TemporaryDirectory(prefix="aem-callgrind-") as td:
        for kind in kinds:
            few = _instructions(kind, FEW, Path(td))
            many = _instructions(kind, MANY, Path(td))
            print(f"{kind:8s} {(many - few) // (MANY - FEW):>9,} instructions per connection", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
