"""Run one test body on asyncio's loop and on aem's (as uvloop's tests do with
UVTestCase/AIOTestCase); any call of the loop's exception handler the test did
not expect fails it."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

import aem

FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.SelectorEventLoop,
    "aem": aem.new_event_loop,
}


class LoopRunner:
    """A fresh loop of one kind; ``run(coro)`` runs a coroutine in it.

    Every call of the exception handler is recorded in ``errors``; the test
    fails at teardown if some were left that it did not ``expect_errors()``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.loop = FACTORIES[kind]()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.errors.append(ctx))

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 20) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def expect_errors(self, n: int | None = None) -> list[dict[str, Any]]:
        """Take the exception handler's calls so far (exactly ``n`` if given)."""
        errors, self.errors = self.errors, []
        if n is not None:
            assert len(errors) == n, errors
        return errors

    def close(self) -> None:
        loop = self.loop
        if loop.is_closed():
            return
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
        gc.collect()


@pytest.fixture(params=list(FACTORIES))
def lr(request: pytest.FixtureRequest) -> Iterator[LoopRunner]:
    runner = LoopRunner(request.param)
    try:
        yield runner
    finally:
        runner.close()
    assert not runner.errors, f"unexpected calls of the exception handler: {runner.errors}"
