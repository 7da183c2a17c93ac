"""The core's whole durable state as one plain, msgpack-able value, and back.

A snapshot is `dump(broker)` at some log position; recovery is `load(...)` followed by the
records after that position. What is dumped is exactly what records build: packages with
their commands in package order, command states, delivery counts, enqueue order numbers,
schemas. Everything derivable (queue counters, ready heaps, dependency counters and
dependents lists, deadline heaps) is rebuilt on load rather than stored, so a snapshot can
never disagree with itself. Waiters and leases' owners are not state: a restart drops them.

Pure: no files. The server decides where the bytes go.
"""

from __future__ import annotations

import heapq
from typing import Any

from .config import Limits
from .core import (
    CANCELLED,
    LEASED,
    READY,
    SETTLED,
    STAGED,
    SUCCEEDED,
    WAITING,
    Broker,
    Command,
    CommandState,
    Package,
    SchemaCheck,
)

FORMAT = 1
_STATES = list(CommandState)
_STATE_INDEX = {s: i for i, s in enumerate(_STATES)}


def dump(broker: Broker) -> list[Any]:
    """The state as nested lists (compact: field names are positional)."""
    packages = []
    for pkg in broker.packages.values():
        commands = [
            [
                c.id,
                c.queue.name,
                c.action,
                c.parameters,
                list(c.dependencies),
                _STATE_INDEX[c.state],
                c.reason,
                c.causer,
                c.delivery,
                c.order,
                c.lease_deadline,
                c.ttr,
            ]
            for c in pkg.commands
        ]
        packages.append(
            [
                pkg.id,
                pkg.created_at,
                pkg.enqueued,
                pkg.cancel_requested,
                pkg.expired,
                pkg.finished_at,
                pkg.causer,
                pkg.reason,
                commands,
            ]
        )
    return [FORMAT, broker.next_order, broker.schemas, packages]


def load(
    data: list[Any], limits: Limits | None = None, schema_check: SchemaCheck | None = None
) -> Broker:
    fmt, next_order, schemas, packages = data
    if fmt != FORMAT:
        raise ValueError(f"snapshot format {fmt} is not {FORMAT}")
    broker = Broker(limits, schema_check)
    broker.next_order = next_order
    broker.schemas = dict(schemas)
    commands = broker.commands
    for p in packages:
        pkg = Package(p[0], p[1])
        pkg.enqueued, pkg.cancel_requested, pkg.expired = p[2], p[3], p[4]
        pkg.finished_at, pkg.causer, pkg.reason = p[5], p[6], p[7]
        broker.packages[pkg.id] = pkg
        for c in p[8]:
            cmd = Command.__new__(Command)
            cmd.id = c[0]
            cmd.queue = broker.queue(c[1])
            cmd.package = pkg
            cmd.action = c[2]
            cmd.parameters = c[3]
            cmd.dependencies = tuple(c[4])
            state = _STATES[c[5]]
            cmd.state = state
            cmd.reason, cmd.causer, cmd.delivery, cmd.order = c[6], c[7], c[8], c[9]
            cmd.lease_deadline, cmd.ttr = c[10], c[11]
            cmd.lease_owner = None
            cmd.unmet = 0
            cmd.dependents = None
            commands[cmd.id] = cmd
            pkg.commands.append(cmd)
            if state not in SETTLED:
                pkg.unsettled += 1
            elif state is CANCELLED:
                pkg.cancelled_any = True
    _rebuild(broker)
    return broker


def _rebuild(broker: Broker) -> None:
    """Derive counters, heaps and the dependents lists from the loaded commands."""
    commands = broker.commands
    waiting: list[Command] = []
    for pkg in broker.packages.values():
        if pkg.finished_at is not None:
            broker.schedule_forget(pkg.id, pkg.finished_at)
        elif pkg.is_open:
            broker.schedule_expiry(pkg.id, pkg.created_at)
        for cmd in pkg.commands:
            state = cmd.state
            if state is STAGED:
                continue
            q = cmd.queue
            if state is WAITING:
                q.waiting += 1
                waiting.append(cmd)
            elif state is READY:
                q.ready += 1
                q.ready_heap.append((cmd.order, cmd))
            elif state is LEASED:
                q.leased += 1
                if cmd.lease_deadline is not None:
                    broker.schedule_lease_expiry(cmd, cmd.lease_deadline)
    # Dependents lists in enqueue order, as the live path built them: a cascade then visits
    # them in the same order and names the same reasons.
    waiting.sort(key=lambda c: c.order)
    for cmd in waiting:
        for dep_id in cmd.dependencies:
            dep = commands.get(dep_id)
            if dep is None or dep.state is SUCCEEDED:  # a forgotten dependency had succeeded
                continue
            cmd.unmet += 1
            if dep.dependents is None:
                dep.dependents = [cmd]
            else:
                dep.dependents.append(cmd)
    for q in broker.queues.values():
        heapq.heapify(q.ready_heap)
