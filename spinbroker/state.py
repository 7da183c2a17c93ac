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

from collections import deque
from collections.abc import Iterable
from operator import attrgetter
from typing import Any

import msgpack

from .config import Limits
from .core import (
    CANCELLED,
    LEASED,
    READY,
    SETTLED,
    SUCCEEDED,
    WAITING,
    Broker,
    Command,
    CommandState,
    Package,
    SchemaCheck,
)

#: 2 adds `clean` at the end; 1 (without it) still loads.
FORMAT = 2
_FORMATS = {1: 4, 2: 5}  # format -> items in the dumped list
_STATES = list(CommandState)
_STATE_INDEX = {s: i for i, s in enumerate(_STATES)}


def dump(broker: Broker, clean: bool = False) -> list[Any]:
    """The state as nested lists (compact: field names are positional). `clean`: taken at
    a clean stop, every record made before it is logged (Broker.stopped_cleanly)."""
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
    return [FORMAT, broker.next_order, broker.schemas, packages, clean]


def load(
    data: list[Any], limits: Limits | None = None, schema_check: SchemaCheck | None = None
) -> Broker:
    """The broker `dump` described, from the dumped value (after its msgpack round trip)."""
    fmt, next_order, schemas, packages, *rest = data
    _check_format(fmt, len(data))
    broker = _start(next_order, schemas, limits, schema_check)
    _finish(broker, _build(broker, packages))
    broker.stopped_cleanly = bool(rest and rest[0] is True)
    return broker


def dump_packed(broker: Broker, clean: bool = False) -> bytes:
    """`dump` as the msgpack bytes a snapshot holds (what `load_packed` reads)."""
    body: bytes = msgpack.packb(dump(broker, clean), use_bin_type=True)
    return body


def load_packed(
    body: bytes | memoryview,
    limits: Limits | None = None,
    schema_check: SchemaCheck | None = None,
    name: str = "snapshot",
) -> Broker:
    """`load(msgpack.unpackb(body))`, streamed: each package (with its commands) is decoded
    and built in turn, so the whole image never exists as Python objects. At a million
    commands that image is ~1 GB of lists and strings, allocated (page faults), read once
    and freed; decoding package by package reuses the same few pages instead. Raises
    ValueError if `body` (from `name`) is not exactly one dumped state, UnknownFormat (a
    ValueError) if it is one of a format this version does not read."""
    # A package is at most the whole body: that bound lets any one of them into the buffer.
    unpacker = msgpack.Unpacker(
        _Reader(memoryview(body)),
        raw=False,
        strict_map_key=False,
        use_list=True,
        read_size=min(_READ_SIZE, max(len(body), 1)),
        max_buffer_size=max(len(body), 1),
    )
    try:
        items = unpacker.read_array_header()
        if not items:
            raise ValueError("an empty list")
        # The format before the length: a newer format may hold more items.
        _check_format(unpacker.unpack(), items)
        next_order, schemas = unpacker.unpack(), unpacker.unpack()
        broker = _start(next_order, schemas, limits, schema_check)
        count = unpacker.read_array_header()
        unpack = unpacker.unpack
        waiting = _build(broker, (unpack() for _ in range(count)))
        if items == _FORMATS[2]:  # format 2 ends with `clean`
            broker.stopped_cleanly = unpack() is True
        if unpacker.tell() != len(body):
            raise ValueError(f"{len(body) - unpacker.tell()} bytes after the state")
    except UnknownFormat as exc:
        raise UnknownFormat(f"{name}: {exc}") from exc
    except (msgpack.UnpackException, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"{name} does not hold a broker state: {exc}") from exc
    _finish(broker, waiting)
    return broker


#: Bytes `load_packed` hands msgpack at a time.
_READ_SIZE = 1 << 20


class _Reader:
    """A buffer as a file for msgpack.Unpacker, which copies it in chunk by chunk (so the
    body is never copied whole)."""

    __slots__ = ("_pos", "_view")

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, size: int) -> bytes:
        chunk = bytes(self._view[self._pos : self._pos + size])
        self._pos += len(chunk)
        return chunk


class UnknownFormat(ValueError):
    """A snapshot of a format this version does not know: most likely a newer spinbroker's.
    Recovery must stop on it, not fall back to anything older (the log may hold records of
    that newer version too)."""


def _check_format(fmt: Any, items: int) -> None:
    """Refuse a dumped state this version cannot read: a format it does not know, or one
    whose length does not fit its format."""
    expected = _FORMATS.get(fmt) if type(fmt) is int else None
    if expected is None:
        known = " and ".join(map(str, _FORMATS))
        raise UnknownFormat(
            f"snapshot format {fmt!r} is unknown to this spinbroker (it reads formats "
            f"{known}): was it written by a newer version?"
        )
    if expected != items:
        raise ValueError(f"snapshot format {fmt!r} in a list of {items} is not one this reads")


def _start(
    next_order: Any, schemas: Any, limits: Limits | None, schema_check: SchemaCheck | None
) -> Broker:
    broker = Broker(limits, schema_check)
    broker.next_order = next_order
    broker.schemas = dict(schemas)
    return broker


#: Per state index: whether a command in that state counts as settled.
_SETTLED_AT = [s in SETTLED for s in _STATES]


def _build(broker: Broker, packages: Iterable[list[Any]]) -> list[Command]:
    """Add the dumped packages and their commands, deriving on the way what `dump` leaves
    out: counters, ready heap entries (heapified by `_finish`), lease, expiry and forget
    deadlines. Returns the waiting commands, whose dependents are linked by `_finish` once
    every command exists. Runs once per stored command: plain loops over locals, no call
    per command beyond building it."""
    commands, by_id, queues = broker.commands, broker.packages, broker.queues
    new_package, new_command = Package.__new__, Command.__new__
    states, settled_at = _STATES, _SETTLED_AT
    waiting: list[Command] = []
    for p in packages:
        pid, created_at, enqueued, cancel_requested, expired, finished_at, causer, reason, cs = p
        pkg = new_package(Package)
        pkg.id, pkg.created_at = pid, created_at
        pkg.enqueued, pkg.cancel_requested, pkg.expired = enqueued, cancel_requested, expired
        pkg.finished_at, pkg.causer, pkg.reason = finished_at, causer, reason
        by_id[pid] = pkg
        if finished_at is not None:
            broker.schedule_forget(pid, finished_at)
        elif not (enqueued or cancel_requested or expired):  # pkg.is_open
            broker.schedule_expiry(pid, created_at)
        pkg_commands: list[Command] = []
        unsettled = 0
        cancelled_any = False
        for c in cs:
            (
                cid,
                name,
                action,
                parameters,
                deps,
                index,
                c_reason,
                c_causer,
                delivery,
                order,
                deadline,
                ttr,
            ) = c
            q = queues.get(name)
            if q is None:
                q = broker.queue(name)
            cmd = new_command(Command)
            cmd.id, cmd.queue, cmd.package = cid, q, pkg
            cmd.action = broker.shared_name(action)
            cmd.parameters, cmd.dependencies = parameters, tuple(deps)
            cmd.state = state = states[index]
            cmd.reason, cmd.causer, cmd.delivery, cmd.order = c_reason, c_causer, delivery, order
            cmd.lease_deadline, cmd.ttr = deadline, ttr
            cmd.lease_owner = None
            cmd.skip_delivery = False
            cmd.unmet = 0
            cmd.dependents = None
            commands[cid] = cmd
            pkg_commands.append(cmd)
            if not settled_at[index]:
                unsettled += 1
            elif state is CANCELLED:
                cancelled_any = True
            if state is READY:
                q.ready_line.append(cmd)  # sorted and counted by `_finish`
            elif state is WAITING:
                q.waiting += 1
                waiting.append(cmd)
            elif state is LEASED:
                q.leased += 1
                if deadline is not None:
                    broker.schedule_lease_expiry(cmd, deadline)
        pkg.commands = tuple(pkg_commands) if enqueued else pkg_commands
        pkg.unsettled, pkg.cancelled_any = unsettled, cancelled_any
    return waiting


def _finish(broker: Broker, waiting: list[Command]) -> None:
    """Link the dependents lists and heapify the ready heaps."""
    commands = broker.commands
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
        q.ready = len(q.ready_line)  # a loaded line holds exactly the ready commands
        # A snapshot lists packages in the order they were made, nearly their enqueue
        # order, so sorting the line is about one pass over it.
        q.ready_line = deque(sorted(q.ready_line, key=attrgetter("order")))
