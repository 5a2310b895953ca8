import aem, time, statistics, os, sys, socket, pickle
from aem.capsules import _executor as ex
from aem.bench.capsules import noop
sys.path.insert(0, "/tmp/caps")
pool = aem.CapsulePool(size=1); pool.wait_ready(30)
for i in range(100): pool.submit(noop, i).result()
w = list(pool._workers)[0]
os.sched_setaffinity(0, {0})
os.sched_setaffinity(w.pid, {1})
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
pid = os.fork()
if pid == 0:
    os.sched_setaffinity(0, {1})
    a.close()
    while True:
        d = b.recv(65536)
        if not d: os._exit(0)
        fn, args, kw = pickle.loads(d); b.send(pickle.dumps(fn(*args, **kw), protocol=5))
b.close()
def floor(i):
    a.send(pickle.dumps((noop, (i,), {}), protocol=5)); return pickle.loads(a.recv(65536))
def rt(f, k=2000):
    t0 = time.perf_counter()
    for i in range(k): f(i)
    return k / (time.perf_counter() - t0)
for spin in (0, 30, 0, 30):
    ex.SPIN_US = spin
    print(f"split CPUs: floor {rt(floor):7.0f}/s  aem (spin {spin}) {rt(lambda i: pool.submit(noop, i).result()):7.0f}/s")
a.close(); os.waitpid(pid, 0); pool.close()
