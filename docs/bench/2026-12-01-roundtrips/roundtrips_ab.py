import concurrent.futures as cf, multiprocessing as mp, os, pickle, socket, sys, time, statistics
import aem
from aem.bench.capsules import noop

K = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
which = sys.argv[2].split(",") if len(sys.argv) > 2 else ["aem", "ppe", "floor"]

class Floor:
    def __init__(self):
        self.a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            self.a.close()
            while True:
                data = b.recv(65536)
                if not data:
                    os._exit(0)
                fn, args, kw = pickle.loads(data)
                b.send(pickle.dumps(fn(*args, **kw), protocol=5))
        b.close()
    def call(self, fn, *args):
        self.a.send(pickle.dumps((fn, args, {}), protocol=5))
        return pickle.loads(self.a.recv(65536))
    def close(self):
        self.a.close(); os.waitpid(self.pid, 0)

def rt(f):
    t0 = time.perf_counter()
    for i in range(K):
        f(i)
    return K / (time.perf_counter() - t0)

pool = aem.CapsulePool(size=4) if "aem" in which else None
if pool: pool.wait_ready(30)
ppe = cf.ProcessPoolExecutor(4, mp_context=mp.get_context("fork")) if "ppe" in which else None
if ppe: list(ppe.map(noop, range(8)))
fl = Floor() if "floor" in which else None
res = {w: [] for w in which}
for r in range(int(os.environ.get("ROUNDS", 5))):
    for w in which:
        if w == "aem": res[w].append(rt(lambda i: pool.submit(noop, i).result()))
        if w == "ppe": res[w].append(rt(lambda i: ppe.submit(noop, i).result()))
        if w == "floor": res[w].append(rt(lambda i: fl.call(noop, i)))
for w, v in res.items():
    m = statistics.median(v)
    print(f"{w:6s} median {m:9.0f}/s  {1e6/m:6.1f} us  rounds {[round(x) for x in v]}")
if "aem" in res and "ppe" in res:
    print("aem/ppe", statistics.median(res["aem"]) / statistics.median(res["ppe"]))
if "aem" in res and "floor" in res:
    print("floor/aem", statistics.median(res["floor"]) / statistics.median(res["aem"]))
if pool: pool.close()
if ppe: ppe.shutdown()
if fl: fl.close()
