"""``aem bench``: aem measured side by side with what users would pick instead.

Each suite lives in its own module (``aem.bench.dispatch`` ...) and exposes
``run(ctx)``; :mod:`aem.bench._harness` holds the shared machinery.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path

from ._harness import Context, print_table, progress, write_report

#: Every suite, in the order ``aem bench`` runs them when none is named.
SUITES: tuple[str, ...] = ("dispatch", "delivery", "timers", "vmtable", "capsules", "http", "idle", "asyncio",
                          "apps")
#: Suites run only when named (long).
EXTRA_SUITES: tuple[str, ...] = ("soak",)


#: What each suite imports beyond aem (the ``bench`` extra); every suite plots and prints
#: tables (matplotlib, rich).
NEEDS: dict[str, tuple[str, ...]] = {
    "dispatch": ("uvloop",), "timers": ("uvloop",), "http": ("uvloop", "granian"),
}
COMMON_NEEDS: tuple[str, ...] = ("matplotlib", "rich")


def missing_modules(suites: Sequence[str]) -> list[str]:
    """The modules of the bench extra that ``suites`` need and this Python lacks."""
    wanted = dict.fromkeys([*COMMON_NEEDS, *(m for s in suites for m in NEEDS.get(s, ()))])
    return [m for m in wanted if importlib.util.find_spec(m) is None]


def describe() -> list[tuple[str, str]]:
    """(suite, the first line of its docstring) for every suite, the long ones last."""
    out = []
    for name in SUITES + EXTRA_SUITES:
        spec = importlib.util.find_spec(f"aem.bench.{name}")  # read, not imported: aem --help stays fast
        try:
            assert spec is not None and spec.origin is not None
            doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
        except (AssertionError, OSError, SyntaxError):
            doc = ""
        first = doc.strip().splitlines()[0] if doc.strip() else ""
        first = first.split(":", 1)[1].strip() if first.startswith("``aem bench") else first
        out.append((name, first + (" (only when named)" if name in EXTRA_SUITES else "")))
    return out


def available() -> list[str]:
    """The suites whose module exists in this build."""
    out = []
    for name in SUITES:
        try:
            importlib.import_module(f"aem.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"aem.bench.{name}":
                raise
            continue
        out.append(name)
    return out


def run(suites: Sequence[str], quick: bool = False, out_dir: str | Path = "bench-results") -> list[Context]:
    """Run ``suites`` (all available when empty), print their tables, write the report."""
    names = list(suites) or available()
    unknown = [s for s in names if s not in SUITES + EXTRA_SUITES]
    if unknown:
        raise ValueError(f"unknown bench suite(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(SUITES + EXTRA_SUITES)}")
    missing = missing_modules(names)
    if missing:  # say so now, not after minutes of measuring
        raise MissingExtraError(
            f"the benchmarks need the bench extra (missing: {', '.join(missing)}): "
            "pip install 'aem[bench]' (or run make bench)")
    out = Path(out_dir)
    contexts = []
    for i, name in enumerate(names, 1):
        module = importlib.import_module(f"aem.bench.{name}")
        ctx = Context(name, quick, out)
        t0 = time.monotonic()
        with progress(f"[{i}/{len(names)}] {name}"):
            module.run(ctx)
        ctx.note(f"suite took {time.monotonic() - t0:.1f} s{' (--quick)' if quick else ''}")
        print_table(name, ctx.rows, ctx.notes)
        contexts.append(ctx)
        write_report(out, contexts)  # after each suite, so a long run keeps what it measured
    return contexts


class MissingExtraError(ValueError):
    """A module of the bench extra is not installed."""
