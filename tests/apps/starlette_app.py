"""A Starlette app for tests/test_apps_asgi.py (the bench uses aem.bench.apps' own)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

MARKS = os.environ.get("AEM_TEST_MARKS", "")


def mark(name: str) -> None:
    if MARKS:
        with open(os.path.join(MARKS, name), "w") as f:
            f.write(str(os.getpid()))


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, str]]:
    if os.environ.get("AEM_TEST_FAIL_STARTUP"):
        raise RuntimeError("startup refused by the test")
    mark("startup")
    yield {"greeting": "from lifespan"}
    mark("shutdown")


async def hello(request: Request) -> Response:
    return PlainTextResponse("Hello, world!")


async def json_(request: Request) -> Response:
    return JSONResponse({"message": "Hello, world!"})


async def echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


async def stream_in(request: Request) -> Response:
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
    return PlainTextResponse(str(total))


async def stream(request: Request) -> Response:
    async def parts() -> AsyncIterator[str]:
        for i in range(5):
            yield f"part {i}\n"
            await asyncio.sleep(0.01)

    return StreamingResponse(parts(), media_type="text/plain")


async def scope_info(request: Request) -> Response:
    s = request.scope
    return JSONResponse({"server": s["server"], "client": s["client"], "scheme": s["scheme"],
                         "root_path": s["root_path"], "path": s["path"],
                         "query": s["query_string"].decode(), "state": request.state.greeting,
                         "http_version": s["http_version"]})


async def pid(request: Request) -> Response:
    return PlainTextResponse(str(os.getpid()))


async def slow(request: Request) -> Response:
    await asyncio.sleep(float(request.query_params.get("s", "0.5")))
    return PlainTextResponse("slow done")


async def boom(request: Request) -> Response:
    raise RuntimeError("boom")


async def ws_echo(ws: WebSocket) -> None:
    await ws.accept(subprotocol=ws.scope["subprotocols"][0] if ws.scope["subprotocols"] else None)
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            mark("ws_disconnect")
            return
        if msg.get("text") == "bye":
            await ws.close(code=1000)
            return
        if msg.get("text") is not None:
            await ws.send_text("echo: " + msg["text"])
        else:
            await ws.send_bytes(msg["bytes"][::-1])


async def ws_reject(ws: WebSocket) -> None:
    await ws.close()


app = Starlette(lifespan=lifespan, routes=[
    Route("/", hello), Route("/json", json_), Route("/echo", echo, methods=["POST"]),
    Route("/count", stream_in, methods=["POST"]), Route("/stream", stream),
    Route("/scope", scope_info), Route("/slow", slow), Route("/boom", boom), Route("/pid", pid),
    WebSocketRoute("/ws", ws_echo), WebSocketRoute("/ws-reject", ws_reject),
])


async def raw(scope, receive, send):  # type: ignore[no-untyped-def]
    """A bare ASGI app: waits for http.disconnect after the body (tests http.disconnect)."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    msg = await receive()
    assert msg["type"] == "http.request"
    if scope["path"] == "/wait-disconnect":
        msg = await receive()
        mark(msg["type"])
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": b"he", "more_body": True})
    await send({"type": "http.response.body", "body": b"llo"})
