"""Static files under a root directory: what to answer for a path, never a byte outside root.

:meth:`StaticFiles.respond` turns a request (method, target path, headers)
into a :class:`StaticResponse`: status, header fields, a small body, and for
file contents an open descriptor with the span to send (the server sends it
with ``sendfile`` and closes it).  It opens files but moves no bytes to a
client; the decisions it makes (ranges, conditional requests, content types)
are plain functions, tested alone.

Safety, in order:

1. the path is percent-decoded once; a NUL byte is a 400;
2. it is split on ``/``; a ``..`` segment (after decoding, so ``%2e%2e``
   too) is a 403; empty and ``.`` segments are dropped, so absolute paths
   (``//etc/passwd``) stay under root;
3. the file is opened (``O_NONBLOCK``: a FIFO cannot block the server), and
   the *opened* file's real path is read back from ``/proc/self/fd``: if it
   lies outside root (a symlink pointing out), it is closed unread and the
   answer is 404.  Checking the opened file, not a path, leaves no window
   for a symlink swapped between a check and the open;
4. anything but a regular file or a directory is a 403.

Small files (up to ``cache_max_file``, 64 KiB) are kept in memory for
``cache_ttl`` (1 s) after they were read, keyed by the request path, and
served from there to requests without conditional or range headers: a file
changed on disk is seen at most that late.  The cache holds only bytes read
through the checks above, so it never serves anything from outside root.
Larger files go out with ``sendfile`` from the open descriptor.
"""

from __future__ import annotations

import html
import mimetypes
import os
import stat
import time
import urllib.parse
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from typing import Final

from .protocol import Headers

__all__ = ["ALLOW", "StaticFiles", "StaticResponse", "content_type", "not_modified", "parse_range"]

#: The methods a static tree answers.
ALLOW: Final = "GET, HEAD, OPTIONS"

_TYPES: dict[str, str] = {}


def content_type(name: str) -> str:
    """The ``Content-Type`` for a file name (``mimetypes``; text types get ``charset=utf-8``)."""
    ext = os.path.splitext(name)[1].lower()
    ct = _TYPES.get(ext)
    if ct is None:
        guessed, encoding = mimetypes.guess_type("x" + ext, strict=False)
        if encoding is not None or guessed is None:
            ct = "application/octet-stream"
        elif guessed.startswith("text/") or guessed in ("application/javascript",
                                                          "application/json"):
            ct = guessed + "; charset=utf-8"
        else:
            ct = guessed
        _TYPES[ext] = ct
    return ct


def parse_range(value: str, size: int) -> tuple[int, int] | bool | None:
    """Interpret a ``Range`` header for a representation of ``size`` bytes.

    Returns ``(start, end)`` (inclusive) for one satisfiable byte range,
    ``None`` when the header is to be ignored (not ``bytes=``, malformed, or
    several ranges: the whole file is then sent, as RFC 9110 allows), and
    ``False`` when the range cannot be satisfied (416).
    """
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        n = int(last)
        if n == 0 or size == 0:
            return False
        return (max(0, size - n), size - 1)
    start = int(first)
    end = size - 1 if last == "" else int(last)
    if last != "" and end < start:
        return None
    if start >= size:
        return False
    return (start, min(end, size - 1))


def not_modified(headers: Headers, mtime: int, etag: str) -> bool:
    """True when a conditional GET may be answered 304 (``If-None-Match`` wins over IMS)."""
    inm = headers.get("if-none-match")
    if inm is not None:
        tags = [t.strip() for t in inm.split(",")]
        return "*" in tags or etag in tags or ("W/" + etag) in tags
    ims = headers.get("if-modified-since")
    if ims is None:
        return False
    try:
        when = parsedate_to_datetime(ims).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    return mtime <= when


def _if_range_ok(headers: Headers, last_modified: str, etag: str) -> bool:
    value = headers.get("if-range")
    if value is None:
        return True
    value = value.strip()
    return value == etag or value == last_modified


@dataclass(slots=True)
class StaticResponse:
    """What to answer: ``status``, ``headers`` and either ``body`` or a file span.

    When ``fd >= 0``, the content is ``length`` bytes of that open file from
    ``offset``; whoever sends it closes ``fd`` (also for HEAD, where nothing is
    sent).  ``length`` is the ``Content-Length`` in both cases.
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    fd: int = -1
    offset: int = 0
    length: int = 0

    def close(self) -> None:
        """Close the file descriptor if there is one (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _conditional(raw: list[tuple[bytes, bytes]]) -> bool:
    """True if the request has conditional (``If-*``) or ``Range`` header fields."""
    for name, _ in raw:
        n = name.lower()
        if n.startswith(b"if-") or n == b"range":
            return True
    return False


def _text(status: int, message: str, extra: list[tuple[str, str]] | None = None) -> StaticResponse:
    body = (message + "\n").encode()
    headers = [("Content-Type", "text/plain; charset=utf-8")]
    if extra:
        headers += extra
    return StaticResponse(status, headers, body, length=len(body))


class StaticFiles:
    """Answers GET/HEAD/OPTIONS for the files under ``root``.

    A directory is answered with its ``index`` file if there is one, else with
    a small HTML listing (``listing=False``: 403); a directory path without a
    trailing ``/`` is redirected (301) to the one with it.  Files carry
    ``Last-Modified``, an ``ETag``, ``Accept-Ranges: bytes``; conditional
    requests get 304 and single byte ranges 206 (or 416).  Raises
    ``NotADirectoryError`` if ``root`` is not a directory.
    """

    def __init__(self, root: str | os.PathLike[str], index: str = "index.html",
                 listing: bool = True, cache_ttl: float = 1.0,
                 cache_max_file: int = 64 * 1024, cache_max_bytes: int = 16 << 20) -> None:
        real = os.path.realpath(os.fspath(root))
        if not os.path.isdir(real):
            raise NotADirectoryError(f"static root {os.fspath(root)!r} is not a directory")
        self.root = real
        self._prefix = real.rstrip("/") + "/"
        self.index = index
        self.listing = listing
        self.cache_ttl = cache_ttl
        self.cache_max_file = cache_max_file
        self.cache_max_bytes = cache_max_bytes
        self._cache: dict[str, tuple[float, StaticResponse]] = {}
        self._cache_bytes = 0
        self._lm: dict[int, str] = {}

    def respond(self, method: str, path: str, headers: Headers, query: str = "",
                now: float | None = None) -> StaticResponse:
        """The answer to ``method`` on the (percent-encoded) ``path``; see the class doc.

        ``now`` (``time.time()``) dates the small-file cache; the response
        returned from the cache is shared: do not modify it.
        """
        if method == "GET" or method == "HEAD":
            if self.cache_ttl > 0 and not _conditional(headers.raw):
                hit = self._cache.get(path)
                if hit is not None:
                    if hit[0] > (time.time() if now is None else now):
                        return hit[1]
                    self._uncache(path)
                return self._respond(method, path, headers, query, path, now)
            return self._respond(method, path, headers, query, None, now)
        if method == "OPTIONS":
            return StaticResponse(204, [("Allow", ALLOW)])
        return _text(405, f"{method} is not allowed here", [("Allow", ALLOW)])

    def _uncache(self, key: str) -> None:
        entry = self._cache.pop(key, None)
        if entry is not None:
            self._cache_bytes -= len(entry[1].body)

    def _respond(self, method: str, path: str, headers: Headers, query: str,
                 cache_key: str | None, now: float | None) -> StaticResponse:
        raw = urllib.parse.unquote_to_bytes(path)
        if b"\x00" in raw:
            return _text(400, "bad path")
        segs = []
        for seg in raw.split(b"/"):
            if seg == b"..":
                return _text(403, "path traversal refused")
            if seg and seg != b".":
                segs.append(os.fsdecode(seg))
        target = os.path.join(self.root, *segs)
        fd, st = self._open(target)
        if fd < 0:
            return _text(-fd, "not found" if fd == -404 else "forbidden")
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            if not path.endswith("/"):
                loc = path + "/" + ("?" + query if query else "")
                return _text(301, "moved", [("Location", loc)])
            ifd, ist = self._open(os.path.join(target, self.index))
            if ifd >= 0 and stat.S_ISREG(ist.st_mode):
                return self._file(ifd, ist, self.index, headers, cache_key, now)
            if ifd >= 0:
                os.close(ifd)
            if not self.listing:
                return _text(403, "directory listing is disabled")
            return self._listing(target, path)
        return self._file(fd, st, segs[-1] if segs else "", headers, cache_key, now)

    def _open(self, target: str) -> tuple[int, os.stat_result]:
        """(fd, stat) of the file at ``target`` if it lies under root, else (-status, ...)."""
        try:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except (FileNotFoundError, NotADirectoryError):
            return -404, _NO_STAT
        except PermissionError:
            return -403, _NO_STAT
        except OSError:
            return -404, _NO_STAT
        try:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                real = os.path.realpath(target)
            if real != self.root and not real.startswith(self._prefix):
                os.close(fd)
                return -404, _NO_STAT
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            os.close(fd)
            return -403, _NO_STAT
        return fd, st

    def _file(self, fd: int, st: os.stat_result, name: str, headers: Headers,
              cache_key: str | None = None, now: float | None = None) -> StaticResponse:
        size = st.st_size
        mtime = int(st.st_mtime)
        lm = self._lm.get(mtime)
        if lm is None:
            if len(self._lm) > 4096:
                self._lm.clear()
            lm = self._lm[mtime] = formatdate(mtime, usegmt=True)
        etag = f'"{st.st_mtime_ns:x}-{size:x}"'
        fields = [("Content-Type", content_type(name)), ("Last-Modified", lm), ("ETag", etag),
                  ("Accept-Ranges", "bytes")]
        if headers.raw and (len(headers.raw) > 1 or headers.raw[0][0].lower() != b"host"):
            if not_modified(headers, mtime, etag):
                os.close(fd)
                return StaticResponse(304, fields[1:3])
            rng = headers.get("range")
            if rng is not None and _if_range_ok(headers, lm, etag):
                span = parse_range(rng, size)
                if span is False:
                    os.close(fd)
                    return _text(416, "range not satisfiable",
                                 [("Content-Range", f"bytes */{size}")])
                if span is not None:
                    assert not isinstance(span, bool)
                    start, end = span
                    fields.append(("Content-Range", f"bytes {start}-{end}/{size}"))
                    return StaticResponse(206, fields, fd=fd, offset=start, length=end - start + 1)
        if cache_key is not None and size <= self.cache_max_file:
            try:
                data = os.pread(fd, size, 0)
            finally:
                os.close(fd)
            if len(data) != size:  # changed while we read: do not keep it
                return StaticResponse(200, fields, data, length=len(data))
            resp = StaticResponse(200, fields, data, length=size)
            if self._cache_bytes + size > self.cache_max_bytes:
                self._cache.clear()
                self._cache_bytes = 0
            self._cache[cache_key] = ((time.time() if now is None else now) + self.cache_ttl, resp)
            self._cache_bytes += size
            return resp
        return StaticResponse(200, fields, fd=fd, offset=0, length=size)

    def _listing(self, directory: str, path: str) -> StaticResponse:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: (not e.is_dir(), e.name))
        except OSError:
            return _text(403, "forbidden")
        title = html.escape(urllib.parse.unquote(path))
        rows = ['<li><a href="../">../</a></li>'] if path != "/" else []
        for e in entries:
            slash = "/" if e.is_dir() else ""
            href = urllib.parse.quote(os.fsencode(e.name)) + slash
            rows.append(f'<li><a href="{href}">{html.escape(e.name)}{slash}</a></li>')
        page = ("<!doctype html><html><head><meta charset=\"utf-8\">"
                f"<title>Index of {title}</title></head><body><h1>Index of {title}</h1>"
                f"<ul>{''.join(rows)}</ul></body></html>\n")
        body = page.encode("utf-8", "surrogateescape")
        return StaticResponse(200, [("Content-Type", "text/html; charset=utf-8")], body,
                              length=len(body))


_NO_STAT = os.stat_result((0,) * 10)
