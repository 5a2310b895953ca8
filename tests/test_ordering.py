"""The engine's delivery order, checked against a model with a hypothesis state machine.

Rules: higher priority first, then order of arrival; a stopped event keeps its
occurrences (up to HELD_MAX) and delivers them, in order, once started; an
unregistered event's pending occurrences are dropped.  Priority is read when
an occurrence arrives (EVJOBPRIO affects later ones), and when kept
occurrences are queued again on EVJOBSTART.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

import aem


class EngineOrdering(RuleBasedStateMachine):
    events = Bundle("events")

    def __init__(self) -> None:
        super().__init__()
        self.engine = aem.Engine()
        self.delivered: list[Any] = []
        self.seq = 0
        # model: eid -> {"prio", "stopped", "alive"}; pending [(prio, seq, eid)]; held eid -> [seq]
        self.regs: dict[int, dict[str, Any]] = {}
        self.sources: dict[int, aem.UserEvent] = {}
        self.pending: list[tuple[int, int, int]] = []
        self.held: dict[int, list[int]] = {}

    def teardown(self) -> None:
        self.engine.close()

    @rule(target=events, prio=st.integers(-3, 3))
    def add(self, prio: int) -> int:
        ue = aem.UserEvent()
        eid = self.engine.register(ue, lambda ev: self.delivered.append((ev.eid, ev.payload)),
                                   priority=prio)
        self.regs[eid] = {"prio": prio, "stopped": False, "alive": True}
        self.sources[eid] = ue
        self.held[eid] = []
        return eid

    @rule(eid=events)
    def fire(self, eid: int) -> None:
        reg = self.regs[eid]
        if not reg["alive"]:
            return
        self.seq += 1
        self.sources[eid].fire(self.seq)
        if reg["stopped"]:
            if len(self.held[eid]) < aem.HELD_MAX:
                self.held[eid].append(self.seq)
        else:
            self.pending.append((reg["prio"], self.seq, eid))

    @rule(eid=events)
    def stop(self, eid: int) -> None:
        reg = self.regs[eid]
        if not reg["alive"]:
            return
        self.engine.control(eid, aem.EVJOBSTOP)
        reg["stopped"] = True
        # pending occurrences of a stopped event are kept (moved to held when reached)
        mine = sorted(s for (_, s, e) in self.pending if e == eid)
        self.pending = [p for p in self.pending if p[2] != eid]
        self.held[eid] = sorted(self.held[eid] + mine)

    @rule(eid=events)
    def start(self, eid: int) -> None:
        reg = self.regs[eid]
        if not reg["alive"]:
            return
        self.engine.control(eid, aem.EVJOBSTART)
        reg["stopped"] = False
        self.pending += [(reg["prio"], s, eid) for s in self.held[eid]]
        self.held[eid] = []

    @rule(eid=events, prio=st.integers(-3, 3))
    def set_priority(self, eid: int, prio: int) -> None:
        if self.regs[eid]["alive"]:
            self.engine.control(eid, aem.EVJOBPRIO, prio)
            self.regs[eid]["prio"] = prio

    @rule(eid=events)
    def unregister(self, eid: int) -> None:
        if self.regs[eid]["alive"]:
            self.engine.unregister(eid)
            self.regs[eid]["alive"] = False
            self.pending = [p for p in self.pending if p[2] != eid]
            self.held[eid] = []

    @precondition(lambda self: self.regs)
    @rule()
    def deliver(self) -> None:
        self.delivered.clear()
        self.engine.run(timeout=0)
        expected = [(eid, seq) for prio, seq, eid in sorted(self.pending, key=lambda p: (-p[0], p[1]))]
        assert self.delivered == expected
        self.pending = []

    @invariant()
    def counts_agree(self) -> None:
        st_ = self.engine.stats()
        assert st_["registered"] == sum(1 for r in self.regs.values() if r["alive"])
        # a stopped event's occurrences move from the queue to the held list lazily
        assert st_["held"] + st_["queued"] == sum(len(h) for h in self.held.values()) + len(self.pending)


EngineOrdering.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestEngineOrdering = EngineOrdering.TestCase


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=60), st.data())
def test_timers_heap_keeps_deadline_order_through_removals(afters_ms: list[int], data: Any) -> None:
    """The one binary heap (heap.h), as the timers use it: insertions, removals from
    anywhere (unregister), pops in (deadline, registration) order."""
    with aem.Engine() as engine:
        fired: list[int] = []
        eids = [engine.register(aem.Timer(ms / 1000), lambda ev: fired.append(ev.eid)) for ms in afters_ms]
        gone = set(data.draw(st.sets(st.sampled_from(eids), max_size=len(eids) // 2)))
        for eid in gone:
            engine.unregister(eid)
        kept = [e for e in eids if e not in gone]
        deadline = {e: engine.describe(e)["deadline_ns"] for e in kept}
        assert engine.run(timeout=5) == "idle"
        assert fired == sorted(kept, key=lambda e: (deadline[e], eids.index(e)))
