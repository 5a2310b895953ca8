"""The native capsule hand-off (aem/_core/handoff.c): records of each kind round-trip, a
malformed record is refused and loses no fd, native events reach capsules as real events,
and the parser survives a bounded coverage-guided fuzzing run (atheris)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from capsulekit import header, pair_fixture  # noqa: F401  (the pair fixture)

import aem
from aem import _core
from conftest import AEM_PATH


def deliver(eng: aem.Engine, register: Callable[[Callable[[Any], None]], Any],
            trigger: Callable[[], None]) -> tuple[Any, Any]:
    """Register a handler that encodes its event (as the pool does, during delivery)."""
    seen: list[tuple[Any, Any]] = []
    register(lambda ev: seen.append((ev, _core.handoff_encode(ev, _core.HANDOFF_RUN))))
    trigger()
    deadline = time.monotonic() + 5
    while not seen:
        assert time.monotonic() < deadline
        eng.run(timeout=0.05)
    return seen[0]


def through(pair: tuple[socket.socket, socket.socket], encoded: tuple[bytes, Any],
            sources: dict[int, Any] | None = None) -> tuple[int, int, Any]:
    record, fdobj = encoded
    fd = -1 if fdobj is None else fdobj if isinstance(fdobj, int) else fdobj.fileno()
    _core.handoff_send(pair[0].fileno(), record, fd)
    got = _core.handoff_recv(pair[1].fileno(), sources)
    assert got is not None and got[0] in (_core.HANDOFF_RUN, _core.HANDOFF_KEEP)
    return got


# -- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [None, 0, -(2**63), 2**63 - 1, b"", b"bytes \x00 payload"])
def test_user_event_payloads_travel_natively(engine: aem.Engine, pair: Any, payload: Any) -> None:
    ue = aem.UserEvent()
    ev, encoded = deliver(engine, lambda h: engine.register(ue, h), lambda: ue.fire(payload))
    assert encoded is not None and encoded[1] is None
    _op, eid, got = through(pair, encoded, {ev.eid: "the source"})
    assert type(got) is aem.PayloadEvent and got.payload == payload
    assert (eid, got.eid, got.time_ns, got.source) == (ev.eid, ev.eid, ev.time_ns, "the source")


@pytest.mark.parametrize("payload", ["a str", 2**63, [1], b"x" * (61 * 1024), bytearray(b"b")])
def test_other_payloads_keep_the_pickled_path(engine: aem.Engine, payload: Any) -> None:
    ue = aem.UserEvent()
    _ev, encoded = deliver(engine, lambda h: engine.register(ue, h), lambda: ue.fire(payload))
    assert encoded is None


def test_constructor_attributes_keep_the_pickled_path(engine: aem.Engine) -> None:
    ue = aem.UserEvent()

    def ctor(ev: Any) -> None:
        ev.extra = 1

    _ev, encoded = deliver(engine, lambda h: engine.register(ue, h, constructor=ctor), lambda: ue.fire(1))
    assert encoded is None


def test_timer_travels_with_count_and_source(engine: aem.Engine, pair: Any) -> None:
    ev, encoded = deliver(engine, lambda h: engine.register(aem.Timer(0.01), h, flags=aem.EVF_ONESHOT),
                          lambda: None)
    _op, _eid, got = through(pair, encoded)
    assert type(got) is aem.TimerEvent and got.count == ev.count == 1
    assert got.source.after == pytest.approx(0.01)  # rebuilt from the record, no source table


def test_signal_travels(engine: aem.Engine, pair: Any) -> None:
    import signal

    ev, encoded = deliver(engine, lambda h: engine.register(aem.Signal(signal.SIGUSR1), h),
                          lambda: os.kill(os.getpid(), signal.SIGUSR1))
    _op, _eid, got = through(pair, encoded)
    assert type(got) is aem.SignalEvent and got.signum == signal.SIGUSR1 and got.info == ev.info


def test_readable_fd_is_the_receivers_own(engine: aem.Engine, pair: Any) -> None:
    a, b = socket.socketpair()
    try:
        b.send(b"waiting")
        ev, encoded = deliver(engine, lambda h: engine.register(aem.Readable(a), h, flags=aem.EVF_ONESHOT),
                              lambda: None)
        _op, _eid, got = through(pair, encoded)
        assert type(got) is aem.FdEvent and got.events == ev.events
        assert got.fd != a.fileno() and os.read(got.fd, 100) == b"waiting"
        os.close(got.fd)
    finally:
        a.close()
        b.close()


def test_read_data_and_fd_travel(engine: aem.Engine, pair: Any) -> None:
    a, b = socket.socketpair()
    try:
        _ev, encoded = deliver(engine, lambda h: engine.register(aem.Read(a), h), lambda: b.send(b"data!"))
        _op, _eid, got = through(pair, encoded)
        assert type(got) is aem.ReadEvent and bytes(got.data) == b"data!" and got.eof is False
        b.send(b"more")
        assert os.read(got.fd, 100) == b"more"
        os.close(got.fd)
    finally:
        a.close()
        b.close()


def test_accepted_socket_travels_blocking(engine: aem.Engine, pair: Any) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    try:
        _ev, encoded = deliver(engine, lambda h: engine.register(aem.Accept(srv), h), lambda: None)
        conn = encoded[1]
        _op, _eid, got = through(pair, encoded)
        conn.close()  # the parent lets go of it (the pool does)
        assert type(got) is aem.AcceptEvent and got.conn.getblocking() is True
        assert got.addr == cli.getsockname()
        cli.sendall(b"ping")
        assert got.conn.recv(10) == b"ping"
        got.conn.close()
    finally:
        cli.close()
        srv.close()


def test_child_exit_travels(engine: aem.Engine, pair: Any) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        ev, encoded = deliver(engine, lambda h: engine.register(aem.ChildExit(proc.pid), h), lambda: None)
        _op, _eid, got = through(pair, encoded)
        assert type(got) is aem.ChildExitEvent
        assert (got.pid, got.returncode, got.job, got.error) == (ev.pid, ev.returncode, ev.job, ev.error)
    finally:
        proc.wait()


def test_file_change_travels(engine: aem.Engine, pair: Any, tmp_path: Path) -> None:
    src = aem.FileChange(str(tmp_path), aem.IN_CREATE)
    ev, encoded = deliver(engine, lambda h: engine.register(src, h),
                          lambda: (tmp_path / "née.txt").write_text("x"))
    _op, _eid, got = through(pair, encoded, {ev.eid: src})
    assert type(got) is aem.FileChangeEvent and got.name == "née.txt" and got.mask == ev.mask
    assert got.path == str(tmp_path)


# -- malformed records ------------------------------------------------------------------------------


@pytest.mark.parametrize("record, nfds, why", [
    (b"AEMH", 0, "too short"),
    (header(_core.K_USER, magic=0x12345678), 0, "bad magic"),
    (header(_core.K_USER, version=9), 0, "unknown version"),
    (header(_core.K_USER, op=3), 0, "bad op"),
    (header(_core.K_USER, data_len=5) + b"abc", 0, "bad data length"),
    (header(_core.K_USER, flags=3), 0, "two payloads"),
    (header(_core.K_USER, flags=2 | 4), 0, "fd count"),
    (header(_core.K_USER, flags=4), 1, "flags not of this kind"),
    (header(_core.K_READABLE), 0, "missing fd"),
    (header(_core.K_READABLE, flags=4), 0, "fd count"),
    (header(_core.K_TIMER, data_len=1) + b"x", 0, "unexpected data"),
    (header(_core.K_CLOSE), 0, "unsupported kind"),
    (header(_core.K_FILE, flags=32, data_len=2) + b"\xff\xfe", 0, "utf-8"),
    (header(_core.K_USER, flags=128), 0, "unknown flags"),
])
def test_malformed_records_are_refused(record: bytes, nfds: int, why: str) -> None:
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(nfds)]
    try:
        with pytest.raises(ValueError, match=why):
            _core._handoff_parse(record, fds)
    finally:
        for fd in fds:
            os.close(fd)  # still ours: a refused record takes nothing


def test_received_malformed_record_closes_its_fds(pair: Any) -> None:
    before = len(os.listdir("/proc/self/fd"))
    r, w = os.pipe()
    _core.handoff_send(pair[0].fileno(), header(_core.K_USER, flags=4), r)
    os.close(r)
    os.close(w)
    with pytest.raises(ValueError, match="flags not of this kind"):
        _core.handoff_recv(pair[1].fileno())
    assert len(os.listdir("/proc/self/fd")) == before


def test_other_messages_come_back_raw(pair: Any) -> None:
    pair[0].send(b"P-not-a-record")
    assert _core.handoff_recv(pair[1].fileno()) == (0, b"P-not-a-record", [])
    pair[0].shutdown(socket.SHUT_WR)
    assert _core.handoff_recv(pair[1].fileno()) is None


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError):
        _core.handoff_encode(object(), 9)
    assert _core.handoff_encode(object(), _core.HANDOFF_RUN) is None
    with pytest.raises(TypeError):
        _core._handoff_parse(header(_core.K_USER), [], sources=[])  # type: ignore[arg-type]
    with pytest.raises(OSError):
        _core.handoff_send(-1, b"x")


# -- in capsules ------------------------------------------------------------------------------------

RESULTS = aem.UserEvent()


def _describe(ev: Any) -> None:
    RESULTS.fire((type(ev).__name__, ev.payload, ev.time_ns, ev.source is SOURCE, os.getpid()))


SOURCE = aem.UserEvent()


def test_native_event_in_a_capsule_is_a_real_event_with_its_source() -> None:
    got: list[Any] = []
    aem.register(RESULTS, lambda ev: got.append(ev.payload))
    seen: list[int] = []
    with aem.CapsulePool(size=1) as pool:
        aem.register(SOURCE, _describe, flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=pool,
                     destructor=lambda ev: seen.append(ev.time_ns))
        pool.refresh()  # a template that knows the registration (and its source)
        assert pool.wait_ready(10)
        SOURCE.fire(b"raw")
        deadline = time.monotonic() + 10
        while not got:
            assert time.monotonic() < deadline
            aem.run(timeout=0.05)
    kind, payload, time_ns, same_source, pid = got[0]
    assert (kind, payload, same_source) == ("PayloadEvent", b"raw", True)
    assert pid != os.getpid() and time_ns == seen[0]


# -- fuzzing ----------------------------------------------------------------------------------------


def _instrumented_core(out: Path) -> Path | None:
    """aem with its C core built for libFuzzer coverage and ASan (None if the tools are missing)."""
    atheris = pytest.importorskip("atheris")
    clang = shutil.which("clang")
    core = Path(__file__).resolve().parent.parent / "src" / "aem" / "_core"
    runtime = Path(atheris.path()) / "asan_with_fuzzer.so"
    if clang is None or not core.is_dir() or not runtime.exists():
        return None
    pkg = out / "aem"
    shutil.copytree(Path(AEM_PATH) / "aem", pkg, ignore=shutil.ignore_patterns("_core*.so", "__pycache__"))
    include = sysconfig.get_paths()["include"]
    objs = []
    procs = []
    for src in sorted(core.glob("*.c")):
        obj = out / (src.stem + ".o")
        objs.append(str(obj))
        procs.append(subprocess.Popen([clang, "-c", "-fPIC", "-O1", "-g", "-std=gnu11",
                                       "-fsanitize=address,fuzzer-no-link", f"-I{core}", f"-I{include}",
                                       str(src), "-o", str(obj)]))
    if any(p.wait(timeout=300) != 0 for p in procs):
        pytest.fail("the instrumented build failed")
    target = pkg / ("_core" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run([clang, "-shared", *objs, "-o", str(target), "-lpthread"], check=True, timeout=120)
    return runtime


def test_record_parser_survives_fuzzing() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runtime = _instrumented_core(Path(tmp))
        if runtime is None:
            pytest.skip("clang, the C sources or atheris's ASan runtime are missing")
        target = Path(__file__).resolve().parent / "fuzz" / "fuzz_handoff.py"
        env = dict(os.environ, PYTHONPATH=tmp, LD_PRELOAD=str(runtime), ASAN_OPTIONS="detect_leaks=0")
        p = subprocess.run([sys.executable, str(target), "-max_total_time=5", "-rss_limit_mb=1024"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Done" in p.stderr and "runs in" in p.stderr
