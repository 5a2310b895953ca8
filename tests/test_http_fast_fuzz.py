"""The fast path's C head parser under atheris (libFuzzer), for a bounded time.

``tests/fuzz/http_parse_fuzz.c`` and ``src/aem/_core/http_parse.c`` are built
with clang's coverage instrumentation and atheris' libFuzzer; the target
(``tests/fuzz/fuzz_http_parse.py``) checks the parser's promises in C and its
verdicts against httptools.  A crash, an abort or a failed check ends the run
with an error and writes the input as ``crash-*`` in the work directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import AEM_PATH

HERE = Path(__file__).parent
CORE = HERE.parent / "src" / "aem" / "_core"
SECONDS = 5

SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"HEAD /a/b.txt?x=1 HTTP/1.1\r\nHost: [::1]:8080\r\nIf-None-Match: *\r\nX:\r\n\r\n",
    b"GET /%41 HTTP/1.1\r\nhost: h\r\nRange: bytes=0-1\r\nA: b\tc\r\n\r\nGET / HTTP/1.1\r\n",
    b"POST / HTTP/1.0\r\nContent-Length: 1\r\n\r\nx",
    b"GET /c HTTP/1.1\r\nConnection: close\r\nHost: c\r\n\r\n",
]


def _build(tmp: Path) -> Path:
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang is not installed (scripts/install-system-deps.sh installs it)")
    atheris = pytest.importorskip("atheris")
    site = Path(atheris.__file__).parent.parent
    runtime = site / "libclang_rt.fuzzer_no_main.a"
    assert runtime.exists(), f"atheris' libFuzzer archive not found at {runtime}"
    lib = tmp / "libhttpparse_fuzz.so"
    subprocess.run([clang, "-O1", "-g", "-fPIC", "-shared", "-fsanitize=fuzzer-no-link",
                    f"-I{CORE}", str(CORE / "http_parse.c"), str(HERE / "fuzz" / "http_parse_fuzz.c"),
                    "-Wl,--whole-archive", str(runtime), "-Wl,--no-whole-archive",
                    "-lstdc++", "-lpthread", "-lm", "-o", str(lib)], check=True)
    return lib


@pytest.mark.timeout(180)
def test_fuzz_the_head_parser(tmp_path: Path) -> None:
    lib = _build(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(SEEDS):
        (corpus / f"seed{i}").write_bytes(seed)
    env = dict(os.environ, PYTHONPATH=AEM_PATH)
    proc = subprocess.run(
        [sys.executable, str(HERE / "fuzz" / "fuzz_http_parse.py"), str(lib),
         f"-max_total_time={SECONDS}", "-max_len=512", "-timeout=10", "-rss_limit_mb=1024",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Done" in out, out[-4000:]
    assert not list(tmp_path.glob("crash-*")), out[-4000:]
    assert len(list(corpus.iterdir())) > len(SEEDS), "the fuzzer found no new coverage"
