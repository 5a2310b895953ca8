"""The hand-off format: how an event travels from the application to another process.

Runs in both: the parent writes (``event_state``, ``send``), the capsule or forked child
reads (``recv``, ``rebuild``).  Messages are pickles on ``SOCK_SEQPACKET`` sockets; file
descriptors travel with ``SCM_RIGHTS``; larger messages in a memfd.
"""

from __future__ import annotations

import array
import contextlib
import os
import pickle
import signal
import socket
import sys
import types
from dataclasses import dataclass
from typing import Any

from .._core import AemError
from ..vmtable import TBL_VZONE, Block, by_id

MAX_INLINE = 60 * 1024  # larger messages travel in a memfd
#: The kind of an event that travels as a native record (see _core/handoff.c).
NATIVE = "native"
FDS_MAX = 16
#: The first byte of a pickle (protocol 2+): an executor's call or result sent as its bare pickle.
PICKLE = b"\x80"


# ---- what a handler in another process receives ---------------------------------------------


class ProcessEvent:
    """An event as a handler running in another process sees it.

    It has the attributes of the original event (``eid``, ``time_ns``, and
    those of its kind: ``payload``, ``data``, ``conn`` ...), copied; ``source``
    when it could be pickled, else None; ``kind`` names the original class
    (``"PayloadEvent"`` ...).
    """

    def __init__(self, kind: str, attrs: dict[str, Any]) -> None:
        self.kind = kind
        self.__dict__.update(attrs)

    def keep(self) -> None:
        """Keep data handed over in a shared (VZONE) block (a memoryview of it) and the
        process's copy of ``fd`` after the handler returns (then close it yourself);
        other data is this process's own copy anyway."""
        self.__dict__["_kept"] = True

    def __getattr__(self, name: str) -> Any:
        if name == "source":  # unpickled on first use: most handlers never look at it
            blob = self.__dict__.pop("_source_blob", None)
            value = pickle.loads(blob) if blob is not None else None
            self.__dict__["source"] = value
            return value
        raise AttributeError(f"{self.kind} has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"<aem.ProcessEvent {self.kind} eid={self.__dict__.get('eid')}>"


@dataclass(frozen=True)
class SocketRef:
    index: int
    family: int
    type: int
    proto: int


@dataclass(frozen=True)
class FdRef:
    """A file descriptor of the event (``ev.fd``): the receiver gets its own copy."""

    index: int


class OwnedFd:
    """A duplicate of an event's fd, owned by the hand-off until it is sent (then closed)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


#: What travels as a file descriptor: sockets (``conn``) and event fds.
Passed = socket.socket | OwnedFd

FIELDS: dict[type, tuple[str, ...]] = {}


def fields(tp: type) -> tuple[str, ...]:
    names = FIELDS.get(tp)
    if names is None:
        seen: list[str] = []
        for klass in tp.__mro__:
            for name, value in vars(klass).items():
                if (isinstance(value, types.GetSetDescriptorType) and not name.startswith("__")
                        and name not in ("kept", "source") and name not in seen):
                    seen.append(name)
        names = FIELDS[tp] = tuple(seen)
    return names


@dataclass(frozen=True)
class SharedBlockRef:
    """A block of a VZONE vmtable, handed over by offset: no copy."""

    vmtable_id: int
    offset: int
    length: int


def plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if isinstance(value, Block) and not value.freed and not value.fallback:
        vmt = value.vmtable
        if vmt.zone == TBL_VZONE:  # shared memory: the other process maps it too
            length = len(value)
            return SharedBlockRef(vmt.id, value.detach(), length)
    try:
        return bytes(memoryview(value))  # buffers (vmtable blocks, bytearray, ...) by value
    except TypeError:
        return value


def event_state(event: Any) -> tuple[str, dict[str, Any], list[Passed]]:
    """What of ``event`` travels to another process: its kind, attributes, and what travels
    as file descriptors (closed here once sent: the receiver has them)."""
    attrs: dict[str, Any] = {}
    socks: list[Passed] = []
    for name in fields(type(event)):
        value = getattr(event, name)
        if isinstance(value, socket.socket):
            attrs[name] = SocketRef(len(socks), value.family, value.type, value.proto)
            socks.append(value)
        elif name == "fd" and isinstance(value, int):
            # the parent's fd number means nothing in another process: hand over a copy
            try:
                socks.append(OwnedFd(value))
            except OSError:  # already closed (a Close event): nothing to hand over
                attrs[name] = None
            else:
                attrs[name] = FdRef(len(socks) - 1)
        else:
            attrs[name] = plain(value)
    if isinstance(event, ProcessEvent):
        attrs.update(event.__dict__)
    else:
        extra = getattr(event, "__dict__", None)
        if extra:
            attrs.update({k: plain(v) for k, v in extra.items()})
    if isinstance(event, ProcessEvent) and "source" in attrs:
        attrs["_source_blob"] = source_blob(event.eid, attrs.pop("source"))
    elif "_source_blob" not in attrs:
        attrs["_source_blob"] = source_blob(event.eid, event.source)
    kind = event.kind if isinstance(event, ProcessEvent) else type(event).__name__
    return kind, attrs, socks


SOURCE_BLOBS: dict[int, tuple[Any, bytes | None]] = {}


def source_blob(eid: int, source: Any) -> bytes | None:
    """``source`` pickled (None if it cannot be), once per registration: the receiver
    unpickles it only if the handler reads ``ev.source``."""
    cached = SOURCE_BLOBS.get(eid)
    if cached is not None and cached[0] is source:
        return cached[1]
    try:
        blob: bytes | None = pickle.dumps(source, protocol=5)
    except Exception:
        blob = None
    if len(SOURCE_BLOBS) >= 4096:
        SOURCE_BLOBS.clear()
    SOURCE_BLOBS[eid] = (source, blob)
    return blob


def rebuild(kind: str, attrs: dict[str, Any], fds: list[int]) -> ProcessEvent:
    for name, value in list(attrs.items()):
        if isinstance(value, SocketRef):
            sock = socket.socket(value.family, value.type, value.proto, fileno=fds[value.index])
            sock.setblocking(True)  # it says what it does: blocking, like any new socket
            attrs[name] = sock
        elif isinstance(value, FdRef):
            attrs[name] = fds[value.index]
            attrs.setdefault("_fds", []).append(fds[value.index])
        elif isinstance(value, SharedBlockRef):
            vmt = by_id(value.vmtable_id)
            if vmt is None:
                raise AemError(f"event {attrs.get('eid')}: its data is in a shared vmtable this process "
                               "does not map (create the vmtable before the capsule pool)")
            block = vmt.block_at(value.offset)
            view = memoryview(block)[: value.length]
            attrs[name] = view
            attrs.setdefault("_shared", []).append((block, view))
    return ProcessEvent(kind, attrs)


# ---- messages on SOCK_SEQPACKET sockets ----------------------------------------------------------


def send(sock: socket.socket, obj: Any, fds: list[int] = (),  # type: ignore[assignment]
          flags: int = 0) -> None:
    data = pickle.dumps(obj, protocol=5)
    fds = list(fds)
    memfd = -1
    if len(data) > MAX_INLINE:
        memfd = os.memfd_create("aem-msg", os.MFD_CLOEXEC)
        os.write(memfd, data)
        data = b"M"
        fds.append(memfd)
    else:
        data = b"P" + data
    if not fds:
        sock.send(data, flags)
        return
    try:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd_array(fds).tobytes())], flags)
    finally:
        if memfd >= 0:
            os.close(memfd)


def fd_array(fds: list[int]) -> array.array[int]:
    return array.array("i", fds)


def recv(sock: socket.socket, flags: int = 0) -> tuple[Any, list[int]] | None:
    """One message and the fds that came with it; None at end of stream."""
    data, anc, _flags, _addr = sock.recvmsg(MAX_INLINE + 16, socket.CMSG_SPACE(FDS_MAX * 4), flags)
    if not data:
        return None
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return decode(data, fds)


def decode(data: bytes, fds: list[int]) -> tuple[Any, list[int]]:
    """A pickled message as :func:`send` wrote it (inline, or in a memfd) and its fds."""
    if data[:1] == b"M":
        memfd = fds.pop()
        try:
            size = os.fstat(memfd).st_size
            data = os.pread(memfd, size, 0)
        finally:
            os.close(memfd)
        return pickle.loads(data), fds
    return pickle.loads(data[1:]), fds


def signal_name(signum: int) -> str:
    """``"SIGTERM"``, ``"SIGRTMIN+1"`` ... (real-time signals have no ``signal.Signals`` member)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        if signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
            return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
        return f"signal {signum}"



def flush_stdio() -> None:
    """Before fork(): what the application printed must not come out once per child."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()



def read_errors(chan: socket.socket) -> list[str]:
    """The errors a process that ended reported on its (non-blocking) socket."""
    out = []
    while True:
        try:
            msg = recv(chan)
        except OSError:
            break
        if msg is None:
            break
        (op, *args), fds = msg
        for fd in fds:
            os.close(fd)
        if op == "error":
            out.append(args[0])
    return out


def close_socks(socks: list[Passed]) -> None:
    """Close sockets handed to another process (they are its now)."""
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


def discard(attrs: dict[str, Any], socks: list[Passed]) -> None:
    """An event that will reach no process: close its sockets, free its shared blocks."""
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()
    for value in attrs.values():
        if isinstance(value, SharedBlockRef):
            vmt = by_id(value.vmtable_id)
            if vmt is not None:
                with contextlib.suppress(Exception):
                    vmt.free_offset(value.offset)


def release(event: ProcessEvent) -> None:
    """The default destructor in a capsule: the event's own copy of its fd is closed and
    its shared blocks go back, unless the handler kept the event (``ev.keep()``)."""
    if event.__dict__.get("_kept"):
        return
    for fd in event.__dict__.get("_fds", ()):
        with contextlib.suppress(OSError):
            os.close(fd)
    for block, view in event.__dict__.get("_shared", ()):
        view.release()
        if not block.freed:
            with contextlib.suppress(Exception):
                block.free()
