"""The vmtable: memory for events (SPEC §3).

A :class:`VMTable` is a pool of memory mapped once, managed by a buddy
allocator in the C core (``_core/vmtable.c``): a block of the needed size
class is found in constant time, alternating alloc/free of one size is served
from a per-order cache without splitting and merging, and every invariant of
the structure can be verified by :meth:`VMTable.check`.

Two zones:

* ``TBL_UZONE`` — private memory populated up front: fastest, costs its size.
  A forked child gets a private copy.
* ``TBL_VZONE`` — a shared memory object (anonymous, or named with ``name=``)
  populated lazily: pages cost memory only once used, free blocks of 64 KiB or
  more go back to the kernel, and every process that maps it (forked
  children, or unrelated processes through :meth:`VMTable.attach`) allocates
  and frees under one robust process-shared lock.  A block can be handed to
  another process by its offset.

Two ways to allocate:

* :meth:`VMTable.alloc` returns an :class:`aem.Block <Block>` — a buffer
  (``memoryview(block)``, ``sock.recv_into(block)``, ``os.readv``,
  ``sock.sendmsg``) that frees its memory with ``free()``, at the end of a
  ``with`` block, or when it is deallocated.
* :meth:`VMTable.alloc_offset` / :meth:`VMTable.free_offset` /
  :meth:`VMTable.view` deal in offsets, without creating objects: the fast
  path, and the way to hand memory between processes.

When a request finds no free block, the vmtable's ``shortage`` event is
delivered synchronously to its handlers (``aem.register(vmt.shortage, fn)``),
which may free memory; the request is retried once, then served from the heap
(``fallback=True``: ``block.fallback`` is True) or refused with
``MemoryError``.

:func:`vmtable` is the process's own vmtable (event payloads such as
``aem.Read`` data live there), configured with
``aem.control(0, aem.EVTBLINIT, {...})`` before its first use.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from . import _core

if TYPE_CHECKING:
    from types import TracebackType

    from .sources import Shortage

__all__ = ["TBL_UZONE", "TBL_VZONE", "Block", "VMTable", "VMTableError", "vmtable"]

#: Private memory, populated up front (SPEC §3).
TBL_UZONE: Final = 0
#: Shared memory, populated lazily, usable by several processes (SPEC §3).
TBL_VZONE: Final = 1

VMTableError = _core.VMTableError
Block = _core.Block
_CoreVMTable = _core.VMTable


#: Makes a vmtable's shortage event source (aem.sources.Shortage, which registers itself
#: here: this module depends on the C core alone).
_shortage_factory: Callable[[VMTable], Shortage] | None = None


def set_shortage_factory(factory: Callable[[VMTable], Shortage]) -> None:
    """Called by aem.sources: the class of ``vmt.shortage``."""
    global _shortage_factory
    _shortage_factory = factory


#: The vmtables of this process by id (a forked process, or a capsule, inherits
#: them: a VZONE block is handed to one by offset, without a copy).
_live: weakref.WeakValueDictionary[int, VMTable] = weakref.WeakValueDictionary()


def by_id(vmt_id: int) -> VMTable | None:
    """The live vmtable of this process with this id (inherited ones included), or None."""
    return _live.get(vmt_id)


class VMTable(_CoreVMTable):
    """A pool of memory for events, managed by a constant-time buddy allocator.

    ``size`` bytes (any size: rounded up to a multiple of ``min_block``, carved
    into power-of-two blocks), ``zone`` :data:`TBL_UZONE` (private, populated
    up front) or :data:`TBL_VZONE` (shared, lazy; ``name`` makes it a POSIX
    shared memory object other processes can :meth:`attach`), ``min_block``
    the smallest block (a power of two >= 16), ``fallback`` whether requests
    the pool cannot satisfy are served from the heap.

    Methods (all raise :class:`VMTableError` on misuse and once closed):

    * ``alloc(n) -> Block`` — at least ``n`` bytes; ``MemoryError`` naming the
      vmtable and the size when short and ``fallback`` is off.
    * ``free(block)`` — same as ``block.free()``, but refuses a block of
      another vmtable.
    * ``alloc_offset(n) -> int`` / ``free_offset(offset)`` — the same without
      objects (never a heap fallback: ``MemoryError`` when short).
    * ``view(offset, n) -> memoryview`` — ``n`` writable bytes at ``offset``,
      which must lie inside one allocated block.
    * ``block_at(offset) -> Block`` — a Block owning the allocated block at
      ``offset`` (e.g. one allocated by another process).
    * ``stats(drain=True) -> dict`` — see :meth:`stats`.
    * ``check(full=True)`` — verify every invariant of the allocator.
    * ``close()`` — unmap the pool (refused while memoryviews of it are alive).
    * ``granted(n) -> int`` — the bytes a request of ``n`` is granted.

    Attributes: ``size``, ``min_block``, ``max_block``, ``zone``, ``name``,
    ``fallback``, ``closed``, ``id``, and :attr:`shortage`, the event source.

    >>> vmt = aem.VMTable(1 << 20)
    >>> blk = vmt.alloc(3000)
    >>> len(blk), blk.size
    (3000, 4096)
    >>> blk.free()
    >>> off = vmt.alloc_offset(100); vmt.view(off, 5)[:] = b"hello"; vmt.free_offset(off)
    >>> vmt.close()
    """

    __slots__ = ("_shortage",)

    def __init__(self, size: int, zone: int = TBL_UZONE, min_block: int = 64,
                 fallback: bool = True, name: str | None = None) -> None:
        super().__init__(size, zone, min_block, fallback, name)
        self._shortage: Shortage | None = None
        _live[self.id] = self

    @classmethod
    def attach(cls, name: str, fallback: bool = True) -> VMTable:
        """Join the named VZONE vmtable created by another process.

        Raises ``FileNotFoundError`` if there is none, :class:`VMTableError` if
        the object is not a vmtable.  The creator's ``close()`` removes the
        name (processes attached keep their mapping).

        >>> shared = aem.VMTable.attach("jobs")  # doctest: +SKIP
        """
        self = cls.__new__(cls)
        _CoreVMTable.__init__(self, 0, TBL_VZONE, 64, fallback, name, _attach=True)
        self._shortage = None
        _live[self.id] = self
        return self

    @property
    def shortage(self) -> Shortage:
        """The event source of this vmtable's shortages (see :class:`aem.sources.Shortage`)."""
        if self._shortage is None:
            if _shortage_factory is None:
                raise RuntimeError("aem.vmtable used without aem.sources: import aem")
            self._shortage = _shortage_factory(self)
        return self._shortage

    def _on_shortage(self, size: int) -> None:
        if self._shortage is not None:
            self._shortage._deliver(size)

    def stats(self, drain: bool = True) -> dict[str, Any]:
        """Sizes and counters of the pool, as a dict.

        ``size``, ``used`` (bytes granted), ``requested``, ``free``,
        ``largest_free``, ``blocks`` (in use), ``by_order`` (block size ->
        counts of free, used and cached blocks), ``internal_fragmentation``
        (used / requested), ``external_fragmentation`` (1 - largest_free /
        free), ``shortages``, ``fallbacks`` (counted by every process of a
        VZONE), ``fallback_live`` and ``fallback_bytes`` (this process's heap
        blocks), ``splits``, ``merges``, ``drains``, ``releases`` (ranges given
        back to the kernel), ``recoveries`` (locks recovered from a dead
        holder), ``zone``, ``min_block``, ``max_block``, ``name``.

        With ``drain`` (the default), recently freed blocks kept in the
        per-order caches are first coalesced, so ``largest_free`` is the
        largest block a request could get.
        """
        return super().stats(drain)

    def check(self, full: bool = True) -> None:
        """Walk every block, free list and cache and verify every invariant.

        Raises :class:`VMTableError` listing the violations.  ``full`` also
        verifies the tag of every unit inside every block: O(size / min_block),
        and it touches all of the metadata of a huge VZONE.
        """
        super().check(full)

    def __enter__(self) -> VMTable:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        zone = "VZONE" if self.zone == TBL_VZONE else "UZONE"
        name = f" {self.name!r}" if self.name else ""
        state = " closed" if self.closed else ""
        return f"<aem.VMTable{name} {zone} size={self.size} min_block={self.min_block}{state}>"


# -- the process's vmtable ------------------------------------------------------------------

#: What the process vmtable is made of, unless EVTBLINIT says otherwise.
DEFAULT_CONFIG: Final[dict[str, Any]] = {
    "size": 64 << 20, "zone": TBL_UZONE, "min_block": 64, "fallback": True, "name": None,
}

#: The smallest process vmtable EVTBLINIT accepts: one default ``aem.Read`` payload (64 KiB).
#: A request larger than the whole pool never fits, fallback or not.
MIN_PROCESS_SIZE: Final = 64 << 10

_process: VMTable | None = None
_process_lock = threading.Lock()


def process_vmtable() -> VMTable:
    """The process's vmtable, where event payloads (``aem.Read`` data) live.

    Created on first use from :data:`DEFAULT_CONFIG` (a 64 MiB UZONE, fallback
    on), unless ``aem.control(0, aem.EVTBLINIT, {...})`` made it before.  A
    forked child inherits its parent's (a UZONE as a private copy).  Also
    reachable as ``aem.vmtable()``.

    >>> blk = aem.vmtable().alloc(100)  # doctest: +SKIP
    """
    global _process
    vmt = _process
    if vmt is None:
        with _process_lock:
            if _process is None:
                _process = VMTable(**DEFAULT_CONFIG)
            vmt = _process
    return vmt


def configure_process_vmtable(arg: dict[str, Any] | None) -> None:
    """Create the process's vmtable now, from ``arg`` (``aem.EVTBLINIT``).

    ``arg`` holds any of ``size``, ``zone``, ``min_block``, ``fallback`` and
    ``name`` (the arguments of :class:`VMTable`; the others keep their
    defaults), or is ``None`` for the defaults; ``size`` must be at least
    :data:`MIN_PROCESS_SIZE`.  Raises :class:`VMTableError`
    once the process vmtable exists (it is made by its first use, or by an
    earlier EVTBLINIT), ``ValueError``/``TypeError`` for a bad ``arg``.

    >>> aem.control(0, aem.EVTBLINIT, {"size": 16 << 20, "zone": aem.TBL_VZONE})  # doctest: +SKIP
    """
    global _process
    if arg is not None and not isinstance(arg, dict):
        raise TypeError(f"EVTBLINIT takes a dict of VMTable arguments or None, "
                        f"not {type(arg).__name__}")
    config = dict(DEFAULT_CONFIG)
    if arg:
        unknown = sorted(set(arg) - set(DEFAULT_CONFIG))
        if unknown:
            raise ValueError(f"unknown EVTBLINIT key(s) {', '.join(map(repr, unknown))}; "
                             f"expected some of {', '.join(DEFAULT_CONFIG)}")
        config.update(arg)
    size = config["size"]
    if isinstance(size, int) and not isinstance(size, bool) and 0 < size < MIN_PROCESS_SIZE:
        raise ValueError(f"EVTBLINIT size {size} is too small for the process vmtable, where aem.Read "
                         f"puts what it reads (up to 64 KiB at a time by default): give at least "
                         f"{MIN_PROCESS_SIZE} bytes")
    with _process_lock:
        if _process is not None:
            raise VMTableError("the process vmtable already exists (made by its first use or an "
                               "earlier EVTBLINIT): EVTBLINIT must come before anything uses it")
        _process = VMTable(**config)


class _ProcessVMTableAccess:
    """``aem.vmtable``: call it for the process's vmtable (see :func:`process_vmtable`).

    It is an object rather than a function because, re-exported by the
    package, it shadows this module's name there: ``from . import vmtable``
    yields it, so it also carries :meth:`configure_process_vmtable` (EVTBLINIT).
    """

    __slots__ = ()

    def __call__(self) -> VMTable:
        """The process's vmtable (created on first use)."""
        return process_vmtable()

    @staticmethod
    def existing() -> VMTable | None:
        """The process's vmtable if one was made, else None (this never makes one: a status
        page that looks must not allocate its 64 MiB)."""
        return _process

    @staticmethod
    def configure_process_vmtable(arg: dict[str, Any] | None) -> None:
        """Create the process's vmtable from ``arg`` (see :func:`configure_process_vmtable`)."""
        configure_process_vmtable(arg)

    def __repr__(self) -> str:
        return "<aem.vmtable: call it for the process's vmtable>"


#: ``aem.vmtable()``: the process's vmtable.
vmtable: Final = _ProcessVMTableAccess()


def _new_lock_in_child() -> None:
    """A forked child keeps its parent's vmtable; only the lock guarding its creation is
    renewed (another thread of the parent may have held it at fork time)."""
    global _process_lock
    _process_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)
