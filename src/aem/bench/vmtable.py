"""``aem bench vmtable``: the vmtable's allocator beside what users would pick instead.

* From Python, ns per alloc+free pair at 64 B, 4 KiB and 64 KiB: the buffer
  API (``free(alloc(n))``, a Block object each time), the offset API
  (``free_offset(alloc_offset(n))``) and the same in a VZONE (process-shared
  lock), against ``bytearray(n)`` (which also zero-fills; a block is not
  cleared).  Targets: offset API <= 1.0x bytearray at 4 KiB, buffer API <= 1.3x.
* The C core alone, a loop inside the extension, against glibc ``malloc``/
  ``free`` on the identical size stream: alloc/free ping-pong, a flood of one
  size (1024 blocks allocated, then freed), and random sizes 64 B .. 64 KiB
  freed in random order (1024 live).  Target: <= 15 ns per pair on the fast
  path (ping-pong).
* Constancy: each allocation timed alone with the CPU's counter (its own
  overhead subtracted) in pools of 1 MiB, 64 MiB and 4 GiB (not populated:
  MAP_NORESERVE), empty and 90% full.  Target: p99 at 4 GiB & 90% <= 1.2x
  p99 at 1 MiB & empty.
* Fragmentation under a random-size flood with churn, at its first shortage:
  granted/requested, 1 - largest_free/free, and the fraction of the pool in
  use then.
* The memory a 1 GiB VZONE costs with 10 MiB in use (RSS and PSS growth of a
  fresh process, from /proc/self/smaps_rollup), against the same data in
  bytearrays; and after everything is freed.
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import Callable
from itertools import repeat
from pathlib import Path
from typing import Any

import aem
from aem._core import _vmt_bench, _vmt_frag, _vmt_latency

from ._harness import Context, distribution, interleave, json_from_child, percentile
from ._plot import bars, cdf

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30


def grouped_bars(path: Path, title: str, groups: dict[str, dict[str, float]], unit: str,
                 log: bool = False) -> None:
    """Horizontal bars, one group per case and one colour per variant (aem in reds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(v for g in groups.values() for v in g))
    reds = iter(["#d62728", "#ff7f0e", "#e377c2", "#8c564b"])
    greys = iter(["#7f7f7f", "#1f77b4", "#2ca02c", "#17becf"])
    colors = {v: next(reds) if v.startswith("aem") else next(greys) for v in variants}
    height = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.25 * len(groups) * len(variants)))
    for i, v in enumerate(variants):
        ys = [g + i * height for g in range(len(groups))]
        xs = [groups[c].get(v, 0.0) for c in groups]
        ax.barh(ys, xs, height=height, color=colors[v], label=v)
        for y, x in zip(ys, xs, strict=True):
            if x:
                ax.text(x, y, f" {x:.3g}", va="center", fontsize=7)
    ax.set_yticks([g + 0.4 - height / 2 for g in range(len(groups))], list(groups), fontsize=8)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(n: int) -> str:
    return f"{n // GIB} GiB" if n >= GIB else f"{n // MIB} MiB" if n >= MIB else \
        f"{n // KIB} KiB" if n >= KIB else f"{n} B"


# -- from Python ---------------------------------------------------------------------------------


def pairs_bytearray(count: int, size: int) -> float:
    """ns per ``bytearray(size)`` made and dropped."""
    make = bytearray
    t0 = time.perf_counter_ns()
    for _ in repeat(None, count):
        make(size)
    return (time.perf_counter_ns() - t0) / count


def pairs_buffer(vmt: aem.VMTable, count: int, size: int) -> float:
    """ns per ``vmt.free(vmt.alloc(size))``."""
    alloc, free = vmt.alloc, vmt.free
    t0 = time.perf_counter_ns()
    for _ in repeat(None, count):
        free(alloc(size))
    return (time.perf_counter_ns() - t0) / count


def pairs_offset(vmt: aem.VMTable, count: int, size: int) -> float:
    """ns per ``vmt.free_offset(vmt.alloc_offset(size))``."""
    alloc, free = vmt.alloc_offset, vmt.free_offset
    t0 = time.perf_counter_ns()
    for _ in repeat(None, count):
        free(alloc(size))
    return (time.perf_counter_ns() - t0) / count


def bench_python(ctx: Context, rounds: int) -> None:
    count = 5_000 if ctx.quick else 200_000
    uz = aem.VMTable(64 * MIB, zone=aem.TBL_UZONE)
    vz = aem.VMTable(64 * MIB, zone=aem.TBL_VZONE)
    groups: dict[str, dict[str, float]] = {}
    try:
        for size in (64, 4 * KIB, 64 * KIB):
            variants: dict[str, Callable[[], float]] = {
                "aem buffer API": functools.partial(pairs_buffer, uz, count, size),
                "aem offset API": functools.partial(pairs_offset, uz, count, size),
                "aem buffer API (VZONE)": functools.partial(pairs_buffer, vz, count, size),
                "aem offset API (VZONE)": functools.partial(pairs_offset, vz, count, size),
                "bytearray": functools.partial(pairs_bytearray, count, size),
            }
            got = interleave(variants, rounds=rounds)
            case = f"Python: alloc+free {_label(size)}"
            for name, samples in got.items():
                med = percentile(samples, 50)
                ctx.record(case, name, "time per pair", med, "ns", samples=samples)
                groups.setdefault(_label(size), {})[name] = med
    finally:
        uz.close()
        vz.close()
    grouped_bars(ctx.plot_path("python"), "alloc+free pair from Python (lower is better)", groups,
                 "ns per pair", log=True)


# -- the C core ------------------------------------------------------------------------------------


def bench_core(ctx: Context, rounds: int) -> None:
    scale = 100 if ctx.quick else 1
    cases = [
        ("pingpong", 64, 2_000_000, "C: ping-pong 64 B"),
        ("pingpong", 4 * KIB, 2_000_000, "C: ping-pong 4 KiB"),
        ("flood", 4 * KIB, 1_000_000, "C: flood of 1024 × 4 KiB"),
        ("random", 0, 1_000_000, "C: random 64 B–64 KiB, freed in random order"),
    ]
    groups: dict[str, dict[str, float]] = {}
    for pattern, size, count, case in cases:
        n = max(count // scale, 2048)
        loop = functools.partial(_vmt_bench, pattern, count=n, size=size or 4096, seed=12345)
        variants: dict[str, Callable[[], float]] = {
            "aem core": functools.partial(loop, "aem"),
            "aem core (VZONE)": functools.partial(loop, "aem", zone=aem.TBL_VZONE),
            "glibc malloc": functools.partial(loop, "malloc"),
        }
        got = interleave(variants, rounds=rounds)
        for name, samples in got.items():
            med = percentile(samples, 50)
            ctx.record(case, name, "time per pair", med, "ns", samples=samples)
            groups.setdefault(case[3:], {})[name] = med
    grouped_bars(ctx.plot_path("core"), "the C core vs glibc malloc, same size stream: alloc+free "
                 "pair (lower is better)", groups, "ns per pair", log=True)


# -- constancy ---------------------------------------------------------------------------------------


def bench_constancy(ctx: Context, rounds: int) -> None:
    count = 5_000 if ctx.quick else 100_000
    big = 256 * MIB if ctx.quick else 4 * GIB  # --quick: a smaller big pool (filling 4 GiB takes time)
    configs = [(pool, fill) for pool in (1 * MIB, 64 * MIB, big) for fill in (0.0, 0.9)]
    series: dict[str, list[float]] = {}
    p50s: dict[tuple[int, float], list[float]] = {c: [] for c in configs}
    p99s: dict[tuple[int, float], list[float]] = {c: [] for c in configs}
    notes: dict[tuple[int, float], str] = {}

    def one(pool: int, fill: float, seed: int = 7) -> float:
        samples, reached, misses = _vmt_latency(pool, fill, count, seed=seed)
        d = distribution(samples)
        p50s[(pool, fill)].append(d["p50"])
        p99s[(pool, fill)].append(d["p99"])
        series[f"aem {_label(pool)} {int(fill * 100)}%"] = samples
        notes[(pool, fill)] = f"fill reached {reached:.1%}, {misses} of {count} requests found no block"
        return d["p99"]

    interleave({f"{p} {f}": functools.partial(one, p, f) for p, f in configs}, rounds=rounds, warmup=0)
    for pool, fill in configs:
        case = f"alloc latency, pool {_label(pool)}, {int(fill * 100)}% full"
        ctx.record(case, "aem", "p50", percentile(p50s[(pool, fill)], 50), "ns",
                   samples=p50s[(pool, fill)])
        ctx.record(case, "aem", "p99", percentile(p99s[(pool, fill)], 50), "ns",
                   samples=p99s[(pool, fill)], note=notes[(pool, fill)])
    ratio = percentile(p99s[(big, 0.9)], 50) / percentile(p99s[(1 * MIB, 0.0)], 50)
    ctx.record(f"constancy: p99 {_label(big)} 90% ÷ p99 1 MiB empty", "aem", "ratio", ratio, "×")
    ctx.note(f"constancy: p99 at {_label(big)} & 90% full is {ratio:.2f}× p99 at 1 MiB & empty "
             f"(target <= 1.2×: {'met' if ratio <= 1.2 else 'MISSED'}); medians of {rounds} "
             f"interleaved rounds of {count:,} allocations, each timed alone with the CPU "
             f"counter, whose readings step by ~10 ns on some VMs")
    cdf(ctx.plot_path("latency"), "latency of one allocation (64 B–4 KiB) by pool size and fill "
        "(last round)", series, "ns")


# -- fragmentation -----------------------------------------------------------------------------------


def bench_fragmentation(ctx: Context) -> None:
    pool = 4 * MIB if ctx.quick else 64 * MIB
    seeds = range(1, 4 if ctx.quick else 8)
    runs = [_vmt_frag(pool, seed=s) for s in seeds]
    case = f"random-size flood (64 B–64 KiB, 40% frees) in {_label(pool)}, at the first shortage"
    metrics = [
        ("granted_over_requested", "granted ÷ requested", "×", "lower"),
        ("external_fragmentation", "1 − largest_free ÷ free", "fraction", "lower"),
        ("usable_granted", "pool in use (granted)", "fraction", "higher"),
        ("usable_requested", "pool in use (requested)", "fraction", "higher"),
    ]
    labels, values = [], []
    for key, metric, unit, better in metrics:
        samples = [float(r[key]) for r in runs]
        med = percentile(samples, 50)
        ctx.record(case, "aem", metric, med, unit, better, samples)
        labels.append(f"aem {metric}")
        values.append(med)
    bars(ctx.plot_path("fragmentation"), f"fragmentation at the first shortage ({_label(pool)} pool)",
         labels, values, "ratio")


# -- memory of a VZONE -------------------------------------------------------------------------------------


def _rollup() -> dict[str, int]:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0] in ("Rss:", "Pss:"):
                out[parts[0][:-1].lower()] = int(parts[1]) * 1024
    return out


def rss_child(variant: str, in_use: int, pool: int) -> None:
    """Entry point of the measuring child: prints one JSON line of RSS/PSS growth."""
    rnd = random.Random(3)
    sizes = []
    total = 0
    while total < in_use:
        n = rnd.randint(64, 64 * KIB)
        sizes.append(n)
        total += n
    before = _rollup()
    keep: list[Any] = []
    vmt = None
    if variant == "bytearray":
        for n in sizes:
            b = bytearray(n)
            b[:] = b"\x5a" * n
            keep.append(b)
    else:
        vmt = aem.VMTable(pool, zone=aem.TBL_VZONE)
        for n in sizes:
            blk = vmt.alloc(n)
            memoryview(blk)[:] = b"\x5a" * n
            keep.append(blk)
    during = _rollup()
    for b in keep:
        if vmt is not None:
            b.free()
    keep.clear()
    if vmt is not None:
        vmt.stats()                      # coalesce the caches: free blocks go back to the kernel
    after = _rollup()
    print(json.dumps({
        "rss": during["rss"] - before["rss"], "pss": during["pss"] - before["pss"],
        "rss_after_free": after["rss"] - before["rss"], "requested": total,
    }))


def _rss_in_child(variant: str, in_use: int, pool: int) -> dict[str, float]:
    return json_from_child(
        f"from aem.bench.vmtable import rss_child; rss_child({variant!r}, {in_use}, {pool})", 300)


def bench_memory(ctx: Context, rounds: int) -> None:
    pool, in_use = 1 * GIB, 10 * MIB
    results: dict[str, list[dict[str, float]]] = {"aem VZONE": [], "bytearray": []}

    def one(variant: str, key: str) -> float:
        r = _rss_in_child(variant, in_use, pool)
        results[key].append(r)
        return r["rss"]

    interleave({"aem VZONE": lambda: one("vzone", "aem VZONE"),
                "bytearray": lambda: one("bytearray", "bytearray")}, rounds=rounds, warmup=0)
    case = f"{_label(in_use)} in use (random 64 B–64 KiB), aem in a {_label(pool)} VZONE"
    labels, values = [], []
    for variant, rs in results.items():
        for key, metric in (("rss", "RSS growth"), ("pss", "PSS growth"),
                            ("rss_after_free", "RSS growth after freeing all")):
            samples = [r[key] / MIB for r in rs]
            med = percentile(samples, 50)
            ctx.record(case, variant, metric, med, "MiB", samples=samples)
            if key != "rss_after_free":
                labels.append(f"{variant} {metric}")
                values.append(med)
    bars(ctx.plot_path("memory"), f"memory for {_label(in_use)} of blocks (lower is better)",
         labels, values, "MiB")


def run(ctx: Context) -> None:
    """Every measurement of the suite, aem and anchors interleaved."""
    rounds = 2 if ctx.quick else 7
    bench_python(ctx, rounds)
    bench_core(ctx, rounds)
    bench_constancy(ctx, 1 if ctx.quick else 5)
    bench_fragmentation(ctx)
    bench_memory(ctx, 1 if ctx.quick else 3)
    ctx.note("bytearray(n) zero-fills its memory; vmtable blocks are not cleared.")
    ctx.note("VZONE variants take the robust process-shared lock (and journal every metadata "
             "write) on each operation; UZONE variants take no lock.")
