"""Bare ASGI and WSGI apps that read request bodies in pieces (tests/test_apps_body.py).

Each leaves marks (files named after what it saw) in ``$AEM_TEST_MARKS``, so a
test can tell what the app got and when.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

MARKS = os.environ.get("AEM_TEST_MARKS", "")


def mark(name: str, text: str = "") -> None:
    if MARKS:   # written whole, then renamed: a test never reads half a mark
        path = os.path.join(MARKS, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


async def _answer(send: Callable[[dict[str, Any]], Any], text: str, status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": text.encode()})


async def asgi(scope: dict[str, Any], receive: Callable[[], Any],
               send: Callable[[dict[str, Any]], Any]) -> None:
    """``/count``: read the body, answer ``total messages``; ``/stall``: read one message and
    wait for the disconnect; ``/late-read?s=S``: sleep S s, then read; ``/no-read``: answer
    without reading."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/no-read":
        await _answer(send, "not read")
        return
    if path == "/late-read":
        await asyncio.sleep(float(scope["query_string"].decode().partition("=")[2] or "0.3"))
        mark("late-read-receive")
    total = messages = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            mark("disconnect", str(total))
            return
        total += len(msg["body"])
        messages += 1
        if messages == 1:
            mark("first", str(total))
            if path == "/stall":
                await asyncio.sleep(2.5)    # holds the body unread; then to the disconnect
                while (msg := await receive())["type"] == "http.request":
                    pass
                mark("stall-end", msg["type"])
                return
        if not msg.get("more_body", False):
            break
    await _answer(send, f"{total} {messages}")


async def stream_count(request: Request) -> Response:
    """Starlette: the body through ``request.stream()``; ``total chunks``."""
    total = chunks = 0
    async for chunk in request.stream():
        if chunk:
            chunks += 1
            total += len(chunk)
            if chunks == 1:
                mark("starlette-first", str(total))
    return PlainTextResponse(f"{total} {chunks}")


starlette = Starlette(routes=[Route("/count", stream_count, methods=["POST"])])


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """``/count``: read ``wsgi.input`` in 64 KiB reads; ``total reads``.  ``/no-read``:
    answer without reading it."""
    if environ["PATH_INFO"] == "/no-read":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "8")])
        return [b"not read"]
    stream = environ["wsgi.input"]
    total = reads = 0
    try:
        while data := stream.read(65536):
            total += len(data)
            reads += 1
            if reads == 1:
                mark("wsgi-first", str(total))
    except OSError as e:
        mark("wsgi-disconnect", f"{type(e).__name__} {total}")
        raise
    body = f"{total} {reads}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
