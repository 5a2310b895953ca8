"""ASGI WebSockets (``websocket.*``) on an :mod:`aem.http.asgi` connection, framed by ``wsproto``.

The HTTP parser hands over the upgrade request; from then on the
connection's bytes go to a :class:`wsproto.WSConnection` (handshake
validation, framing, masking, fragmentation, ping/pong and the closing
handshake are wsproto's).  An accepted connection is pinged every
``ws_ping_interval`` seconds (the server's); a peer whose pong does not come
within ``ws_ping_timeout`` is gone: the connection is closed (1011) and the
app gets ``websocket.disconnect``.
"""

from __future__ import annotations

import asyncio
import traceback
from typing import TYPE_CHECKING, Any

from .protocol import Request

if TYPE_CHECKING:
    from .asgi import Message, _HttpProtocol

__all__ = ["WebSocketSession"]


class WebSocketSession:
    """One WebSocket connection running one ASGI app call."""

    def __init__(self, conn: _HttpProtocol, req: Request) -> None:
        from wsproto import ConnectionType, WSConnection

        from .asgi import make_scope

        self.conn = conn
        self.req = req
        self.ws = WSConnection(ConnectionType.SERVER)
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.accepted = False
        self.closed = False          # our close sent, or the connection gone
        self.handshake_ok = False
        self.parts: list[Any] = []
        self.loop = conn.loop
        self.ping_payload = b""      # the ping whose pong is awaited (b"": none)
        self.pings = 0
        self.keepalive: asyncio.TimerHandle | None = None
        srv = conn.server
        srv.stats.active += 1
        head = [f"{req.method} {req.target} HTTP/1.1\r\n".encode("latin-1")]
        for name, value in req.raw_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"\r\n")
        self.ws.receive_data(b"".join(head))
        self._pump()
        scope = make_scope(conn, req, "websocket")
        scope["subprotocols"] = [p.strip() for p in (req.headers.get("sec-websocket-protocol") or "")
                                 .split(",") if p.strip()]
        self.task: asyncio.Task[None] | None = self.loop.create_task(self._run(scope))

    async def _run(self, scope: dict[str, Any]) -> None:
        srv = self.conn.server
        try:
            await srv.app(scope, self.receive, self.send)
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError):
                srv.stats.app_errors += 1
                srv.log_error(f"aem serve: exception in the websocket app for {self.req.target}:\n"
                              + traceback.format_exc())
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            srv.stats.active -= 1
            self.task = None
            if not self.conn.closed:
                if not self.accepted:
                    self._reject(500 if not self.closed else 403)
                elif not self.closed:
                    self._close(1011, "")
                self.conn.transport.close()

    # -- bytes from the client ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            self.ws.receive_data(data)
        except Exception:
            self.conn.transport.close()
            return
        self._pump()

    def connection_lost(self) -> None:
        self._stop_keepalive()
        if not self.closed:
            self.closed = True
            self.inbox.put_nowait({"type": "websocket.disconnect", "code": 1006})
        elif self.inbox.empty():
            self.inbox.put_nowait({"type": "websocket.disconnect", "code": 1006})

    def _pump(self) -> None:
        from wsproto.events import (
            BytesMessage,
            CloseConnection,
            Ping,
            Pong,
            TextMessage,
        )
        from wsproto.events import Request as WSRequest

        for event in self.ws.events():
            if isinstance(event, WSRequest):
                self.handshake_ok = True
                self.inbox.put_nowait({"type": "websocket.connect"})
            elif isinstance(event, (TextMessage, BytesMessage)):
                self.parts.append(event.data)
                if event.message_finished:
                    if isinstance(event, TextMessage):
                        msg: Message = {"type": "websocket.receive", "text": "".join(self.parts)}
                    else:
                        msg = {"type": "websocket.receive", "bytes": b"".join(self.parts)}
                    self.parts = []
                    self.inbox.put_nowait(msg)
            elif isinstance(event, Ping):
                self._write(event.response())
            elif isinstance(event, Pong):
                if self.ping_payload and bytes(event.payload) == self.ping_payload:
                    self.ping_payload = b""
                    self._keepalive_after(self.conn.server.ws_ping_interval)
            elif isinstance(event, CloseConnection):
                if not self.closed:
                    self.closed = True
                    self._write(event.response())
                self.inbox.put_nowait({"type": "websocket.disconnect", "code": event.code,
                                       "reason": event.reason or ""})
                self.conn.transport.close()

    def _write(self, event: Any) -> None:
        if self.conn.closed:
            return
        try:
            data = self.ws.send(event)
        except Exception:
            return
        if data:
            self.conn.transport.write(data)

    # -- the app's receive/send --------------------------------------------------------------

    async def receive(self) -> Message:
        if not self.handshake_ok and self.inbox.empty():
            return {"type": "websocket.disconnect", "code": 1006}
        return await self.inbox.get()

    async def send(self, message: Message) -> None:
        from wsproto.events import AcceptConnection
        from wsproto.events import Message as WSMessage

        kind = message["type"]
        if kind == "websocket.accept":
            if self.accepted or self.closed:
                raise RuntimeError("websocket.accept after the handshake ended")
            self.accepted = True
            extra = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
            self._write(AcceptConnection(subprotocol=message.get("subprotocol"), extra_headers=extra))
            self._keepalive_after(self.conn.server.ws_ping_interval)
            return
        if kind == "websocket.send":
            if not self.accepted:
                raise RuntimeError("websocket.send before websocket.accept")
            if self.closed:
                return
            data = message.get("bytes")
            if data is None:
                data = message.get("text", "")
            self._write(WSMessage(data=data))
            await self.conn.drain()
            return
        if kind == "websocket.close":
            if not self.accepted:
                self.closed = True
                self._reject(403)
                self.conn.transport.close()
                return
            if not self.closed:
                self._close(int(message.get("code", 1000) or 1000), message.get("reason") or "")
            return
        raise RuntimeError(f"unexpected ASGI message {kind!r} in a websocket scope")

    def _close(self, code: int, reason: str) -> None:
        from wsproto.events import CloseConnection

        self.closed = True
        self._stop_keepalive()
        self._write(CloseConnection(code=code, reason=reason))

    # -- keepalive: a ping every ws_ping_interval, its pong within ws_ping_timeout -------------

    def _keepalive_after(self, delay: float | None) -> None:
        self._stop_keepalive()
        if delay is not None and not self.closed and not self.conn.closed:
            self.keepalive = self.loop.call_later(delay, self._ping)

    def _stop_keepalive(self) -> None:
        if self.keepalive is not None:
            self.keepalive.cancel()
            self.keepalive = None

    def _ping(self) -> None:
        from wsproto.events import Ping

        self.keepalive = None
        if self.closed or self.conn.closed:
            return
        self.pings += 1
        self.ping_payload = b"aem-%d" % self.pings
        self._write(Ping(payload=self.ping_payload))
        timeout = self.conn.server.ws_ping_timeout
        if timeout is not None:
            self.keepalive = self.loop.call_later(timeout, self._pong_missed)

    def _pong_missed(self) -> None:
        """The peer did not answer the ping in time: it is gone (as a dropped network would
        leave it), so the connection closes without waiting for a closing handshake."""
        self.keepalive = None
        if self.closed or self.conn.closed:
            return
        self._close(1011, "keepalive ping timeout")
        self.inbox.put_nowait({"type": "websocket.disconnect", "code": 1011})
        self.conn.transport.close()

    def _reject(self, status: int) -> None:
        if self.conn.closed:
            return
        from wsproto.events import RejectConnection

        if self.handshake_ok:
            self._write(RejectConnection(status_code=status, headers=[(b"content-length", b"0")],
                                         has_body=False))
        else:
            self.conn.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                      b"Connection: close\r\n\r\n")
        self.conn.server.stats.responses[status // 100] += 1

    def shutdown(self) -> None:
        """Server shutdown: close with 1012 (service restart)."""
        if self.accepted and not self.closed:
            self._close(1012, "server shutting down")
            self.inbox.put_nowait({"type": "websocket.disconnect", "code": 1012})
        elif not self.accepted and self.task is not None:
            self.task.cancel()
