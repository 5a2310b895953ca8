"""aem.http.static: resolution under root, traversal, ranges, conditionals, listings."""

from __future__ import annotations

import os
from email.utils import formatdate
from pathlib import Path

import pytest

from aem.http.protocol import Headers
from aem.http.static import StaticFiles, StaticResponse, content_type, not_modified, parse_range

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
