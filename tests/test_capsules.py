"""Handlers in their own processes: EVF_FORK, EVF_CAPSULE, EVF_NOCLDWAIT, EVF_KEEPALIVE."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

import aem
from conftest import AEM_PATH, children_of, processes, run_script, run_until

# -- helpers -------------------------------------------------------------------------------------


def report_pid(ev: Any) -> None:
    """A module-level handler: importable by reference from any process."""
    ev.payload["results"].fire((os.getpid(), ev.payload["value"]))


def zombies_below(pids: list[int]) -> list[int]:
    """Zombie processes whose parent is one of ``pids``."""
    return [pid for pid, state, parent in processes() if state == "Z" and parent in pids]


# -- capsules --------------------------------------------------------------------------------------


def test_capsule_runs_the_handler_in_another_process(pool: aem.CapsulePool) -> None:
    results = aem.UserEvent()
    got: list[Any] = []
    exits: list[Any] = []
    aem.register(results, lambda ev: got.append(ev.payload))
    ue = aem.UserEvent()
    eid = aem.register(ue, report_pid, flags=aem.EVF_CAPSULE, pool=pool)
    aem.register(aem.ChildExit(job=eid), lambda ev: exits.append((ev.pid, ev.returncode, ev.job, ev.error)))
    ue.fire({"results": results, "value": 1})
    run_until(lambda: got and exits)
    pid, value = got[0]
    assert value == 1 and pid != os.getpid() and pid not in pool.pids()[:1]
    assert exits == [(pid, 0, eid, None)]
    st = pool.stats()
    assert st["activations"] == 1 and st["reaped"] == 1 and st["failed"] == 0


def test_capsule_handler_exception_is_reported(pool: aem.CapsulePool) -> None:
    def boom(ev: Any) -> None:
        raise ValueError(f"bad payload {ev.payload}")

    exits: list[Any] = []
    ue = aem.UserEvent()
    eid = aem.register(ue, boom, flags=aem.EVF_CAPSULE, pool=pool)
    aem.register(aem.ChildExit(job=eid), lambda ev: exits.append(ev))
    ue.fire(42)
    run_until(lambda: exits)
    ev = exits[0]
    assert ev.returncode == 1 and ev.job == eid
    assert "Traceback" in ev.error and "ValueError: bad payload 42" in ev.error
    assert pool.stats()["failed"] == 1


def test_nocldwait_reports_nothing_and_leaves_no_zombie(pool: aem.CapsulePool, tmp_path: Any) -> None:
    ue = aem.UserEvent()
    marker = tmp_path / "ran"
    exits: list[Any] = []
    eid = aem.register(ue, lambda ev: marker.write_text(str(os.getpid())),
                       flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=pool)
    aem.register(aem.ChildExit(job=eid), exits.append)
    pool.refresh()  # the lambda registered after the pool started: give the pool a new template
    ue.fire()
    deadline = time.monotonic() + 10
    while pool.stats()["reaped"] < 1:
        assert time.monotonic() < deadline
        aem.run(timeout=0.02)
    aem.run(timeout=0.1)
    assert marker.exists() and exits == []
    assert zombies_below(pool.pids()) == []


def test_keepalive_capsule_handles_every_occurrence_in_order(pool: aem.CapsulePool) -> None:
    results = aem.UserEvent()
    got: list[Any] = []
    exits: list[Any] = []
    aem.register(results, lambda ev: got.append(ev.payload))
    ue = aem.UserEvent()
    eid = aem.register(ue, report_pid, flags=aem.EVF_CAPSULE | aem.EVF_KEEPALIVE, pool=pool)
    aem.register(aem.ChildExit(job=eid), lambda ev: exits.append(ev.returncode))
    for i in range(20):
        ue.fire({"results": results, "value": i})
    run_until(lambda: len(got) == 20)
    assert [v for _, v in got] == list(range(20))
    assert len({pid for pid, _ in got}) == 1, "one attached capsule"
    assert exits == []
    aem.unregister(eid)  # releases the attached capsule: it exits and is reported
    run_until(lambda: exits)
    assert exits == [0]


def test_late_lambda_handler_refreshes_the_pool(pool: aem.CapsulePool) -> None:
    results = aem.UserEvent()
    got: list[Any] = []
    aem.register(results, lambda ev: got.append(ev.payload))
    ue = aem.UserEvent()
    secret = "captured by a closure"
    aem.register(ue, lambda ev: results.fire(secret), flags=aem.EVF_CAPSULE, pool=pool)
    ue.fire()
    run_until(lambda: got)
    assert got == [secret] and pool.stats()["refreshes"] == 1


def test_module_level_handler_needs_no_refresh(pool: aem.CapsulePool) -> None:
    results = aem.UserEvent()
    got: list[Any] = []
    aem.register(results, lambda ev: got.append(ev.payload))
    ue = aem.UserEvent()
    aem.register(ue, report_pid, flags=aem.EVF_CAPSULE, pool=pool)
    ue.fire({"results": results, "value": "x"})
    run_until(lambda: got)
    assert pool.stats()["refreshes"] == 0


@pytest.mark.parametrize("signum, name", [(signal.SIGKILL, "SIGKILL"),
                                          # signal.Signals() has no real-time signals: this one
                                          # killed the manager thread (no ChildExit, no refill)
                                          (signal.SIGRTMIN + 1, "SIGRTMIN+1")])
def test_killed_busy_capsule_is_reported_and_replaced(pool: aem.CapsulePool, signum: int, name: str) -> None:
    results = aem.UserEvent()
    started: list[int] = []
    aem.register(results, lambda ev: started.append(ev.payload))

    def slow(ev: Any) -> None:
        results.fire(os.getpid())
        time.sleep(30)

    exits: list[Any] = []
    ue = aem.UserEvent()
    eid = aem.register(ue, slow, flags=aem.EVF_CAPSULE, pool=pool)
    aem.register(aem.ChildExit(job=eid), exits.append)
    pool.refresh()
    assert pool.wait_ready(10)
    ue.fire()
    run_until(lambda: started)
    os.kill(started[0], signum)
    run_until(lambda: exits)
    assert exits[0].pid == started[0] and exits[0].returncode == -signum
    assert name in exits[0].error
    assert pool.wait_ready(10), "the pool refilled"
    assert pool.stats()["failed"] == 1


def test_evjobshtdn_ends_the_jobs_processes(pool: aem.CapsulePool) -> None:
    results = aem.UserEvent()
    started: list[int] = []
    aem.register(results, lambda ev: started.append(ev.payload))
    exits: list[Any] = []
    ue = aem.UserEvent()

    def slow(ev: Any) -> None:
        results.fire(os.getpid())
        time.sleep(30)

    eid = aem.register(ue, slow, flags=aem.EVF_CAPSULE, pool=pool)
    aem.register(aem.ChildExit(job=eid), exits.append)
    pool.refresh()
    ue.fire()
    run_until(lambda: started)
    aem.control(eid, aem.EVJOBSHTDN)
    run_until(lambda: exits)
    assert exits[0].returncode == -signal.SIGTERM
    with pytest.raises(aem.UnknownEventError):
        aem.unregister(eid)


def test_accepted_connection_is_handed_to_the_capsule(pool: aem.CapsulePool) -> None:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve(ev: Any) -> None:
        ev.conn.setblocking(True)
        ev.conn.sendall(f"hello from {os.getpid()}\n".encode())
        ev.conn.close()

    aem.register(aem.Accept(srv), serve, flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=pool)
    pool.refresh()
    assert pool.wait_ready(10)
    cli = socket.create_connection(srv.getsockname(), timeout=10)
    deadline = time.monotonic() + 10
    data = b""
    cli.setblocking(False)
    while not data.endswith(b"\n"):
        assert time.monotonic() < deadline
        aem.run(timeout=0.02)
        try:
            chunk = cli.recv(100)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    assert data.startswith(b"hello from ") and int(data.split()[-1]) != os.getpid()
    cli.close()
    srv.close()


def test_pending_activations_wait_for_a_free_capsule() -> None:
    with aem.CapsulePool(size=1, reserve=0) as small:
        assert small.wait_ready(10)
        results = aem.UserEvent()
        got: list[Any] = []
        aem.register(results, lambda ev: got.append(ev.payload))
        ue = aem.UserEvent()
        aem.register(ue, report_pid, flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=small)
        for i in range(10):
            ue.fire({"results": results, "value": i})
        run_until(lambda: len(got) == 10, timeout=20)
        assert sorted(v for _, v in got) == list(range(10))
        assert small.stats()["failed"] == 0


def test_subprocess_exit_codes_are_intact_with_a_pool(pool: aem.CapsulePool) -> None:
    assert subprocess.run(["false"]).returncode == 1
    assert subprocess.run(["true"]).returncode == 0
    p = subprocess.Popen(["sh", "-c", "exit 7"])
    assert p.wait() == 7
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL


def test_pool_stats_are_in_aem_stats(pool: aem.CapsulePool) -> None:
    st = aem.stats()["capsules"]
    assert st["idle"] >= 2 and st["templates"] >= 1


def test_pool_misuse() -> None:
    with pytest.raises(ValueError):
        aem.CapsulePool(size=-1)
    with pytest.raises(ValueError):
        aem.CapsulePool(size=0, reserve=0)
    with pytest.raises(ValueError):
        aem.register(aem.UserEvent(), print, pool=object())  # pool without EVF_CAPSULE
    p = aem.CapsulePool(size=1)
    p.close()
    p.close()
    with pytest.raises(aem.AemError, match="closed"):  # refused at registration
        aem.register(aem.UserEvent(), report_pid, flags=aem.EVF_CAPSULE, pool=p)


# -- EVF_FORK ------------------------------------------------------------------------------------------

STATE = {"value": "before"}


def test_fork_sees_the_state_at_the_moment_of_the_event() -> None:
    results = aem.UserEvent()
    got: list[Any] = []
    exits: list[Any] = []
    aem.register(results, lambda ev: got.append(ev.payload))
    ue = aem.UserEvent()
    eid = aem.register(ue, lambda ev: results.fire((os.getpid(), STATE["value"])), flags=aem.EVF_FORK)
    aem.register(aem.ChildExit(job=eid), lambda ev: exits.append((ev.pid, ev.returncode)))
    STATE["value"] = "at the event"
    ue.fire()
    run_until(lambda: got and exits)
    pid, value = got[0]
    assert value == "at the event" and pid != os.getpid()
    assert exits == [(pid, 0)]
    assert not children_of(os.getpid()) - {p for p in aem.stats().get("capsules", {}) if False}


def test_fork_handler_exception_and_nocldwait() -> None:
    exits: list[Any] = []
    ue = aem.UserEvent()
    eid = aem.register(ue, lambda ev: 1 / 0, flags=aem.EVF_FORK)
    aem.register(aem.ChildExit(job=eid), exits.append)
    quiet = aem.UserEvent()
    qeid = aem.register(quiet, lambda ev: None, flags=aem.EVF_FORK | aem.EVF_NOCLDWAIT)
    quiet_exits: list[Any] = []
    aem.register(aem.ChildExit(job=qeid), quiet_exits.append)
    ue.fire()
    quiet.fire()
    run_until(lambda: exits)
    assert exits[0].returncode == 1 and "ZeroDivisionError" in exits[0].error
    deadline = time.monotonic() + 5
    while children_of(os.getpid()) and time.monotonic() < deadline:
        aem.run(timeout=0.02)
    assert quiet_exits == [] and not children_of(os.getpid())


def test_fork_keepalive_keeps_one_process(tmp_path: Any) -> None:
    results = aem.UserEvent()
    got: list[Any] = []
    aem.register(results, lambda ev: got.append(ev.payload))
    ue = aem.UserEvent()
    eid = aem.register(ue, report_pid, flags=aem.EVF_FORK | aem.EVF_KEEPALIVE)
    exits: list[Any] = []
    aem.register(aem.ChildExit(job=eid), lambda ev: exits.append(ev.returncode))
    for i in range(5):
        ue.fire({"results": results, "value": i})
    run_until(lambda: len(got) == 5)
    assert [v for _, v in got] == list(range(5)) and len({p for p, _ in got}) == 1
    aem.unregister(eid)
    run_until(lambda: exits)
    assert exits == [0]


# -- scale, faults, shutdown (in their own processes) ------------------------------------------------------


def test_ten_thousand_nocldwait_capsules_leave_no_zombie_and_no_fd() -> None:
    code = """
        import aem, os, time
        def work(ev):
            pass
        ue = aem.UserEvent()
        aem.register(ue, work, flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT)
        pool = aem.default_pool()
        assert pool.wait_ready(20)
        fds_before = len(os.listdir("/proc/self/fd"))
        n = 10_000
        for i in range(n):
            ue.fire(i)
        deadline = time.monotonic() + 240
        while pool.stats()["reaped"] < n and time.monotonic() < deadline:
            aem.run(timeout=0.05)
        assert pool.wait_ready(20)
        st = pool.stats()
        zombies = 0
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    stat = open(f"/proc/{name}/stat").read()
                except OSError:
                    continue
                rest = stat[stat.rindex(")") + 2:].split()
                zombies += rest[0] == "Z" and int(rest[1]) in pool.pids() + [os.getpid()]
        print(st["reaped"], st["failed"], zombies, len(os.listdir("/proc/self/fd")) - fds_before)
        pool.close()
    """
    p = run_script(code, timeout=300)
    assert p.returncode == 0, p.stderr
    reaped, failed, zombies, fd_delta = map(int, p.stdout.split())
    assert reaped >= 10_000 and failed == 0 and zombies == 0 and fd_delta == 0


def test_reserve_capsule_runs_a_shutdown_handler_when_fork_is_refused(tmp_path: Any) -> None:
    code = f"""
        import aem, errno, os, time
        marker = {str(tmp_path / "shutdown-ran")!r}
        def busy(ev):
            time.sleep(3)
        def normal(ev):
            open(marker + ".normal", "w").write(str(os.getpid()))
        def shutdown(ev):
            open(marker, "w").write(str(os.getpid()))
        pool = aem.CapsulePool(size=1, reserve=1, spawn_timeout=0.5)
        a, b, c = aem.UserEvent(), aem.UserEvent(), aem.UserEvent()
        aem.register(a, busy, flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=pool)
        nb = aem.register(b, normal, flags=aem.EVF_CAPSULE, pool=pool)
        aem.register(c, shutdown, flags=aem.EVF_CAPSULE, pool=pool, priority=aem.RESERVE_PRIORITY)
        failures = []
        aem.register(aem.ChildExit(job=nb), lambda ev: failures.append((ev.pid, ev.returncode, ev.error)))
        pool.refresh()
        assert pool.wait_ready(10)
        pool._deny_fork_for_tests(errno.EAGAIN)   # the kernel now refuses the template's forks
        a.fire()                                   # takes the only normal capsule
        aem.run(timeout=0.2)
        b.fire()                                   # no capsule for a normal event: reported failed
        c.fire()                                   # high priority: the reserve capsule runs it
        deadline = time.monotonic() + 10
        while not (failures and os.path.exists(marker)) and time.monotonic() < deadline:
            aem.run(timeout=0.05)
        print(os.path.exists(marker), os.path.exists(marker + ".normal"))
        print(failures[0][0], failures[0][1])
        print(failures[0][2])
        pool.close()
    """
    p = run_script(code, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "True False"
    assert lines[1] == "0 None"
    assert "refused" in lines[2] and "Resource temporarily unavailable" in lines[2]


def test_fork_refused_by_the_kernel_is_reported() -> None:
    code = """
        import aem, errno
        errors = []
        aem.set_error_handler(lambda exc, ev: errors.append(exc))
        ue = aem.UserEvent()
        aem.register(ue, print, flags=aem.EVF_FORK)
        aem._core._deny_process_creation(errno.EAGAIN)
        ue.fire()
        aem.run(timeout=0.2)
        print(type(errors[0]).__name__, errors[0].errno == errno.EAGAIN, aem.stats()["errors"])
    """
    p = run_script(code)
    assert p.stdout.split() == ["BlockingIOError", "True", "1"], p.stderr


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_processes_end_with_the_application(how: str) -> None:
    code = f"""
        import aem, os, sys, time, signal
        def slow(ev):
            time.sleep(60)
        ue = aem.UserEvent()
        aem.register(ue, slow, flags=aem.EVF_CAPSULE)
        fk = aem.UserEvent()
        aem.register(fk, slow, flags=aem.EVF_FORK)
        pool = aem.default_pool()
        assert pool.wait_ready(10)
        ue.fire(); fk.fire()
        aem.run(timeout=0.3)
        from aem.capsules._fork import forked_pids
        print(" ".join(map(str, pool.pids() + forked_pids(aem.current()))), flush=True)
        if {how!r} == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(0)   # no close(): the pool's atexit handler and the template end everything
    """
    p = run_script(code, timeout=60)
    pids = [int(x) for x in p.stdout.split()]
    assert len(pids) >= 4, p.stderr
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if _alive(pid)]
        time.sleep(0.05)
    assert alive == [], "processes outlived the application"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_vzone_payload_reaches_a_capsule_by_reference() -> None:
    code = """
        import aem, os, socket, time
        aem.control(0, aem.EVTBLINIT, {"size": 1 << 20, "zone": aem.TBL_VZONE})
        vmt = aem.vmtable()
        results = aem.UserEvent()
        got = []
        aem.register(results, lambda ev: got.append(ev.payload))
        def handler(ev):
            # the data is a view of the shared block: same offset, no copy
            results.fire((bytes(ev.data), type(ev.data).__name__, vmt.stats()["used"]))
        def remember(ev):
            ev.offset_seen = ev.data.offset
        a, b = socket.socketpair()
        pool = aem.CapsulePool(size=1)
        aem.register(aem.Read(a), handler, flags=aem.EVF_CAPSULE, pool=pool, constructor=remember)
        pool.refresh()
        assert pool.wait_ready(10)
        b.send(b"shared bytes")
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            aem.run(timeout=0.05)
        time.sleep(0.2)
        print(got[0][0].decode(), got[0][1], got[0][2] > 0, vmt.stats()["used"])
        pool.close()
    """
    p = run_script(code, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["shared", "bytes", "memoryview", "True", "0"]


# -- kept from review (were in test_regressions.py) ------------------------------

def test_oneshot_timer_with_a_lambda_runs_in_a_capsule() -> None:
    p = run_script("""
        import aem, os, time
        pool = aem.CapsulePool(size=1)
        assert pool.wait_ready(10)
        results = aem.UserEvent()
        got = []
        aem.register(results, lambda ev: got.append(ev.payload))
        aem.register(aem.Timer(0.05), lambda ev: results.fire(os.getpid()),
                     flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=pool)
        t0 = time.process_time()
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            aem.run(timeout=0.05)
        print(len(got), got[0] != os.getpid(), time.process_time() - t0 < 5)
        pool.close()
    """)
    assert p.stdout.split() == ["1", "True", "True"], p.stderr


def test_refresh_lets_running_capsules_finish() -> None:
    p = run_script("""
        import aem, time
        a, b = aem.UserEvent(), aem.UserEvent()
        ea = aem.register(a, lambda ev: time.sleep(0.5), flags=aem.EVF_CAPSULE)
        pool = aem.CapsulePool(size=2)
        assert pool.wait_ready(10)
        exits = []
        aem.register(aem.ChildExit(job=ea), lambda ev: exits.append(("A", ev.returncode)))
        a.fire()
        aem.run(timeout=0.2)
        eb = aem.register(b, lambda ev: None, flags=aem.EVF_CAPSULE, pool=pool)  # unknown lambda
        aem.register(aem.ChildExit(job=eb), lambda ev: exits.append(("B", ev.returncode)))
        b.fire()                       # refreshes the template
        deadline = time.monotonic() + 10
        while len(exits) < 2 and time.monotonic() < deadline:
            aem.run(timeout=0.05)
        print(sorted(exits))
        pool.close()
    """)
    assert p.stdout.strip() == "[('A', 0), ('B', 0)]", p.stderr


def test_keepalive_capsule_raising_every_time_does_not_stall() -> None:
    p = run_script("""
        import aem, os, sys, time
        reply = aem.UserEvent()
        got = []
        aem.register(reply, lambda ev: got.append(ev.payload))
        def h(ev):
            reply.fire(ev.payload)
            raise ValueError("bad request " + "x" * 200)
        ue = aem.UserEvent()
        pool = aem.CapsulePool(size=1)
        aem.register(ue, h, flags=aem.EVF_CAPSULE | aem.EVF_KEEPALIVE, pool=pool)
        assert pool.wait_ready(10)
        for i in range(600):
            ue.fire(i)
            if i % 50 == 0:
                aem.run(timeout=0.02)
        deadline = time.monotonic() + 20
        while len(got) < 600 and time.monotonic() < deadline:
            aem.run(timeout=0.05)
        print(len(got))
        pool.close(timeout=0.5)
    """, timeout=60)
    assert p.stdout.strip() == "600", p.stderr[-2000:]


def test_forks_do_not_repeat_what_the_application_printed(tmp_path: Any) -> None:
    script = tmp_path / "dup.py"
    script.write_text(textwrap.dedent("""
        import aem
        def h(ev):
            pass
        print("HELLO-FROM-PARENT")          # still in the buffer: stdout is a file
        pool = aem.CapsulePool(size=2)
        ue = aem.UserEvent()
        aem.register(ue, h, flags=aem.EVF_CAPSULE | aem.EVF_NOCLDWAIT, pool=pool)
        pool.wait_ready(10)
        for i in range(3):
            ue.fire(i)
            aem.run(timeout=0.2)
        fe = aem.UserEvent()
        aem.register(fe, h, flags=aem.EVF_FORK | aem.EVF_NOCLDWAIT)
        fe.fire()
        aem.run(timeout=0.3)
        pool.close()
    """))
    out = tmp_path / "out.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = AEM_PATH
    with open(out, "w") as f:
        subprocess.run([sys.executable, str(script)], stdout=f, stderr=subprocess.PIPE, env=env,
                       timeout=60, check=True)
    time.sleep(0.2)
    assert out.read_text().count("HELLO-FROM-PARENT") == 1
