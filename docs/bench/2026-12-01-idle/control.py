"""Control: are the top level's p99s the server's doing, or the machine's? Hold 19,500 idle
connections to the measured server ("own"), or to another idle process ("elsewhere"), or none."""
import sys, tempfile, time, statistics
from pathlib import Path
from aem.bench import idle as I
from aem.bench.http import make_servers, make_root, proc_cpu
kinds = sys.argv[1].split(","); N = int(sys.argv[2]); rounds = int(sys.argv[3])
I._raise_limit(N + 4096)
res = {}
with tempfile.TemporaryDirectory() as td:
    tmp = Path(td); root = make_root(tmp)
    servers = make_servers(tmp, root, kinds + ["floor"], idle_timeout=3600.0)
    sink = servers.pop()  # another floor server: only holds the "elsewhere" connections
    h_own, h_else = I._Holders(), I._Holders()
    try:
        for s in servers + [sink]:
            s.start(tmp); I._settle_fds(s)
        base = {id(s): I._open_fds(s) for s in servers + [sink]}
        for r in range(rounds):
            conds = ["none", "own", "elsewhere"]
            for cond in (conds if r % 2 == 0 else conds[::-1]):
                for s in (servers if r % 2 == 0 else servers[::-1]):
                    own, other = (N, 0) if cond == "own" else (0, N) if cond == "elsewhere" else (0, 0)
                    h_own.hold(s.port, own); h_else.hold(sink.port, other)
                    assert I._wait_held(s, base[id(s)], own) and I._wait_held(sink, base[id(sink)], other)
                    p1 = proc_cpu(1); t0 = time.monotonic()
                    got = I._one_round(s, h_own, 2)
                    pid1 = (proc_cpu(1) - p1) / (time.monotonic() - t0) * 1e3
                    res.setdefault((s.name, cond), []).append(got["p99"])
                    print(f"r{r} {s.name:5} {cond:9} p50 {got['p50']:6.0f} p99 {got['p99']:6.0f} rps {got['rps']:7.0f} cpu {got['cpu']:5.2f} other {got['other']:3.0f}% pid1 {pid1:4.1f} ms/s", flush=True)
    finally:
        h_own.stop(); h_else.stop()
        for s in servers + [sink]: s.stop()
for (name, cond), v in res.items():
    print(name, cond, "median p99", statistics.median(v), [round(x) for x in v])
