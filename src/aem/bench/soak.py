"""``aem bench soak``: AEMhttpd under steady load for ten minutes, its memory watched.

The aem server (the same as in the ``http`` suite) serves a mix of requests —
hello, a 4 KiB static file, the status page — from ``wrk`` (64
connections, pinned to the other core) in back-to-back 30 s runs; its RSS is
sampled between runs.  A server that leaks shows a rising line; the figures
are the RSS at the start (after a warm-up run), at the end, and the growth.
Not in the default set of suites (it takes ten minutes; ``--quick``: 20 s).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ._harness import Context
from ._plot import lines
from .http import CONNECTIONS, have_wrk, make_root, make_servers, run_wrk

MIX = """
counter = 0
paths = {"/hello", "/4k.bin", "/_aem/status", "/hello", "/4k.bin", "/hello"}
request = function()
  counter = counter + 1
  return wrk.format("GET", paths[(counter % #paths) + 1])
end
"""


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run(ctx: Context) -> None:
    """Steady load for ten minutes (20 s with --quick); RSS sampled after every run."""
    if not have_wrk():
        ctx.note("wrk is not installed: soak skipped (scripts/install-system-deps.sh installs it)")
        return
    total = 20.0 if ctx.quick else 600.0
    chunk = 5.0 if ctx.quick else 30.0
    with tempfile.TemporaryDirectory(prefix="aem-soak-") as tmpdir:
        tmp = Path(tmpdir)
        root = make_root(tmp)
        script = tmp / "mix.lua"
        script.write_text(MIX)
        (server,) = make_servers(tmp, root, ["aem"])
        server.start(tmp)
        try:
            assert server.proc is not None
            pid = server.proc.pid
            run_wrk(server.port, "/hello", chunk, CONNECTIONS, script)  # warm-up
            t0 = time.monotonic()
            times, rss, rates, errors = [0.0], [_rss_kb(pid) / 1024], [], 0
            while time.monotonic() - t0 < total:
                ctx.step(f"{time.monotonic() - t0:.0f} of {total:g} s, RSS {rss[-1]:.1f} MiB")
                res = run_wrk(server.port, "/hello", chunk, CONNECTIONS, script)
                rates.append(res.rps)
                errors += res.errors
                times.append(time.monotonic() - t0)
                rss.append(_rss_kb(pid) / 1024)
            alive = server.proc.poll() is None
        finally:
            server.stop()
    case = f"{total:g} s at steady load ({CONNECTIONS} connections, mixed requests)"
    ctx.record(case, "aem", "RSS at start", rss[0], "MiB", "lower")
    ctx.record(case, "aem", "RSS at end", rss[-1], "MiB", "lower", rss)
    ctx.record(case, "aem", "RSS growth", rss[-1] - rss[0], "MiB", "lower")
    ctx.record(case, "aem", "requests/s (median run)", sorted(rates)[len(rates) // 2], "1/s", "higher",
               rates)
    ctx.record(case, "aem", "socket errors + non-2xx/3xx", errors, "", "lower")
    ctx.note(f"server alive at the end: {alive}; RSS max {max(rss):.1f} MiB; "
             f"{len(rates)} runs of {chunk:g} s; RSS includes the 64 MiB process vmtable")
    lines(ctx.plot_path("rss"), "AEMhttpd RSS under steady load", times, {"aem RSS": rss},
          "seconds", "RSS (MiB)")
