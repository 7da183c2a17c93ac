"""Unit tests of the pure core (`spinbroker.core.Broker`) with an injected clock.

Every test drives a `Harness`: a Broker plus a clock (`h.now`) and an id counter, so ids and
times are literal and every run is identical. Each section follows a part of protocol.md.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest

from spinbroker import state
from spinbroker.config import Limits
from spinbroker.core import REASON_QUOTE_MAX, Broker, Command, NewCommand, Waiter
from spinbroker.errors import BrokerError, ErrorCode
from spinbroker.records import (
    BrokerStarted,
    CommandCompleted,
    CommandLeased,
    LeaseCancelled,
    LeaseReleased,
    PackageExpired,
    PackageForgotten,
    from_wire,
    to_wire,
)

TTL = 3600.0
RETENTION = 86400.0


def nc(
    resource: str = "r",
    action: str = "a",
    params: dict[str, Any] | None = None,
    deps: list[str | int] | tuple[str | int, ...] = (),
) -> NewCommand:
    return NewCommand(resource, action, dict(params or {}), list(deps))


class Harness:
    """A broker with an injected clock and predictable ids (p-1, c-1, ...)."""

    def __init__(self, **limits: Any) -> None:
        self.b = Broker(Limits(**limits))
        self.now = 0.0
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)

    def id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"

    def ids(self, n: int) -> list[str]:
        return [self.id("c") for _ in range(n)]

    # producers
    def submit(self, *commands: NewCommand) -> tuple[str, list[str]]:
        pid = self.id("p")
        ids = self.b.submit(pid, list(commands), self.ids(len(commands)), self.now)
        return pid, ids

    def new(self) -> str:
        pid = self.id("p")
        self.b.new_package(pid, self.now)
        return pid

    def add(self, pid: str, *commands: NewCommand) -> list[str]:
        return self.b.add_commands(pid, list(commands), self.ids(len(commands)), self.now)

    # agents
    def waiter(self, owner: int | None = 1, ttr: float | None = None) -> Waiter:
        return Waiter(f"w{next(self._tokens)}", owner, ttr)

    def next(
        self, resource: str = "r", owner: int | None = 1, ttr: float | None = None
    ) -> Command | None:
        return self.b.next(resource, self.waiter(owner, ttr), self.now, False)

    def next_id(self, resource: str = "r", owner: int | None = 1, ttr: float | None = None) -> str:
        cmd = self.next(resource, owner, ttr)
        assert cmd is not None, f"nothing ready on {resource}"
        return cmd.id

    def park(self, resource: str = "r", owner: int | None = 1, ttr: float | None = None) -> Waiter:
        w = self.waiter(owner, ttr)
        assert self.b.next(resource, w, self.now, True) is None
        return w

    def drain_deliveries(self) -> list[tuple[object, str]]:
        out = [(w.token, c.id) for w, c in self.b.deliveries]
        self.b.deliveries.clear()
        return out

    def drain_all(self, resource: str = "r") -> list[str]:
        out = []
        while (cmd := self.next(resource)) is not None:
            out.append(cmd.id)
        return out

    def complete(
        self, cid: str, success: bool = True, reason: str | None = None, delivery: int | None = None
    ) -> str:
        return self.b.complete(cid, success, reason, delivery, self.now).value

    def run(self, cid: str, success: bool = True, reason: str | None = None) -> None:
        """Lease exactly `cid` (it must be the next on its resource) and complete it."""
        resource = self.b.commands[cid].resource
        assert self.next_id(resource) == cid
        self.complete(cid, success, reason)

    # queries
    def state(self, any_id: str) -> str:
        return str(self.b.status(any_id)["state"])

    def pkg(self, pid: str) -> dict[str, Any]:
        return self.b.status(pid, True)

    def snapshot(self) -> Any:
        """Everything observable, for 'nothing changed' checks."""
        packages = {pid: self.b.status(pid, True) for pid in sorted(self.b.packages)}
        return packages, self.b.stats(), len(self.b.outbox), sorted(self.b.commands)


def error_code(exc: pytest.ExceptionInfo[BrokerError]) -> ErrorCode:
    return exc.value.code


def assert_refused(h: Harness, code: ErrorCode, fn: Any, *args: Any) -> BrokerError:
    """`fn(*args)` raises BrokerError(code) and changes nothing observable."""
    before = h.snapshot()
    with pytest.raises(BrokerError) as exc:
        fn(*args)
    assert exc.value.code is code, exc.value
    assert h.snapshot() == before
    return exc.value


def replay(b: Broker, limits: Limits | None = None) -> Broker:
    """A fresh broker built from `b.outbox`, every record through the wire and msgpack."""
    fresh = Broker(limits or b.limits)
    for rec in b.outbox:
        data = msgpack.packb(to_wire(rec), use_bin_type=True)
        fresh.apply(from_wire(msgpack.unpackb(data, raw=False, strict_map_key=False)))
    return fresh


# ---------------------------------------------------------------------------- order


def test_next_follows_enqueue_sequence_then_position() -> None:
    h = Harness()
    early = h.new()  # created first, enqueued last: enqueue sequence decides
    (e0,) = h.add(early, nc())
    _, (a0, a1, a2) = h.submit(nc(), nc(), nc())
    _, (b0, b1) = h.submit(nc(), nc())
    h.b.enqueue(early, h.now)
    assert h.drain_all() == [a0, a1, a2, b0, b1, e0]


def test_resources_are_separate_queues() -> None:
    h = Harness()
    _, (x0, r0, x1) = h.submit(nc("x"), nc("r"), nc("x"))
    assert h.drain_all("r") == [r0]
    assert h.drain_all("x") == [x0, x1]
    assert h.next("unknown") is None


def test_dependency_gates_within_a_package() -> None:
    h = Harness()
    _, (a, b) = h.submit(nc(), nc(deps=[0]))
    assert h.state(b) == "waiting"
    assert h.next_id() == a
    assert h.next() is None  # b waits for a
    assert h.complete(a) == "succeeded"
    assert h.state(b) == "ready"
    assert h.next_id() == b


def test_dependency_gates_across_packages() -> None:
    h = Harness()
    _, (a,) = h.submit(nc("x"))
    _, (b,) = h.submit(nc("r", deps=[a]))
    assert h.next() is None
    assert h.state(b) == "waiting"
    h.run(a)
    assert h.next_id() == b


def test_dependency_on_an_already_succeeded_command_is_ready_at_once() -> None:
    h = Harness()
    _, (a,) = h.submit(nc("x"))
    h.run(a)
    _, (b,) = h.submit(nc(deps=[a]))
    assert h.state(b) == "ready"


def test_all_dependencies_must_succeed() -> None:
    h = Harness()
    _, (a, b, c) = h.submit(nc("x"), nc("x"), nc("r", deps=[0, 1]))
    h.run(a)
    assert h.state(c) == "waiting"
    h.run(b)
    assert h.state(c) == "ready"


def test_waiting_command_does_not_block_ready_ones_behind_it() -> None:
    h = Harness()
    _, (x, w, r1) = h.submit(nc("x"), nc("r", deps=[0]), nc("r"))
    _, (r2,) = h.submit(nc("r"))
    assert h.drain_all() == [r1, r2]
    assert h.state(w) == "waiting"
    h.run(x)
    assert h.next_id() == w


def test_ready_command_retakes_its_place_ahead_of_later_ones() -> None:
    h = Harness()
    _, (x, w) = h.submit(nc("x"), nc("r", deps=[0]))
    _, (l1, l2) = h.submit(nc("r"), nc("r"))
    _, (l3,) = h.submit(nc("r"))
    h.run(x)
    assert h.drain_all() == [w, l1, l2, l3]


def test_ready_command_goes_behind_earlier_enqueued_ones() -> None:
    h = Harness()
    _, (e1,) = h.submit(nc("r"))
    _, (x,) = h.submit(nc("x"))
    _, (w, l1) = h.submit(nc("r", deps=[x]), nc("r"))
    h.run(x)
    assert h.drain_all() == [e1, w, l1]


# ---------------------------------------------------------------------------- waiters


def test_parked_waiters_are_served_first_come_first_served() -> None:
    h = Harness()
    w1, w2, w3 = h.park(), h.park(), h.park()
    assert h.b.stats()["resources"]["r"]["agents"] == 3
    _, (c0, c1) = h.submit(nc(), nc())
    assert h.drain_deliveries() == [(w1.token, c0), (w2.token, c1)]
    _, (c2,) = h.submit(nc())
    assert h.drain_deliveries() == [(w3.token, c2)]
    assert h.b.stats()["resources"]["r"]["agents"] == 0
    assert h.state(c0) == "leased"
    assert h.b.status(c0)["delivery"] == 1


def test_later_next_does_not_overtake_parked_waiters() -> None:
    h = Harness()
    w1 = h.park()
    # a non-blocking NEXT finds nothing, a second blocking one queues behind w1
    assert h.next() is None
    w2 = h.park()
    _, (c0,) = h.submit(nc())
    assert h.drain_deliveries() == [(w1.token, c0)]
    assert w2.queue is not None
    _, (c1,) = h.submit(nc())
    assert h.drain_deliveries() == [(w2.token, c1)]


def test_unparked_waiter_leaves_the_line() -> None:
    h = Harness()
    w1, w2, w3 = h.park(), h.park(), h.park()
    h.b.unpark(w2)
    h.b.unpark(w2)  # twice is harmless
    _, (c0, c1) = h.submit(nc(), nc())
    assert h.drain_deliveries() == [(w1.token, c0), (w3.token, c1)]


def test_names_only_agents_use_cost_nothing_once_the_agents_leave() -> None:
    """NEXT on a name no command has used makes no queue unless it parks, and the queue
    it parks on goes with its last agent: agents cannot grow the broker by inventing
    names (each NEXT with a timeout would otherwise leave a queue behind)."""
    h = Harness()
    for i in range(100):
        assert h.next(f"typo-{i}") is None
    assert h.b.queues == {}
    w1, w2 = h.park("vm"), h.park("vm")
    assert list(h.b.queues) == ["vm"]
    h.b.unpark(w1)
    assert list(h.b.queues) == ["vm"]  # w2 still waits there
    h.b.unpark(w2)
    assert h.b.queues == {}
    # The name comes back like any other: a parked agent is served by a later command.
    w3 = h.park("vm")
    _, (c,) = h.submit(nc("vm"))
    assert h.drain_deliveries() == [(w3.token, c)]


def test_a_queue_an_agent_made_stays_once_a_command_uses_it() -> None:
    """A command adopts the queue its agents park on, in every way a command can arrive
    (SUBMIT, ADD then ENQUEUE): the queue then stays when its agents leave, as the
    command's place in line must."""
    h = Harness()
    w1, w2 = h.park("a"), h.park("b")
    h.submit(nc("x"), nc("a", deps=[0]))  # waits on x: w1 stays parked
    pid = h.new()
    (staged,) = h.add(pid, nc("b"))  # staged, not yet enqueued
    h.b.unpark(w1)
    h.b.unpark(w2)
    assert sorted(h.b.queues) == ["a", "b", "x"]
    h.b.enqueue(pid, h.now)
    assert h.next_id("b") == staged
    # The one-command SUBMIT (its own fast path) adopts it too: the command, served at
    # once to the agent parked there, must be found again when its lease is lost.
    w3 = h.park("c")
    _, (c,) = h.submit(nc("c"))
    assert h.drain_deliveries() == [(w3.token, c)]
    h.b.unpark(w4 := h.park("c", owner=2))
    assert w4.queue is None and "c" in h.b.queues
    h.b.release_owner(1, h.now)
    assert h.next_id("c") == c


def test_dependency_success_serves_a_parked_waiter() -> None:
    h = Harness()
    _, (x, r) = h.submit(nc("x"), nc("r", deps=[0]))
    w = h.park("r")
    assert h.drain_deliveries() == []
    h.run(x)
    assert h.drain_deliveries() == [(w.token, r)]


def test_delivered_lease_carries_the_waiters_owner_and_ttr() -> None:
    h = Harness()
    conn = h.park(owner=7)
    timed = h.park(owner=8, ttr=30.0)
    _, (c0, c1) = h.submit(nc(), nc())
    assert h.drain_deliveries() == [(conn.token, c0), (timed.token, c1)]
    assert h.b.commands[c1].delivered()["ttr"] == 30.0
    h.b.release_owner(8, h.now)  # a ttr lease outlives the connection
    assert h.state(c1) == "leased"
    h.b.release_owner(7, h.now)
    assert h.state(c0) == "ready"


# ---------------------------------------------------------------------------- failure


def test_failure_cancels_transitive_dependents_and_independents_still_run() -> None:
    h = Harness()
    pid, (a, b, c, d) = h.submit(nc(), nc(deps=[0]), nc(deps=[1]), nc())
    h.run(a, success=False, reason="boom")
    assert [h.state(x) for x in (a, b, c, d)] == ["failed", "cancelled", "cancelled", "ready"]
    assert h.b.status(a)["reason"] == "boom"
    assert a in h.b.status(b)["reason"]
    st = h.pkg(pid)
    assert (st["state"], st["causer"], st["reason"], st["finished"]) == ("failed", a, "boom", False)
    assert h.drain_all() == [d]
    h.complete(d)
    st = h.pkg(pid)
    assert (st["state"], st["causer"], st["finished"]) == ("failed", a, True)
    assert st["counts"]["succeeded"] == 1
    assert st["counts"]["failed"] == 1
    assert st["counts"]["cancelled"] == 2


def test_transitive_dependent_reason_names_the_failed_command() -> None:
    # protocol.md: "A failed command's transitive dependents become cancelled (the reason
    # names the failed command)". Two hops away, the reason must still name `a`.
    h = Harness()
    _, (a, _b, c) = h.submit(nc(), nc(deps=[0]), nc(deps=[1]))
    h.run(a, success=False, reason="boom")
    assert h.state(c) == "cancelled"
    assert a in h.b.status(c)["reason"]


def test_cancelled_dependents_name_the_root_even_after_it_is_forgotten() -> None:
    # a fails; b (another package, kept alive by e) is cancelled through it; a's package is
    # forgotten; c then depends on b. c's reason must still say that a *failed*.
    h = Harness(retention=10.0)
    _, (a,) = h.submit(nc("x"))
    _, (b, _e) = h.submit(nc(deps=[a]), nc())
    h.run(a, success=False, reason="disk full")
    assert h.b.status(b)["reason"] == f"dependency {a} failed: disk full"
    h.b.tick(10.0)
    assert_refused(h, ErrorCode.NOT_FOUND, h.b.status, a)
    pid, (c,) = h.submit(nc(deps=[b]))
    assert h.b.status(c)["reason"] == f"dependency {a} failed: disk full"
    st = h.pkg(pid)
    assert st["causer"] == a
    assert st["reason"].startswith(f"dependency {a} failed")


def test_package_is_failed_from_the_first_failure_and_keeps_that_causer() -> None:
    h = Harness()
    pid, (a, b, c) = h.submit(nc(), nc(), nc())
    assert h.next_id() == a
    assert h.next_id() == b
    h.complete(b, success=False, reason="first")
    st = h.pkg(pid)
    assert (st["state"], st["causer"], st["reason"], st["finished"]) == (
        "failed",
        b,
        "first",
        False,
    )
    h.complete(a, success=False, reason="second")
    h.run(c)
    st = h.pkg(pid)
    assert (st["state"], st["causer"], st["reason"], st["finished"]) == (
        "failed",
        b,
        "first",
        True,
    )


def test_failure_in_one_package_fails_a_dependent_package_with_the_root_causer() -> None:
    h = Harness()
    p1, (a,) = h.submit(nc("x"))
    p2, (b, e) = h.submit(nc(deps=[a]), nc())
    p3, (c,) = h.submit(nc(deps=[b]))
    h.run(a, success=False, reason="disk full")
    assert (h.state(b), h.state(c), h.state(e)) == ("cancelled", "cancelled", "ready")
    for pid in (p2, p3):
        st = h.pkg(pid)
        assert st["state"] == "failed"
        assert st["causer"] == a
        assert "disk full" in st["reason"]
    assert h.pkg(p1)["state"] == "failed"
    assert h.pkg(p3)["finished"] is True
    assert h.pkg(p2)["finished"] is False  # e still runs
    assert h.drain_all() == [e]


def test_enqueue_after_a_dependency_failed_cancels_at_once() -> None:
    h = Harness()
    _, (a,) = h.submit(nc("x"))
    pid = h.new()
    (b,) = h.add(pid, nc(deps=[a]))
    h.run(a, success=False, reason="nope")
    h.b.enqueue(pid, h.now)
    assert h.state(b) == "cancelled"
    st = h.pkg(pid)
    assert (st["state"], st["causer"], st["finished"]) == ("failed", a, True)
    assert h.next() is None


def test_submit_depending_on_a_failed_command_is_cancelled_at_once() -> None:
    h = Harness()
    _, (a,) = h.submit(nc("x"))
    h.run(a, success=False)
    pid, (b, c, d) = h.submit(nc(deps=[a]), nc(deps=[0]), nc())
    assert (h.state(b), h.state(c), h.state(d)) == ("cancelled", "cancelled", "ready")
    assert h.pkg(pid)["causer"] == a
    assert h.drain_all() == [d]


# ---------------------------------------------------------------------------- cancel


def test_cancel_cancels_undelivered_and_leased_may_still_complete() -> None:
    h = Harness()
    pid, (a, b, c) = h.submit(nc(), nc(deps=[0]), nc())
    assert h.next_id() == a
    assert h.b.cancel(pid, h.now) == 2
    assert (h.state(a), h.state(b), h.state(c)) == ("leased", "cancelled", "cancelled")
    assert h.b.status(b)["reason"] is not None
    st = h.pkg(pid)
    assert (st["state"], st["finished"]) == ("cancelled", False)
    assert h.next() is None
    assert h.complete(a) == "succeeded"
    assert h.state(b) == "cancelled"  # a's dependent went with the package
    assert h.next() is None
    st = h.pkg(pid)
    assert (st["state"], st["finished"], st["causer"]) == ("cancelled", True, None)
    assert h.b.finished[-1].id == pid


def test_cancel_reaches_dependents_in_other_packages() -> None:
    h = Harness()
    p1, (a,) = h.submit(nc("x"))
    p2, (b, e) = h.submit(nc(deps=[a]), nc())
    p3, (c,) = h.submit(nc(deps=[b]))
    assert h.b.cancel(p1, h.now) == 1
    assert (h.state(b), h.state(c), h.state(e)) == ("cancelled", "cancelled", "ready")
    # A command cancelled because a dependency went away makes its package fail; the
    # causer is the root (the cancelled command of p1).
    assert h.pkg(p2)["causer"] == a
    assert h.pkg(p3)["causer"] == a
    assert h.pkg(p3)["state"] == "failed"
    assert h.pkg(p3)["finished"] is True
    assert h.drain_all() == [e]


def test_cancelled_package_with_a_failing_leased_command_is_failed() -> None:
    h = Harness()
    pid, (a, _b) = h.submit(nc(), nc())
    assert h.next_id() == a
    h.b.cancel(pid, h.now)
    h.complete(a, success=False, reason="late")
    st = h.pkg(pid)
    assert (st["state"], st["causer"], st["reason"], st["finished"]) == (
        "failed",
        a,
        "late",
        True,
    )


def test_cancel_of_an_open_package_discards_it() -> None:
    h = Harness()
    pid = h.new()
    a, b = h.add(pid, nc(), nc(deps=[]))
    assert h.b.cancel(pid, h.now) == 2
    st = h.pkg(pid)
    assert (st["state"], st["finished"]) == ("cancelled", True)
    assert (h.state(a), h.state(b)) == ("cancelled", "cancelled")
    assert_refused(h, ErrorCode.NOT_OPEN, h.b.enqueue, pid, h.now)
    assert_refused(h, ErrorCode.NOT_OPEN, h.add, pid, nc())
    assert h.next() is None


def test_cancel_of_an_empty_open_package() -> None:
    h = Harness()
    pid = h.new()
    assert h.b.cancel(pid, h.now) == 0
    st = h.pkg(pid)
    assert (st["state"], st["finished"]) == ("cancelled", True)


def test_cancel_of_a_finished_package_changes_nothing() -> None:
    h = Harness()
    pid, (a,) = h.submit(nc())
    h.run(a)
    before = h.snapshot()
    assert h.b.cancel(pid, h.now) == 0
    assert h.snapshot() == before
    assert h.pkg(pid)["state"] == "succeeded"


def test_cancel_twice_answers_zero_the_second_time() -> None:
    h = Harness()
    pid, _ = h.submit(nc(), nc())
    assert h.b.cancel(pid, h.now) == 2
    before = h.snapshot()
    assert h.b.cancel(pid, h.now) == 0
    assert h.snapshot() == before


def test_cancel_with_everything_leased_cancels_nothing() -> None:
    h = Harness()
    pid, (a,) = h.submit(nc())
    assert h.next_id() == a
    assert h.b.cancel(pid, h.now) == 0
    assert h.pkg(pid)["state"] == "pending"
    h.complete(a)
    assert h.pkg(pid)["state"] == "succeeded"


def test_cancel_of_unknown_package_is_not_found() -> None:
    h = Harness()
    assert_refused(h, ErrorCode.NOT_FOUND, h.b.cancel, "p-nope", h.now)


# ---------------------------------------------------------------------------- expiry


def test_open_package_expires_after_the_ttl() -> None:
    h = Harness(package_ttl=100.0)
    h.now = 10.0
    pid = h.new()
    (a,) = h.add(pid, nc())
    assert h.b.next_deadline() == 110.0
    h.b.tick(109.999)
    assert h.state(pid) == "open"
    h.now = 110.0
    h.b.tick(h.now)
    st = h.pkg(pid)
    assert (st["state"], st["finished"], st["commands"]) == ("expired", True, [])
    assert sum(st["counts"].values()) == 0
    assert isinstance(h.b.outbox[-1], PackageExpired)
    assert h.b.finished[-1].id == pid
    assert_refused(h, ErrorCode.NOT_FOUND, h.b.enqueue, pid, h.now)
    assert_refused(h, ErrorCode.NOT_FOUND, h.add, pid, nc())
    assert_refused(h, ErrorCode.NOT_FOUND, h.b.cancel, pid, h.now)
    assert_refused(h, ErrorCode.NOT_FOUND, h.b.status, a)
    assert_refused(h, ErrorCode.NOT_FOUND, h.b.wait_target, pid)


def test_enqueued_and_cancelled_packages_do_not_expire() -> None:
    h = Harness(package_ttl=100.0)
    enq = h.new()
    h.add(enq, nc())
    h.b.enqueue(enq, h.now)
    canc = h.new()
    h.b.cancel(canc, h.now)
    sub, _ = h.submit(nc())
    h.b.tick(1000.0)
    assert h.state(enq) == "pending"
    assert h.state(sub) == "pending"
    assert h.state(canc) == "cancelled"
    assert not any(isinstance(r, PackageExpired) for r in h.b.outbox)


def test_finished_package_is_forgotten_after_retention() -> None:
    h = Harness(retention=50.0)
    pid, (a,) = h.submit(nc())
    h.now = 10.0
    h.run(a)
    assert h.pkg(pid)["finished"] is True
    h.b.tick(59.9)
    assert h.state(pid) == "succeeded"
    assert h.state(a) == "succeeded"
    h.now = 60.0
    h.b.tick(h.now)
    assert isinstance(h.b.outbox[-1], PackageForgotten)
    assert_refused(h, ErrorCode.NOT_FOUND, h.b.status, pid)
    assert_refused(h, ErrorCode.NOT_FOUND, h.b.status, a)
    assert_refused(h, ErrorCode.UNKNOWN_DEPENDENCY, h.submit, nc(deps=[a]))
    assert h.b.stats()["totals"]["packages"] == 0
    assert h.b.stats()["totals"]["commands"] == 0


def test_unfinished_package_is_not_forgotten() -> None:
    h = Harness(retention=5.0)
    pid, (a, _b) = h.submit(nc(), nc())
    h.run(a)
    h.b.tick(1000.0)
    assert h.state(pid) == "pending"


def test_expired_package_is_forgotten_after_retention() -> None:
    h = Harness(package_ttl=10.0, retention=20.0)
    pid = h.new()
    h.b.tick(10.0)
    assert h.state(pid) == "expired"
    h.b.tick(29.0)
    assert h.state(pid) == "expired"
    h.b.tick(30.0)
    assert_refused(h, ErrorCode.NOT_FOUND, h.b.status, pid)


def test_enqueue_refuses_a_dependency_forgotten_while_open() -> None:
    h = Harness(retention=10.0, package_ttl=1000.0)
    _, (a,) = h.submit(nc("x"))
    h.run(a)
    pid = h.new()
    h.add(pid, nc(deps=[a]))
    h.b.tick(10.0)  # a's package is forgotten
    assert_refused(h, ErrorCode.UNKNOWN_DEPENDENCY, h.b.enqueue, pid, h.now)
    assert h.state(pid) == "open"


# ---------------------------------------------------------------------------- leases


def test_connection_lease_released_on_close_is_redelivered_in_its_place() -> None:
    h = Harness()
    _, (a, b) = h.submit(nc(), nc())
    _, (c,) = h.submit(nc())
    assert h.next_id(owner=1) == a
    assert h.next_id(owner=2) == b
    h.b.release_owner(1, h.now)
    assert isinstance(h.b.outbox[-1], LeaseReleased)
    assert h.state(a) == "ready"
    assert h.b.status(a)["delivery"] == 1
    cmd = h.next(owner=3)
    assert cmd is not None
    assert cmd.id == a  # ahead of c, enqueued later
    assert cmd.delivered()["delivery"] == 2
    assert h.next_id(owner=3) == c
    assert h.state(b) == "leased"  # owner 2 still holds b
    h.b.release_owner(1, h.now)  # nothing left for owner 1
    assert h.state(a) == "leased"


def test_release_owner_hands_the_command_to_a_parked_waiter() -> None:
    h = Harness()
    _, (a,) = h.submit(nc())
    assert h.next_id(owner=1) == a
    w = h.park(owner=2)
    h.b.release_owner(1, h.now)
    assert h.drain_deliveries() == [(w.token, a)]
    assert h.b.status(a)["delivery"] == 2


def test_release_owner_ends_leases_in_queue_order() -> None:
    # With max_deliveries=1 both lost leases fail; the first in line is the causer.
    h = Harness(max_deliveries=1)
    pid, (a, b) = h.submit(nc(), nc())
    assert h.next_id(owner=1) == a
    assert h.next_id(owner=1) == b
    h.b.release_owner(1, h.now)
    assert [r.command for r in h.b.outbox[-2:]] == [a, b]  # type: ignore[union-attr]
    assert (h.state(a), h.state(b)) == ("failed", "failed")
    assert h.pkg(pid)["causer"] == a


def test_enqueue_serves_a_parked_waiter() -> None:
    h = Harness()
    w = h.park()
    pid = h.new()
    (a,) = h.add(pid, nc())
    assert h.drain_deliveries() == []
    h.b.enqueue(pid, h.now)
    assert h.drain_deliveries() == [(w.token, a)]


def test_ttr_lease_expires_on_tick() -> None:
    h = Harness()
    _, (a,) = h.submit(nc())
    cmd = h.next(owner=None, ttr=10.0)
    assert cmd is not None
    assert cmd.delivered()["ttr"] == 10.0
    assert h.b.next_deadline() == 10.0
    h.b.release_owner(1, h.now)
    h.b.tick(9.99)
    assert h.state(a) == "leased"
    h.b.tick(10.0)
    assert h.state(a) == "ready"
    assert h.b.status(a)["delivery"] == 1
    h.now = 10.0
    again = h.next(ttr=10.0)
    assert again is not None
    assert again.delivered()["delivery"] == 2


def test_touch_extends_a_ttr_lease() -> None:
    h = Harness()
    _, (a,) = h.submit(nc())
    assert h.next_id(ttr=10.0) == a
    h.now = 5.0
    assert h.b.touch(a, None, None, h.now) == 10.0  # default: the NEXT ttr
    h.b.tick(10.0)
    assert h.state(a) == "leased"
    h.now = 14.0
    assert h.b.touch(a, 30.0, 1, h.now) == 30.0
    h.b.tick(43.9)
    assert h.state(a) == "leased"
    h.b.tick(44.0)
    assert h.state(a) == "ready"


def test_touch_of_a_connection_lease_only_checks_it() -> None:
    h = Harness()
    _, (a,) = h.submit(nc())
    assert h.next_id(owner=1) == a
    n = len(h.b.outbox)
    assert h.b.touch(a, None, None, h.now) is None
    assert h.b.touch(a, 5.0, 1, h.now) is None
    assert len(h.b.outbox) == n
    assert h.b.next_deadline() is None  # no lease deadline appeared


def test_touch_errors() -> None:
    h = Harness()
    _, (a, b) = h.submit(nc(), nc("x", deps=[0]))
    assert_refused(h, ErrorCode.NOT_FOUND, h.b.touch, "c-nope", 5.0, None, h.now)
    assert_refused(h, ErrorCode.NOT_LEASED, h.b.touch, a, 5.0, None, h.now)
    assert_refused(h, ErrorCode.NOT_LEASED, h.b.touch, b, 5.0, None, h.now)
    assert h.next_id(ttr=5.0) == a
    assert_refused(h, ErrorCode.STALE_DELIVERY, h.b.touch, a, 5.0, 0, h.now)
    h.complete(a)
    assert_refused(h, ErrorCode.ALREADY_COMPLETED, h.b.touch, a, 5.0, None, h.now)


def test_max_deliveries_fails_the_command_when_a_connection_lease_is_lost() -> None:
    h = Harness(max_deliveries=2)
    pid, (a, b) = h.submit(nc(), nc(deps=[0]))
    assert h.next_id(owner=1) == a
    h.b.release_owner(1, h.now)
    assert h.state(a) == "ready"
    assert h.next_id(owner=1) == a
    h.b.release_owner(1, h.now)
    reason = "lease lost after 2 deliveries (max_deliveries=2)"
    st = h.b.status(a)
    assert (st["state"], st["reason"], st["delivery"]) == ("failed", reason, 2)
    assert h.state(b) == "cancelled"
    pst = h.pkg(pid)
    assert (pst["state"], pst["causer"], pst["reason"], pst["finished"]) == (
        "failed",
        a,
        reason,
        True,
    )
    rec = h.b.outbox[-1]
    assert isinstance(rec, CommandCompleted)
    assert (rec.success, rec.reason) == (False, reason)


def test_max_deliveries_fails_the_command_when_a_ttr_lease_expires() -> None:
    h = Harness(max_deliveries=1)
    _, (a,) = h.submit(nc())
    assert h.next_id(ttr=1.0) == a
    h.b.tick(1.0)
    st = h.b.status(a)
    assert (st["state"], st["reason"]) == (
        "failed",
        "lease lost after 1 deliveries (max_deliveries=1)",
    )
    assert h.next() is None


@pytest.mark.parametrize("how", ["connection closed", "ttr ran out", "restart"])
def test_a_leased_command_of_a_cancelled_package_is_cancelled_when_its_lease_ends(
    how: str,
) -> None:
    """CANCEL spares a leased command (its agent may still complete it). If the lease ends
    without COMPLETE, the command is cancelled, not delivered again after the CANCEL, and
    its dependents in other packages are cancelled through it."""
    h = Harness()
    pid, (a,) = h.submit(nc())
    other, (b,) = h.submit(nc(deps=[a]))
    ttr = 5.0 if how == "ttr ran out" else None
    assert h.next_id(owner=1, ttr=ttr) == a
    assert h.b.cancel(pid, h.now) == 0  # nothing to cancel now: `a` is out
    # nothing cancelled yet: the package stays pending while `a` runs
    assert h.state(a) == "leased" and h.pkg(pid)["state"] == "pending"
    assert not h.pkg(pid)["finished"]
    if how == "connection closed":
        h.b.release_owner(1, h.now)
    elif how == "ttr ran out":
        h.b.tick(h.now + ttr)
    else:
        h.b.recover_leases(h.now)
    assert isinstance(h.b.outbox[-1], LeaseCancelled)
    status = h.b.status(a)
    assert (status["state"], status["reason"]) == ("cancelled", "package cancelled")
    assert h.pkg(pid)["state"] == "cancelled" and h.pkg(pid)["finished"]
    assert h.b.status(b)["reason"] == f"dependency {a} was cancelled"
    assert h.pkg(other)["state"] == "failed" and h.pkg(other)["finished"]
    assert h.next() is None
    replayed = Broker(h.b.limits)
    for rec in h.b.outbox:
        replayed.apply(from_wire(msgpack.unpackb(msgpack.packb(to_wire(rec)))))
    assert replayed.status(a) == h.b.status(a) and replayed.status(pid) == h.b.status(pid)


def test_a_bad_name_is_quoted_short_in_its_error() -> None:
    h = Harness()
    with pytest.raises(BrokerError) as refused:
        h.submit(nc(resource="x" * 1_000_000))
    assert refused.value.code is ErrorCode.BAD_REQUEST
    assert "must be 1-128 characters" in refused.value.message
    assert len(refused.value.message) < 300


def test_a_dependency_named_twice_counts_once() -> None:
    h = Harness()
    _, (a,) = h.submit(nc())
    _, (b, c) = h.submit(nc(), nc(deps=[0, a, 0, a, 0]))
    assert h.b.commands[c].dependencies == (b, a)
    assert h.b.commands[c].unmet == 2
    for expected in (a, b):
        assert h.next_id() == expected
        h.b.complete(expected, True, None, None, h.now)
    assert h.next_id() == c


def test_dependents_quote_a_long_failure_reason_not_copy_it() -> None:
    """One failure must not be copied whole into every dependent (memory, snapshots and
    STATUS replies would grow with dependents x reason): dependents quote its start."""
    h = Harness()
    _, (a, b) = h.submit(nc(), nc(deps=[0]))
    other, (c,) = h.submit(nc(deps=[a]))
    long_reason = "x" * 100_000
    assert h.next_id() == a
    h.b.complete(a, False, long_reason, None, h.now)
    later, (d,) = h.submit(nc(deps=[a]))  # cancelled at enqueue: `a` failed already
    assert h.b.status(a)["reason"] == long_reason
    quoted = f"dependency {a} failed: {'x' * REASON_QUOTE_MAX}..."
    for cmd in (b, c, d):
        assert h.b.status(cmd)["reason"] == quoted
    for pkg in (other, later):
        assert h.pkg(pkg)["reason"] == quoted
    short = h.submit(nc())[1][0]
    assert h.next_id() == short
    h.b.complete(short, False, "disk full", None, h.now)
    assert h.b.status(h.submit(nc(deps=[short]))[1][0])["reason"] == (
        f"dependency {short} failed: disk full"
    )


# ---------------------------------------------------------------------------- complete


def test_complete_errors() -> None:
    h = Harness()
    _, (a, b, c) = h.submit(nc(), nc("x", deps=[0]), nc())
    assert_refused(h, ErrorCode.NOT_FOUND, h.complete, "c-nope")
    assert_refused(h, ErrorCode.NOT_LEASED, h.complete, a)  # ready
    assert_refused(h, ErrorCode.NOT_LEASED, h.complete, b)  # waiting
    assert h.next_id() == a
    assert h.complete(a) == "succeeded"
    assert_refused(h, ErrorCode.ALREADY_COMPLETED, h.complete, a)
    assert_refused(h, ErrorCode.ALREADY_COMPLETED, h.complete, a, False)
    assert h.next_id() == c
    assert h.complete(c, False, "x") == "failed"
    assert_refused(h, ErrorCode.ALREADY_COMPLETED, h.complete, c, True)


def test_complete_of_a_cancelled_command_is_not_leased() -> None:
    h = Harness()
    pid, (a,) = h.submit(nc())
    h.b.cancel(pid, h.now)
    assert_refused(h, ErrorCode.NOT_LEASED, h.complete, a)


def test_complete_with_a_stale_delivery_is_refused() -> None:
    h = Harness()
    _, (a,) = h.submit(nc())
    assert h.next_id(owner=1) == a
    h.b.release_owner(1, h.now)
    assert h.next_id(owner=2) == a
    assert_refused(h, ErrorCode.STALE_DELIVERY, h.complete, a, True, None, 1)
    assert h.complete(a, True, None, delivery=2) == "succeeded"


def test_complete_may_come_from_any_connection() -> None:
    h = Harness()
    _, (a,) = h.submit(nc())
    assert h.next_id(owner=1) == a
    assert h.complete(a) == "succeeded"  # complete carries no owner at all
    h.b.release_owner(1, h.now)  # the lease is gone: nothing to release
    assert h.state(a) == "succeeded"


# ---------------------------------------------------------------------------- add errors


def test_add_unknown_dependency_changes_nothing() -> None:
    h = Harness()
    pid = h.new()
    h.add(pid, nc())
    assert_refused(h, ErrorCode.UNKNOWN_DEPENDENCY, h.add, pid, nc(deps=["c-nope"]))


def test_add_dependency_on_a_command_of_another_open_package_is_unknown() -> None:
    h = Harness()
    other = h.new()
    (o,) = h.add(other, nc())
    pid = h.new()
    assert_refused(h, ErrorCode.UNKNOWN_DEPENDENCY, h.add, pid, nc(deps=[o]))
    assert_refused(h, ErrorCode.UNKNOWN_DEPENDENCY, h.submit, nc(deps=[o]))
    h.b.enqueue(other, h.now)
    h.add(pid, nc(deps=[o]))  # enqueued now: fine


def test_add_dependency_on_an_earlier_command_of_the_same_package() -> None:
    h = Harness()
    pid = h.new()
    (a,) = h.add(pid, nc())
    b, c = h.add(pid, nc(deps=[a]), nc(deps=[a]))
    assert h.b.commands[c].dependencies == (a,)
    # a string dependency on a later command of the same batch is unknown
    later = f"c-{int(c.split('-')[1]) + 2}"
    assert_refused(h, ErrorCode.UNKNOWN_DEPENDENCY, h.add, pid, nc(deps=[later]), nc())
    h.b.enqueue(pid, h.now)
    assert h.drain_all() == [a]
    h.complete(a)
    assert h.drain_all() == [b, c]


@pytest.mark.parametrize(
    "resource,action",
    [
        ("", "a"),
        ("r", ""),
        ("a b", "a"),
        ("r", "a\n"),
        ("x" * 129, "a"),
        ("é", "a"),
        ("r", "a,b"),
    ],
)
def test_add_bad_names_change_nothing(resource: str, action: str) -> None:
    h = Harness()
    pid = h.new()
    assert_refused(h, ErrorCode.BAD_REQUEST, h.add, pid, nc(resource, action))
    assert_refused(h, ErrorCode.BAD_REQUEST, h.submit, nc(resource, action))


def test_good_names_are_accepted() -> None:
    h = Harness()
    pid = h.new()
    h.add(pid, nc("Az09_.:@/-", "x" * 128))


def test_add_non_str_parameter_key_changes_nothing() -> None:
    h = Harness()
    pid = h.new()
    assert_refused(h, ErrorCode.BAD_REQUEST, h.add, pid, nc(params={1: "x"}))  # type: ignore[dict-item]
    assert_refused(h, ErrorCode.BAD_REQUEST, h.add, pid, nc(params={b"k": "x"}))  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "params",
    [{"obj": object()}, {"big": 2**70}, {"nested": {"set": {1, 2}}}],
    ids=["object", "int-too-big", "set"],
)
def test_add_unencodable_parameters_change_nothing(params: dict[str, Any]) -> None:
    h = Harness()
    pid = h.new()
    assert_refused(h, ErrorCode.BAD_REQUEST, h.add, pid, nc(params=params))
    assert_refused(h, ErrorCode.BAD_REQUEST, h.submit, nc(params=params))


def test_parameter_bytes_limit() -> None:
    h = Harness(max_parameter_bytes=100)
    pid = h.new()
    # {"k": <str of n bytes>}: fixmap(1) + fixstr "k"(2) + str8 header(2) + n
    fits = {"k": "x" * 95}
    assert len(msgpack.packb(fits, use_bin_type=True)) == 100
    h.add(pid, nc(params=fits))
    err = assert_refused(h, ErrorCode.LIMIT_EXCEEDED, h.add, pid, nc(params={"k": "x" * 96}))
    assert "101" in err.message
    assert_refused(h, ErrorCode.LIMIT_EXCEEDED, h.submit, nc(params={"k": "x" * 96}))


def test_commands_per_package_limit() -> None:
    h = Harness(max_commands_per_package=3)
    pid = h.new()
    h.add(pid, nc(), nc())
    assert_refused(h, ErrorCode.LIMIT_EXCEEDED, h.add, pid, nc(), nc())
    h.add(pid, nc())
    assert_refused(h, ErrorCode.LIMIT_EXCEEDED, h.add, pid, nc())
    assert_refused(h, ErrorCode.LIMIT_EXCEEDED, h.submit, nc(), nc(), nc(), nc())
    h.submit(nc(), nc(), nc())


def test_add_batch_is_all_or_nothing() -> None:
    h = Harness()
    pid = h.new()
    (a,) = h.add(pid, nc())
    assert_refused(h, ErrorCode.BAD_REQUEST, h.add, pid, nc(deps=[a]), nc(deps=[a]), nc("bad name"))
    assert_refused(h, ErrorCode.UNKNOWN_DEPENDENCY, h.add, pid, nc(), nc(deps=["c-nope"]))
    assert len(h.pkg(pid)["commands"]) == 1


def test_add_errors_on_packages_in_the_wrong_state() -> None:
    h = Harness()
    assert_refused(h, ErrorCode.NOT_FOUND, h.add, "p-nope", nc())
    pid, _ = h.submit(nc())
    assert_refused(h, ErrorCode.NOT_OPEN, h.add, pid, nc())


# ---------------------------------------------------------------------------- enqueue / submit


def test_enqueue_returns_commands_in_package_order_and_only_once() -> None:
    h = Harness()
    pid = h.new()
    ids = h.add(pid, nc(), nc("x")) + h.add(pid, nc())
    assert [h.state(c) for c in ids] == ["staged"] * 3
    assert h.state(pid) == "open"
    assert h.b.enqueue(pid, h.now) == ids
    assert h.state(pid) == "pending"
    assert_refused(h, ErrorCode.NOT_OPEN, h.b.enqueue, pid, h.now)


def test_enqueue_of_an_empty_package() -> None:
    h = Harness()
    pid = h.new()
    assert_refused(h, ErrorCode.EMPTY_PACKAGE, h.b.enqueue, pid, h.now)
    assert_refused(h, ErrorCode.NOT_FOUND, h.b.enqueue, "p-nope", h.now)


def test_submit_of_nothing_is_an_empty_package() -> None:
    h = Harness()
    assert_refused(h, ErrorCode.EMPTY_PACKAGE, h.submit)


def test_submit_with_positional_dependencies() -> None:
    h = Harness()
    _, (x,) = h.submit(nc("x"))
    pid, (a, b, c) = h.submit(nc(), nc(deps=[0]), nc(deps=[0, 1, x]))
    assert h.b.commands[b].dependencies == (a,)
    assert h.b.commands[c].dependencies == (a, b, x)
    cmd = h.next()
    assert cmd is not None
    assert cmd.id == a
    h.complete(a)
    cmd = h.next()
    assert cmd is not None
    assert cmd.delivered()["dependencies"] == [a]
    assert h.pkg(pid)["state"] == "pending"


def test_submit_with_a_string_dependency_on_an_earlier_command_of_the_request() -> None:
    h = Harness()
    first = "c-2"  # the harness hands out p-1, then c-2, c-3
    _, (a, b) = h.submit(nc(), nc(deps=[first]))
    assert a == first
    assert h.b.commands[b].dependencies == (a,)


@pytest.mark.parametrize("deps", [[1], [2], [-1], [0, 5]], ids=repr)
def test_submit_with_a_forward_or_self_position_is_unknown(deps: list[str | int]) -> None:
    h = Harness()
    assert_refused(h, ErrorCode.UNKNOWN_DEPENDENCY, h.submit, nc(), nc(deps=deps), nc())


def test_parameters_keep_their_types() -> None:
    params = {
        "image_size": 50,
        "ratio": 0.5,
        "path": "test",
        "flag": True,
        "none": None,
        "blob": b"\x00\x01",
        "vm": {"Name": "x", "cpus": [1, 2]},
    }
    h = Harness()
    _, (a,) = h.submit(nc(params=params))
    cmd = h.next()
    assert cmd is not None
    got = cmd.delivered()["parameters"]
    assert got == params
    assert [type(got[k]) for k in params] == [type(v) for v in params.values()]
    again = replay(h.b).commands[a].delivered()["parameters"]
    assert again == params
    assert [type(again[k]) for k in params] == [type(v) for v in params.values()]


# ---------------------------------------------------------------------------- status / stats


def test_command_status_fields() -> None:
    h = Harness()
    pid, (a,) = h.submit(nc("storage", "add_volume"))
    assert h.b.status(a) == {
        "kind": "command",
        "id": a,
        "package": pid,
        "resource": "storage",
        "action": "add_volume",
        "state": "ready",
        "reason": None,
        "delivery": 0,
    }
    st = h.b.status(pid)
    assert "commands" not in st
    assert st["counts"] == {
        "staged": 0,
        "waiting": 0,
        "ready": 1,
        "leased": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }


def test_stats_counts() -> None:
    h = Harness()
    _, (a, _b, _c) = h.submit(nc(), nc(deps=[0]), nc())
    _, (_x, _y) = h.submit(nc("x"), nc("x", deps=[a]))
    staged = h.new()
    h.add(staged, nc("s"))
    assert h.next_id() == a
    h.park("z")
    st = h.b.stats()
    assert st["resources"]["r"] == {"ready": 1, "waiting": 1, "leased": 1, "agents": 0}
    assert st["resources"]["x"] == {"ready": 1, "waiting": 1, "leased": 0, "agents": 0}
    assert st["resources"]["z"] == {"ready": 0, "waiting": 0, "leased": 0, "agents": 1}
    assert st["totals"] == {
        "ready": 2,
        "waiting": 2,
        "leased": 1,
        "agents": 1,
        "packages": 3,
        "commands": 6,
    }
    h.complete(a)
    st = h.b.stats()
    assert st["resources"]["r"] == {"ready": 2, "waiting": 0, "leased": 0, "agents": 0}
    assert st["resources"]["x"] == {"ready": 2, "waiting": 0, "leased": 0, "agents": 0}


def test_stats_after_failure_and_cancel() -> None:
    h = Harness()
    _, (a, _b, _c) = h.submit(nc(), nc(deps=[0]), nc("x", deps=[1]))
    p2, _ = h.submit(nc("x"), nc("x"))
    h.run(a, success=False)
    h.b.cancel(p2, h.now)
    totals = h.b.stats()["totals"]
    assert (totals["ready"], totals["waiting"], totals["leased"]) == (0, 0, 0)


# ---------------------------------------------------------------------------- recovery


def test_replay_rebuilds_the_same_state() -> None:
    h = Harness(max_deliveries=3)
    p1, (a, b, c) = h.submit(nc(), nc(deps=[0]), nc("x"))
    p2 = h.new()
    h.add(p2, nc(deps=[a]), nc("x"))
    assert h.next_id(owner=1) == a
    assert h.next_id("x", owner=None, ttr=10.0) == c
    h.b.touch(c, 20.0, None, 1.0)
    h.complete(a)
    h.b.enqueue(p2, h.now)
    assert h.next_id(owner=2) == b
    h.b.release_owner(2, h.now)
    p3, _ = h.submit(nc("y"))
    h.b.cancel(p3, h.now)
    h.b.tick(25.0)
    fresh = replay(h.b)
    for pid in (p1, p2, p3):
        assert fresh.status(pid, True) == h.b.status(pid, True)
    assert fresh.stats() == h.b.stats()
    assert fresh.next_order == h.b.next_order


def test_recover_leases_puts_leased_commands_back_in_their_place() -> None:
    h = Harness()
    _, (a, b, c) = h.submit(nc(), nc(), nc())
    assert h.next_id(owner=1) == a
    assert h.next_id(owner=None, ttr=100.0) == b
    fresh = replay(h.b)
    assert fresh.status(a)["state"] == "leased"
    fresh.recover_leases(5.0, crashed=False)
    assert [type(r) for r in fresh.outbox] == [BrokerStarted, LeaseReleased, LeaseReleased]
    assert [r.command for r in fresh.outbox[1:]] == [a, b]  # type: ignore[union-attr]
    assert fresh.stats()["totals"]["leased"] == 0
    w = Waiter("w", 9, None)
    got = [fresh.next("r", w, 5.0, False) for _ in range(3)]
    assert [(g.id, g.delivery) for g in got if g] == [(a, 2), (b, 2), (c, 1)]
    assert fresh.next_deadline() is None  # b's old ttr deadline is stale
    fresh.tick(100.0)  # and must not release b's new (connection) lease
    assert fresh.status(b)["state"] == "leased"


def test_after_a_crash_a_ready_command_skips_the_delivery_number_that_may_be_lost() -> None:
    """Audit h4: a first delivery's reply leaves before its lease record is durable. Lost
    in a crash, the restarted broker gave delivery 1 again, and the first agent's stale
    COMPLETE (delivery 1) was taken for the new lease's."""
    h = Harness()
    _, (a, b) = h.submit(nc(), nc())
    assert h.next_id(owner=1) == a
    lost = h.b.outbox.pop()  # the lease record the crash took
    assert isinstance(lost, CommandLeased) and lost.delivery == 1
    fresh = replay(h.b)
    fresh.recover_leases(5.0)  # crashed: the default
    w = Waiter("w", 9, None)
    got = [fresh.next("r", w, 5.0, False) for _ in range(2)]
    assert [(g.id, g.delivery) for g in got if g] == [(a, 2), (b, 2)]
    assert w.skipped  # its reply waits for its own lease record (server.py)
    with pytest.raises(BrokerError) as err:
        fresh.complete(a, True, None, 1, 5.0)
    assert err.value.code is ErrorCode.STALE_DELIVERY
    # The numbers are in the records: a replay of them has the same ones.
    fresh.outbox[:0] = h.b.outbox  # the whole log: before the crash, then after it
    again = replay(fresh)
    assert [again.status(c)["delivery"] for c in (a, b)] == [2, 2]
    # Lost again and redelivered: the skip is spent, the count goes on from 2.
    again.release_owner(9, 6.0)
    assert [again.next("r", w, 6.0, False).delivery for _ in range(2)] == [3, 3]  # type: ignore[union-attr]


def test_recover_leases_respects_max_deliveries() -> None:
    # protocol.md: when a lease ends without COMPLETE and the command was already
    # delivered max_deliveries times it fails "instead of being delivered again". A
    # restart ends every lease; recover_leases must not hand out delivery max+1.
    h = Harness(max_deliveries=1)
    _, (a,) = h.submit(nc())
    assert h.next_id(owner=1) == a
    fresh = replay(h.b)
    fresh.recover_leases(1.0)
    st = fresh.status(a)
    assert st["state"] == "failed"
    assert st["reason"] == "lease lost after 1 deliveries (max_deliveries=1)"
    assert fresh.next("r", Waiter("w", 1, None), 1.0, False) is None


def test_replayed_broker_keeps_the_ttr_of_the_current_lease() -> None:
    # "The same records always give the same state": the lease's ttr (used by a TOUCH
    # without ttr and shown by NEXT) must come from the records, not from live-only state.
    h = Harness()
    _, (a,) = h.submit(nc())
    assert h.next_id(owner=None, ttr=10.0) == a
    h.b.tick(10.0)  # lease expires
    h.now = 10.0
    assert h.next_id(owner=None, ttr=30.0) == a
    fresh = replay(h.b)
    assert fresh.commands[a].delivered() == h.b.commands[a].delivered()
    assert fresh.touch(a, None, None, 11.0) == h.b.touch(a, None, None, 11.0) == 30.0


# ---------------------------------------------------------------------------- deadlines


def test_next_deadline() -> None:
    h = Harness(package_ttl=100.0, retention=1000.0)
    assert h.b.next_deadline() is None
    h.now = 5.0
    h.new()
    assert h.b.next_deadline() == 105.0
    _, (a,) = h.submit(nc())
    assert h.next_id(ttr=30.0) == a
    assert h.b.next_deadline() == 35.0
    h.now = 20.0
    h.complete(a)
    h.b.tick(35.0)  # only a stale lease deadline: nothing happens
    assert h.b.next_deadline() == 105.0
    h.b.tick(105.0)
    assert h.b.next_deadline() == 1020.0  # the submitted package's retention


def test_tick_always_makes_progress() -> None:
    # A server loop sleeps until next_deadline() and ticks; it must never spin.
    h = Harness(package_ttl=10.0, retention=10.0)
    for i in range(5):
        h.now = float(i)
        h.new()
        _, (a,) = h.submit(nc())
        assert h.next_id(ttr=float(i + 1)) == a
    seen = 0
    while (d := h.b.next_deadline()) is not None:
        h.b.tick(d)
        nd = h.b.next_deadline()
        assert nd is None or nd > d
        seen += 1
        assert seen < 100
    # the open packages expired and were forgotten; the submitted ones wait for agents
    assert h.b.stats()["totals"]["packages"] == 5
    assert h.b.stats()["totals"]["ready"] == 5


def _slots(obj: object) -> dict[str, object]:
    """Every slot of `obj` (an unset slot raises: a fast path that forgot one fails here)."""
    return {name: getattr(obj, name) for name in type(obj).__slots__}


def test_the_one_command_submit_fast_path_builds_what_the_general_path_builds() -> None:
    """`apply_submitted_one` builds the Package and Command of a one-command SUBMIT slot by
    slot (replay speed); a two-step NEW + ADD + ENQUEUE of the same command goes through the
    constructors. Every slot must agree, so a slot added later cannot be forgotten there."""
    fast, general = Harness(), Harness()
    pid, _ = fast.submit(nc("r", "a", {"k": 1}))
    gpid = general.new()
    general.add(gpid, nc("r", "a", {"k": 1}))
    general.b.enqueue(gpid, general.now)
    f_pkg, g_pkg = fast.b.packages[pid], general.b.packages[gpid]
    f_cmd, g_cmd = f_pkg.commands[0], g_pkg.commands[0]
    f_slots, g_slots = _slots(f_cmd), _slots(g_cmd)
    for differs in ("id", "package", "queue"):  # ids differ; the others are checked below
        f_slots.pop(differs), g_slots.pop(differs)
    assert f_slots == g_slots
    assert f_cmd.queue.name == g_cmd.queue.name and f_cmd.package is f_pkg
    fp, gp = _slots(f_pkg), _slots(g_pkg)
    for differs in ("id", "commands"):
        fp.pop(differs), gp.pop(differs)
    assert fp == gp
    q = f_cmd.queue
    assert (q.ready, list(q.ready_line), q.ready_heap) == (1, [f_cmd], [])


def test_a_package_holds_its_commands_in_a_tuple_once_enqueued() -> None:
    """Open, a package's commands are a list that ADD appends to; enqueued they are final
    and held in a tuple (48 bytes for one command instead of 80); ADD is refused then."""
    h = Harness()
    pid = h.new()
    a, b = h.add(pid, nc(), nc())
    assert isinstance(h.b.packages[pid].commands, list)
    h.b.enqueue(pid, h.now)
    pkg = h.b.packages[pid]
    assert isinstance(pkg.commands, tuple) and [c.id for c in pkg.commands] == [a, b]
    assert_refused(h, ErrorCode.NOT_OPEN, h.add, pid, nc())
    one, _ = h.submit(nc())
    assert isinstance(h.b.packages[one].commands, tuple)
    two, _ = h.submit(nc(), nc())
    assert isinstance(h.b.packages[two].commands, tuple)
    restored = state.load_packed(state.dump_packed(h.b), h.b.limits)
    assert all(isinstance(p.commands, tuple) for p in restored.packages.values())
    open_pid = h.new()
    h.add(open_pid, nc())
    restored = state.load_packed(state.dump_packed(h.b), h.b.limits)
    assert isinstance(restored.packages[open_pid].commands, list)


def _fresh(name: str) -> str:
    """An equal string that is a distinct object (as each decoded request or record is)."""
    copy = "".join(list(name))
    assert copy == name and copy is not name
    return copy


def test_commands_share_one_string_per_action_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A million commands of a few actions must not hold a million copies of their names:
    every path that makes a Command (SUBMIT's fast path, NEW + ADD, replay of each record,
    snapshot load) hands it the broker's shared string, for a bounded number of names."""
    monkeypatch.setattr("spinbroker.core.SHARED_NAMES_MAX", 3)
    h = Harness()
    ids = [h.submit(nc(action=_fresh("build")))[1][0] for _ in range(2)]
    pid = h.new()
    ids += h.add(pid, nc(action=_fresh("build")), nc(action=_fresh("build"), deps=[ids[0]]))
    h.b.enqueue(pid, h.now)
    for names in (["n1", "n2"], ["n3", "n4"]):  # two more names fill the table of 3
        for name in names:
            h.submit(nc(action=name))

    def actions(b: Broker) -> list[str]:
        return [b.commands[i].action for i in ids]

    assert len({id(a) for a in actions(h.b)}) == 1
    assert set(h.b._names) == {"build", "n1", "n2"}
    unshared = [h.b.commands[i] for i in h.b.commands if h.b.commands[i].action == "n4"]
    assert len(unshared) == 1  # past the bound the name is kept as it came, not shared

    replayed = Broker(h.b.limits)
    for rec in h.b.outbox:
        replayed.apply(from_wire(msgpack.unpackb(msgpack.packb(to_wire(rec)))))
    restored = state.load_packed(state.dump_packed(h.b), h.b.limits)
    for b in (replayed, restored):
        assert len({id(a) for a in actions(b)}) == 1 and actions(b) == actions(h.b)
