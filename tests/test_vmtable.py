"""aem.VMTable: allocation, blocks as buffers, misuse, shortage, I/O, fork, attach,
the process vmtable (SPEC §3).

The random model-based test is test_vmtable_stateful.py; processes sharing a
VZONE (stress, a holder of the lock killed) are in test_vmtable_multiproc.py.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import aem
from aem import _core
from aem.sources import Shortage
from conftest import AEM_PATH, fork_call

PAGE = os.sysconf("SC_PAGESIZE")


@pytest.fixture(params=[aem.TBL_UZONE, aem.TBL_VZONE], ids=["UZONE", "VZONE"])
def zone(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def vmt(zone: int) -> Iterator[aem.VMTable]:
    v = aem.VMTable(1 << 20, zone=zone)
    try:
        yield v
    finally:
        gc.collect()
        if not v.closed:
            v.check()
            v.close()


def unique_name() -> str:
    return f"aem-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def address(buf: Any) -> int:
    """The address of a writable buffer's first byte."""
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c


def run_python(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with this aem importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = AEM_PATH
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def in_child(fn: Callable[[], None], timeout: float = 20) -> int:
    """Run ``fn`` in a forked child; return its exit status (0: fn returned)."""
    pid = fork_call(fn)
    try:
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return os.waitstatus_to_exitcode(status)


# -- allocation and blocks ---------------------------------------------------------------------


def test_block_basics(vmt: aem.VMTable) -> None:
    blk = vmt.alloc(3000)
    assert isinstance(blk, aem.Block)
    assert len(blk) == 3000 and blk.size == 4096 and not blk.fallback and not blk.freed
    assert blk.offset % 4096 == 0 and blk.vmtable is vmt and blk.generation > 0
    mv = memoryview(blk)
    assert mv.nbytes == 3000 and not mv.readonly and mv.contiguous and mv.format == "B"
    mv[:5] = b"hello"
    assert bytes(blk)[:5] == b"hello"
    assert bytes(vmt.view(blk.offset, 5)) == b"hello"
    mv.release()
    blk.free()
    assert blk.freed
    assert "freed" in repr(blk)


def test_granted_sizes_and_alignment(vmt: aem.VMTable) -> None:
    for n, granted in [(1, 64), (64, 64), (65, 128), (4096, 4096), (4097, 8192), (65536, 65536)]:
        assert vmt.granted(n) == granted
        blk = vmt.alloc(n)
        assert blk.size == granted
        assert blk.offset % granted == 0
        if n >= PAGE:
            assert address(blk) % PAGE == 0, "blocks of a page or more are page-aligned"
        blk.free()
    assert vmt.granted(0) == 0 and vmt.granted(vmt.size + 1) == 0


def test_pool_of_any_size(zone: int) -> None:
    size = 3 * (1 << 20) + 5 * 4096 + 100          # not a power of two, not a multiple of min_block
    with aem.VMTable(size, zone=zone, min_block=64) as v:
        assert v.size == size + 28                  # rounded up to a multiple of min_block
        assert v.max_block == 2 << 20
        start = v.stats()
        assert start["free"] == v.size and start["largest_free"] == 2 << 20
        with pytest.raises(aem.VMTableError, match="largest block"):
            v.alloc(3 << 20)
        blocks = [v.alloc(1 << 20) for _ in range(3)] + [v.alloc(4096) for _ in range(5)]
        blocks += [v.alloc(64), v.alloc(64)]       # the 128-byte tail: every byte handed out
        assert v.stats()["free"] == 0
        with pytest.raises(MemoryError):
            v.alloc_offset(64)
        for b in blocks:
            b.free()
        v.check()
        assert v.stats()["free"] == v.size and v.stats()["largest_free"] == 2 << 20


def test_min_block(zone: int) -> None:
    with aem.VMTable(1 << 16, zone=zone, min_block=16) as v:
        assert v.granted(1) == 16 and v.alloc(17).size == 32
    with aem.VMTable(1 << 20, zone=zone, min_block=4096) as v:
        assert v.granted(1) == 4096
    for bad in (0, 8, 48, 100):
        with pytest.raises(ValueError, match="min_block"):
            aem.VMTable(1 << 20, zone=zone, min_block=bad)


def test_offset_api(vmt: aem.VMTable) -> None:
    off = vmt.alloc_offset(100)
    view = vmt.view(off, 100)
    view[:] = bytes(range(100))
    assert bytes(vmt.view(off + 10, 5)) == bytes(range(10, 15))
    blk = vmt.block_at(off)
    assert len(blk) == 100 and blk.size == 128 and bytes(blk) == bytes(range(100))
    del view
    vmt.free_offset(off)
    with pytest.raises(aem.VMTableError, match="already freed"):
        blk.free()
    assert vmt.stats()["used"] == 0


def test_views_are_checked(vmt: aem.VMTable) -> None:
    off = vmt.alloc_offset(4096)
    vmt.view(off, 4096)
    with pytest.raises(aem.VMTableError, match="not inside one allocated block"):
        vmt.view(off, 4097)
    with pytest.raises(aem.VMTableError, match="not inside one allocated block"):
        vmt.view(off + 4096, 1)                     # free memory
    with pytest.raises(aem.VMTableError):
        vmt.view(off, 0)
    with pytest.raises(aem.VMTableError):
        vmt.view(vmt.size, 1)
    vmt.free_offset(off)
    with pytest.raises(aem.VMTableError):
        vmt.view(off, 1)
    with pytest.raises(BufferError):
        memoryview(vmt)                              # only views and blocks export memory


def test_context_manager_and_deallocation_free(vmt: aem.VMTable) -> None:
    with vmt.alloc(1000) as blk:
        memoryview(blk)[0] = 1
    assert blk.freed and vmt.stats()["used"] == 0
    with vmt.alloc(1000) as blk:
        blk.free()                                   # freeing inside the block is fine
    vmt.alloc(5000)                                  # dropped: freed by deallocation
    assert vmt.stats()["used"] == 0
    kept = [vmt.alloc(100) for _ in range(10)]
    assert vmt.stats()["blocks"] == 10
    del kept
    assert vmt.stats()["blocks"] == 0


def test_detach_and_block_at(vmt: aem.VMTable) -> None:
    blk = vmt.alloc(300)
    memoryview(blk)[:3] = b"abc"
    off = blk.detach()
    assert blk.freed and off == blk.offset
    with pytest.raises(aem.VMTableError, match="detached"):
        memoryview(blk)
    with pytest.raises(aem.VMTableError, match="detached"):
        blk.free()
    del blk
    gc.collect()
    assert vmt.stats()["used"] == 512, "a detached block stays allocated"
    again = vmt.block_at(off)
    assert bytes(again)[:3] == b"abc" and len(again) == 300
    again.free()
    with pytest.raises(aem.VMTableError, match="no allocated block"):
        vmt.block_at(off)


def test_stats(vmt: aem.VMTable) -> None:
    blocks = [vmt.alloc(100), vmt.alloc(3000), vmt.alloc(70000)]
    st = vmt.stats()
    assert st["size"] == 1 << 20 and st["used"] == 128 + 4096 + 131072
    assert st["requested"] == 73100 and st["blocks"] == 3
    assert st["free"] == st["size"] - st["used"]
    assert st["internal_fragmentation"] == pytest.approx(st["used"] / 73100)
    assert st["external_fragmentation"] == pytest.approx(1 - st["largest_free"] / st["free"])
    assert st["by_order"][4096]["used"] == 1 and st["by_order"][128]["used"] == 1
    assert sum(o["free"] * size for size, o in st["by_order"].items()) == st["free"]
    assert st["zone"] in ("UZONE", "VZONE") and st["min_block"] == 64
    for b in blocks:
        b.free()
    json.dumps(vmt.stats())


def test_alloc_free_pingpong_uses_the_cache(vmt: aem.VMTable) -> None:
    vmt.free(vmt.alloc(4096))
    before = vmt.stats(drain=False)
    for _ in range(1000):
        vmt.free_offset(vmt.alloc_offset(4096))
    after = vmt.stats(drain=False)
    assert after["splits"] == before["splits"] and after["merges"] == before["merges"]


# -- misuse -----------------------------------------------------------------------------------


def test_bad_sizes(vmt: aem.VMTable) -> None:
    for alloc in (vmt.alloc, vmt.alloc_offset):
        with pytest.raises(aem.VMTableError, match="0 bytes"):
            alloc(0)
        with pytest.raises(aem.VMTableError, match=">= 0"):
            alloc(-1)
        with pytest.raises(aem.VMTableError, match="larger than the whole pool"):
            alloc(vmt.size + 1)
        with pytest.raises(aem.VMTableError, match="larger than the whole pool"):
            alloc(1 << 70)
        with pytest.raises(TypeError):
            alloc(1.5)  # type: ignore[arg-type]
    assert issubclass(aem.VMTableError, ValueError)
    vmt.check()


def test_double_free(vmt: aem.VMTable) -> None:
    blk = vmt.alloc(100)
    blk.free()
    with pytest.raises(aem.VMTableError, match="double free"):
        blk.free()
    with pytest.raises(aem.VMTableError, match="double free"):
        vmt.free(blk)
    off = vmt.alloc_offset(100)
    vmt.free_offset(off)
    with pytest.raises(aem.VMTableError, match=r"double free|not the start"):
        vmt.free_offset(off)
    vmt.check()
    assert vmt.stats()["used"] == 0


def test_stale_block_after_reuse(vmt: aem.VMTable) -> None:
    blk = vmt.alloc(100)
    vmt.free_offset(blk.offset)              # freed behind the Block's back ...
    other = vmt.alloc(100)                   # ... and the same memory handed out again
    assert other.offset == blk.offset and other.generation != blk.generation
    with pytest.raises(aem.VMTableError, match="use after free"):
        memoryview(blk)
    with pytest.raises(aem.VMTableError, match="already freed"):
        blk.free()
    assert not other.freed and memoryview(other).nbytes == 100, "the new owner is untouched"
    other.free()
    vmt.check()


def test_bad_offsets(vmt: aem.VMTable) -> None:
    off = vmt.alloc_offset(4096)
    for bad in (off + 64, off + 1, vmt.size, vmt.size + 4096, (1 << 20) + 7):
        with pytest.raises(aem.VMTableError):
            vmt.free_offset(bad)
    with pytest.raises(aem.VMTableError):
        vmt.free_offset(-4096)
    vmt.free_offset(off)
    vmt.check()


def test_foreign_block(zone: int) -> None:
    with aem.VMTable(1 << 16, zone=zone) as a, aem.VMTable(1 << 16, zone=zone) as b:
        blk = a.alloc(100)
        with pytest.raises(aem.VMTableError, match="another vmtable"):
            b.free(blk)
        with pytest.raises(TypeError):
            b.free(bytearray(10))  # type: ignore[arg-type]
        assert not blk.freed
        blk.free()
        a.check()
        b.check()


def test_use_after_free_never_touches_memory(vmt: aem.VMTable) -> None:
    blk = vmt.alloc(100)
    blk.free()
    with pytest.raises(aem.VMTableError, match="use after free"):
        memoryview(blk)
    with pytest.raises(aem.VMTableError, match="use after free"):
        bytes(blk)
    a, b = socket.socketpair()
    with a, b:
        a.send(b"x")
        with pytest.raises((aem.VMTableError, TypeError)):  # its argument parser retypes the error
            b.recv_into(blk)
        assert b.recv(1) == b"x", "nothing was read into the freed block"


def test_free_refused_while_a_view_is_alive(vmt: aem.VMTable) -> None:
    blk = vmt.alloc(100)
    mv = memoryview(blk)
    with pytest.raises(aem.VMTableError, match="memoryview"):
        blk.free()
    with pytest.raises(aem.VMTableError, match="memoryview"):
        with blk:
            pass
    assert not blk.freed
    mv[0] = 7                                    # still valid memory
    mv.release()
    blk.free()


def test_closed_vmtable(zone: int) -> None:
    v = aem.VMTable(1 << 16, zone=zone)
    blk = v.alloc(100)
    view = v.view(v.alloc_offset(10), 10)
    with pytest.raises(aem.VMTableError, match="buffer export"):
        v.close()
    view.release()
    v.close()
    v.close()                                    # idempotent
    assert v.closed
    for call in (lambda: v.alloc(1), lambda: v.alloc_offset(1), lambda: v.free_offset(0),
                 lambda: v.view(0, 1), v.stats, v.check, lambda: memoryview(blk)):
        with pytest.raises(aem.VMTableError, match="closed"):
            call()
    blk.free()                                   # the pool is gone: nothing to return
    assert "closed" in repr(v)


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="at least 1 byte"):
        aem.VMTable(0)
    with pytest.raises(ValueError, match="zone"):
        aem.VMTable(1 << 20, zone=7)
    with pytest.raises(ValueError, match="TBL_VZONE"):
        aem.VMTable(1 << 20, name="x")
    with pytest.raises(TypeError):
        aem.VMTable("big")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="raise min_block"):
        aem.VMTable(1 << 40, zone=aem.TBL_VZONE, min_block=16)
    for bad in ("", "a/b", "/"):
        with pytest.raises(ValueError, match="name"):
            aem.VMTable(1 << 16, zone=aem.TBL_VZONE, name=bad)


# -- shortage -----------------------------------------------------------------------------------


def test_shortage_handler_frees_and_the_request_is_retried(zone: int) -> None:
    with aem.VMTable(8192, zone=zone, fallback=False) as v:
        held = [v.alloc(4096), v.alloc(4096)]
        seen: list[tuple[str, int, bool]] = []

        def on_shortage(ev: Any) -> None:
            seen.append((type(ev).__name__, ev.size, ev.vmtable is v))
            held.pop().free()

        eid = aem.register(v.shortage, on_shortage)
        assert isinstance(eid, int) and eid > 0
        blk = v.alloc(100)
        assert seen == [("ShortageEvent", 100, True)]
        assert not blk.fallback and v.stats()["shortages"] == 1
        off = v.alloc_offset(4000)                # the retry serves the offset API too
        assert len(seen) == 2
        v.free_offset(off)
        blk.free()
        aem.unregister(eid)
        held.clear()
        v.alloc(8192).free()
        assert len(seen) == 2, "no delivery after unregister"


def test_shortage_then_fallback(zone: int) -> None:
    with aem.VMTable(8192, zone=zone, fallback=True) as v:
        hold = v.alloc(8192)
        seen: list[int] = []
        eid = aem.register(v.shortage, lambda ev: seen.append(ev.size))
        blk = v.alloc(5000)
        assert seen == [5000]
        assert blk.fallback and blk.offset == -1 and len(blk) == 5000 and blk.size == 5000
        assert address(blk) % PAGE == 0
        memoryview(blk)[:] = b"z" * 5000
        assert bytes(blk) == b"z" * 5000
        st = v.stats()
        assert st["fallbacks"] == 1 and st["fallback_live"] == 1 and st["fallback_bytes"] == 5000
        with pytest.raises(aem.VMTableError, match="heap"):
            blk.detach()
        v.free(blk)
        with pytest.raises(aem.VMTableError, match="double free"):
            blk.free()
        assert v.stats()["fallback_live"] == 0
        small = v.alloc(10)
        assert small.fallback
        del small                                # deallocation frees heap blocks too
        assert v.stats()["fallback_live"] == 0
        with pytest.raises(MemoryError, match="no heap fallback"):
            v.alloc_offset(100)                   # offsets exist only in the pool
        aem.unregister(eid)
        hold.free()


def test_shortage_memory_error_names_the_vmtable_and_size(zone: int) -> None:
    name = unique_name() if zone == aem.TBL_VZONE else None
    with aem.VMTable(1 << 16, zone=zone, fallback=False, name=name) as v:
        hold = v.alloc(40000)
        with pytest.raises(MemoryError) as info:
            v.alloc(30000)
        text = str(info.value)
        assert "30000 bytes" in text and "fallback is off" in text
        assert (name in text) if name else "anonymous" in text
        assert v.stats()["shortages"] == 1
        hold.free()


def test_shortage_handler_errors_go_to_the_error_handler(zone: int) -> None:
    errors: list[BaseException] = []
    old = aem.set_error_handler(lambda exc, ev: errors.append(exc))
    try:
        with aem.VMTable(4096, zone=zone, fallback=True) as v:
            hold = v.alloc(4096)

            def bad(ev: Any) -> None:
                raise RuntimeError("handler failed")

            aem.register(v.shortage, bad)
            blk = v.alloc(10)
            assert blk.fallback and len(errors) == 1 and "handler failed" in str(errors[0])
            blk.free()
            hold.free()
    finally:
        aem.set_error_handler(old)


def test_shortage_is_not_delivered_again_from_its_handler(zone: int) -> None:
    with aem.VMTable(4096, zone=zone, fallback=True) as v:
        hold = v.alloc(4096)
        depth: list[int] = []

        def greedy(ev: Any) -> None:
            depth.append(ev.size)
            inner = v.alloc(64)                   # short again: served by the heap, no recursion
            assert inner.fallback
            inner.free()

        aem.register(v.shortage, greedy)
        v.alloc(100).free()
        assert depth == [100]
        hold.free()


def test_shortage_with_a_private_engine(engine: aem.Engine) -> None:
    with aem.VMTable(4096) as v:
        hold = v.alloc(4096)
        seen: list[int] = []
        eid = engine.register(v.shortage, lambda ev: (seen.append(ev.size), hold.free()))
        blk = v.alloc(64)
        assert seen == [64] and not blk.fallback
        engine.unregister(eid)
        blk.free()


# -- I/O ------------------------------------------------------------------------------------------


def test_io_with_sockets_and_vectors(vmt: aem.VMTable) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"hello world")
        blk = vmt.alloc(64)
        n = b.recv_into(blk)
        assert bytes(blk)[:n] == b"hello world"
        out = vmt.alloc(5)
        memoryview(out)[:] = b"12345"
        assert a.sendmsg([memoryview(blk)[:n], out]) == n + 5
        assert b.recv(100) == b"hello world12345"
        r, w = os.pipe()
        try:
            os.write(w, b"abcdefgh")
            x, y = vmt.alloc(3), vmt.alloc(5)
            assert os.readv(r, [x, y]) == 8
            assert bytes(x) == b"abc" and bytes(y) == b"defgh"
            assert os.writev(w, [x, y]) == 8 and os.read(r, 8) == b"abcdefgh"
        finally:
            os.close(r)
            os.close(w)


def test_o_direct_read_into_a_page_aligned_block(vmt: aem.VMTable, tmp_path: Path) -> None:
    path = tmp_path / "direct.bin"
    data = os.urandom(2 * PAGE)
    path.write_bytes(data)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip(f"{tmp_path} does not support O_DIRECT (tmpfs?)")
        raise
    try:
        blk = vmt.alloc(2 * PAGE)
        assert address(blk) % PAGE == 0
        try:
            n = os.readv(fd, [blk])
        except OSError as e:
            if e.errno == errno.EINVAL:
                pytest.skip(f"O_DIRECT reads refused on {tmp_path}: {e}")
            raise
        assert n == 2 * PAGE and bytes(blk) == data
        blk.free()
    finally:
        os.close(fd)


# -- fork --------------------------------------------------------------------------------------------


def test_fork_uzone_is_a_private_copy() -> None:
    with aem.VMTable(1 << 20, zone=aem.TBL_UZONE) as v:
        blk = v.alloc(100)
        memoryview(blk)[:1] = b"P"

        def child() -> None:
            assert bytes(blk)[:1] == b"P"           # inherited ...
            memoryview(blk)[:1] = b"C"             # ... as a private copy
            extra = [v.alloc(4096) for _ in range(10)]
            blk.free()
            v.check()
            del extra

        assert in_child(child) == 0
        assert bytes(blk)[:1] == b"P"
        assert v.stats()["blocks"] == 1, "the child's allocations are its own"
        blk.free()


def test_fork_vzone_is_shared() -> None:
    with aem.VMTable(1 << 20, zone=aem.TBL_VZONE) as v:
        mine = v.alloc(100)
        memoryview(mine)[:1] = b"P"
        r, w = os.pipe()

        def child() -> None:
            assert bytes(mine)[:1] == b"P"
            memoryview(mine)[:1] = b"C"             # seen by the parent
            mine.free()                             # freed in another process
            off = v.alloc_offset(200)
            v.view(off, 5)[:] = b"child"
            os.write(w, off.to_bytes(8, "little"))
            inherited = v.alloc(300)
            memoryview(inherited)[:1] = b"K"
            os.write(w, inherited.detach().to_bytes(8, "little"))

        try:
            assert in_child(child) == 0
            off = int.from_bytes(os.read(r, 8), "little")
            kept = int.from_bytes(os.read(r, 8), "little")
        finally:
            os.close(r)
            os.close(w)
        assert bytes(v.view(off, 5)) == b"child"
        with pytest.raises(aem.VMTableError, match="use after free"):
            memoryview(mine)                     # the child freed it
        with pytest.raises(aem.VMTableError, match="already freed"):
            mine.free()
        v.free_offset(off)                       # allocated there, freed here
        blk = v.block_at(kept)
        assert bytes(blk)[:1] == b"K" and len(blk) == 300
        blk.free()
        v.check()
        assert v.stats()["used"] == 0


def test_vzone_block_inherited_by_a_child_is_not_freed_by_its_deallocation() -> None:
    with aem.VMTable(1 << 20, zone=aem.TBL_VZONE) as v:
        blk = v.alloc(100)

        def child() -> None:
            nonlocal blk
            del blk                                  # the parent owns it
            gc.collect()

        assert in_child(child) == 0
        assert not blk.freed and v.stats()["blocks"] == 1
        blk.free()


# -- named VZONE: attach from an unrelated process ------------------------------------------------


def test_attach_from_an_unrelated_process() -> None:
    name = unique_name()
    with aem.VMTable(1 << 20, zone=aem.TBL_VZONE, name=name) as v:
        assert v.name == name
        blk = v.alloc(64)
        memoryview(blk)[:6] = b"parent"
        res = run_python(f"""
            import aem
            v = aem.VMTable.attach({name!r})
            assert v.size == {v.size} and v.id == {v.id} and v.name == {name!r}
            assert bytes(v.view({blk.offset}, 6)) == b"parent"
            v.view({blk.offset}, 6)[:] = b"client"
            off = v.alloc_offset(1000)
            v.view(off, 5)[:] = b"hello"
            v.check()
            print(off)
            v.close()
        """)
        assert res.returncode == 0, res.stderr
        off = int(res.stdout)
        assert bytes(blk)[:6] == b"client"
        assert bytes(v.view(off, 5)) == b"hello"
        v.free_offset(off)
        blk.free()
        with pytest.raises(FileExistsError, match="attach"):
            aem.VMTable(1 << 16, zone=aem.TBL_VZONE, name=name)
        joined = aem.VMTable.attach("/" + name)    # a leading slash is allowed
        assert joined.id == v.id and isinstance(joined.shortage, Shortage)
        joined.alloc(10).free()
        joined.close()
        v.check()
    with pytest.raises(FileNotFoundError):        # the creator's close removed the name
        aem.VMTable.attach(name)


def test_attach_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        aem.VMTable.attach(unique_name())
    with pytest.raises(ValueError):
        aem.VMTable.attach("a/b")
    name = unique_name()
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"not a vmtable" * 1000)
        with pytest.raises(aem.VMTableError, match="not an aem vmtable"):
            aem.VMTable.attach(name)
    finally:
        os.close(fd)
        os.unlink(f"/dev/shm/{name}")


# -- the process vmtable and EVTBLINIT ---------------------------------------------------------------


def test_process_vmtable_defaults() -> None:
    res = run_python("""
        import aem
        v = aem.vmtable()
        assert v is aem.vmtable() and isinstance(v, aem.VMTable)
        assert (v.size, v.zone, v.min_block, v.fallback) == (64 << 20, aem.TBL_UZONE, 64, True)
        try:
            aem.control(0, aem.EVTBLINIT, {"size": 1 << 20})
        except aem.VMTableError as e:
            assert "already exists" in str(e)
        else:
            raise AssertionError("EVTBLINIT after first use must fail")
        print("ok")
    """)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_evtblinit_configures_the_process_vmtable() -> None:
    res = run_python("""
        import aem, os
        for bad, exc in (({"sise": 1}, ValueError), ([1], TypeError)):
            try:
                aem.control(0, aem.EVTBLINIT, bad)
            except exc:
                pass
            else:
                raise AssertionError(bad)
        aem.control(0, aem.EVTBLINIT, {"size": 1 << 20, "zone": aem.TBL_VZONE, "fallback": False})
        v = aem.vmtable()
        assert (v.size, v.zone, v.fallback) == (1 << 20, aem.TBL_VZONE, False)
        blk = v.alloc(100)
        pid = os.fork()
        if pid == 0:
            assert aem.vmtable() is v              # inherited, shared
            memoryview(blk)[:2] = b"ok"
            os._exit(0)
        os.waitpid(pid, 0)
        assert bytes(blk)[:2] == b"ok"
        print("ok")
    """)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# -- the C API for the engine ----------------------------------------------------------------------


def test_engine_c_api(vmt: aem.VMTable) -> None:
    blk = _core._vmt_copy_in(vmt, b"payload")
    assert isinstance(blk, aem.Block) and bytes(blk) == b"payload" and blk.vmtable is vmt
    _core._block_release(blk)
    assert blk.freed
    _core._block_release(blk)                    # already freed: fine
    kept = _core._vmt_copy_in(vmt, b"kept")
    mv = memoryview(kept)
    _core._block_release(kept)                   # a view is alive: freed when the Block goes
    assert not kept.freed
    del mv, kept
    assert vmt.stats()["used"] == 0
    with pytest.raises(aem.VMTableError):
        _core._vmt_copy_in(vmt, b"")
    with pytest.raises(TypeError):
        _core._vmt_copy_in(object(), b"x")
    with pytest.raises(TypeError):
        _core._block_release(b"x")


def test_public_names() -> None:
    for name in ("VMTable", "Block", "VMTableError", "TBL_UZONE", "TBL_VZONE", "vmtable",
                 "ShortageEvent"):
        assert hasattr(aem, name)
    assert (aem.TBL_UZONE, aem.TBL_VZONE) == (0, 1)
    assert aem.vmtable.__doc__ and aem.VMTable.__doc__ and aem.Block.__doc__


# -- the benchmark runs ---------------------------------------------------------------------------------


def test_bench_vmtable_quick(tmp_path: Path) -> None:
    from aem import bench

    bench.run(["vmtable"], quick=True, out_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["suites"]["vmtable"]["rows"]
    assert any(r["variant"].startswith("aem") for r in rows)
    assert any(not r["variant"].startswith("aem") for r in rows)
    assert all(r["value"] == r["value"] and r["value"] >= 0 for r in rows)
    for plot in data["suites"]["vmtable"]["plots"]:
        assert (tmp_path / plot).stat().st_size > 1000


# -- kept from review (were in test_regressions.py) ------------------------------

def test_stopped_shortage_registration_stays_registered(engine: aem.Engine) -> None:
    vmt = aem.VMTable(1 << 16, fallback=True)
    calls: list[int] = []
    eid = engine.register(vmt.shortage, lambda ev: calls.append(ev.size))
    engine.control(eid, aem.EVJOBSTOP)
    big = vmt.alloc(1 << 16)
    small = vmt.alloc(64)  # shortage while stopped: not delivered, not forgotten
    small.free()
    engine.control(eid, aem.EVJOBSTART)
    small = vmt.alloc(64)
    assert calls == [64]
    small.free()
    big.free()
    vmt.close()
