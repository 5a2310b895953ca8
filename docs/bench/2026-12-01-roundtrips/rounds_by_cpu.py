import aem, time, statistics, os, sys
from aem.capsules import _executor as ex
from aem.bench.capsules import noop
miss = [0]
real = ex.call_recv
def call_recv(fd):
    g = real(fd)
    if g is None: miss[0] += 1
    return g
ex.call_recv = call_recv
pool = aem.CapsulePool(size=4); pool.wait_ready(30)
for i in range(500): pool.submit(noop, i).result()
for r in range(8):
    miss[0] = 0
    lat = []
    t0 = time.perf_counter()
    for i in range(2000):
        a = time.perf_counter_ns(); pool.submit(noop, i).result(); lat.append(time.perf_counter_ns() - a)
    dt = time.perf_counter() - t0
    w = [c for c in pool._workers][0]
    cpu_p = open(f"/proc/self/stat").read().rsplit(")",1)[1].split()[36]
    cpu_w = open(f"/proc/{w.pid}/stat").read().rsplit(")",1)[1].split()[36]
    lat.sort()
    print(f"round {r}: {2000/dt:8.0f}/s p10 {lat[200]/1000:6.1f} p50 {lat[1000]/1000:6.1f} p90 {lat[1800]/1000:6.1f} us; first read missed {miss[0]}; cpus parent {cpu_p} worker {cpu_w}")
pool.close()
