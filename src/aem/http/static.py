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
``cache_ttl`` (1 s) after they were read, keyed by the resolved path (every
spelling of a path is one entry), bounded in entries and bytes, and served
from there to requests without conditional or range headers: a file changed
on disk is seen at most that late.  The cache holds only bytes read through
the checks above, so it never serves anything from outside root.
Larger files go out with ``sendfile`` from the open descriptor.
"""

from __future__ import annotations

import calendar
import datetime
import errno
import html
import mimetypes
import os
import re
import stat
import time
import urllib.parse
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Final

from .protocol import Headers

__all__ = ["ALLOW", "CacheEntry", "StaticFiles", "StaticResponse", "content_type", "not_modified",
           "parse_http_date", "parse_range", "precondition_failed"]

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


def _digits(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes ``"\xb2"`` (²), which ``int`` refuses."""
    return text.isascii() and text.isdigit()


_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
# RFC 9110 §5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime forms; nothing else
_IMF = re.compile(r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d\d) ([A-Z][a-z]{2}) (\d{4}) "
                  r"(\d\d):(\d\d):(\d\d) GMT\Z", re.ASCII)
_RFC850 = re.compile(r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), "
                     r"(\d\d)-([A-Z][a-z]{2})-(\d\d) (\d\d):(\d\d):(\d\d) GMT\Z", re.ASCII)
_ASCTIME = re.compile(r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) ([A-Z][a-z]{2}) ([ \d]\d) "
                      r"(\d\d):(\d\d):(\d\d) (\d{4})\Z", re.ASCII)


def parse_http_date(value: str) -> int | None:
    """Seconds since the epoch of an HTTP-date (RFC 9110 §5.6.7), or None if it is not one.

    A date without ``GMT`` (other than the asctime form), with another zone,
    or out of range is not an HTTP-date: the condition it carries is ignored.
    """
    value = value.strip()
    m = _IMF.match(value)
    if m:
        day, mon, year, hh, mm, ss = m.groups()
    else:
        m = _RFC850.match(value)
        if m:
            day, mon, yy, hh, mm, ss = m.groups()
            year = str(1900 + int(yy) if int(yy) >= 70 else 2000 + int(yy))
        else:
            m = _ASCTIME.match(value)
            if not m:
                return None
            mon, day, hh, mm, ss, year = m.groups()
    month = _MONTHS.get(mon)
    if month is None:
        return None
    try:
        return calendar.timegm(datetime.datetime(
            int(year), month, int(day), int(hh), int(mm), int(ss)).timetuple())
    except ValueError:
        return None


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
    if not (_digits(first) or first == "") or not (_digits(last) or last == ""):
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


def _tags(value: str) -> list[str]:
    return [t.strip() for t in value.split(",")]


def precondition_failed(headers: Headers, mtime: int, etag: str) -> bool:
    """True when ``If-Match`` or ``If-Unmodified-Since`` fails (412; RFC 9110 §13.2.2).

    ``If-Match`` compares strongly (a weak tag never matches); when it is
    present, ``If-Unmodified-Since`` is not looked at; an invalid date is ignored.
    """
    im = headers.get("if-match")
    if im is not None:
        tags = _tags(im)
        return "*" not in tags and etag not in tags
    ius = headers.get("if-unmodified-since")
    if ius is None:
        return False
    when = parse_http_date(ius)
    return when is not None and mtime > when


def not_modified(headers: Headers, mtime: int, etag: str) -> bool:
    """True when a conditional GET may be answered 304 (``If-None-Match`` wins over IMS).

    An ``If-Modified-Since`` that is not an HTTP-date (see :func:`parse_http_date`) is ignored.
    """
    inm = headers.get("if-none-match")
    if inm is not None:
        tags = _tags(inm)
        return "*" in tags or etag in tags or ("W/" + etag) in tags
    ims = headers.get("if-modified-since")
    if ims is None:
        return False
    when = parse_http_date(ims)
    return when is not None and mtime <= when


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


@dataclass(slots=True)
class CacheEntry:
    """One small file held in memory by :class:`StaticFiles` (see docs/http.md).

    ``key``: the resolved request path under root — percent-decoded, ``.``
    and empty segments dropped, joined with ``/`` (``"sub/a.txt"``; a
    directory's index is under ``"sub/"``, the root's under ``""``), so every
    spelling of one file (``/./a``, ``/%2e/a``, ``//a``) is one entry.
    ``path``: the opened file's real path.  ``body``: its bytes.  ``head``:
    its own header lines, rendered (``Content-Type`` to ``Accept-Ranges``,
    each ending in CRLF; the status line, ``Server``, ``Date``,
    ``Content-Length`` and ``Connection`` belong to each response).
    ``mtime_ns``, ``size``, ``etag`` as served; ``expires``: the
    ``time.time()`` after which the entry is not used; ``response``: the
    200 answer (shared: not to be modified).
    """

    key: str
    path: str
    body: bytes
    head: bytes
    mtime_ns: int
    size: int
    etag: str
    expires: float
    response: StaticResponse

    @property
    def cost(self) -> int:
        """The bytes the entry is counted for against ``cache_max_bytes``."""
        return len(self.body) + len(self.head) + 2 * len(self.key) + len(self.path) + _ENTRY_COST


_OPEN_ERRORS = {403: "forbidden", 404: "not found",
                503: "the server is out of file descriptors; try again"}
_ENTRY_COST = 512   # the objects of an entry besides its strings, roughly


def _text(status: int, message: str, extra: list[tuple[str, str]] | None = None) -> StaticResponse:
    body = (message + "\n").encode()
    headers = [("Content-Type", "text/plain; charset=utf-8")]
    if extra:
        headers += extra
    return StaticResponse(status, headers, body, length=len(body))


def _segments(path: str) -> list[str] | StaticResponse:
    """The path's segments under root (decoded once), or the refusal (400, 403)."""
    raw = urllib.parse.unquote_to_bytes(path)
    if b"\x00" in raw:
        return _text(400, "bad path")
    segs = []
    for seg in raw.split(b"/"):
        if seg == b"..":
            return _text(403, "path traversal refused")
        if seg and seg != b".":
            segs.append(os.fsdecode(seg))
    return segs


class StaticFiles:
    """Answers GET/HEAD/OPTIONS for the files under ``root``.

    A directory is answered with its ``index`` file if there is one, else with
    a small HTML listing (``listing=False``: 403); a directory path without a
    trailing ``/`` is redirected (301) to the one with it, and a file path
    with one is a 404.  Files carry ``Last-Modified``, an ``ETag``,
    ``Accept-Ranges: bytes``; ``If-Match`` / ``If-Unmodified-Since`` that fail
    get 412, ``If-None-Match`` / ``If-Modified-Since`` 304, single byte ranges
    206 (or 416).

    Files up to ``cache_max_file`` bytes are kept in memory for ``cache_ttl``
    seconds (:class:`CacheEntry`), at most ``cache_max_entries`` of them and
    ``cache_max_bytes`` in all (entries counted with their overhead); expired
    entries are dropped by :meth:`purge` (the server calls it every tick) or
    when room is needed, the oldest first.  Raises ``NotADirectoryError`` if
    ``root`` is not a directory.
    """

    def __init__(self, root: str | os.PathLike[str], index: str = "index.html",
                 listing: bool = True, cache_ttl: float = 1.0,
                 cache_max_file: int = 64 * 1024, cache_max_bytes: int = 16 << 20,
                 cache_max_entries: int = 1024) -> None:
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
        self.cache_max_entries = cache_max_entries
        #: The small-file cache: key (see :class:`CacheEntry`) → entry, oldest first.
        self.cache: dict[str, CacheEntry] = {}
        self.cache_bytes = 0
        self._lm: dict[int, str] = {}

    def respond(self, method: str, path: str, headers: Headers, query: str = "",
                now: float | None = None) -> StaticResponse:
        """The answer to ``method`` on the (percent-encoded) ``path``; see the class doc.

        ``now`` (``time.time()``) dates the small-file cache; the response
        returned from the cache is shared: do not modify it.
        """
        if method != "GET" and method != "HEAD":
            if method == "OPTIONS":
                return StaticResponse(204, [("Allow", ALLOW)])
            return _text(405, f"{method} is not allowed here", [("Allow", ALLOW)])
        cached = self.cache_ttl > 0 and not _conditional(headers.raw)
        if (cached and path[:1] == "/" and "%" not in path and "/." not in path
                and "//" not in path):
            # already in normal form (the usual case): the key without decoding or splitting
            hit = self.cache.get(path[1:])
            if hit is not None and hit.expires > (time.time() if now is None else now):
                return hit.response
        segs = _segments(path)
        if isinstance(segs, StaticResponse):
            return segs
        slash = path.endswith("/")
        key: str | None = None
        if cached:
            key = "/".join(segs) + "/" if slash and segs else "/".join(segs)
            hit = self.cache.get(key)
            if hit is not None:
                if hit.expires > (time.time() if now is None else now):
                    return hit.response
                self._drop(key)
        return self._respond(segs, slash, query, headers, key, now)

    def purge(self, now: float | None = None) -> int:
        """Drop the expired cache entries; returns how many went."""
        now = time.time() if now is None else now
        old = [k for k, e in self.cache.items() if e.expires <= now]
        for k in old:
            self._drop(k)
        return len(old)

    def _drop(self, key: str) -> None:
        entry = self.cache.pop(key, None)
        if entry is not None:
            self.cache_bytes -= entry.cost

    def _store(self, entry: CacheEntry, now: float) -> None:
        cost = entry.cost
        if cost > self.cache_max_bytes or self.cache_max_entries < 1:
            return
        self._drop(entry.key)
        cache = self.cache
        if len(cache) >= self.cache_max_entries or self.cache_bytes + cost > self.cache_max_bytes:
            self.purge(now)
            while cache and (len(cache) >= self.cache_max_entries
                             or self.cache_bytes + cost > self.cache_max_bytes):
                self._drop(next(iter(cache)))
        cache[entry.key] = entry
        self.cache_bytes += cost

    def _respond(self, segs: list[str], slash: bool, query: str, headers: Headers,
                 key: str | None, now: float | None) -> StaticResponse:
        target = os.path.join(self.root, *segs)
        fd, st, real = self._open(target)
        if fd < 0:
            return _text(-fd, _OPEN_ERRORS[-fd])
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            if not slash:
                # built from the segments: "//sub" must not become "//sub/" (another host)
                loc = "".join("/" + urllib.parse.quote(os.fsencode(s)) for s in segs) + "/"
                return _text(301, "moved", [("Location", loc + ("?" + query if query else ""))])
            ifd, ist, ireal = self._open(os.path.join(target, self.index))
            if ifd >= 0 and stat.S_ISREG(ist.st_mode):
                return self._file(ifd, ist, ireal, self.index, headers, key, now)
            if ifd >= 0:
                os.close(ifd)
            elif ifd == -503:
                return _text(503, _OPEN_ERRORS[503])
            if not self.listing:
                return _text(403, "directory listing is disabled")
            return self._listing(target, "/" + "/".join(segs) + ("/" if segs else ""))
        if slash:  # "/index.html/": a file is not a directory
            os.close(fd)
            return _text(404, "not found")
        return self._file(fd, st, real, segs[-1] if segs else "", headers, key, now)

    def _open(self, target: str) -> tuple[int, os.stat_result, str]:
        """(fd, stat, real path) of the file at ``target`` if under root, else (-status, ...)."""
        try:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except (FileNotFoundError, NotADirectoryError):
            return -404, _NO_STAT, ""
        except PermissionError:
            return -403, _NO_STAT, ""
        except OSError as e:
            # out of descriptors is the server's trouble, not a missing file
            return (-503 if e.errno in (errno.EMFILE, errno.ENFILE) else -404), _NO_STAT, ""
        try:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                real = os.path.realpath(target)
            if real != self.root and not real.startswith(self._prefix):
                os.close(fd)
                return -404, _NO_STAT, ""
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            os.close(fd)
            return -403, _NO_STAT, ""
        return fd, st, real

    def _file(self, fd: int, st: os.stat_result, real: str, name: str, headers: Headers,
              key: str | None = None, now: float | None = None) -> StaticResponse:
        """The answer for open file ``fd``, which this method owns: closed on every path
        that does not hand it on (in a ``StaticResponse``), and on any error."""
        try:
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
            answer: StaticResponse | None = None
            if headers.raw and (len(headers.raw) > 1 or headers.raw[0][0].lower() != b"host"):
                if precondition_failed(headers, mtime, etag):
                    answer = _text(412, "precondition failed", fields[1:3])
                elif not_modified(headers, mtime, etag):
                    answer = StaticResponse(304, fields[1:3])
                else:
                    rng = headers.get("range")
                    if rng is not None and _if_range_ok(headers, lm, etag):
                        span = parse_range(rng, size)
                        if span is False:
                            answer = _text(416, "range not satisfiable",
                                           [("Content-Range", f"bytes */{size}")])
                        elif span is not None:
                            assert not isinstance(span, bool)
                            start, end = span
                            fields.append(("Content-Range", f"bytes {start}-{end}/{size}"))
                            return StaticResponse(206, fields, fd=fd, offset=start,
                                                  length=end - start + 1)
            if answer is None and (key is None or size > self.cache_max_file):
                return StaticResponse(200, fields, fd=fd, offset=0, length=size)
            data = b"" if answer is not None else os.pread(fd, size, 0)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if answer is not None:
            return answer
        resp = StaticResponse(200, fields, data, length=len(data))
        if len(data) == size and key is not None:   # (else it changed while we read)
            now = time.time() if now is None else now
            head = "".join(f"{k}: {v}\r\n" for k, v in fields).encode("latin-1")
            self._store(CacheEntry(key, real, data, head, st.st_mtime_ns, size, etag,
                                   now + self.cache_ttl, resp), now)
        return resp

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
