"""Per-step timestamps of one submit(fn).result() round trip (CLOCK_MONOTONIC, both processes)."""
import os, sys, time, statistics, tempfile, pickle
import aem
from aem.capsules import _executor as ex, _child as ch
from aem.bench.capsules import noop
ns = time.monotonic_ns
P = []  # parent stamps per call
cur = {}
# worker: stamps written after each answer
wfile = tempfile.mktemp()
wfd = os.open(wfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
WFD = []
real_answer = ch.answer_call
def answer_call(chan, blob):
    w0 = ns()
    fn, args, kwargs = pickle.loads(blob)
    w1 = ns()
    r = fn(*args, **kwargs)
    w2 = ns()
    out = pickle.dumps(r, protocol=5)
    w3 = ns()
    chan.send(out)
    w4 = ns()
    if not WFD: WFD.append(os.open(wfile, os.O_WRONLY | os.O_APPEND))
    os.write(WFD[0], f"{args[0]} {w0} {w1} {w2} {w3} {w4}\n".encode())
ch.answer_call = answer_call
real_submit = ex.ExecutorPart.submit
def submit(self, fn, *a, **k):
    cur["t0"] = ns()
    f = real_submit(self, fn, *a, **k)
    cur["t4"] = ns()
    return f
ex.ExecutorPart.submit = submit
real_send_call = ex.send_call
def send_call(chan, blob):
    cur["t2"] = ns(); real_send_call(chan, blob); cur["t3"] = ns()
ex.send_call = send_call
real_recv = ex.call_recv
def call_recv(fd):
    got = real_recv(fd)
    if got is not None: cur["t6"] = ns()
    else: cur["miss"] = cur.get("miss", 0) + 1
    return got
ex.call_recv = call_recv
real_dumps = pickle.dumps
real_result = ex.CallFuture.result
def result(self, timeout=None):
    cur["t5"] = ns()
    r = real_result(self, timeout)
    cur["t7"] = ns()
    return r
ex.CallFuture.result = result

pool = aem.CapsulePool(size=4); pool.wait_ready(30)
for i in range(300): pool.submit(noop, -1).result()
K = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
rows = []
for i in range(K):
    cur.clear()
    pool.submit(noop, i).result()
    rows.append((i, dict(cur)))
pool.close()
os.close(wfd)
W = {}
for line in open(wfile):
    i, *w = map(int, line.split())
    if i >= 0: W[i] = w
os.unlink(wfile)
steps = {k: [] for k in ["submit: enter -> send (CallFuture, pickle, lock, dispatch)", "send syscall",
         "send returned -> worker: answer_call entered (wake, recv, python)", "worker: unpickle call", "worker: call",
         "worker: pickle result", "worker: send syscall",
         "worker send done -> parent: answer received (poll wake/recv)", "parent: answer -> result() returns (unpickle, set_result, locks)",
         "submit returned -> result() entered", "total"]}
miss = 0
for i, c in rows:
    if i not in W or "t6" not in c: continue
    w0, w1, w2, w3, w4 = W[i]
    v = [c["t2"]-c["t0"], c["t3"]-c["t2"], w0-c["t3"], w1-w0, w2-w1, w3-w2, w4-w3, c["t6"]-w4, c["t7"]-c["t6"], c["t5"]-c["t4"], c["t7"]-c["t0"]]
    for k, x in zip(steps, v): steps[k].append(x/1000)
    miss += c.get("miss", 0) > 0
print(f"n={len(steps['total'])}, calls where the answer was not there at the first read: {miss}")
for k, v in steps.items():
    print(f"{k:80s} p50 {statistics.median(v):7.2f} us")
