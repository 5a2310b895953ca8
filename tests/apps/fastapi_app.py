"""A FastAPI app for tests/test_apps_asgi.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

app = FastAPI()


class Item(BaseModel):
    name: str
    price: float


@app.get("/items/{item_id}")
async def read_item(item_id: int, q: str | None = None) -> dict[str, object]:
    return {"item_id": item_id, "q": q}


@app.post("/items")
async def create_item(item: Item) -> dict[str, object]:
    return {"name": item.name, "price_with_tax": round(item.price * 1.2, 2)}


@app.get("/numbers")
async def numbers() -> StreamingResponse:
    async def gen() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"{i}\n".encode()

    return StreamingResponse(gen(), media_type="text/plain")


@app.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            data = await websocket.receive_json()
            await websocket.send_json({"got": data})
    except WebSocketDisconnect:
        pass
