"""AEMhttpd: aem's single-threaded HTTP/1.1 server (``aem serve``).

General layout:

* ``aem.http.protocol``  HTTP/1.1 without I/O: bytes in, requests out; limits; response heads
* ``aem.http.static``    files under a root: traversal-safe resolution, ranges, conditionals
* ``aem.http.status``    the ``/_aem/status`` page (HTML and JSON)
* ``aem.http.app``       the dynamic handler interface: ``app(request) -> Response``
* ``aem.http.server``    the server on aem events (Accept, Read, Writable, Timer)

Every public name is re-exported here.  :func:`serve` is the one-call way in::

    import aem.http
    aem.http.serve("public", port=8080)              # static files
    aem.http.serve(lambda req: aem.http.Response("hi"), port=8080)
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .app import App as App
from .app import Response as Response
from .protocol import Headers as Headers
from .protocol import HttpError as HttpError
from .protocol import Limits as Limits
from .protocol import Request as Request
from .protocol import RequestParser as RequestParser
from .server import HTTPServer as HTTPServer
from .server import Timeouts as Timeouts
from .static import StaticFiles as StaticFiles

__all__ = ["App", "HTTPServer", "Headers", "HttpError", "Limits", "Request", "RequestParser",
           "Response", "StaticFiles", "Timeouts", "serve"]


def serve(app_or_root: App | str | os.PathLike[str] | None = None, host: str = "127.0.0.1",
          port: int = 8080, *, root: str | os.PathLike[str] | None = None, quiet: bool = False,
          **options: Any) -> str:
    """Serve until SIGINT/SIGTERM (or ``aem.stop()``); return why it ended.

    ``app_or_root``: an app (a callable, see :mod:`aem.http.app`) or the
    directory of static files.  ``root``: static files behind an app.
    ``quiet``: no access log (otherwise one line per request on stdout).
    Other keywords go to :class:`HTTPServer` (``limits``, ``timeouts``,
    ``engine``, ``sock``, ``reuse_port`` ...).  Raises ``OSError`` if the
    address cannot be bound.
    """
    if callable(app_or_root):
        app: App | None = app_or_root
    else:
        app = None
        if app_or_root is not None:
            if root is not None:
                raise TypeError("give the root once: serve(root) or serve(app, root=...)")
            root = app_or_root
    options.setdefault("access_log", None if quiet else sys.stdout)
    server = HTTPServer(app, root=root, host=host, port=port, **options)
    server.start()
    print(f"aem serve: {server.url} (pid {os.getpid()})", file=sys.stderr, flush=True)
    try:
        return server.run()
    finally:
        server.close()
