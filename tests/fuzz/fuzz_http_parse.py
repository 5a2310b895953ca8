"""atheris fuzz target: the fast path's head parser (src/aem/_core/http_parse.c).

Usage: python fuzz_http_parse.py LIB [libFuzzer options] [CORPUS_DIR]

LIB is http_parse.c + http_parse_fuzz.c built with clang
``-fsanitize=fuzzer-no-link`` (coverage for libFuzzer); it checks the
parser's promises itself (abort on a broken one).  Here, every head it accepts
must also be a complete, valid request to httptools (the full path's parser)
with the same method, target and header fields; the full path's own parser
(``aem.http.protocol.RequestParser``, with its Host, version and framing
rules and its default limits, the same as ``http_parse``'s) must read it as one
HTTP/1.1 request, no error, with the same fields, kept alive unless it says
``Connection: close`` (and then both parsers agree it closes); and
``aem._core.http_parse`` (the production build) must agree with it.
"""

from __future__ import annotations

import ctypes
import sys

# LIB carries libFuzzer (linked from atheris' libclang_rt.fuzzer_no_main.a): loaded first,
# globally, atheris finds it ("Using preloaded libfuzzer") and LIB's coverage feeds it.
lib = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
fuzz_one = lib.aem_fuzz_http_parse
fuzz_one.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
fuzz_one.restype = ctypes.c_long

import atheris  # noqa: E402
import httptools  # noqa: E402

from aem import _core  # noqa: E402
from aem.http.protocol import Request, RequestParser  # noqa: E402


class _Probe:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = 0
        self.parser: httptools.HttpRequestParser | None = None
        self.keep_alive: bool | None = None

    def on_headers_complete(self) -> None:
        # asked here, as the full path asks (after the message llhttp has moved on)
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.complete += 1


def test_one_input(data: bytes) -> None:
    n = fuzz_one(data, len(data))
    mine = _core.http_parse(data)
    assert (mine is None) == (n < 0), (data, n, mine)
    if mine is None:
        return
    method, target, head_len, _cond, _canon, fields, close = mine
    assert head_len == n
    probe = _Probe()
    parser = probe.parser = httptools.HttpRequestParser(probe)
    parser.feed_data(data[:head_len])  # raises on anything httptools rejects
    assert probe.complete == 1, data
    assert parser.get_method().decode() == method and parser.get_http_version() == "1.1"
    assert probe.keep_alive == (not close), data
    assert probe.url == target and probe.headers == fields, (data, probe.headers, fields)
    # never accept what the full path rejects: its parser takes the head as one plain request
    events = RequestParser().feed(data[:head_len])
    assert len(events) == 1 and type(events[0]) is Request, (data, events)
    req = events[0]
    assert (req.method, req.target.encode("latin-1"), req.version) == (method, target, "1.1"), data
    assert req.keep_alive == (not close) and req.body == b"" and req.raw_headers == fields, data


if __name__ == "__main__":
    atheris.Setup([sys.argv[0], *sys.argv[2:]], test_one_input)
    atheris.Fuzz()
