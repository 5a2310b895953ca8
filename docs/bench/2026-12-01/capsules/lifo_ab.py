# EVF_CAPSULE with the idle table LIFO vs FIFO, keepalive, the floor and ProcessPoolExecutor,
# interleaved in one run: python lifo_ab.py [samples] [rounds] [ballast MB]
"""A/B: EVF_CAPSULE latency with the idle table LIFO vs FIFO, and the floor; interleaved rounds."""
import sys, time, statistics
import aem
from aem.bench import capsules as b

n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
mb = int(sys.argv[3]) if len(sys.argv) > 3 else 0
ballast = None
a = b._Aem()
if mb:
    ballast = bytearray(mb * 2**20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
pre = b._Prefork()
import concurrent.futures as cf, multiprocessing as mp
ppe = cf.ProcessPoolExecutor(4, mp_context=mp.get_context("fork")); list(ppe.map(b.noop, range(8)))
out = {"lifo": [], "fifo": [], "floor": [], "keepalive": [], "ppe": []}
try:
    for _ in range(rounds):
        for name in out:
            k = n // rounds
            if name == "floor":
                out[name] += b._paced(k, pre.one)
            elif name == "ppe":
                out[name] += b._paced(k, lambda: b._submit_latency(ppe))
            elif name == "keepalive":
                out[name] += a.latency("keepalive", k)
            else:
                a.pool._table.lifo = int(name == "lifo")
                out[name] += a.latency("capsule", k)
            a.pool.wait_ready(10)
finally:
    ppe.shutdown()
    pre.close()
    a.close()
def q(v, p):
    v = sorted(v); return v[min(len(v)-1, int(p*len(v)))]
print(f"rss {b._rss_mb():.0f} MB, n={n}")
for k, v in out.items():
    print(f"{k:10s} p50 {q(v,.5):8.1f}  p90 {q(v,.9):8.1f}  p99 {q(v,.99):8.1f}  p50/ppe {q(v,.5)/q(out['ppe'],.5):.3f}  p50/floor {q(v,.5)/q(out['floor'],.5):.2f}")
