"""A core that reads alone: imports go one way, sources reach the engine only through
SourceHost, no magic numbers, and the C core's types are described in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import aem
from aem import _core, sources

PKG = Path(aem.__file__).resolve().parent


def _tree(module: str) -> ast.Module:
    return ast.parse((PKG / f"{module.replace('.', '/')}.py").read_text())


def _imports(module: str) -> set[str]:
    """The aem modules ``module`` imports, anywhere in it (functions too), outside
    ``if TYPE_CHECKING:`` blocks (those are for the type checker only)."""
    tree = _tree(module)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    out.add(node.module.split(".")[0])
                else:
                    out |= {a.name for a in node.names}
            elif node.module and node.module.startswith("aem."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("aem.")}
    return out


def test_vmtable_depends_on_the_c_core_alone() -> None:
    assert _imports("vmtable") == {"_core"}


def test_sources_do_not_import_the_engine() -> None:
    assert _imports("sources") <= {"_core", "vmtable"}


def test_no_import_cycle_between_engine_sources_and_vmtable() -> None:
    core = {"engine", "sources", "vmtable"}
    graph = {m: _imports(m) & core for m in core}

    def reaches(a: str, b: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in graph[a])

    assert not [m for m in core if reaches(m, m)], graph


def _host_members() -> set[str]:
    return {n for n in vars(sources.SourceHost) if not n.startswith("__") and n not in (
        "_is_protocol", "_is_runtime_protocol", "_abc_impl")}


def test_sources_use_only_the_source_host_interface() -> None:
    allowed = _host_members()
    used = {node.attr for node in ast.walk(_tree("sources"))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in ("engine", "eng")}
    assert used and used <= allowed, f"outside SourceHost: {sorted(used - allowed)}"


def test_engine_implements_source_host() -> None:
    members = _host_members()
    assert {"_add", "_listen_to_job", "_user_channel"} <= members
    missing = [n for n in members if not hasattr(aem.Engine, n)]
    assert not missing, missing


_MODULES = sorted(".".join(p.relative_to(PKG).with_suffix("").parts) for p in PKG.rglob("*.py")
                  if "bench" not in p.relative_to(PKG).parts)
_MAGIC_LEFT: dict[str, str] = {}


@pytest.mark.parametrize("module", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=_MAGIC_LEFT[m])) if m in _MAGIC_LEFT else m
    for m in _MODULES])
def test_no_magic_numbers(module: str) -> None:
    """errno values by name (errno.EMSGSIZE, not 90) and named limits (not 2**31 - 1), in
    every module of the package (the benchmarks aside)."""
    bad = []
    tree = _tree(module)
    named = {id(n) for t in tree.body if isinstance(t, ast.Assign) for n in ast.walk(t)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and "errno" in ast.unparse(node.left) and any(
                isinstance(c, ast.Constant) and isinstance(c.value, int) for c in node.comparators):
            bad.append(ast.unparse(node))
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and id(node) not in named
                and isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant)):
            bad.append(ast.unparse(node))  # a constant power outside a module-level constant
    assert not bad, bad


def test_every_c_type_has_its_stub_in_core_pyi() -> None:
    stub = ast.parse((PKG / "_core.pyi").read_text())
    stubbed = {n.name for n in stub.body if isinstance(n, ast.ClassDef)}
    stubbed |= {n.name for n in stub.body if isinstance(n, ast.FunctionDef)}
    runtime = {n for n, v in vars(_core).items() if isinstance(v, type) or callable(v)}
    runtime -= {n for n in runtime if n.startswith("__")}
    assert not sorted(runtime - stubbed), "C names without a stub in _core.pyi"
    for module in ("vmtable", "bench/vmtable"):
        text = (PKG / f"{module}.py").read_text()
        assert "if TYPE_CHECKING:\n    # The" not in text and "class _CoreVMTable" not in text, module


def test_deliver_now_stub_says_it_may_return_none() -> None:
    stub = (PKG / "_core.pyi").read_text()
    assert "def _deliver_now(self, eid: int, values: tuple[Any, ...], /) -> bool | None" in stub


def test_no_module_imports_another_in_a_cycle() -> None:
    """Across the whole package, at import time (module level, outside ``TYPE_CHECKING``):
    a module may import a lower layer, never one that imports it back, however indirectly.
    (Imports inside functions are how a higher layer is reached late, on purpose.)"""
    modules = {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PKG.rglob("*.py")}

    def deps(name: str) -> set[str]:
        path = modules[name]
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out: set[str] = set()
        body = list(ast.parse(path.read_text()).body)
        while body:
            node = body.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                body += node.body + node.orelse + [s for h in getattr(node, "handlers", []) for s in h.body]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
        # a package's own parents are imported first by Python itself: not an edge
        return {d for d in out if d in modules and d != name and not name.startswith(d + ".")}

    graph = {m: deps(m) for m in modules}
    cycles = []
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join((*path, nxt)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    assert not cycles, cycles[:5]


def _c_sources() -> list[Path]:
    """The C core's sources, in the repository (the installed package has only the binary)."""
    files = sorted((Path(__file__).resolve().parent.parent / "src" / "aem" / "_core").glob("*.[ch]"))
    assert files
    return files


def test_one_binary_heap_in_the_c_core() -> None:
    """heap.h is the C core's one binary heap: no other file writes its own sift-up/down."""
    own = [p.name for p in _c_sources() if p.name != "heap.h"
           and re.search(r"^static\b[^;{]*\bsift_(up|down)\s*\(", p.read_text(), re.M)]
    assert not own, f"binary heaps of their own in {own}: use heap.h's AEM_HEAP_DEFINE"


def _defines(text: str, name: str) -> bool:
    """Whether C source ``text`` defines function ``name`` (not merely calls or declares it)."""
    return re.search(rf"^[A-Za-z][^;\n]*\b{name}\s*\([^;]*?\)\s*\{{", text, re.M) is not None


def test_the_c_core_is_split_by_concern() -> None:
    """What issue 10 moved out of the binding stays out: per-kind delivery in delivery.c,
    asynchronous delivery (the doorbell's drain) in async_delivery.c, the vmtable's
    benchmark loops in vmtable_bench.c."""
    files = {p.name: p.read_text() for p in _c_sources()}
    homes = {"delivery.c": ["deliver_accept", "deliver_read", "deliver_custom", "aem_py_deliver_one",
                            "source_failed"],
             "async_delivery.c": ["drain", "aem_py_engine_start", "aem_py_stop_async"],
             "vmtable_bench.c": ["py_vmt_bench", "py_vmt_latency"]}
    for home, names in homes.items():
        for name in names:
            where = [f for f, text in files.items() if _defines(text, name)]
            assert where == [home], f"{name} is defined in {where}, not only in {home}"
    assert "CLOCK_MONOTONIC" not in files["vmtable_py.c"], "timing loops belong in vmtable_bench.c"
