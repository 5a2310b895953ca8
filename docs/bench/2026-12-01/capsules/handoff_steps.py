# Step timestamps of one EVF_CAPSULE hand-off: apply handoff-stamps.patch, build, run this
# (python handoff_steps.py [events] [ballast MB]); see docs/capsules.md.
"""Step timestamps of one hand-off (needs the stamps.patch build). EVF_CAPSULE, LIFO, 5 ms pauses."""
import sys, time, os
import aem
from aem import _core

RESULTS = aem.UserEvent()

def probe(ev):
    t1 = time.monotonic_ns()
    s = _core._ho_stamps()
    RESULTS.fire((ev.payload, t1, s[2], s[3], s[4], s[7] - s[6]))

n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
mb = int(sys.argv[2]) if len(sys.argv) > 2 else 0
eng = aem.current()
rows = []
faults = []
def got(ev):
    t0, t1, rr, ra, call, f = ev.payload
    s = _core._ho_stamps()
    faults.append(f)
    rows.append((t0, s[0], s[5], s[1], rr, ra, call, t1))
eng.register(RESULTS, got)
src = aem.UserEvent()
pool = aem.CapsulePool(size=4, reserve=0)
eng.register(src, probe, flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=pool)
pool.refresh(); pool.wait_ready(30)
ballast = None
if mb:
    ballast = bytearray(mb * 2**20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
fired = [0]
def drive(ev):
    if len(rows) < fired[0]:
        return
    if fired[0] == n:
        eng.stop(); return
    fired[0] += 1
    src.fire(time.monotonic_ns())
tid = eng.register(aem.Timer(0.005, 0.005), drive)
eng.run(timeout=n * 0.1 + 10)
pool.close()
names = ["fire -> deliver entered", "deliver -> before sendmsg", "sendmsg", "sendmsg done -> recvmsg returned (wake)",
         "recvmsg returned -> GIL back", "GIL back -> handler called (parse, lookup)", "handler called -> first line", "total"]
def q(v, p):
    v = sorted(v); return v[min(len(v)-1, int(p*len(v)))]
cols = list(zip(*rows))
print(f"n={len(rows)}  rss={mb}MB")
for i, name in enumerate(names[:-1]):
    d = [(b - a) / 1000 for a, b in zip(cols[i], cols[i+1])]
    print(f"{name:45s} p50 {q(d,.5):7.1f}  p90 {q(d,.9):7.1f}  p99 {q(d,.99):8.1f}")
d = [(r[-1] - r[0]) / 1000 for r in rows]
print(f"{'total':45s} p50 {q(d,.5):7.1f}  p90 {q(d,.9):7.1f}  p99 {q(d,.99):8.1f}")
print("minor faults handler called -> first line: p50", q(faults, .5), "p90", q(faults, .9), "max", max(faults))
