# EVF_CAPSULE latency split by whether a replacement capsule was starting/warming when the event
# fired: python refill_tail.py samples ballast_MB
"""EVF_CAPSULE latency tail: is the pool refilling (a capsule starting/warming) when the event fires?"""
import sys, time
import aem
from aem.bench import capsules as b

n = int(sys.argv[1]); mb = int(sys.argv[2])
a = b._Aem()
ballast = None
if mb:
    ballast = bytearray(mb * 2**20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
src = a.sources["capsule"]; eng = a.eng
start = len(a.got); fired = [0]; state = []
def drive(ev):
    if len(a.got) - start < fired[0]:
        return
    if fired[0] == n:
        eng.stop(); return
    fired[0] += 1
    with a.pool._lock:
        a.pool._sync()
        st = sum(1 for c in a.pool._capsules.values() if c.state in ("starting", "warming"))
    state.append(st)
    src.fire(time.monotonic_ns())
tid = eng.register(aem.Timer(b.PAUSE, b.PAUSE), drive)
eng.run(timeout=n * 0.1 + 10)
lat = [x / 1000 for x in a.got[start:start + n]]
a.close()
def q(v, p):
    v = sorted(v); return v[min(len(v)-1, int(p*len(v)))] if v else float("nan")
print(f"rss {b._rss_mb():.0f} MB n={len(lat)}: all p50 {q(lat,.5):.1f} p99 {q(lat,.99):.1f} max {max(lat):.0f}")
for k in sorted(set(state)):
    v = [l for l, s in zip(lat, state) if s == k]
    print(f"  starting/warming at fire = {k}: n={len(v)} p50 {q(v,.5):.1f} p90 {q(v,.9):.1f} p99 {q(v,.99):.1f} max {max(v):.0f}")
slow = sorted(zip(lat, state), reverse=True)[:8]
print("  slowest (µs, starting):", [(round(l), s) for l, s in slow])
