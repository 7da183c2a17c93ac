"""Records: the plain description of every durable change the core makes.

(Plain slotted dataclasses, not frozen ones: recovery builds millions of them, and a frozen
dataclass pays an object.__setattr__ per field. Nothing mutates a record once made.)

The core changes state only by applying a record (`Broker.apply`). A live request makes its
decision, builds the record, applies it and hands it to the server, which appends it to the
write-ahead log before replying; recovery applies the same records in the same order and so
rebuilds the same state. Records therefore carry every input a decision used: ids, times,
delivery numbers, reasons. Nothing here does IO; `to_wire`/`from_wire` give the msgpack-able
form (a list whose first element names the record type).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class CommandSpec:
    """A command as added to a package; `dependencies` are command ids and `parameters`
    the msgpack encoding of the parameter map (stored and logged as is)."""

    id: str
    resource: str
    action: str
    parameters: bytes
    dependencies: tuple[str, ...]

    def to_wire(self) -> list[Any]:
        return [self.id, self.resource, self.action, self.parameters, list(self.dependencies)]

    @classmethod
    def from_wire(cls, w: list[Any]) -> CommandSpec:
        return cls(w[0], w[1], w[2], w[3], tuple(w[4]))


@dataclass(slots=True)
class PackageCreated:
    package: str
    at: float


@dataclass(slots=True)
class CommandsAdded:
    package: str
    commands: tuple[CommandSpec, ...]
    at: float


@dataclass(slots=True)
class PackageEnqueued:
    package: str
    at: float


@dataclass(slots=True)
class PackageSubmitted:
    """NEW + ADD + ENQUEUE in one record: the common producer path, one log write."""

    package: str
    commands: tuple[CommandSpec, ...]
    at: float


@dataclass(slots=True)
class CommandLeased:
    command: str
    delivery: int
    #: The connection holding a connection lease; None for a ttr lease.
    owner: int | None
    #: Absolute expiry of a ttr lease; None for a connection lease.
    deadline: float | None
    at: float
    #: The ttr the lease was taken with (None: a connection lease).
    ttr: float | None = None


@dataclass(slots=True)
class LeaseTouched:
    command: str
    deadline: float
    at: float
    #: The ttr now in force.
    ttr: float | None = None


@dataclass(slots=True)
class LeaseReleased:
    """A lease ended without COMPLETE; the command is ready again in its original place."""

    command: str
    at: float


@dataclass(slots=True)
class LeaseCancelled:
    """A lease ended without COMPLETE after the command's package was cancelled: CANCEL let
    the command finish where it ran, so it is cancelled now, not delivered again."""

    command: str
    at: float


@dataclass(slots=True)
class CommandCompleted:
    command: str
    success: bool
    reason: str | None
    at: float


@dataclass(slots=True)
class PackageCancelled:
    package: str
    at: float


@dataclass(slots=True)
class PackageExpired:
    package: str
    at: float


@dataclass(slots=True)
class PackageForgotten:
    """A finished or expired package leaves memory after the retention period."""

    package: str
    at: float


@dataclass(slots=True)
class SchemaAnnounced:
    """An agent announced the actions and parameters its resource accepts."""

    resource: str
    schema: dict[str, Any]
    at: float


@dataclass(slots=True)
class BrokerStarted:
    """A broker started on the state a clean stop left (the first record after it).
    Changes nothing: a clean stop's snapshot is the last word only while no record follows
    it (see `Broker.recover_leases`)."""

    at: float


Record = (
    PackageCreated
    | CommandsAdded
    | PackageEnqueued
    | PackageSubmitted
    | CommandLeased
    | LeaseTouched
    | LeaseReleased
    | LeaseCancelled
    | CommandCompleted
    | PackageCancelled
    | PackageExpired
    | PackageForgotten
    | SchemaAnnounced
    | BrokerStarted
)


#: The tag of the commonest record: a `PackageSubmitted` of one command without
#: dependencies, flat: [tag, package, command id, resource, action, parameters, at]. Its
#: fields after the tag are `Broker.apply_submitted_one`'s arguments in order, so that
#: replay applies it without building the record (persist.py). Logs written before it
#: existed hold the nested "submitted" form, which still decodes.
SUBMITTED_ONE = "submitted1"


def to_wire(rec: Record) -> list[Any]:
    """The msgpack-able form of a record: [tag, field, ...]."""
    match rec:
        case PackageCreated(p, at):
            return ["created", p, at]
        case CommandsAdded(p, cmds, at):
            return ["added", p, [c.to_wire() for c in cmds], at]
        case PackageEnqueued(p, at):
            return ["enqueued", p, at]
        case PackageSubmitted(p, cmds, at):
            if len(cmds) == 1 and not cmds[0].dependencies:
                c = cmds[0]
                return [SUBMITTED_ONE, p, c.id, c.resource, c.action, c.parameters, at]
            return ["submitted", p, [c.to_wire() for c in cmds], at]
        case CommandLeased(c, delivery, owner, deadline, at, ttr):
            return ["leased", c, delivery, owner, deadline, at, ttr]
        case LeaseTouched(c, deadline, at, ttr):
            return ["touched", c, deadline, at, ttr]
        case LeaseReleased(c, at):
            return ["released", c, at]
        case LeaseCancelled(c, at):
            return ["lease_cancelled", c, at]
        case CommandCompleted(c, success, reason, at):
            return ["completed", c, success, reason, at]
        case PackageCancelled(p, at):
            return ["cancelled", p, at]
        case PackageExpired(p, at):
            return ["expired", p, at]
        case PackageForgotten(p, at):
            return ["forgotten", p, at]
        case SchemaAnnounced(r, schema, at):
            return ["announced", r, schema, at]
        case BrokerStarted(at):
            return ["started", at]
    raise TypeError(f"not a record: {rec!r}")


_new = object.__new__


# The decoders of the records a log holds most of build them with `object.__new__` and
# plain slot stores: a dataclass __init__ call costs more than the stores themselves, and
# recovery decodes every record of the log. Each sets every field (the round-trip tests
# compare all of them).


def _specs(wires: list[Any]) -> tuple[CommandSpec, ...]:
    specs = []
    for c in wires:
        spec = _new(CommandSpec)
        spec.id, spec.resource, spec.action, spec.parameters = c[0], c[1], c[2], c[3]
        spec.dependencies = tuple(c[4])
        specs.append(spec)
    return tuple(specs)


def _submitted(w: list[Any]) -> PackageSubmitted:
    rec = _new(PackageSubmitted)
    rec.package, rec.commands, rec.at = w[1], _specs(w[2]), w[3]
    return rec


def _submitted_one(w: list[Any]) -> PackageSubmitted:
    if len(w) != 7:
        raise ValueError(f"malformed record {w!r}: {len(w)} fields, expected 7")
    spec = _new(CommandSpec)
    spec.id, spec.resource, spec.action, spec.parameters = w[2], w[3], w[4], w[5]
    spec.dependencies = ()
    rec = _new(PackageSubmitted)
    rec.package, rec.commands, rec.at = w[1], (spec,), w[6]
    return rec


def _leased(w: list[Any]) -> CommandLeased:
    rec = _new(CommandLeased)
    rec.command, rec.delivery, rec.owner, rec.deadline = w[1], w[2], w[3], w[4]
    rec.at, rec.ttr = w[5], w[6]
    return rec


def _completed(w: list[Any]) -> CommandCompleted:
    rec = _new(CommandCompleted)
    rec.command, rec.success, rec.reason, rec.at = w[1], w[2], w[3], w[4]
    return rec


#: One decoder per tag: a dict lookup rather than a chain of comparisons.
_DECODERS: dict[str, Callable[[list[Any]], Record]] = {
    SUBMITTED_ONE: _submitted_one,
    "submitted": _submitted,
    "leased": _leased,
    "completed": _completed,
    "touched": lambda w: LeaseTouched(w[1], w[2], w[3], w[4]),
    "released": lambda w: LeaseReleased(w[1], w[2]),
    "lease_cancelled": lambda w: LeaseCancelled(w[1], w[2]),
    "created": lambda w: PackageCreated(w[1], w[2]),
    "added": lambda w: CommandsAdded(w[1], _specs(w[2]), w[3]),
    "enqueued": lambda w: PackageEnqueued(w[1], w[2]),
    "cancelled": lambda w: PackageCancelled(w[1], w[2]),
    "expired": lambda w: PackageExpired(w[1], w[2]),
    "forgotten": lambda w: PackageForgotten(w[1], w[2]),
    "announced": lambda w: SchemaAnnounced(w[1], w[2], w[3]),
    "started": lambda w: BrokerStarted(w[1]),
}


def from_wire(w: list[Any]) -> Record:
    """Inverse of `to_wire`; raises ValueError on an unknown tag or shape."""
    try:
        decode = _DECODERS.get(w[0])
        if decode is not None:
            return decode(w)
    except (IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed record {w!r}: {exc}") from exc
    raise ValueError(
        f"unknown record tag {w[0]!r}: a record type this spinbroker does not know "
        "(was it written by a newer version?)"
    )
