"""``aem bench``: aem measured side by side with what users would pick instead.

Each suite lives in its own module (``aem.bench.dispatch`` ...) and exposes
``run(ctx)``; :mod:`aem.bench._harness` holds the shared machinery.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from pathlib import Path

from ._harness import Context, print_table, write_report

#: Every suite, in the order ``aem bench`` runs them when none is named.
SUITES: tuple[str, ...] = ("dispatch", "delivery", "timers", "vmtable", "capsules", "http", "idle", "asyncio",
                          "apps")
#: Suites run only when named (long).
EXTRA_SUITES: tuple[str, ...] = ("soak",)


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
    out = Path(out_dir)
    contexts = []
    for name in names:
        module = importlib.import_module(f"aem.bench.{name}")
        ctx = Context(name, quick, out)
        t0 = time.monotonic()
        module.run(ctx)
        ctx.note(f"suite took {time.monotonic() - t0:.1f} s{' (--quick)' if quick else ''}")
        print_table(name, ctx.rows, ctx.notes)
        contexts.append(ctx)
        write_report(out, contexts)  # after each suite, so a long run keeps what it measured
    return contexts
