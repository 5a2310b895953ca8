"""The benchmark harness shared by every suite of ``aem bench``.

A suite is a module ``aem.bench.<name>`` with a function ``run(ctx: Context) -> None``.
It measures aem and its anchors *side by side in the same run* (interleaved rounds,
see :func:`interleave`) and records one :class:`Row` per (case, variant, metric)
with :meth:`Context.record`.  The harness then

* prints a table per suite with each aem figure's ratio to every anchor of the
  same case and metric,
* writes ``results.json`` (machine description + every row, raw samples included),
  ``results.md`` (the same tables in markdown) and the suite's PNG plots to ``--out``.

Ratios are always computed between rows of one run; absolute numbers are reported
with the CPU model and never compared across runs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

AEM = "aem"


@dataclass
class Row:
    """One measured figure: ``value`` of ``metric`` for ``variant`` in ``case``.

    ``variant`` is ``"aem"`` (or starts with ``"aem"``) for our own figures; anything
    else is an anchor.  ``better`` says which direction is an improvement, so the
    table can mark ratios.  ``samples`` keeps the raw per-round values.
    """

    suite: str
    case: str
    variant: str
    metric: str
    value: float
    unit: str
    better: str = "lower"  # or "higher"
    samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def is_aem(self) -> bool:
        return self.variant.startswith(AEM)


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples`` by linear interpolation."""
    if not samples:
        raise ValueError("percentile of no samples")
    data = sorted(samples)
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


def distribution(samples: Sequence[float]) -> dict[str, float]:
    """p50, p99, max and mean of ``samples``."""
    return {
        "p50": percentile(samples, 50),
        "p99": percentile(samples, 99),
        "max": float(max(samples)),
        "mean": float(statistics.fmean(samples)),
    }


class _Progress:
    """The suite running now and what it measures: a rich progress line per suite (the
    harness updates it from :func:`interleave` and :meth:`Context.record`).  Refreshed
    only when it changes: no thread runs beside the measurements."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.task: Any = None

    def show(self, what: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, status=what)
            self.bar.refresh()


_progress = _Progress()


@contextmanager
def progress(title: str) -> Iterator[None]:
    """Show a progress line ``title``: what runs now, elapsed time; done when the block ends."""
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # pragma: no cover - rich is in the bench extra
        print(f"{title} ...", flush=True)
        yield
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}"), auto_refresh=False, transient=False)
    _progress.bar, _progress.task = bar, bar.add_task(title, total=None, status="starting")
    with bar:
        try:
            yield
            bar.update(_progress.task, total=1, completed=1, status="done")
            bar.refresh()
        finally:
            _progress.bar = _progress.task = None


def interleave(
    variants: dict[str, Callable[[], float]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each variant alternately (A B C A B C ...), ``warmup`` discarded rounds first.

    Each callable performs one measurement and returns its figure.  Returns the
    figures of the kept rounds per variant, in round order.
    """
    out: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            stage = "warm-up" if r < warmup else f"round {r - warmup + 1}/{rounds}"
            _progress.show(f"{name}, {stage}")
            value = fn()
            if r >= warmup:
                out[name].append(value)
    return out


def machine() -> dict[str, str]:
    """What the figures were measured on: CPU model, cores, kernel, Python, aem."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from aem import __version__

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aem": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def aem_pythonpath() -> str:
    """PYTHONPATH for child processes of a suite: the aem being measured, then the rest."""
    import aem

    here = os.path.dirname(os.path.dirname(os.path.abspath(aem.__file__)))
    old = os.environ.get("PYTHONPATH", "")
    return here + (os.pathsep + old if old else "")


def compile_c(tmp: Path, name: str, source: str, *flags: str) -> str | None:
    """``source`` compiled (``-O2``, ``flags``) with the C compiler here into ``tmp/name``
    (once: an executable already there is reused); its path, or None without a compiler or
    when it does not compile."""
    import shutil

    exe = tmp / name
    if exe.exists():
        return str(exe)
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    src = tmp / f"{name}.c"
    src.write_text(source)
    if subprocess.run([cc, "-O2", *flags, "-o", str(exe), str(src)], capture_output=True).returncode:
        return None
    return str(exe)


def json_from_child(code: str, timeout: float) -> dict[str, float]:
    """Run ``code`` in a fresh Python (a clean process to measure memory in); the JSON
    object its last line of output holds."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=aem_pythonpath()), timeout=timeout)
    data: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return data


def pin_to_cpu(cpu: int) -> None:
    """Pin the calling process to one CPU (ignored where the CPU does not exist)."""
    try:
        if cpu < (os.cpu_count() or 1):
            os.sched_setaffinity(0, {cpu})
    except OSError:
        pass


class Context:
    """Handed to a suite's ``run``: its options and the place to record figures."""

    def __init__(self, suite: str, quick: bool, out_dir: Path) -> None:
        self.suite = suite
        self.quick = quick
        self.out_dir = out_dir
        self.rows: list[Row] = []
        self.plots: list[Path] = []
        self.notes: list[str] = []

    def record(
        self,
        case: str,
        variant: str,
        metric: str,
        value: float,
        unit: str,
        better: str = "lower",
        samples: Iterable[float] = (),
        note: str = "",
    ) -> Row:
        """Record one figure. ``value`` is what the table shows (usually a median)."""
        if better not in ("lower", "higher"):
            raise ValueError("better must be 'lower' or 'higher'")
        row = Row(self.suite, case, variant, metric, float(value), unit, better,
                  [float(s) for s in samples], note)
        self.rows.append(row)
        _progress.show(f"measured {case}: {variant}")
        return row

    def step(self, what: str) -> None:
        """Say what runs now (a server, a case, a round) in the suite's progress line."""
        _progress.show(what)

    def note(self, text: str) -> None:
        """A sentence printed under the suite's table and kept in the results."""
        self.notes.append(text)

    def plot_path(self, name: str) -> Path:
        """Where to save a PNG plot named ``name`` (registered for the report)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.suite}-{name}.png"
        self.plots.append(path)
        return path


def ratios(rows: Sequence[Row]) -> list[tuple[Row, Row, float]]:
    """(aem row, anchor row, aem/anchor) for every pair sharing case and metric."""
    out = []
    for a in rows:
        if not a.is_aem:
            continue
        for b in rows:
            if b.is_aem or b.case != a.case or b.metric != a.metric or b.value == 0:
                continue
            out.append((a, b, a.value / b.value))
    return out


def primary_aem(rows: Sequence[Row]) -> dict[tuple[str, str], Row]:
    """The first aem row recorded for each (case, metric): the one ratios are shown for."""
    out: dict[tuple[str, str], Row] = {}
    for r in rows:
        if r.is_aem:
            out.setdefault((r.case, r.metric), r)
    return out


def secondary_ratios(rows: Sequence[Row]) -> list[str]:
    """Sentences giving the ratios of the other aem variants to each anchor."""
    primary = primary_aem(rows)
    out = []
    for a, b, q in ratios(rows):
        if primary.get((a.case, a.metric)) is a:
            continue
        out.append(f"{a.variant} ÷ {b.variant} ({a.case}, {a.metric}): {q:.2f}×")
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table, with ratios of aem to each anchor."""
    lines = ["| case | variant | metric | value | unit | aem ÷ this |",
             "|---|---|---|---:|---|---:|"]
    aem_by_key = primary_aem(rows)
    for r in rows:
        ratio = ""
        a = aem_by_key.get((r.case, r.metric))
        if a is not None and not r.is_aem and r.value:
            ratio = f"{a.value / r.value:.2f}×"
        lines.append(f"| {r.case} | {r.variant} | {r.metric} | {_fmt(r.value)} | {r.unit} | {ratio} |")
    return "\n".join(lines)


def print_table(suite: str, rows: Sequence[Row], notes: Sequence[str]) -> None:
    """Print the suite's rows (rich table when rich is installed)."""
    aem_by_key = primary_aem(rows)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is in the bench extra
        print(f"== {suite}")
        print(markdown_table(rows))
        for n in notes:
            print("  " + n)
        return
    table = Table(title=f"aem bench {suite}", title_justify="left")
    for col in ("case", "variant", "metric", "value", "unit", "aem ÷ this"):
        table.add_column(col, justify="right" if col in ("value", "aem ÷ this") else "left")
    for r in rows:
        ratio = ""
        a = aem_by_key.get((r.case, r.metric))
        if a is not None and not r.is_aem and r.value:
            q = a.value / r.value
            good = q <= 1 if r.better == "lower" else q >= 1
            ratio = f"[{'green' if good else 'red'}]{q:.2f}×[/]"
        style = "bold" if r.is_aem else ""
        table.add_row(r.case, r.variant, r.metric, _fmt(r.value), r.unit, ratio, style=style)
    console = Console(width=120)
    console.print(table)
    for n in [*notes, *secondary_ratios(rows)]:
        console.print("  " + n)


def write_report(out_dir: Path, contexts: Sequence[Context]) -> None:
    """results.json and results.md for every suite run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    payload: dict[str, Any] = {"machine": info, "suites": {}}
    md = ["# aem bench results", "",
          f"CPU: {info['cpu']} ({info['cores']} cores), kernel {info['kernel']}, "
          f"Python {info['python']}, aem {info['aem']}, {info['date']}.", "",
          "Ratios are between figures of this one run (aem ÷ anchor).", ""]
    for ctx in contexts:
        payload["suites"][ctx.suite] = {
            "quick": ctx.quick,
            "rows": [asdict(r) for r in ctx.rows],
            "notes": ctx.notes,
            "plots": [p.name for p in ctx.plots],
        }
        md += [f"## {ctx.suite}", "", markdown_table(ctx.rows), ""]
        md += [f"- {n}" for n in ctx.notes]
        md += [f"- {n}" for n in secondary_ratios(ctx.rows)]
        md += [f"![{p.stem}]({p.name})" for p in ctx.plots]
        md.append("")
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    (out_dir / "results.md").write_text("\n".join(md))
