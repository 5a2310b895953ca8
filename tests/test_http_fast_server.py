"""test_http_server's over-the-wire tests again, with the native fast path on.

The server of test_http_server keeps an access log, which turns the fast path
off; here the same server runs without one (the fast path and its read hook
in the engine then answer the simple requests), and every test of that module
but the access-log one runs against it: keep-alive, pipelining, timeouts,
slow and non-reading clients, resets, 2,000 connections ...
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_http_server as base
from test_http_server import *  # noqa: F403  (the tests, run here against this module's server)

del test_access_log  # noqa: F821  (no access log: the fast path is on)

SCRIPT = base.SERVER_SCRIPT.replace("access_log=sys.stdout,", "access_log=None,")
assert SCRIPT != base.SERVER_SCRIPT


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[base.Server]:
    """test_http_server's server fixture, started with SCRIPT."""
    saved = base.SERVER_SCRIPT
    base.SERVER_SCRIPT = SCRIPT
    try:
        gen = base.server.__wrapped__(tmp_path_factory)  # type: ignore[attr-defined]
        srv = next(gen)
    finally:
        base.SERVER_SCRIPT = saved
    try:
        yield srv
    finally:
        gen.close()
