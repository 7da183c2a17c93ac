"""Snapshots: dump + load + the records after the snapshot give the live state exactly.

A random workload runs on a live broker; at a random record position its state is rebuilt
from the records before that position, dumped, sent through msgpack, loaded, and the
remaining records are replayed on top. The result must be indistinguishable from the live
broker, including the order in which each queue would deliver its ready commands.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spinbroker import records, state
from spinbroker.config import Limits
from spinbroker.core import Broker, NewCommand, Waiter
from spinbroker.errors import BrokerError
from spinbroker.ids import IdGenerator

LIMITS = Limits(package_ttl=50.0, retention=200.0, max_deliveries=3)


def observable(b: Broker) -> dict[str, Any]:
    """Everything a client could learn, plus each queue's delivery order."""
    order = {}
    for name, q in b.queues.items():
        entries = sorted([(c.order, c) for c in q.ready_line] + q.ready_heap, key=lambda e: e[0])
        ready = [c.id for _, c in entries if c.state.value == "ready"]
        if ready:
            order[name] = ready
    return {
        "packages": {pid: b.status(pid, True) for pid in b.packages},
        "stats": b.stats(),
        "order": order,
        "next_order": b.next_order,
        "schemas": b.schemas,
        "unmet": {cid: c.unmet for cid, c in b.commands.items() if c.state.value == "waiting"},
    }


def roundtrip(rec: records.Record) -> records.Record:
    wire = msgpack.packb(records.to_wire(rec), use_bin_type=True)
    return records.from_wire(msgpack.unpackb(wire, raw=False, strict_map_key=False))


def run_workload(data: st.DataObject) -> Broker:
    b = Broker(LIMITS)
    ids = IdGenerator(0)
    now = 0.0
    resources = ["a", "b"]
    for _ in range(data.draw(st.integers(5, 40))):
        now += data.draw(st.sampled_from([0.0, 1.0, 30.0]))
        op = data.draw(st.sampled_from(["submit", "open", "next", "complete", "cancel", "tick"]))
        known = list(b.commands)
        try:
            if op in ("submit", "open"):
                n = data.draw(st.integers(1, 4))
                cmds = []
                for i in range(n):
                    deps: list[str | int] = []
                    if i and data.draw(st.booleans()):
                        deps.append(data.draw(st.integers(0, i - 1)))
                    if known and data.draw(st.booleans()):
                        deps.append(data.draw(st.sampled_from(known)))
                    cmds.append(
                        NewCommand(data.draw(st.sampled_from(resources)), "x", {"i": i}, deps)
                    )
                if op == "submit":
                    b.submit(ids(), cmds, ids.many(n), now)
                else:
                    pid = ids()
                    b.new_package(pid, now)
                    plain = [
                        NewCommand(
                            c.resource,
                            c.action,
                            c.parameters,
                            [d for d in c.dependencies if isinstance(d, str)],
                        )
                        for c in cmds
                    ]
                    b.add_commands(pid, plain, ids.many(n), now)
                    if data.draw(st.booleans()):
                        b.enqueue(pid, now)
            elif op == "next":
                ttr = data.draw(st.sampled_from([None, 5.0]))
                owner = data.draw(st.integers(1, 3))
                b.next(data.draw(st.sampled_from(resources)), Waiter(None, owner, ttr), now, False)
                if data.draw(st.booleans()):
                    b.release_owner(owner, now)
            elif op == "complete":
                leased = [c for c in b.commands.values() if c.state.value == "leased"]
                if leased:
                    c = data.draw(st.sampled_from(leased))
                    b.complete(c.id, data.draw(st.booleans()), "r", None, now)
            elif op == "cancel" and b.packages:
                b.cancel(data.draw(st.sampled_from(sorted(b.packages))), now)
            elif op == "tick":
                b.tick(now)
        except BrokerError:
            pass
    return b


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_snapshot_plus_replay_equals_live(data: st.DataObject) -> None:
    live = run_workload(data)
    log = [roundtrip(r) for r in live.outbox]
    cut = data.draw(st.integers(0, len(log)))

    before = Broker(LIMITS)
    for rec in log[:cut]:
        before.apply(rec)
    image = msgpack.unpackb(
        msgpack.packb(state.dump(before), use_bin_type=True), raw=False, strict_map_key=False
    )
    restored = state.load(image, LIMITS)
    assert observable(restored) == observable(before)
    for rec in log[cut:]:
        restored.apply(rec)
    assert observable(restored) == observable(live)
    # And they keep behaving alike: the same next deadline, the same tick.
    assert restored.next_deadline() == live.next_deadline()


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_replay_equals_live(data: st.DataObject) -> None:
    live = run_workload(data)
    replayed = Broker(LIMITS)
    for rec in live.outbox:
        replayed.apply(roundtrip(rec))
    assert observable(replayed) == observable(live)


def test_a_clean_stop_is_marked_and_a_format_1_snapshot_still_loads() -> None:
    """Format 2 ends with `clean` (a clean stop's snapshot: every lease is on record, so
    recovery skips no delivery number: Broker.recover_leases). Format 1 has no such item
    and loads as not clean."""
    b = Broker(LIMITS)
    b.submit("p", [NewCommand("a", "x", {}, [])], ["c"], 0.0)
    for clean in (False, True):
        assert state.load_packed(state.dump_packed(b, clean), LIMITS).stopped_cleanly is clean
        assert state.load(state.dump(b, clean), LIMITS).stopped_cleanly is clean
    old = [1, *state.dump(b)[1:4]]
    for loaded in (
        state.load(old, LIMITS),
        state.load_packed(msgpack.packb(old, use_bin_type=True), LIMITS),
    ):
        assert not loaded.stopped_cleanly and loaded.status("c")["state"] == "ready"
    for bad in ([2, *old[1:]], [1, *state.dump(b)[1:]]):  # format and length disagree
        with pytest.raises(ValueError, match="not one this reads"):
            state.load_packed(msgpack.packb(bad, use_bin_type=True), LIMITS)
