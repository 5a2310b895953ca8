"""An aem-interface app (``app(request) -> Response``) for tests/test_apps_asgi.py."""

from __future__ import annotations

from aem.http import Request, Response


def app(request: Request) -> Response | None:
    if request.path == "/":
        return Response("aem app")
    return None
