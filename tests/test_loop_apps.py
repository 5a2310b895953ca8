"""Real programs on aem.EventLoop: uvicorn serving an ASGI app, aiohttp's server and client."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

import aem

uvicorn = pytest.importorskip("uvicorn")
aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402


def _run(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=aem.new_event_loop) as r:
        return r.run(asyncio.wait_for(coro, 30))


async def _http_get(port: int, path: str = "/") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


async def hello_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    body = f"hello from {type(asyncio.get_running_loop()).__name__}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def test_uvicorn_serves_an_asgi_app_on_the_aem_loop() -> None:
    async def main() -> list[bytes]:
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(hello_asgi, loop="none", lifespan="off", log_level="warning")
        server = uvicorn.Server(config)
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        replies = [await _http_get(port) for _ in range(3)]
        server.should_exit = True
        await task
        sock.close()
        return replies

    for reply in _run(main()):
        assert reply.startswith(b"HTTP/1.1 200")
        assert reply.endswith(b"hello from EventLoop")


def test_aiohttp_server_and_client_on_the_aem_loop() -> None:
    async def handler(request: Any) -> Any:
        if request.method == "POST":
            return web.json_response({"echo": await request.json()})
        return web.Response(text=f"aiohttp on {type(asyncio.get_running_loop()).__name__}")

    async def main() -> tuple[str, Any]:
        app = web.Application()
        app.router.add_get("/", handler)
        app.router.add_post("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        site = web.SockSite(runner, sock)
        await site.start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/") as resp:
                    text = await resp.text()
                async with session.post(f"http://127.0.0.1:{port}/", json={"a": [1, 2]}) as resp:
                    js = await resp.json()
        finally:
            await runner.cleanup()
        return text, js

    text, js = _run(main())
    assert text == "aiohttp on EventLoop"
    assert js == {"echo": {"a": [1, 2]}}
