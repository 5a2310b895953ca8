"""The docs a newcomer works from: every Python block of README.md and docs/ runs, and the
reference covers every public name.

The convention (docs/writing-docs.md): a fenced block whose language is ``python``
runs, as is, in a fresh Python in an empty directory, and must exit 0 within a minute.
An HTML comment on the line right before the fence changes that:

* ``<!-- test: skip (why) -->`` — illustrative, or needs what a test cannot have (a
  server that runs until Ctrl-C, another machine): not run; the reason is required.
* ``<!-- test: continue -->`` — runs after the blocks before it in the same file (one
  program told in several steps); the chain runs as one program.

Blocks in other languages (``sh``, diagrams, C) are not run.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import aem
from conftest import run_script

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*test:\s*(?P<what>skip|continue)\b(?P<why>.*?)-->\s*$")


@dataclass
class Block:
    path: Path
    line: int
    code: str
    marker: str | None
    why: str

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The ``python`` blocks of a markdown file, with the marker before each."""
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang, indent = i, m["lang"], len(m["indent"])
        i += 1
        body: list[str] = []
        while i < len(lines) and not re.match(rf"^ {{{indent}}}```\s*$", lines[i]):
            body.append(lines[i][indent:])
            i += 1
        i += 1
        if lang != "python":
            continue
        prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        mk = MARKER.match(prev)
        out.append(Block(path, start + 1, "\n".join(body) + "\n", mk["what"] if mk else None,
                         mk["why"].strip(" ()—-") if mk else ""))
    return out


ALL = [b for f in FILES for b in blocks(f)]


def program(block: Block, every: list[Block] = ALL) -> str:
    """The block's code, preceded by the chain of blocks it continues."""
    same = [b for b in every if b.path == block.path and b.line <= block.line and b.marker != "skip"]
    chain: list[Block] = []
    for b in reversed(same):
        chain.insert(0, b)
        if b.marker != "continue":
            break
    return "\n".join(b.code for b in chain)


def test_the_docs_have_runnable_blocks() -> None:
    run = [b for b in ALL if b.marker != "skip"]
    assert len(run) >= 10, [b.id for b in run]
    assert any(b.path.name == "README.md" for b in run)
    assert any(b.path.name == "guide.md" for b in run)


@pytest.mark.parametrize("block", [b for b in ALL if b.marker == "skip"], ids=lambda b: b.id)
def test_a_skipped_block_says_why(block: Block) -> None:
    assert len(block.why) >= 8, f"{block.id}: <!-- test: skip (the reason) -->"


@pytest.mark.parametrize("block", [b for b in ALL if b.marker != "skip"], ids=lambda b: b.id)
def test_block_runs(block: Block, tmp_path: Path) -> None:
    p = run_script(program(block), timeout=60, cwd=tmp_path)
    assert p.returncode == 0, f"{block.id} failed:\n{p.stdout}\n{p.stderr}"


def test_blocks_are_found_where_they_are(tmp_path: Path) -> None:
    """The parser itself: fences, markers and chains (so the tests above can fail)."""
    sample = tmp_path / "sample.md"
    sample.write_text("text\n\n```python\nx = 1\n```\n\n<!-- test: continue -->\n```python\n"
                      "assert x == 1\n```\n\n<!-- test: skip (needs a server) -->\n```python\n"
                      "serve()\n```\n\n```sh\nmake run\n```\n")
    found = blocks(sample)
    assert [(b.line, b.marker) for b in found] == [(3, None), (8, "continue"), (13, "skip")]
    assert found[2].why == "needs a server"
    assert program(found[1], found) == "x = 1\n\nassert x == 1\n"
    assert program(found[0], found) == "x = 1\n"


# -- the reference ------------------------------------------------------------------------------

def test_the_reference_covers_every_public_name() -> None:
    """docs/reference.md is generated from the docstrings by mkdocstrings: each public name of
    ``aem`` has its ``::: aem.NAME`` entry (constants are listed in tables)."""
    text = (ROOT / "docs" / "reference.md").read_text()
    entries = set(re.findall(r"^::: aem\.(\w+)", text, re.M))
    mentioned = set(re.findall(r"`aem\.(\w+)`", text))
    public = {n for n in dir(aem) if not n.startswith("_") and not isinstance(getattr(aem, n), type(aem))}
    constants = {n for n in public if n.isupper()}
    missing = sorted((public - constants) - entries)
    assert not missing, f"no ::: entry in docs/reference.md for {missing}"
    assert not sorted(constants - mentioned), "constants missing from the reference's tables"


def test_the_site_nav_lists_existing_pages() -> None:
    nav = re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert "guide.md" in nav and "reference.md" in nav
    assert all((ROOT / "docs" / page).exists() for page in nav), nav


def test_the_reference_covers_the_servers_public_names() -> None:
    """``aem.http`` (AEMhttpd, ``app(request) -> Response``) is public too: each name of its
    ``__all__`` has a ``::: aem.http.NAME`` entry or is named in the reference's text."""
    import aem.http

    text = (ROOT / "docs" / "reference.md").read_text()
    entries = set(re.findall(r"^::: aem\.http\.(\w+)", text, re.M))
    mentioned = set(re.findall(r"`aem\.http\.(\w+)", text))
    missing = sorted(set(aem.http.__all__) - entries - mentioned)
    assert not missing, f"no ::: entry in docs/reference.md for aem.http.{missing}"


def _undocumented(cls: type, path: str, ids: set[str], documented: set[type]) -> list[str]:
    """The public members of ``cls`` a reader of the built reference would not find: not
    rendered under ``path``, not named in the class's docstring, and not on a base documented
    in the reference itself (``aem.Event``'s ``eid``) or from the standard library (asyncio's
    loop methods; the executor methods CapsulePool takes from ``concurrent.futures`` excepted)."""
    out = []
    doc = cls.__doc__ or ""
    for name in dir(cls):
        if name.startswith("_") or f"{path}.{name}" in ids or f"``{name}``" in doc:
            continue
        if name in getattr(cls, "__dataclass_fields__", ()):
            continue  # a field: in the rendered signature, with its default
        owner = next(k for k in cls.__mro__ if name in vars(k))
        if owner is not cls and owner in documented:
            continue
        if owner.__module__.split(".")[0] == "aem" or owner.__module__ == "concurrent.futures._base":
            out.append(f"{path}.{name}")
    return out


def test_the_built_reference_shows_every_member(tmp_path: Path) -> None:
    """The site as ``make docs`` builds it: every public method and attribute of each class in
    the reference can be found there, the inherited ones too (the C bases of Engine and VMTable
    hold register, alloc ...; CapsulePool's submit and map come from its executor part)."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        pytest.skip("the docs extra (mkdocs) is not installed")
    site = tmp_path / "site"
    p = subprocess.run([str(mkdocs), "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                        "--site-dir", str(site)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    ids = set(re.findall(r'id="(aem\.[\w.]+)"', (site / "reference" / "index.html").read_text()))
    classes = {}
    for path in re.findall(r"^::: (aem\.[\w.]+)", (ROOT / "docs" / "reference.md").read_text(), re.M):
        module, _, name = path.rpartition(".")
        obj = getattr(importlib.import_module(module), name)
        if isinstance(obj, type):
            classes[path] = obj
    missing = [m for path, cls in classes.items()
               for m in _undocumented(cls, path, ids, set(classes.values()))]
    assert not missing, f"members not shown by docs/reference.md: {missing}"


# -- the layout and the design describe today's tree ------------------------------------------

SRC = ROOT / "src" / "aem"
EXTERNAL_FILES = {"Python.h"}  # cited from elsewhere (CPython)


def _layout() -> str:
    readme = (ROOT / "README.md").read_text()
    part = readme[readme.index("## Layout"):]
    return part[:part.index("\n## ", 1)]


def test_the_readme_layout_names_every_part_of_the_package() -> None:
    layout = _layout()
    parts = [p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    parts = [f"{p}/" for p in parts] + [p.name for p in SRC.glob("*.py")] + ["_core.pyi"]
    c_files = [p.name for p in (SRC / "_core").glob("*.c")]
    missing = [p for p in parts + c_files if p not in layout]
    assert not missing, f"README.md's layout does not name {missing}"


def test_the_design_names_every_c_file() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    missing = [p.name for p in (SRC / "_core").glob("*.[ch]") if p.name not in design]
    assert not missing, f"docs/design.md does not name {missing}"


def test_every_file_the_docs_cite_exists() -> None:
    """A source, script or test file named in the README or docs/ (``vmtable.c``,
    ``bench/.../control.py``) is in the repository."""
    names = {p.name for p in ROOT.rglob("*") if ".git" not in p.parts and ".venv" not in p.parts}
    missing = []
    for md in FILES:
        for cited in set(re.findall(r"([\w./-]*\w\.(?:c|h|py|pyi|sh))\b", md.read_text())):
            name = cited.rsplit("/", 1)[-1]
            if name not in names and name not in EXTERNAL_FILES:
                missing.append(f"{md.name}: {cited}")
    assert not missing, missing


def _includes_python(c_file: Path, seen: frozenset[Path] = frozenset()) -> bool:
    text = c_file.read_text()
    if "#include <Python.h>" in text:
        return True
    local = [c_file.parent / n for n in re.findall(r'#include "([\w.]+)"', text)]
    return any(_includes_python(h, seen | {c_file}) for h in local if h not in seen and h.exists())


def test_the_designs_c_file_table_says_which_files_use_python() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    rows = re.findall(r"^\| (`[\w.]+`(?:, `[\w.]+`)*) \| (yes|no) \|", design, re.M)
    said = {name: py == "yes" for names, py in rows for name in re.findall(r"`([\w.]+)`", names)}
    c_files = sorted((SRC / "_core").glob("*.c"))
    assert {p.name for p in c_files} <= set(said), "a C file is missing from the table"
    wrong = [p.name for p in c_files if said[p.name] != _includes_python(p)]
    assert not wrong, f"docs/design.md says the wrong thing about Python.h in {wrong}"


GUIDE_TOPICS = {
    "an echo server": ("aem.Accept(", "aem.Read("),
    "writing to a slow peer with backpressure": ("aem.Writable(", "BlockingIOError", "aem.EVJOBSTOP"),
    "a handler in a capsule": ("aem.EVF_CAPSULE", "aem.CapsulePool(", "aem.ChildExit(job="),
    "the default pool": ("aem.default_pool()",),
    "EVF_KEEPALIVE": ("aem.EVF_KEEPALIVE",),
    "a failing source": ("aem.Source", "aem.set_error_handler"),
}


@pytest.mark.parametrize("topic", GUIDE_TOPICS)
def test_the_guide_shows_each_topic_in_a_block_that_runs(topic: str) -> None:
    """What a newcomer needs first (issue 10): each shown by an example the tests run."""
    run = [b.code for b in ALL if b.path.name == "guide.md" and b.marker != "skip"]
    assert any(all(word in code for word in GUIDE_TOPICS[topic]) for code in run), topic
