"""The core against a reference model, driven by hypothesis.

The model (`Model`) keeps plain lists and dicts and recomputes everything by scanning: a
command is ready when it is queued and every dependency has succeeded, NEXT takes the
ready command with the smallest enqueue order, a failure cancels whatever is queued and
depends on something dead, again and again until nothing changes. Slow and obviously
right; the Broker must agree with it after every step:

- NEXT returns exactly the model's first ready command of the resource;
- every command's state, delivery and reason, every package's state, finished flag,
  causer, reason and counts agree; forgotten and expired things answer not_found;
- STATS agree with a recount of the model;
- the records the Broker committed, sent through `to_wire`, msgpack and `from_wire` into a
  replica, give the same observable state (and a fresh replay at the end does too).

Runs are derandomized so the suite is deterministic; set SPINBROKER_FUZZ=<n> to explore
<n> random examples instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from spinbroker.config import Limits
from spinbroker.core import REASON_QUOTE_MAX, Broker, NewCommand, Waiter
from spinbroker.errors import BrokerError, ErrorCode
from spinbroker.records import from_wire, to_wire

LIMITS = Limits(max_commands_per_package=4, package_ttl=50.0, retention=10.0, max_deliveries=2)
RESOURCES = ("r", "s")
OWNERS = (1, 2, 3)
TTRS = (None, 3.0, 10.0)
FUZZ = os.environ.get("SPINBROKER_FUZZ")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


# ---------------------------------------------------------------------------- the model


@dataclass
class MCmd:
    id: str
    pkg: str
    resource: str
    deps: list[str]
    #: staged | queued (waiting or ready: derived) | leased | succeeded | failed | cancelled
    state: str = "staged"
    order: int = -1
    delivery: int = 0
    #: Ready at a crash: its next delivery skips a number (Broker.recover_leases).
    skip: bool = False
    owner: int | None = None
    deadline: float | None = None
    ttr: float | None = None
    reason: str | None = None
    #: For a command cancelled through a dependency: the failed/cancelled command at the root.
    root: str | None = None
    #: Expired or forgotten: the broker no longer knows it.
    gone: bool = False
    #: Cancelled through a root that was already forgotten (see `Model.cancel_through`).
    root_was_gone: bool = False


@dataclass
class MPkg:
    id: str
    created_at: float
    cmds: list[str] = field(default_factory=list)
    enqueued: bool = False
    cancel_requested: bool = False
    #: Commands cancelled by CANCEL of this package.
    victims: int = 0
    expired: bool = False
    forgotten: bool = False
    finished_at: float | None = None
    causer: str | None = None
    reason: str | None = None
    #: The causer came through a dependency (reason is "dependency ...").
    through_dependency: bool = False
    #: ... from a root that was already forgotten.
    root_was_gone: bool = False


class ModelError(Exception):
    def __init__(self, code: ErrorCode) -> None:
        super().__init__(code.value)
        self.code = code


class Model:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.now = 0.0
        self.pkgs: dict[str, MPkg] = {}
        #: Every command ever added, in creation order, never removed (see `gone`).
        self.cmds: dict[str, MCmd] = {}
        self.next_order = 0
        #: resource -> parked waiters (token, owner, ttr), first come first served.
        self.waiters: dict[str, list[tuple[str, int, float | None]]] = {r: [] for r in RESOURCES}
        #: Every lease deadline ever set, not yet passed: (deadline, seq, command).
        self.lease_entries: list[tuple[float, int, str]] = []
        self.seq = 0
        self.deliveries: list[tuple[str, str]] = []
        #: Packages that finished since the last look (what WAIT is told about).
        self.just_finished: list[str] = []
        self.changed = False

    # ------------------------------------------------------------ derived

    def live(self) -> Iterable[MCmd]:
        return (c for c in self.cmds.values() if not c.gone)

    def state(self, c: MCmd) -> str:
        if c.state != "queued":
            return c.state
        ok = all(self.cmds[d].state == "succeeded" for d in c.deps)
        return "ready" if ok else "waiting"

    def first_ready(self, resource: str) -> MCmd | None:
        ready = [c for c in self.live() if c.resource == resource and self.state(c) == "ready"]
        return min(ready, key=lambda c: c.order) if ready else None

    def finished(self, p: MPkg) -> bool:
        if p.expired:
            return True
        if not p.enqueued:
            return p.cancel_requested
        return all(self.cmds[c].state in TERMINAL for c in p.cmds)

    def pkg_state(self, p: MPkg) -> str:
        if p.expired:
            return "expired"
        if p.causer is not None:
            return "failed"
        if p.cancel_requested and (p.victims or not p.enqueued):
            return "cancelled"
        if not p.enqueued:
            return "open"
        return "succeeded" if self.finished(p) else "pending"

    def counts(self, p: MPkg) -> dict[str, int]:
        out = dict.fromkeys(
            ("staged", "waiting", "ready", "leased", "succeeded", "failed", "cancelled"), 0
        )
        if not p.expired:
            for cid in p.cmds:
                out[self.state(self.cmds[cid])] += 1
        return out

    def is_open(self, p: MPkg) -> bool:
        return not (p.enqueued or p.cancel_requested or p.expired or p.forgotten)

    def known_pkg(self, pid: str) -> MPkg:
        p = self.pkgs.get(pid)
        if p is None or p.forgotten or p.expired:
            raise ModelError(ErrorCode.NOT_FOUND)
        return p

    def dependable(self, dep: str) -> bool:
        c = self.cmds.get(dep)
        return c is not None and not c.gone and self.pkgs[c.pkg].enqueued

    # ------------------------------------------------------------ transitions

    def lease(self, c: MCmd, owner: int, ttr: float | None) -> None:
        c.state = "leased"
        c.delivery += 2 if c.skip else 1
        c.skip = False
        c.ttr = ttr
        if ttr is None:
            c.owner, c.deadline = owner, None
        else:
            c.owner, c.deadline = None, self.now + ttr
            self.push_deadline(c)

    def push_deadline(self, c: MCmd) -> None:
        assert c.deadline is not None
        self.seq += 1
        self.lease_entries.append((c.deadline, self.seq, c.id))

    def end_lease(self, c: MCmd) -> None:
        c.owner = c.deadline = None
        p = self.pkgs[c.pkg]
        if p.cancel_requested:  # CANCEL let it finish where it ran; it will not run again
            c.state, c.reason = "cancelled", "package cancelled"
            p.victims += 1
            self.cascade([c])
        elif c.delivery >= self.limits.max_deliveries:
            reason = (
                f"lease lost after {c.delivery} deliveries "
                f"(max_deliveries={self.limits.max_deliveries})"
            )
            self.fail(c, reason)
        else:
            c.state = "queued"

    def fail(self, c: MCmd, reason: str | None) -> None:
        c.state, c.reason = "failed", reason
        c.owner = c.deadline = None
        p = self.pkgs[c.pkg]
        if p.causer is None:
            p.causer, p.reason, p.through_dependency = c.id, reason, False
        self.cascade([c])

    def cancel_through(self, c: MCmd, dead: MCmd) -> None:
        """Cancel `c` because `dead` (a dependency) failed or was cancelled. The reason names
        the root of the chain: the command that failed, or that CANCEL cancelled."""
        root = self.cmds[dead.root or dead.id]
        failed = root.state == "failed"
        c.state, c.root = "cancelled", root.id
        c.reason = f"dependency {root.id} {'failed' if failed else 'was cancelled'}"
        if failed and root.reason:
            quoted = root.reason
            if len(quoted) > REASON_QUOTE_MAX:
                quoted = quoted[:REASON_QUOTE_MAX] + "..."
            c.reason = f"{c.reason}: {quoted}"
        c.root_was_gone = root.gone
        p = self.pkgs[c.pkg]
        if p.causer is None:
            p.causer, p.through_dependency = root.id, True
            p.reason = c.reason
            p.root_was_gone = root.gone

    def cascade(self, roots: list[MCmd]) -> None:
        """Cancel, root by root, every queued command that depends (transitively) on it."""
        for r in roots:
            dead = {r.id}
            changed = True
            while changed:
                changed = False
                for c in self.live():
                    if c.state != "queued":
                        continue
                    hit = next((d for d in c.deps if d in dead), None)
                    if hit is not None:
                        self.cancel_through(c, self.cmds[hit])
                        dead.add(c.id)
                        changed = True

    def enqueue_cmds(self, p: MPkg) -> None:
        p.enqueued = True
        for cid in p.cmds:
            c = self.cmds[cid]
            c.order = self.next_order
            self.next_order += 1
            dead = next(
                (self.cmds[d] for d in c.deps if self.cmds[d].state in ("failed", "cancelled")),
                None,
            )
            if dead is not None:
                self.cancel_through(c, dead)
            else:
                c.state = "queued"

    def dispatch(self) -> None:
        for resource, line in self.waiters.items():
            while line and (c := self.first_ready(resource)) is not None:
                token, owner, ttr = line.pop(0)
                self.lease(c, owner, ttr)
                self.deliveries.append((token, c.id))

    def mark_finished(self) -> None:
        for p in self.pkgs.values():
            if not p.forgotten and p.finished_at is None and self.finished(p):
                p.finished_at = self.now
                self.just_finished.append(p.id)

    def settle(self) -> None:
        self.mark_finished()
        self.dispatch()

    # ------------------------------------------------------------ requests

    def new_cmds(self, pid: str, specs: list[tuple[str, list[str]]], ids: list[str]) -> None:
        p = self.pkgs[pid]
        for cid, (resource, deps) in zip(ids, specs, strict=True):
            self.cmds[cid] = MCmd(cid, pid, resource, deps)
            p.cmds.append(cid)

    def check_deps(self, specs: list[tuple[str, list[str]]], ids: list[str], own: set[str]):
        own = set(own)
        for cid, (_, deps) in zip(ids, specs, strict=True):
            for d in deps:
                if d not in own and not self.dependable(d):
                    raise ModelError(ErrorCode.UNKNOWN_DEPENDENCY)
            own.add(cid)

    def submit(self, pid: str, specs: list[tuple[str, list[str]]], ids: list[str]) -> None:
        self.check_deps(specs, ids, set())
        self.pkgs[pid] = MPkg(pid, self.now)
        self.new_cmds(pid, specs, ids)
        self.enqueue_cmds(self.pkgs[pid])
        self.settle()

    def new_package(self, pid: str) -> None:
        self.pkgs[pid] = MPkg(pid, self.now)

    def add(self, pid: str, specs: list[tuple[str, list[str]]], ids: list[str]) -> None:
        p = self.known_pkg(pid)
        if not self.is_open(p):
            raise ModelError(ErrorCode.NOT_OPEN)
        if len(p.cmds) + len(specs) > self.limits.max_commands_per_package:
            raise ModelError(ErrorCode.LIMIT_EXCEEDED)
        self.check_deps(specs, ids, set(p.cmds))
        self.new_cmds(pid, specs, ids)

    def enqueue(self, pid: str) -> list[str]:
        p = self.known_pkg(pid)
        if not self.is_open(p):
            raise ModelError(ErrorCode.NOT_OPEN)
        if not p.cmds:
            raise ModelError(ErrorCode.EMPTY_PACKAGE)
        for cid in p.cmds:
            if any(self.cmds[d].gone for d in self.cmds[cid].deps):
                raise ModelError(ErrorCode.UNKNOWN_DEPENDENCY)
        self.enqueue_cmds(p)
        self.settle()
        return list(p.cmds)

    def next(self, token: str, resource: str, owner: int, ttr: float | None, block: bool):
        line = self.waiters[resource]
        if not line:
            c = self.first_ready(resource)
            if c is not None:
                self.lease(c, owner, ttr)
                return c.id
        if block:
            line.append((token, owner, ttr))
        return None

    def unpark(self, token: str) -> None:
        for line in self.waiters.values():
            line[:] = [w for w in line if w[0] != token]

    def leased(self, cid: str, delivery: int | None) -> MCmd:
        c = self.cmds.get(cid)
        if c is None or c.gone:
            raise ModelError(ErrorCode.NOT_FOUND)
        if c.state in ("succeeded", "failed"):
            raise ModelError(ErrorCode.ALREADY_COMPLETED)
        if c.state != "leased":
            raise ModelError(ErrorCode.NOT_LEASED)
        if delivery is not None and delivery != c.delivery:
            raise ModelError(ErrorCode.STALE_DELIVERY)
        return c

    def complete(self, cid: str, success: bool, reason: str | None, delivery: int | None) -> str:
        c = self.leased(cid, delivery)
        if success:
            c.state, c.reason = "succeeded", reason
            c.owner = c.deadline = None
        else:
            self.fail(c, reason)
        self.settle()
        return c.state

    def touch(self, cid: str, ttr: float | None, delivery: int | None) -> float | None:
        c = self.leased(cid, delivery)
        if c.deadline is None:
            return None
        c.ttr = c.ttr if ttr is None else ttr
        assert c.ttr is not None
        c.deadline = self.now + c.ttr
        self.push_deadline(c)
        return c.ttr

    def cancel(self, pid: str) -> int:
        """CANCEL; `self.changed` says whether it changes anything (and so makes a record)."""
        self.changed = False
        p = self.known_pkg(pid)
        victims = [self.cmds[c] for c in p.cmds if self.cmds[c].state in ("staged", "queued")]
        if p.finished_at is not None or (p.cancel_requested and not victims):
            return 0
        self.changed = True
        p.cancel_requested = True
        p.victims += len(victims)
        for v in victims:
            v.state, v.reason = "cancelled", "package cancelled"
        self.cascade(victims)
        self.settle()
        return len(victims)

    def release_owner(self, owner: int) -> None:
        held = [c for c in self.live() if c.state == "leased" and c.owner == owner]
        for c in sorted(held, key=lambda c: c.order):
            self.end_lease(c)
        self.settle()

    def tick(self, now: float) -> None:
        self.now = now
        due = sorted(e for e in self.lease_entries if e[0] <= now)
        self.lease_entries = [e for e in self.lease_entries if e[0] > now]
        for deadline, _, cid in due:
            c = self.cmds[cid]
            if c.state == "leased" and c.deadline == deadline:
                self.end_lease(c)
        for p in self.pkgs.values():
            if self.is_open(p) and p.created_at + self.limits.package_ttl <= now:
                p.expired = True
                for cid in p.cmds:
                    self.cmds[cid].gone = True
        self.mark_finished()
        for p in self.pkgs.values():
            if p.forgotten or p.finished_at is None:
                continue
            if p.finished_at + self.limits.retention <= now:
                p.forgotten = True
                for cid in p.cmds:
                    self.cmds[cid].gone = True
        self.dispatch()

    def restart(self, crashed: bool) -> None:
        """Every connection is gone and every lease is released, in order. After a crash
        the ready commands' next delivery skips a number (one may have been lost)."""
        for line in self.waiters.values():
            line.clear()
        if crashed:
            for c in self.live():
                if self.state(c) == "ready":
                    c.skip = True
        held = [c for c in self.live() if c.state == "leased"]
        for c in sorted(held, key=lambda c: c.order):
            self.end_lease(c)
        self.mark_finished()


# ---------------------------------------------------------------------------- helpers


def wire(rec: Any) -> bytes:
    return msgpack.packb(to_wire(rec), use_bin_type=True)


def unwire(data: bytes) -> Any:
    return from_wire(msgpack.unpackb(data, raw=False, strict_map_key=False))


def rebuild(log: list[bytes]) -> Broker:
    b = Broker(LIMITS)
    for data in log:
        b.apply(unwire(data))
    return b


def durable_stats(b: Broker) -> dict[str, Any]:
    """STATS without what is not durable: parked agents and queues that never held work."""
    s = b.stats()
    resources = {
        name: {k: v for k, v in r.items() if k != "agents"}
        for name, r in s["resources"].items()
        if r["ready"] or r["waiting"] or r["leased"]
    }
    totals = {k: v for k, v in s["totals"].items() if k != "agents"}
    return {"resources": resources, "totals": totals}


# ---------------------------------------------------------------------------- the machine


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.b = Broker(LIMITS)
        self.m = Model(LIMITS)
        self.replica = Broker(LIMITS)
        self.log: list[bytes] = []
        self.waiters: dict[str, Waiter] = {}
        self.counter = 0
        #: Steps since the last restart: restarts drop every lease, so they stay rare.
        self.steps = 0

    # ------------------------------------------------------------ plumbing

    def fresh_id(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}{self.counter}"

    def both(self, live: Any, model: Any) -> Any:
        """Run a request on the broker and the model; they must agree on success or error."""
        try:
            expected = model()
        except ModelError as exc:
            try:
                got = live()
            except BrokerError as err:
                assert err.code is exc.code, (err, exc.code)
            else:
                raise AssertionError(f"broker answered {got!r}, the model {exc.code}")
            assert not self.b.outbox, "a refused request committed records"
            return None
        got = live()
        assert got == expected, (got, expected)
        return got

    def sync(self) -> None:
        """Log the committed records, feed the replica, compare deliveries to blocked NEXTs."""
        for rec in self.b.outbox:
            data = wire(rec)
            self.log.append(data)
            self.replica.apply(unwire(data))
        self.b.outbox.clear()
        got = sorted((str(w.token), c.id) for w, c in self.b.deliveries)
        self.b.deliveries.clear()
        assert got == sorted(self.m.deliveries)
        for token, _ in got:
            del self.waiters[token]
        self.m.deliveries.clear()
        finished = sorted(p.id for p in self.b.finished)
        self.b.finished.clear()
        assert finished == sorted(self.m.just_finished)
        self.m.just_finished.clear()
        self.steps += 1

    def wrong(self, data: st.DataObject) -> bool:
        """Now and then (1 in 8) a request names something it should not."""
        return data.draw(st.integers(0, 7), label="wrong") == 7

    def pick_package(self, data: st.DataObject, good: list[str]) -> str:
        if good and not self.wrong(data):
            return data.draw(st.sampled_from(good), label="package")
        return data.draw(st.sampled_from([*self.m.pkgs, "p-bogus"]), label="package")

    def open_packages(self) -> list[str]:
        return [p.id for p in self.m.pkgs.values() if self.m.is_open(p)]

    def dep_candidates(self, data: st.DataObject) -> list[str]:
        """Commands a new command may depend on (the latest few), or anything when wrong."""
        if self.wrong(data):
            return [*list(self.m.cmds)[-8:], "c-bogus"]
        recent = [c for c in list(self.m.cmds)[-12:] if self.m.dependable(c)]
        done = [c.id for c in self.m.live() if c.state == "succeeded" and self.m.dependable(c.id)]
        return [*recent, *done[-4:]]

    # ------------------------------------------------------------ producers

    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(1, 3), label="n")
        pid = self.fresh_id("p")
        ids = [self.fresh_id("c") for _ in range(n)]
        cands = self.dep_candidates(data)
        cmds: list[NewCommand] = []
        specs: list[tuple[str, list[str]]] = []
        bad_position = False
        for i in range(n):
            resource = data.draw(st.sampled_from(RESOURCES), label="resource")
            positions = list(range(i + 1 if self.wrong(data) else i))
            choices: list[str | int] = [*positions, *cands]
            deps: list[str | int] = (
                data.draw(st.lists(st.sampled_from(choices), max_size=2), label="deps")
                if choices
                else []
            )
            bad_position |= any(isinstance(d, int) and d >= i for d in deps)
            cmds.append(NewCommand(resource, "act", {"i": i, "pid": pid}, list(deps)))
            specs.append((resource, [ids[d] if isinstance(d, int) else d for d in deps]))

        def model() -> list[str]:
            if bad_position:
                raise ModelError(ErrorCode.UNKNOWN_DEPENDENCY)
            self.m.submit(pid, specs, ids)
            return ids

        self.both(lambda: self.b.submit(pid, cmds, ids, self.m.now), model)
        self.sync()

    @precondition(lambda self: len(self.open_packages()) < 3)
    @rule()
    def new_package(self) -> None:
        pid = self.fresh_id("p")
        self.b.new_package(pid, self.m.now)
        self.m.new_package(pid)
        self.sync()

    @rule(data=st.data())
    def add(self, data: st.DataObject) -> None:
        pid = self.pick_package(data, self.open_packages())
        n = data.draw(st.integers(1, 2), label="n")
        ids = [self.fresh_id("c") for _ in range(n)]
        own = self.m.pkgs[pid].cmds if pid in self.m.pkgs else []
        cands = [*own, *self.dep_candidates(data)]
        specs = [
            (
                data.draw(st.sampled_from(RESOURCES), label="resource"),
                data.draw(st.lists(st.sampled_from(cands), max_size=2), label="deps")
                if cands
                else [],
            )
            for _ in range(n)
        ]
        cmds = [NewCommand(r, "act", {}, list(d)) for r, d in specs]
        self.both(
            lambda: self.b.add_commands(pid, cmds, ids, self.m.now),
            lambda: (self.m.add(pid, specs, ids), ids)[1],
        )
        self.sync()

    @rule(data=st.data())
    def enqueue(self, data: st.DataObject) -> None:
        pid = self.pick_package(data, self.open_packages())
        self.both(lambda: self.b.enqueue(pid, self.m.now), lambda: self.m.enqueue(pid))
        self.sync()

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        unfinished = [p.id for p in self.m.pkgs.values() if p.finished_at is None]
        pid = self.pick_package(data, unfinished)
        self.both(lambda: self.b.cancel(pid, self.m.now), lambda: self.m.cancel(pid))
        assert bool(self.b.outbox) == self.m.changed, "CANCEL that changes nothing made a record"
        self.sync()

    # ------------------------------------------------------------ agents

    def next_request(self, resource: str, owner: int, ttr: float | None, block: bool) -> None:
        token = self.fresh_id("w")
        w = Waiter(token, owner, ttr)
        expected = self.m.next(token, resource, owner, ttr, block)
        got = self.b.next(resource, w, self.m.now, block)
        assert (got.id if got else None) == expected
        if got is not None:
            assert got.delivery == self.m.cmds[got.id].delivery
            assert got.delivered()["ttr"] == ttr
        if block and got is None:
            self.waiters[token] = w
        self.sync()

    @rule(
        resource=st.sampled_from(RESOURCES),
        owner=st.sampled_from(OWNERS),
        ttr=st.sampled_from(TTRS),
    )
    def take(self, resource: str, owner: int, ttr: float | None) -> None:
        """NEXT with timeout 0."""
        self.next_request(resource, owner, ttr, False)

    @rule(
        resource=st.sampled_from(RESOURCES),
        owner=st.sampled_from(OWNERS),
        ttr=st.sampled_from(TTRS),
    )
    def park(self, resource: str, owner: int, ttr: float | None) -> None:
        """A blocking NEXT: leased at once, or parked behind the agents already waiting."""
        self.next_request(resource, owner, ttr, True)

    @rule(
        resource=st.sampled_from(RESOURCES),
        owner=st.sampled_from(OWNERS),
        outcome=st.sampled_from(["succeed", "fail", "keep", "park"]),
    )
    def work(self, resource: str, owner: int, outcome: str) -> None:
        """An agent's cycle in one step: NEXT, then COMPLETE (or not yet). With "park" the
        NEXT blocks when nothing is ready, and the agent stays parked."""
        token = self.fresh_id("w")
        block = outcome == "park"
        expected = self.m.next(token, resource, owner, None, block)
        w = Waiter(token, owner, None)
        got = self.b.next(resource, w, self.m.now, block)
        assert (got.id if got else None) == expected
        if got is None and block:
            self.waiters[token] = w
        self.sync()
        if got is not None and outcome in ("succeed", "fail"):
            reason = None if outcome == "succeed" else f"{got.id} broke"
            self.do_complete(got.id, outcome == "succeed", reason, got.delivery)

    @precondition(lambda self: self.waiters)
    @rule(data=st.data())
    def unpark(self, data: st.DataObject) -> None:
        token = data.draw(st.sampled_from(sorted(self.waiters)), label="waiter")
        self.b.unpark(self.waiters.pop(token))
        self.m.unpark(token)
        self.sync()

    def leased_ids(self) -> list[str]:
        return [c.id for c in self.m.live() if c.state == "leased"]

    def pick_delivery(self, data: st.DataObject, cid: str) -> int | None:
        c = self.m.cmds.get(cid)
        current = c.delivery if c else 1
        if not self.wrong(data):
            return data.draw(st.sampled_from([None, current]), label="delivery")
        return current - 1

    def do_complete(self, cid: str, success: bool, reason: str | None, delivery: int | None):
        self.both(
            lambda: self.b.complete(cid, success, reason, delivery, self.m.now).value,
            lambda: self.m.complete(cid, success, reason, delivery),
        )
        self.sync()

    @precondition(lambda self: self.leased_ids())
    @rule(data=st.data())
    def succeed(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(self.leased_ids()), label="command")
        self.do_complete(cid, True, None, self.pick_delivery(data, cid))

    @precondition(lambda self: self.leased_ids())
    @rule(data=st.data(), reason=st.sampled_from([None, "boom", "disk full", "long " * 60]))
    def fail(self, data: st.DataObject, reason: str | None) -> None:
        cid = data.draw(st.sampled_from(self.leased_ids()), label="command")
        self.do_complete(cid, False, reason, self.pick_delivery(data, cid))

    @rule(data=st.data(), success=st.booleans())
    def complete_anything(self, data: st.DataObject, success: bool) -> None:
        """COMPLETE of whatever: mostly errors (not_leased, already_completed, not_found)."""
        cid = data.draw(st.sampled_from([*list(self.m.cmds)[-8:], "c-bogus"]), label="command")
        delivery = data.draw(st.sampled_from([None, 0, 1, 2]), label="delivery")
        self.do_complete(cid, success, None if success else "x", delivery)

    @precondition(lambda self: self.leased_ids())
    @rule(data=st.data(), ttr=st.sampled_from(TTRS))
    def touch(self, data: st.DataObject, ttr: float | None) -> None:
        if self.wrong(data):
            cid = data.draw(st.sampled_from([*list(self.m.cmds)[-8:], "c-bogus"]))
        else:
            cid = data.draw(st.sampled_from(self.leased_ids()), label="command")
        delivery = self.pick_delivery(data, cid)
        self.both(
            lambda: self.b.touch(cid, ttr, delivery, self.m.now),
            lambda: self.m.touch(cid, ttr, delivery),
        )
        self.sync()

    @rule(owner=st.sampled_from(OWNERS))
    def close_connection(self, owner: int) -> None:
        # What the server does when a connection closes: its blocked NEXTs go, then its
        # connection leases end.
        for token, w in list(self.waiters.items()):
            if w.owner == owner:
                self.b.unpark(w)
                self.m.unpark(token)
                del self.waiters[token]
        self.b.release_owner(owner, self.m.now)
        self.m.release_owner(owner)
        self.sync()

    # ------------------------------------------------------------ time and restarts

    @rule(dt=st.sampled_from([1.0, 0.0, 2.0, 5.0, 10.0, 50.0, 70.0]))
    def tick(self, dt: float) -> None:
        now = self.m.now + dt
        self.b.tick(now)
        self.m.tick(now)
        self.sync()

    # recover_leases re-delivers a command that already had max_deliveries (see
    # test_core.test_recover_leases_respects_max_deliveries); restarts stay clear of that.
    @precondition(
        lambda self: (
            self.steps >= 15
            and all(
                c.delivery < LIMITS.max_deliveries for c in self.m.live() if c.state == "leased"
            )
        )
    )
    @rule(crashed=st.booleans())
    def restart(self, crashed: bool) -> None:
        # A clean stop that still owes a skip is not marked clean (persist.take_inline).
        crashed = crashed or self.b.owes_skips()
        self.b = rebuild(self.log)
        self.b.finished.clear()  # replay re-finishes old packages; no WAIT survives a restart
        self.b.recover_leases(self.m.now, crashed)
        self.waiters.clear()
        self.m.restart(crashed)
        self.sync()
        self.steps = 0

    # ------------------------------------------------------------ invariants

    @invariant()
    def commands_agree(self) -> None:
        for c in self.m.cmds.values():
            if c.gone:
                try:
                    self.b.status(c.id)
                except BrokerError as err:
                    assert err.code is ErrorCode.NOT_FOUND
                else:
                    raise AssertionError(f"{c.id} should be gone")
                continue
            s = self.b.status(c.id)
            assert (s["state"], s["delivery"]) == (self.m.state(c), c.delivery), (c, s)
            if c.root_was_gone:
                # The core cannot see a forgotten root's outcome (see test_core's
                # test_cancelled_dependents_name_the_root_even_after_it_is_forgotten).
                assert s["reason"].startswith(f"dependency {c.root} "), (c, s)
            else:
                assert s["reason"] == c.reason, (c, s)

    @invariant()
    def packages_agree(self) -> None:
        for p in self.m.pkgs.values():
            if p.forgotten:
                try:
                    self.b.status(p.id)
                except BrokerError as err:
                    assert err.code is ErrorCode.NOT_FOUND
                else:
                    raise AssertionError(f"{p.id} should be forgotten")
                continue
            s = self.b.status(p.id, True)
            want = (self.m.pkg_state(p), p.finished_at is not None, p.causer)
            assert (s["state"], s["finished"], s["causer"]) == want, (p, s)
            assert s["counts"] == self.m.counts(p), (p, s)
            assert [c["id"] for c in s["commands"]] == ([] if p.expired else p.cmds)
            if p.root_was_gone:
                assert s["reason"].startswith(f"dependency {p.causer} "), (p, s)
            else:
                assert s["reason"] == p.reason, (p, s)

    @invariant()
    def stats_agree(self) -> None:
        s = self.b.stats()
        for resource in RESOURCES:
            cmds = [c for c in self.m.live() if c.resource == resource]
            want = {
                "ready": sum(self.m.state(c) == "ready" for c in cmds),
                "waiting": sum(self.m.state(c) == "waiting" for c in cmds),
                "leased": sum(c.state == "leased" for c in cmds),
                "agents": len(self.m.waiters[resource]),
            }
            got = s["resources"].get(resource, dict.fromkeys(want, 0))
            assert got == want, (resource, got, want)
            # between requests a queue never has both ready work and blocked agents
            assert not (want["ready"] and want["agents"])
        totals = s["totals"]
        assert totals["packages"] == sum(not p.forgotten for p in self.m.pkgs.values())
        assert totals["commands"] == sum(1 for _ in self.m.live())

    @invariant()
    def next_deadline_is_the_first_real_deadline(self) -> None:
        lim = self.m.limits
        due = [c.deadline for c in self.m.live() if c.state == "leased" and c.deadline]
        due += [p.created_at + lim.package_ttl for p in self.m.pkgs.values() if self.m.is_open(p)]
        due += [
            p.finished_at + lim.retention
            for p in self.m.pkgs.values()
            if p.finished_at is not None and not p.forgotten
        ]
        assert self.b.next_deadline() == (min(due) if due else None)

    @invariant()
    def replica_agrees(self) -> None:
        self.compare(self.replica)

    def compare(self, other: Broker) -> None:
        for p in self.m.pkgs.values():
            if p.forgotten:
                assert p.id not in other.packages
                continue
            assert other.status(p.id, True) == self.b.status(p.id, True)
        assert durable_stats(other) == durable_stats(self.b)

    def teardown(self) -> None:
        self.compare(rebuild(self.log))


TestCoreModel = CoreMachine.TestCase
TestCoreModel.settings = settings(
    max_examples=int(FUZZ or 250),
    stateful_step_count=50,
    derandomize=not FUZZ,
    database=None,
    # Shrinking a long run takes minutes; exploring (SPINBROKER_FUZZ) shrinks, CI reports raw.
    phases=[Phase.explicit, Phase.generate, *([Phase.shrink] if FUZZ else [])],
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
