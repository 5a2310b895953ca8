import sys, tempfile, time
from pathlib import Path
from aem.bench import apps
from aem.bench._harness import Context
from aem.bench.http import start_servers
conns = tuple(int(x) for x in sys.argv[1].split(","))
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
ctx = Context("apps", False, Path(tempfile.mkdtemp()))
servers = apps._servers("wsgi", 2)
try:
    started = start_servers(ctx, servers, Path(tempfile.mkdtemp()))
    time.sleep(1.0); apps._unpin(started)
    apps._p99_with_slow(ctx, started, 4.0, rounds, 1, conns=conns)
finally:
    for s in servers: s.stop()
for r in ctx.rows:
    print(f"{r.case:45} {r.variant:9} {r.metric:22} {r.value:9.2f}  {[round(x, 2) for x in r.samples]}")
for n in ctx.notes: print(" -", n)
