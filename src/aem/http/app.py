"""The dynamic handler interface of AEMhttpd: ``app(request) -> Response | None``.

An *app* is any callable taking one :class:`~aem.http.protocol.Request` and
returning what to answer::

    from aem.http import Response, serve

    def app(request):
        if request.path == "/hello":
            return Response("Hello, world!")
        if request.method == "POST" and request.path == "/echo":
            return Response(request.body, content_type="application/octet-stream")
        return None                      # not mine: static files under root, or 404

    serve(app, root="public", port=8080)

* It runs in the server's one thread, between events: it must not block
  (no sleeping, no slow disk or network calls).  Work that blocks belongs in
  another process (an ``EVF_CAPSULE`` handler) or another server.
* The request is complete when the app sees it: ``request.body`` holds the
  whole body (bounded by ``Limits.max_body``).
* It returns a :class:`Response`; ``bytes`` or ``str`` are shorthand for a
  200 ``text/plain`` response; ``None`` passes the request on to the static
  files (if the server has a root) or to a 404.
* For ``HEAD`` the app is called as for ``GET``; the server sends the head
  of its response, with the ``Content-Length`` the body would have.
* An exception in the app gives a 500 to the client and a traceback on the
  server's error log; the server goes on.
* ``Content-Length``, ``Date``, ``Server`` and ``Connection`` are the
  server's: the app does not set them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .protocol import Request

__all__ = ["App", "Response"]


class Response:
    """What an app answers: ``body``, ``status`` and header fields.

    ``body`` is ``bytes`` or ``str`` (encoded as UTF-8); ``headers`` is a
    mapping or an iterable of ``(name, value)`` pairs (repeat a name by
    giving it twice); ``content_type`` is added as ``Content-Type`` unless
    ``headers`` has one (None: no ``Content-Type``).  Raises ``ValueError``
    for a status outside 100..599 and ``TypeError`` for a body of another type.

    >>> Response("created", status=201, headers={"Location": "/items/7"})  # doctest: +SKIP
    """

    __slots__ = ("body", "headers", "status")

    def __init__(self, body: bytes | str = b"", status: int = 200,
                 headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                 content_type: str | None = "text/plain; charset=utf-8") -> None:
        if type(body) is not bytes:
            if isinstance(body, str):
                body = body.encode("utf-8")
            elif isinstance(body, bytes):
                body = bytes(body)
            else:
                raise TypeError(f"a Response body is bytes or str, not {type(body).__name__}")
        if status != 200 and not 100 <= status <= 599:
            raise ValueError(f"status {status} is not an HTTP status code")
        self.body: bytes = body
        self.status = status
        if headers is None:
            #: The header fields, ``(name, value)`` pairs in order (a list the app may extend).
            self.headers: list[tuple[str, str]] = (
                [("Content-Type", content_type)] if content_type is not None else [])
            return
        fields: list[tuple[str, str]]
        if isinstance(headers, Mapping):
            fields = [(str(k), str(v)) for k, v in headers.items()]
        else:
            fields = [(str(k), str(v)) for k, v in headers]
        if content_type is not None and not any(k.lower() == "content-type" for k, _ in fields):
            fields.insert(0, ("Content-Type", content_type))
        self.headers = fields

    @classmethod
    def json(cls, data: Any, status: int = 200,
             headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None) -> Response:
        """A JSON response (``application/json``) of ``data``.

        Raises ``TypeError`` if ``data`` does not serialize.
        """
        return cls(json.dumps(data, separators=(",", ":")).encode(), status, headers,
                   "application/json")

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self.body)} bytes>"


#: The type of a dynamic handler.
App = Callable[[Request], "Response | bytes | str | None"]
