"""aem.http.static: resolution under root, traversal, ranges, conditionals, listings."""

from __future__ import annotations

import os
from email.utils import formatdate
from pathlib import Path

import pytest

from aem.http.protocol import Headers
from aem.http.static import (
    StaticFiles,
    StaticResponse,
    content_type,
    not_modified,
    parse_http_date,
    parse_range,
    precondition_failed,
)

SECRET = b"TOP-SECRET-OUTSIDE-ROOT"


@pytest.fixture()
def tree(tmp_path: Path) -> tuple[Path, StaticFiles]:
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "index.html").write_text("<h1>home</h1>")
    (root / "a.txt").write_bytes(b"0123456789")
    (root / "sub" / "b.css").write_text("body{}")
    (root / "sub" / "deeper" / "c.json").write_text("{}")
    (root / "with space.txt").write_text("spaced")
    (root / "empty.bin").write_bytes(b"")
    outside = tmp_path / "secret.txt"
    outside.write_bytes(SECRET)
    (root / "escape").symlink_to(outside)
    (root / "escape_dir").symlink_to(tmp_path)
    (root / "inner_link").symlink_to(root / "a.txt")
    os.mkfifo(root / "fifo")
    return root, StaticFiles(root)


def H(**kw: str) -> Headers:
    fields = [(k.replace("_", "-").encode(), v.encode()) for k, v in kw.items()]
    return Headers([(b"Host", b"x"), *fields])


def body_of(r: StaticResponse) -> bytes:
    if r.fd < 0:
        return r.body
    try:
        return os.pread(r.fd, r.length, r.offset)
    finally:
        r.close()


def test_file_and_headers(tree: tuple[Path, StaticFiles]) -> None:
    root, sf = tree
    r = sf.respond("GET", "/a.txt", H())
    fields = dict(r.headers)
    assert r.status == 200 and r.length == 10 and body_of(r) == b"0123456789"
    assert fields["Content-Type"] == "text/plain; charset=utf-8"
    assert fields["Accept-Ranges"] == "bytes" and fields["ETag"].startswith('"')
    assert fields["Last-Modified"] == formatdate(int((root / "a.txt").stat().st_mtime), usegmt=True)
    assert body_of(sf.respond("GET", "/with%20space.txt", H())) == b"spaced"
    assert dict(sf.respond("GET", "/sub/b.css", H()).headers)["Content-Type"].startswith("text/css")
    assert sf.respond("GET", "/empty.bin", H()).length == 0
    assert body_of(sf.respond("GET", "/inner_link", H())) == b"0123456789"  # a link inside root


def test_directory_index_listing_and_redirect(tree: tuple[Path, StaticFiles]) -> None:
    _, sf = tree
    assert body_of(sf.respond("GET", "/", H())) == b"<h1>home</h1>"
    r = sf.respond("GET", "/sub", H(), query="q=1")
    assert r.status == 301 and dict(r.headers)["Location"] == "/sub/?q=1"
    r = sf.respond("GET", "/sub/", H())
    assert r.status == 200 and b'href="b.css"' in r.body and b'href="deeper/"' in r.body
    assert b'href="../"' in r.body
    assert StaticFiles(tree[0], listing=False).respond("GET", "/sub/", H()).status == 403


@pytest.mark.parametrize("path", [
    "/../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E/secret.txt", "/sub/../../secret.txt",
    "/..%2fsecret.txt", "/sub/%2e%2e/%2e%2e/secret.txt", "/.%2e/secret.txt",
])
def test_traversal_is_refused(tree: tuple[Path, StaticFiles], path: str) -> None:
    r = tree[1].respond("GET", path, H())
    assert r.status == 403 and SECRET not in body_of(r)


@pytest.mark.parametrize("path", ["/escape", "/escape_dir/secret.txt", "//etc/passwd",
                                  "/etc/passwd", "/missing", "/a.txt/x"])
def test_outside_or_missing_is_404(tree: tuple[Path, StaticFiles], path: str) -> None:
    r = tree[1].respond("GET", path, H())
    assert r.status == 404 and r.fd < 0 and SECRET not in r.body


def test_special_files_and_bad_bytes(tree: tuple[Path, StaticFiles]) -> None:
    _, sf = tree
    assert sf.respond("GET", "/fifo", H()).status == 403  # and did not block opening it
    assert sf.respond("GET", "/a.txt%00.html", H()).status == 400


def test_methods(tree: tuple[Path, StaticFiles]) -> None:
    _, sf = tree
    r = sf.respond("HEAD", "/a.txt", H())
    assert r.status == 200 and r.length == 10
    r.close()
    r = sf.respond("OPTIONS", "/a.txt", H())
    assert r.status == 204 and dict(r.headers)["Allow"] == "GET, HEAD, OPTIONS"
    for m in ("POST", "PUT", "DELETE", "PATCH"):
        r = sf.respond(m, "/a.txt", H())
        assert r.status == 405 and "Allow" in dict(r.headers)


def test_conditional_get(tree: tuple[Path, StaticFiles]) -> None:
    _, sf = tree
    first = sf.respond("GET", "/a.txt", H())
    first.close()
    f = dict(first.headers)
    assert sf.respond("GET", "/a.txt", H(if_modified_since=f["Last-Modified"])).status == 304
    assert sf.respond("GET", "/a.txt", H(if_none_match=f["ETag"])).status == 304
    old = formatdate(0, usegmt=True)
    r = sf.respond("GET", "/a.txt", H(if_modified_since=old))
    assert r.status == 200
    r.close()
    r = sf.respond("GET", "/a.txt", H(if_modified_since="garbage"))
    assert r.status == 200
    r.close()
    # If-None-Match wins over If-Modified-Since
    r = sf.respond("GET", "/a.txt",
                   H(if_none_match='"other"', if_modified_since=f["Last-Modified"]))
    assert r.status == 200
    r.close()


def test_ranges(tree: tuple[Path, StaticFiles]) -> None:
    _, sf = tree
    r = sf.respond("GET", "/a.txt", H(range="bytes=2-4"))
    assert r.status == 206 and dict(r.headers)["Content-Range"] == "bytes 2-4/10"
    assert body_of(r) == b"234"
    assert body_of(sf.respond("GET", "/a.txt", H(range="bytes=-3"))) == b"789"
    assert body_of(sf.respond("GET", "/a.txt", H(range="bytes=7-"))) == b"789"
    r = sf.respond("GET", "/a.txt", H(range="bytes=10-"))
    assert r.status == 416 and dict(r.headers)["Content-Range"] == "bytes */10"
    r = sf.respond("GET", "/a.txt", H(range="bytes=0-1,4-5"))  # several: whole file
    assert r.status == 200 and body_of(r) == b"0123456789"
    etag = dict(r.headers)["ETag"]
    r = sf.respond("GET", "/a.txt", H(range="bytes=0-0", if_range='"stale"'))
    assert r.status == 200
    r.close()
    r = sf.respond("GET", "/a.txt", H(range="bytes=0-0", if_range=etag))
    assert r.status == 206 and body_of(r) == b"0"


def test_parse_range_table() -> None:
    assert parse_range("bytes=0-0", 5) == (0, 0)
    assert parse_range("bytes=3-100", 5) == (3, 4)
    assert parse_range("bytes=-100", 5) == (0, 4)
    assert parse_range("bytes=5-", 5) is False
    assert parse_range("bytes=-0", 5) is False
    assert parse_range("bytes=4-2", 5) is None
    assert parse_range("items=0-1", 5) is None
    assert parse_range("bytes=a-b", 5) is None
    assert parse_range("bytes=", 5) is None


def test_not_modified_and_types() -> None:
    assert not_modified(Headers([(b"If-None-Match", b"*")]), 0, '"x"')
    assert not_modified(Headers([(b"If-None-Match", b'W/"x", "y"')]), 0, '"x"')
    assert not not_modified(Headers([]), 0, '"x"')
    assert content_type("a.HTML") == "text/html; charset=utf-8"
    assert content_type("a.png") == "image/png"
    assert content_type("noext") == "application/octet-stream"
    assert content_type("a.tar.gz") == "application/octet-stream"


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        StaticFiles(tmp_path / "nope")


def test_small_file_cache(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"one")
    sf = StaticFiles(tmp_path, cache_ttl=0.2)
    t0 = 1000.0
    assert body_of(sf.respond("GET", "/f.txt", H(), now=t0)) == b"one"
    (tmp_path / "f.txt").write_bytes(b"two")
    hit = sf.respond("GET", "/f.txt", H(), now=t0 + 0.1)
    assert hit.body == b"one" and hit.fd < 0  # served from memory within the TTL
    assert sf.respond("GET", "/f.txt", H(range="bytes=0-0"), now=t0 + 0.1).status == 206
    assert body_of(sf.respond("GET", "/f.txt", H(), now=t0 + 0.3)) == b"two"
    (tmp_path / "f.txt").unlink()
    assert sf.respond("GET", "/f.txt", H(), now=t0 + 0.6).status == 404
    nocache = StaticFiles(tmp_path, cache_ttl=0)
    (tmp_path / "g.txt").write_bytes(b"g")
    r = nocache.respond("GET", "/g.txt", H())
    assert r.fd >= 0 and body_of(r) == b"g"
    big = StaticFiles(tmp_path, cache_max_file=4)
    (tmp_path / "h.txt").write_bytes(b"larger than four")
    r = big.respond("GET", "/h.txt", H())
    assert r.fd >= 0  # too big for the cache: sendfile from the descriptor
    r.close()


# -- regressions of issue 9 ----------------------------------------------------------------------

def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("value", ["bytes=\xb2-", "bytes=-\xb2", "bytes=\u0663-\u0664",
                                   "bytes=0-\xb9", "bytes=1\xb2-"])
def test_non_ascii_digits_in_range_are_ignored_and_close_the_file(
        tree: tuple[Path, StaticFiles], value: str) -> None:
    """Regression (issue 9): ``Range: bytes=\\xb2-`` raised in int() and leaked the file's fd."""
    _, sf = tree
    before = _open_fds()
    for _ in range(20):
        r = sf.respond("GET", "/a.txt", H(range=value))
        assert r.status == 200 and body_of(r) == b"0123456789"
    assert _open_fds() == before
    assert parse_range(value, 10) is None


def test_errors_while_answering_a_file_close_it(tree: tuple[Path, StaticFiles],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import aem.http.static as static_mod

    _, sf = tree

    def boom(*a: object) -> object:
        raise RuntimeError("boom")

    monkeypatch.setattr(static_mod, "parse_range", boom)
    before = _open_fds()
    for _ in range(5):
        with pytest.raises(RuntimeError):
            sf.respond("GET", "/a.txt", H(range="bytes=0-1"))
    assert _open_fds() == before


def test_cache_is_keyed_by_the_resolved_path(tmp_path: Path) -> None:
    """Regression (issue 9): /./, /%2e/, // spellings of one file each added an entry."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_bytes(b"x" * 100)
    sf = StaticFiles(tmp_path)
    spellings = ["/sub/f.txt", "/./sub/f.txt", "/%2e/sub/f.txt", "//sub//f.txt",
                 "/sub/./f.txt", "/%73ub/f.txt", "/sub/%2E/f.txt"]
    for s in spellings:
        assert body_of(sf.respond("GET", s, H(), now=1.0)) == b"x" * 100
    assert list(sf.cache) == ["sub/f.txt"]
    entry = sf.cache["sub/f.txt"]
    assert entry.path == str((tmp_path / "sub" / "f.txt").resolve()) and entry.size == 100
    assert entry.body == b"x" * 100 and entry.etag == dict(entry.response.headers)["ETag"]
    assert entry.head.startswith(b"Content-Type: text/plain") and entry.head.endswith(b"\r\n")
    assert sf.cache_bytes == entry.cost


def test_cache_is_bounded_in_entries_and_bytes_and_expires(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i}.txt").write_bytes(b"y" * 1000)
    sf = StaticFiles(tmp_path, cache_max_entries=10, cache_max_bytes=1 << 20, cache_ttl=1.0)
    for i in range(50):
        sf.respond("GET", f"/f{i}.txt", H(), now=100.0)
        assert len(sf.cache) <= 10
    assert sorted(sf.cache) == sorted(f"f{i}.txt" for i in range(40, 50))   # the newest stay
    small = StaticFiles(tmp_path, cache_max_bytes=5 * (1000 + 600), cache_ttl=1.0)
    for i in range(50):
        sf_resp = small.respond("GET", f"/f{i}.txt", H(), now=100.0)
        assert sf_resp.status == 200
        assert small.cache_bytes <= small.cache_max_bytes
    assert 1 <= len(small.cache) <= 5
    assert small.cache_bytes == sum(e.cost for e in small.cache.values())
    # expired entries go without anyone asking for them again
    n = len(small.cache)
    assert small.purge(now=100.5) == 0 and len(small.cache) == n
    assert small.purge(now=101.5) == n and not small.cache and small.cache_bytes == 0


def test_directory_redirect_is_never_to_another_host(tree: tuple[Path, StaticFiles]) -> None:
    """Regression (issue 9): ``GET //sub`` redirected to ``//sub/``, another host for a browser."""
    _, sf = tree
    for path in ("//sub", "///sub", "/./sub", "/%2fsub", "//sub/./deeper"):
        r = sf.respond("GET", path, H())
        loc = dict(r.headers)["Location"]
        assert r.status == 301 and loc.startswith("/") and not loc.startswith("//"), loc
    assert dict(sf.respond("GET", "//sub", H(), "a=1").headers)["Location"] == "/sub/?a=1"


def test_a_file_with_a_trailing_slash_is_404(tree: tuple[Path, StaticFiles]) -> None:
    """Regression (issue 9): ``/index.html/`` served the file."""
    _, sf = tree
    for path in ("/index.html/", "/a.txt/", "/sub/b.css/", "/a.txt/."):
        r = sf.respond("GET", path, H())
        assert r.status == (404 if path.endswith("/") else 200), path
        r.close()


@pytest.mark.parametrize(("value", "expected"), [
    ("Sun, 06 Nov 1994 08:49:37 GMT", 784111777),
    ("Sunday, 06-Nov-94 08:49:37 GMT", 784111777),
    ("Sun Nov  6 08:49:37 1994", 784111777),
    ("Sun, 06 Nov 1994 08:49:37", None),          # no GMT
    ("Sun, 06 Nov 1994 08:49:37 +0100", None),
    ("Sun, 06 Nov 1994 08:49:37 PST", None),
    ("Sun, 31 Feb 1994 08:49:37 GMT", None),
    ("garbage", None), ("", None),
    ("Sun, \u0660\u0666 Nov 1994 08:49:37 GMT", None),
])
def test_http_dates(value: str, expected: int | None) -> None:
    assert parse_http_date(value) == expected


def test_if_modified_since_without_gmt_is_ignored(tree: tuple[Path, StaticFiles]) -> None:
    """Regression (issue 9): a date without ``GMT`` was honoured (it is not an HTTP-date)."""
    _, sf = tree
    lm = dict(sf.respond("GET", "/a.txt", H()).headers)["Last-Modified"]
    assert sf.respond("GET", "/a.txt", H(if_modified_since=lm)).status == 304
    r = sf.respond("GET", "/a.txt", H(if_modified_since=lm.replace(" GMT", "")))
    assert r.status == 200
    r.close()


def test_if_match_and_if_unmodified_since_give_412(tree: tuple[Path, StaticFiles]) -> None:
    """Regression (issue 9): If-Match / If-Unmodified-Since were ignored."""
    _, sf = tree
    first = sf.respond("GET", "/a.txt", H())
    f = dict(first.headers)
    etag, lm = f["ETag"], f["Last-Modified"]
    before = _open_fds()
    assert sf.respond("GET", "/a.txt", H(if_match='"nope"')).status == 412
    assert sf.respond("GET", "/a.txt", H(if_match="W/" + etag)).status == 412   # strong compare
    assert sf.respond("HEAD", "/a.txt", H(if_unmodified_since=formatdate(0, usegmt=True))).status \
        == 412
    assert _open_fds() == before
    for ok in (H(if_match=etag), H(if_match='"x", ' + etag), H(if_match="*"),
               H(if_unmodified_since=lm), H(if_unmodified_since="not a date"),
               H(if_match=etag, if_unmodified_since=formatdate(0, usegmt=True))):
        r = sf.respond("GET", "/a.txt", ok)
        assert r.status == 200, ok.raw
        r.close()
    assert _open_fds() == before
    assert precondition_failed(Headers([(b"If-Match", b'"a"')]), 0, '"b"')


def test_cache_fast_key_only_for_normal_paths(tmp_path: Path) -> None:
    (tmp_path / "bc").write_bytes(b"bc")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "index.html").write_bytes(b"index")
    sf = StaticFiles(tmp_path)
    assert sf.respond("GET", "/bc", H(), now=1.0).body == b"bc"
    assert sf.respond("GET", "abc", H(), now=1.0).status == 404      # not "/bc" from the cache
    assert sf.respond("GET", "/d/", H(), now=1.0).body == b"index"
    assert sf.respond("GET", "/d", H(), now=1.0).status == 301         # "d" is not "d/"
    assert sf.respond("GET", "/d/", H(), now=1.0).body == b"index"     # from the cache
    assert sorted(sf.cache) == ["bc", "d/"]


def test_out_of_descriptors_is_503_not_404(tree: tuple[Path, StaticFiles],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9: with the fd limit reached, every file answered 404 (as if missing)."""
    import errno

    _, sf = tree
    real_open = os.open

    def no_fds(*a: object, **k: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", no_fds)
    for path in ("/a.txt", "/sub/"):
        r = sf.respond("GET", path, H())
        assert r.status == 503 and b"file descriptors" in r.body
    monkeypatch.setattr(os, "open", real_open)
    r = sf.respond("GET", "/a.txt", H())
    assert r.status == 200
    r.close()
