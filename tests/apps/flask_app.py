"""A Flask app for tests/test_apps_wsgi.py."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

from flask import Flask, Response, request, send_file

app = Flask(__name__)


@app.route("/")
def hello() -> str:
    return "Hello, world!"


@app.route("/echo", methods=["POST"])
def echo() -> bytes:
    return request.get_data()


@app.route("/lines", methods=["POST"])
def lines() -> str:
    stream = request.environ["wsgi.input"]
    return str(sum(1 for _ in iter(stream.readline, b"")))


@app.route("/stream")
def stream() -> Response:
    def gen() -> Iterator[str]:
        for i in range(4):
            yield f"part {i}\n"

    return Response(gen(), mimetype="text/plain")


@app.route("/file")
def file() -> Response:
    return send_file(os.environ["AEM_TEST_FILE"], mimetype="application/octet-stream")


@app.route("/sleep")
def sleep() -> str:
    time.sleep(float(request.args.get("s", "0.1")))
    return "slept"


@app.route("/pid")
def pid() -> str:
    return str(os.getpid())


@app.route("/sleep-pid")
def sleep_pid() -> str:
    time.sleep(0.3)    # long enough for a second request to need the other worker
    return str(os.getpid())


@app.route("/environ")
def environ() -> dict[str, object]:
    e = request.environ
    return {k: e[k] for k in ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING",
                              "SERVER_PROTOCOL", "REMOTE_ADDR", "wsgi.url_scheme", "HTTP_X_TEST")
            if k in e} | {"multiprocess": e["wsgi.multiprocess"]}


@app.route("/boom")
def boom() -> str:
    raise RuntimeError("boom")


@app.route("/exit")
def exit_() -> str:
    sys.stdout.flush()
    os._exit(3)


def exc_info_app(environ, start_response):  # type: ignore[no-untyped-def]
    """Plain WSGI: an error after start_response, reported with exc_info (PEP 3333)."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    try:
        raise ValueError("late failure")
    except ValueError:
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
    return [b"replaced by the error page"]


def write_app(environ, start_response):  # type: ignore[no-untyped-def]
    """Plain WSGI: the legacy write() callable, then an iterable."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written ")
    return [b"and ", b"returned"]


@app.route("/bigstream")
def bigstream() -> Response:
    def gen() -> Iterator[bytes]:
        for _ in range(200):
            yield b"x" * 65536

    return Response(gen(), mimetype="application/octet-stream")
