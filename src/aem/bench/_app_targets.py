"""The apps ``aem bench apps`` serves with every server (same code for aem and its anchors).

* ``asgi_app`` (Starlette): ``/hello`` → ``Hello, world!``; ``/json`` → a small JSON object.
* ``wsgi_app`` (Flask): ``/hello`` → ``Hello, world!``; ``/slow`` sleeps 100 ms first.
"""

from __future__ import annotations

import time

from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route


async def _hello(request: Request) -> Response:
    return PlainTextResponse("Hello, world!")


async def _json(request: Request) -> Response:
    return JSONResponse({"message": "Hello, world!", "items": [1, 2, 3]})


asgi_app = Starlette(routes=[Route("/hello", _hello), Route("/json", _json)])

wsgi_app = Flask(__name__)


@wsgi_app.route("/hello")
def _wsgi_hello() -> str:
    return "Hello, world!"


@wsgi_app.route("/slow")
def _wsgi_slow() -> str:
    time.sleep(0.1)
    return "slow"
