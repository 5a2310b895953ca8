"""``CapsulePool`` as a ``concurrent.futures.Executor`` (parent side).

``submit(fn, *args)`` hands the call to a *worker*: a capsule taken from the pool
that, unlike an event's capsule, stays alive and takes the next call (as a
``ProcessPoolExecutor`` worker does).  At most ``size`` capsules are workers.
A call travels pickled (``fn`` by reference, like ``ProcessPoolExecutor``); its
result or exception comes back on the worker's socket, read by the pool's
manager thread, which completes the future.  A worker that dies fails only the
future of the call it was running; the pool replaces it.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import functools
import itertools
import math
import os
import pickle
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._core import AemError, call_recv, wait_readable
from ._child import run_chunk
from ._handoff import MAX_INLINE, PICKLE, decode, send, signal_name

if TYPE_CHECKING:
    from ._pool import Capsule


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a capsule (set as the exception's ``__cause__``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


@dataclass(slots=True)
class Call:
    future: cf.Future[Any]
    blob: bytes
    started: bool = False  # set_running_or_notify_cancel() done
    worker: Capsule | None = None  # the worker it was sent to


class CallFuture(cf.Future[Any]):
    """A call's future: a thread that waits for it reads the worker's answer itself (no
    hand-off through the pool's manager thread on the way back)."""

    def __init__(self, pool: ExecutorPart) -> None:
        super().__init__()
        self._pool: ExecutorPart | None = pool
        self._call: Call | None = None

    def result(self, timeout: float | None = None) -> Any:
        pool, call = self._pool, self._call
        if pool is not None and call is not None and self._state not in _DONE:
            pool._await_call(call, timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        pool, call = self._pool, self._call
        if pool is not None and call is not None and self._state not in _DONE:
            pool._await_call(call, timeout)
        return super().exception(timeout)


#: A future's states once it will not change any more (read without its lock: one attribute).
_CANCELLED = frozenset({cf._base.CANCELLED, cf._base.CANCELLED_AND_NOTIFIED})
_DONE = _CANCELLED | {cf._base.FINISHED}


#: Calls a worker may hold at once when every worker is busy (sent ahead: no round trip
#: between two calls).  A worker that dies fails only the one it was running.
PIPELINE = 2

#: How long a thread in ``result()`` polls its worker's socket (yielding the CPU between
#: polls) before it sleeps: an answer that comes within it costs no wake-up of this thread
#: (on another CPU, the worker's answer would otherwise wait for this CPU to wake up).
SPIN_US = 30


class _Bell:
    """A thread's eventfd, rung (from a future's done-callback) when another thread completes
    a call this one waits for: it then stops waiting at once, with no time-out slices."""

    __slots__ = ("fd", "owner", "rung")

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.owner = threading.get_ident()
        self.rung = False      # set after each write: clear() reads only then (no syscall)

    def ring(self, _future: object = None) -> None:
        if threading.get_ident() == self.owner:
            return             # the waiting thread completed it itself: it is awake
        try:
            os.eventfd_write(self.fd, 1)
        except OSError:
            pass               # (its count is saturated: it is rung already)
        self.rung = True

    def clear(self) -> None:
        if self.rung:
            self.rung = False
            try:
                os.eventfd_read(self.fd)   # (a ring after this sets rung again)
            except OSError:
                pass

    def __del__(self) -> None:
        fd = getattr(self, "fd", -1)   # (-1: eventfd() failed in __init__)
        if fd >= 0:
            os.close(fd)


_bells = threading.local()


def _bell() -> _Bell:
    """This thread's bell."""
    bell: _Bell | None = getattr(_bells, "bell", None)
    if bell is None:
        bell = _bells.bell = _Bell()
    return bell


def _forget_bells() -> None:
    """In a forked child: its threads make their own bells (the eventfds would be shared)."""
    global _bells
    _bells = threading.local()


os.register_at_fork(after_in_child=_forget_bells)


def _chunks(size: int, iterables: tuple[Iterable[Any], ...]) -> Iterator[tuple[tuple[Any, ...], ...]]:
    it = zip(*iterables, strict=False)
    while chunk := tuple(itertools.islice(it, size)):
        yield chunk


class _NotAnAnswer(Exception):
    """A message on a worker's socket that is not a call's answer (skipped)."""


def send_call(chan: socket.socket, blob: bytes) -> None:
    """A call to a worker: its pickle as it is (a pickle's first byte, ``\\x80``, tells it
    from the other messages), or in a memfd when it is large."""
    if len(blob) <= MAX_INLINE:
        chan.send(blob)
    else:
        send(chan, ("call", 0, blob, None, None))


def answer(data: bytes, fds: list[int]) -> tuple[bool, Any]:
    """A worker's answer as :func:`aem.capsules._child.answer_call` sent it: (True, result) or
    (False, exception with its remote traceback).  Raises _NotAnAnswer for another message."""
    if data[:1] == PICKLE:  # a result, pickled once
        return True, pickle.loads(data)
    msg, _fds = decode(data, fds)
    if msg[0] != "result":
        raise _NotAnAnswer(msg[0])
    _op, ok, payload = msg
    return _outcome(ok, payload)


def _outcome(ok: bool, payload: Any) -> tuple[bool, Any]:
    """A worker's answer, unpickled: (True, result) or (False, exception with its remote traceback)."""
    if ok:
        return True, pickle.loads(payload)
    exc_blob, tb = payload
    exc: BaseException
    try:
        exc = pickle.loads(exc_blob) if exc_blob is not None else AemError(tb.splitlines()[-1])
    except Exception:
        exc = AemError(tb.splitlines()[-1] if tb else "the call failed")
    exc.__cause__ = RemoteTraceback(tb)
    return False, exc


class ExecutorPart(cf.Executor, abc.ABC):
    """The executor half of :class:`CapsulePool` (its state is made by ``_init_executor``;
    the pool provides the abstract methods)."""

    size: int
    _lock: threading.RLock
    _closed: bool
    _calls: deque[Call]
    _workers: set[Capsule]
    _shutdown_called: bool

    def _init_executor(self) -> None:
        self._calls = deque()
        self._workers = set()
        self._shutdown_called = False
        self._finisher: threading.Thread | None = None

    # -- the Executor API ------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a capsule; its Future.

        ``fn`` and its arguments are pickled (a module-level function travels by
        reference).  Raises ``RuntimeError`` after :meth:`shutdown` or :meth:`close`."""
        if self._shutdown_called or self._closed:  # checked again with the lock
            raise RuntimeError("cannot schedule new futures after shutdown")
        fut: cf.Future[Any] = CallFuture(self)
        try:
            blob = pickle.dumps((fn, args, kwargs), protocol=5)
        except Exception as e:  # the call cannot travel: its future says why
            fut.set_exception(e)
            return fut
        call = Call(fut, blob)
        fut._call = call  # type: ignore[attr-defined]
        with self._lock:
            if self._shutdown_called or self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._calls.append(call)
            self._dispatch_calls()
        return fut

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Like ``ProcessPoolExecutor.map``: results in order; ``chunksize`` calls travel together."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        chunks = super().map(functools.partial(run_chunk, fn), _chunks(chunksize, iterables),
                             timeout=timeout)
        return itertools.chain.from_iterable(chunks)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; ``cancel_futures`` cancels those not started.  The pool closes (see
        :meth:`close`) once the calls submitted finished: now with ``wait``, else in the
        background (a later ``shutdown(wait=True)`` waits for that too)."""
        with self._lock:
            self._shutdown_called = True
            if cancel_futures:
                for call in self._calls:
                    call.future.cancel()
                self._calls.clear()
            futures = [c.future for c in self._calls] + [c.future for w in self._workers for c in w.calls]
        if wait:
            cf.wait(futures)
            if self._finisher is not None:  # an earlier shutdown(wait=False): wait for it too
                self._finisher.join()
            self.close()
        elif self._finisher is None:
            def finish() -> None:
                cf.wait(futures)
                self.close()

            self._finisher = threading.Thread(target=finish, daemon=True, name="aem-capsule-shutdown")
            self._finisher.start()

    # -- bookkeeping (with the pool's lock) --------------------------------------------------------

    # what the pool provides (CapsulePool)

    @abc.abstractmethod
    def close(self, timeout: float = 2.0) -> None:
        """End the pool and every process it created."""

    @abc.abstractmethod
    def _take_idle(self, priority: int) -> Capsule | None:
        """With the lock: an idle capsule, out of the pool's idle set (None: none may be taken)."""

    @abc.abstractmethod
    def _wake(self) -> None:
        """Wake the pool's manager thread."""

    @abc.abstractmethod
    def _workers_pending(self) -> bool:
        """With the lock: capsules on their way (starting, warming) that could become workers."""

    def _take_worker(self) -> Capsule | None:
        """A worker that may take one more call: an idle one, else a new one while there are
        fewer than ``size``, else — all ``size`` busy — the least loaded, up to PIPELINE calls."""
        least: Capsule | None = None
        for w in self._workers:
            if w.state == "worker" and (least is None or len(w.calls) < len(least.calls)):
                least = w
        if least is not None and not least.calls:
            return least
        if len(self._workers) < self.size:
            cap = self._take_idle(0)
            if cap is not None:
                cap.state = "worker"
                self._workers.add(cap)
                self._wake()  # the manager watches the new worker's socket from now on
                return cap
            self._wake()  # the manager makes more capsules
            if self._workers_pending():
                return None  # more workers are coming: no call waits behind another meanwhile
        if least is not None and len(least.calls) < PIPELINE:
            return least
        return None

    def _dispatch_calls(self) -> None:
        """Give waiting calls to workers."""
        while self._calls:
            call = self._calls[0]
            if call.future._state in _CANCELLED:
                self._calls.popleft()
                continue
            cap = self._take_worker()
            if cap is None:
                return
            self._calls.popleft()
            if not call.started:
                if not call.future.set_running_or_notify_cancel():
                    continue
                call.started = True
            try:
                send_call(cap.chan, call.blob)
            except BlockingIOError:  # its socket is full: the call waits for the next answer
                self._calls.appendleft(call)
                return
            except OSError as e:  # it died before taking it: this call failed (its exit follows)
                call.future.set_exception(AemError(f"capsule {cap.pid} could not take the call: {e}"))
                continue
            cap.calls.append(call)
            call.worker = cap

    def _call_done(self, cap: Capsule) -> None:
        """The manager: a worker's socket is readable (its answers, or its end)."""
        if not self._take_answers(cap):
            cap.state = "broken"  # it died: its exit, reported by the template, fails the call
            return
        self._dispatch_calls()

    def _take_answers(self, cap: Capsule) -> bool:
        """Complete the futures of the answers waiting on a worker's socket; False at its end."""
        while cap.calls:
            try:
                got = call_recv(cap.chan.fileno())
            except (OSError, ValueError):
                return False
            if got is None:
                return True
            data, fds = got
            if not data and not fds:
                return False
            try:
                good, value = answer(data, fds)
            except _NotAnAnswer:
                continue
            except Exception as e:  # the result could not be unpickled here
                good, value = False, e
            call = cap.calls.popleft()
            if good:
                call.future.set_result(value)
            else:
                call.future.set_exception(value)
        return True

    def _await_call(self, call: Call, timeout: float | None) -> None:
        """In the thread waiting for ``call``: read its worker's answers until it is done (or
        the time is up, or the worker is gone: the manager then completes it).  Meanwhile
        the manager leaves that worker's socket to the threads waiting on it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        lock = self._lock
        bell: _Bell | None = None
        with lock:
            cap = call.worker
            if cap is None or cap.state != "worker":
                return
            cap.waiters += 1
            try:
                while True:
                    fd = cap.chan.fileno()
                    if cap.state != "worker" or fd < 0 or call.future._state in _DONE:
                        return
                    self._call_done(cap)  # the answer is often there already: read first
                    if call.future._state in _DONE:
                        return
                    wait = -1
                    if deadline is not None:
                        wait = math.ceil((deadline - time.monotonic()) * 1000)
                        if wait <= 0:
                            return
                    if bell is None:
                        lock.release()  # poll without the lock (most answers come meanwhile)
                        try:
                            ready = wait_readable(fd, 0, SPIN_US)
                        finally:
                            lock.acquire()
                        if ready:
                            continue
                        # then sleep; another waiter on this worker may read this call's
                        # answer (or the pool fail it): its completion rings this thread's bell
                        bell = _bell()
                        call.future.add_done_callback(bell.ring)
                    bell.clear()      # (a ring left by an earlier call's future, or just now)
                    if call.future._state in _DONE:
                        return
                    lock.release()  # sleep without the lock
                    try:
                        wait_readable(fd, wait, 0, bell.fd)
                    finally:
                        lock.acquire()
            finally:
                cap.waiters -= 1
                if cap.calls and not cap.waiters and cap.state == "worker":
                    self._wake()  # answers nobody waits for here: the manager watches this worker again

    def _worker_exited(self, cap: Capsule, code: int, errors: list[str]) -> None:
        """A worker ended: the call it was running fails; calls queued behind it go back to
        the queue (they never started)."""
        self._workers.discard(cap)
        self._take_answers(cap)  # answers it sent before it died
        if cap.calls:
            running = cap.calls.popleft()
            if not running.future.done():
                why = signal_name(-code) if code < 0 else f"exit code {code}"
                text = errors[-1] if errors else ""
                running.future.set_exception(AemError(f"capsule {cap.pid} running this call ended ({why})"
                                                      + (f": {text}" if text else "")))
            self._calls.extendleft(reversed(cap.calls))
            cap.calls.clear()
        cap.state = "broken"
        self._dispatch_calls()

    def _fail_calls(self, why: str) -> None:
        """The pool closes: calls not started are cancelled, running ones fail."""
        for waiting in self._calls:
            waiting.future.cancel()
        self._calls.clear()
        for cap in self._workers:
            for i, call in enumerate(cap.calls):
                if not call.future.done():
                    call.future.set_exception(AemError(why if i == 0 else
                                                       "the capsule pool was closed before the call ran"))
            cap.calls.clear()
        self._workers.clear()
