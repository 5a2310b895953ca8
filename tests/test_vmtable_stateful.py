"""The vmtable against a model: random allocations, frees, writes and misuse.

After every step the allocator's own check() walks its whole structure; the
model verifies that live blocks never overlap, that what was written into a
block stays there until it is freed, and at the end that all memory comes back.
"""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

import aem

# Not a power of two, not a multiple of the largest block: carved into several.
POOL = (1 << 20) + 3 * 4096 + 64 * 5
SIZES = st.one_of(
    st.integers(1, 300),
    st.integers(301, 20_000),
    st.integers(20_001, 300_000),
    st.sampled_from([16, 64, 4096, 65536, 1 << 19, 1 << 20]),
)


class Live:
    """One allocation of the model."""

    def __init__(self, offset: int, granted: int, length: int, block: aem.Block | None,
                 fill: int) -> None:
        self.offset = offset
        self.granted = granted
        self.length = length
        self.block = block        # None: allocated through the offset API
        self.content = bytes([fill]) * length


class VMTableMachine(RuleBasedStateMachine):
    zone = aem.TBL_UZONE
    min_block = 64

    live = Bundle("live")

    def __init__(self) -> None:
        super().__init__()
        self.vmt = aem.VMTable(POOL, zone=self.zone, min_block=self.min_block, fallback=False)
        self.start = self.vmt.stats()
        self.freed: list[aem.Block] = []
        self.items: list[Live] = []

    def _view(self, item: Live) -> memoryview:
        if item.block is not None:
            return memoryview(item.block)
        return self.vmt.view(item.offset, item.length)

    @rule(target=live, n=SIZES, by_offset=st.booleans(), fill=st.integers(0, 255))
    def alloc(self, n: int, by_offset: bool, fill: int) -> Live | None:
        granted = self.vmt.granted(n)
        if granted == 0:
            assert n > self.vmt.max_block
            try:
                self.vmt.alloc(n)
            except aem.VMTableError:
                return None
            raise AssertionError("a request beyond the largest block must be refused")
        try:
            if by_offset:
                offset, block = self.vmt.alloc_offset(n), None
            else:
                block = self.vmt.alloc(n)
                offset = block.offset
        except MemoryError:
            # Refused only when no free block of that size exists (caches coalesced).
            assert self.vmt.stats()["largest_free"] < granted
            return None
        assert offset % granted == 0 and 0 <= offset and offset + granted <= self.vmt.size
        item = Live(offset, granted, n, block, fill)
        view = self._view(item)
        view[:] = item.content
        view.release()
        self.items.append(item)
        return item

    @rule(item=consumes(live))
    def free(self, item: Live | None) -> None:
        if item is None:
            return
        view = self._view(item)
        assert bytes(view) == item.content, "a block's content changed while it was allocated"
        view.release()
        self.items.remove(item)
        if item.block is None:
            self.vmt.free_offset(item.offset)
        else:
            item.block.free()
            self.freed.append(item.block)

    @rule(item=live, fill=st.integers(0, 255))
    def rewrite(self, item: Live | None, fill: int) -> None:
        if item is None:
            return
        item.content = bytes([fill]) * item.length
        view = self._view(item)
        view[:] = item.content
        view.release()

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def misuse_a_freed_block(self, data: st.DataObject) -> None:
        blk = data.draw(st.sampled_from(self.freed))
        for misuse in (blk.free, lambda: memoryview(blk), lambda: self.vmt.free(blk)):
            try:
                misuse()
            except aem.VMTableError:
                continue
            raise AssertionError("misuse of a freed block was not refused")

    @rule(offset=st.integers(0, POOL + 4096))
    def free_a_random_offset(self, offset: int) -> None:
        # Only offsets that start no live block of the model may be tried.
        if any(offset == item.offset for item in self._live()):
            return
        try:
            self.vmt.free_offset(offset)
        except aem.VMTableError:
            return
        raise AssertionError(f"free_offset({offset}) of no allocated block was accepted")

    def _live(self) -> list[Live]:
        return list(self.items)

    @invariant()
    def consistent(self) -> None:
        self.vmt.check()
        items = sorted(self._live(), key=lambda v: v.offset)
        for a, b in itertools.pairwise(items):
            assert a.offset + a.granted <= b.offset, "two live blocks overlap"
        st_ = self.vmt.stats(drain=False)
        assert st_["blocks"] == len(items)
        assert st_["used"] == sum(v.granted for v in items)
        assert st_["requested"] == sum(v.length for v in items)

    def teardown(self) -> None:
        try:
            for item in self._live():
                view = self._view(item)
                assert bytes(view) == item.content
                view.release()
                if item.block is None:
                    self.vmt.free_offset(item.offset)
                else:
                    item.block.free()
            end = self.vmt.stats()
            assert end["used"] == 0 and end["free"] == end["size"] == self.start["size"]
            assert end["largest_free"] == self.start["largest_free"], "all memory coalesced back"
            self.vmt.check()
        finally:
            self.vmt.close()


class VZoneMachine(VMTableMachine):
    zone = aem.TBL_VZONE
    min_block = 16


FAST = settings(max_examples=40, stateful_step_count=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

TestUZone = VMTableMachine.TestCase
TestUZone.settings = FAST
TestVZone = VZoneMachine.TestCase
TestVZone.settings = FAST
