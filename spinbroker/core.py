"""The broker's state machine: packages, resource queues, the dependency DAG and leases.

Pure: no sockets, no files, no clocks. Time comes in as `now` (seconds, the server's wall
clock); ids come in from the caller. Every change happens by applying a record
(`records.py`): a live method validates, builds the record and commits it (apply + append to
`outbox`); recovery calls `apply` with the same records. One code path, so replay cannot
drift from live behaviour, and the same records always give the same state.

What is *not* durable lives here too, because the ordering rules need it: agents blocked in
NEXT (`Waiter`, served first come first served), the packages that just finished (for
WAIT) and the commands a dependency just made ready. Those produce no records of their own;
the leases they lead to do.

Invariants, kept here and nowhere else:
- A resource queue delivers its ready commands in (enqueue sequence, position in package)
  order. Each command gets a global `order` number at enqueue, assigned in package order,
  so one integer captures both keys; the ready set is a heap on it. A command that becomes
  ready later, or comes back from a lost lease, is pushed with its original number and so
  retakes its place in line. Waiting commands are not in the heap: no head-of-line blocking.
- A command is WAITING exactly while `unmet > 0`: the number of its dependencies that have
  not succeeded. Succeeding decrements the dependents' counters (cost: O(dependents)).
- Dependencies point only at commands that existed when the dependent was added, so the
  graph is acyclic by construction.
- Heaps use lazy deletion: an entry is valid only if the command still matches it.
"""

from __future__ import annotations

import heapq
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgpack

from .config import Limits
from .errors import BrokerError, ErrorCode, shown
from .records import (
    BrokerStarted,
    CommandCompleted,
    CommandLeased,
    CommandsAdded,
    CommandSpec,
    LeaseCancelled,
    LeaseReleased,
    LeaseTouched,
    PackageCancelled,
    PackageCreated,
    PackageEnqueued,
    PackageExpired,
    PackageForgotten,
    PackageSubmitted,
    Record,
    SchemaAnnounced,
)

NAME_RE = re.compile(r"[A-Za-z0-9_.:@/-]{1,128}")
GOOD_NAMES_MAX = 10_000
#: A command cancelled because a dependency failed quotes at most this many characters of
#: the failed command's reason (which keeps all of it): one failure with a long reason must
#: not be copied whole into each of thousands of dependents, snapshots and STATUS replies.
REASON_QUOTE_MAX = 200
#: The reason of a command cancelled by CANCEL of its package (at once, or when a lease it
#: had at the CANCEL ended without COMPLETE).
PACKAGE_CANCELLED = "package cancelled"
#: At most this many action names are shared (see `Broker.shared_name`).
SHARED_NAMES_MAX = 10_000


def check_name(field: str, value: str) -> None:
    """Resource and action names: 1-128 characters of letters, digits and _ . : @ / -."""
    if not NAME_RE.fullmatch(value):
        raise BrokerError(
            ErrorCode.BAD_REQUEST,
            f"{field} {shown(value)} must be 1-128 characters of letters, digits and _ . : @ / -",
        )


def quote_reason(reason: str) -> str:
    """A failed command's reason as its cancelled dependents quote it."""
    if len(reason) <= REASON_QUOTE_MAX:
        return reason
    return reason[:REASON_QUOTE_MAX] + "..."


class CommandState(StrEnum):
    STAGED = "staged"
    WAITING = "waiting"
    READY = "ready"
    LEASED = "leased"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class PackageState(StrEnum):
    OPEN = "open"
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


STAGED = CommandState.STAGED
WAITING = CommandState.WAITING
READY = CommandState.READY
LEASED = CommandState.LEASED
SUCCEEDED = CommandState.SUCCEEDED
FAILED = CommandState.FAILED
CANCELLED = CommandState.CANCELLED
SETTLED = frozenset({SUCCEEDED, FAILED, CANCELLED})
_STATE_NAMES = tuple(s.value for s in CommandState)


@dataclass(slots=True)
class NewCommand:
    """A command as a producer asks for it, before it has an id. In SUBMIT a dependency may
    be an int: the position of an earlier command of the same request."""

    resource: str
    action: str
    parameters: dict[str, Any]
    dependencies: list[str | int]


def decode_parameters(packed: bytes) -> dict[str, Any]:
    """Parameters are kept msgpack-encoded (as the log holds them): a few hundred bytes less
    per queued command than a dict of objects, and nothing to rebuild on recovery. They are
    decoded once per delivery."""
    params: dict[str, Any] = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    return params


_new = object.__new__


class Command:
    __slots__ = (
        "action",
        "causer",
        "delivery",
        "dependencies",
        "dependents",
        "id",
        "lease_deadline",
        "lease_owner",
        "order",
        "package",
        "parameters",
        "queue",
        "reason",
        "skip_delivery",
        "state",
        "ttr",
        "unmet",
    )

    def __init__(
        self, spec: CommandSpec, package: Package, queue: ResourceQueue, action: str
    ) -> None:
        self.id = spec.id
        self.package = package
        self.queue = queue
        #: `spec.action`, as the broker's shared string for it.
        self.action = action
        self.parameters = spec.parameters
        self.dependencies = spec.dependencies
        self.state = STAGED
        self.reason: str | None = None
        #: For a command cancelled through a dependency: the failed command at the root.
        self.causer: str | None = None
        self.delivery = 0
        #: Set by `recover_leases` after a crash; its next delivery skips a number.
        self.skip_delivery = False
        self.order = -1
        self.unmet = 0
        self.dependents: list[Command] | None = None
        self.lease_owner: int | None = None
        self.lease_deadline: float | None = None
        self.ttr: float | None = None

    @property
    def resource(self) -> str:
        return self.queue.name

    def delivered(self) -> dict[str, Any]:
        """The command as NEXT returns it."""
        return {
            "id": self.id,
            "package": self.package.id,
            "resource": self.queue.name,
            "action": self.action,
            "parameters": decode_parameters(self.parameters),
            "dependencies": list(self.dependencies),
            "delivery": self.delivery,
            "ttr": self.ttr,
        }

    def status(self) -> dict[str, Any]:
        return {
            "kind": "command",
            "id": self.id,
            "package": self.package.id,
            "resource": self.queue.name,
            "action": self.action,
            "state": self.state.value,
            "reason": self.reason,
            "delivery": self.delivery,
        }


class Package:
    __slots__ = (
        "cancel_requested",
        "cancelled_any",
        "causer",
        "commands",
        "created_at",
        "enqueued",
        "expired",
        "finished_at",
        "id",
        "reason",
        "unsettled",
    )

    def __init__(self, package_id: str, created_at: float) -> None:
        self.id = package_id
        self.created_at = created_at
        #: A list while the package is open (ADD appends to it), a tuple from ENQUEUE on
        #: (final by then: a one-item tuple takes 48 bytes where a list takes 80).
        self.commands: list[Command] | tuple[Command, ...] = []
        #: Whether any command of the package was cancelled (for the `cancelled` state).
        self.cancelled_any = False
        self.unsettled = 0
        self.enqueued = False
        self.cancel_requested = False
        self.expired = False
        self.finished_at: float | None = None
        self.causer: str | None = None
        self.reason: str | None = None

    @property
    def is_open(self) -> bool:
        return not (self.enqueued or self.cancel_requested or self.expired)

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def state(self) -> PackageState:
        if self.expired:
            return PackageState.EXPIRED
        if self.causer is not None:
            return PackageState.FAILED
        if self.cancel_requested and (self.cancelled_any or not self.enqueued):
            return PackageState.CANCELLED
        if not self.enqueued:
            return PackageState.OPEN
        if self.finished:
            return PackageState.SUCCEEDED
        return PackageState.PENDING

    def counts(self) -> dict[str, int]:
        """Commands per state. Counted when asked (STATUS), not kept up to date on every
        transition: the hot paths stay cheaper and each package smaller."""
        counts = dict.fromkeys(_STATE_NAMES, 0)
        for cmd in self.commands:
            counts[cmd.state.value] += 1
        return counts

    def status(self, with_commands: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "package",
            "id": self.id,
            "state": self.state.value,
            "finished": self.finished,
            "causer": self.causer,
            "reason": self.reason,
            "counts": self.counts(),
        }
        if with_commands:
            out["commands"] = [c.status() for c in self.commands]
        return out


class Waiter:
    """An agent blocked in NEXT. `token` is the server's handle for the reply."""

    __slots__ = ("lease_record", "owner", "queue", "skipped", "token", "ttr")

    def __init__(self, token: object, owner: int | None, ttr: float | None) -> None:
        self.token = token
        self.owner = owner
        self.ttr = ttr
        #: The queue the waiter is parked on; None while not parked.
        self.queue: ResourceQueue | None = None
        #: Once served: the index in `Broker.outbox` of the record of its lease.
        self.lease_record = -1
        #: Once served: its lease skipped a delivery number (see `recover_leases`), so its
        #: reply must wait for the lease's own record.
        self.skipped = False


class ResourceQueue:
    __slots__ = (
        "agents_only",
        "leased",
        "name",
        "ready",
        "ready_heap",
        "ready_line",
        "waiters",
        "waiting",
    )

    def __init__(self, name: str, agents_only: bool = False) -> None:
        self.name = name
        #: Made by a blocking NEXT and never named by a command: it goes when its last
        #: agent does (see `Broker.unpark`), so that names made up by agents cost nothing.
        self.agents_only = agents_only
        #: The ready commands, in two sorted parts merged at the head (see `first_ready`):
        #: `ready_line` holds those made ready in enqueue order (each after every one
        #: before it: the common case, enqueued with no dependencies), `ready_heap`
        #: (order, command) the others (dependencies met later, leases lost). Both keep
        #: stale entries (commands no longer ready), skipped at the head. The line costs
        #: one pointer per command where the heap costs a tuple (56 bytes) more.
        self.ready_line: deque[Command] = deque()
        self.ready_heap: list[tuple[int, Command]] = []
        self.ready = 0
        self.waiting = 0
        self.leased = 0
        #: Agents blocked in NEXT, first come first served (oldest first). An OrderedDict,
        #: not a deque: an agent leaving the line (timeout, disconnect) costs O(1), not
        #: O(agents), which thousands of agents parked on one resource would make O(n^2).
        self.waiters: OrderedDict[Waiter, None] = OrderedDict()

    def push_ready(self, cmd: Command) -> None:
        """Put a command that became ready in its place (its enqueue order)."""
        line = self.ready_line
        if not line or line[-1].order < cmd.order:
            line.append(cmd)
        else:
            heapq.heappush(self.ready_heap, (cmd.order, cmd))

    def first_ready(self) -> Command | None:
        """The ready command first in line (lowest enqueue order), after dropping stale
        entries. It stays in line: leasing it (`take_first`, in `apply`) takes it out, so
        that live and replay agree."""
        line = self.ready_line
        while line and line[0].state is not READY:
            line.popleft()
        heap = self.ready_heap
        while heap:
            order, cmd = heap[0]
            if cmd.state is READY and cmd.order == order:
                if line and line[0].order < order:
                    return line[0]
                return cmd
            heapq.heappop(heap)
        return line[0] if line else None

    def take_first(self) -> Command:
        """Take out the command `first_ready` just returned."""
        line, heap = self.ready_line, self.ready_heap
        if line and (not heap or line[0].order < heap[0][0]):
            return line.popleft()
        return heapq.heappop(heap)[1]

    def stats(self) -> dict[str, int]:
        return {
            "ready": self.ready,
            "waiting": self.waiting,
            "leased": self.leased,
            "agents": len(self.waiters),
        }


#: Validates a command against an announced schema: (schema, action, parameters) -> problem
#: or None. Injected so the core does not depend on the agent framework's schema module.
SchemaCheck = Callable[[dict[str, Any], str, dict[str, Any]], str | None]


def _no_schema_check(schema: dict[str, Any], action: str, parameters: dict[str, Any]) -> None:
    return None


def _lease_entry_valid(entry: tuple[float, int, Command]) -> bool:
    cmd = entry[2]
    return cmd.state is LEASED and cmd.lease_deadline == entry[0]


class Broker:
    """The whole broker state. Live methods raise `BrokerError` and change nothing on bad
    input; on success they append their records to `outbox` for the server to log."""

    def __init__(self, limits: Limits | None = None, schema_check: SchemaCheck | None = None):
        self.limits = limits or Limits()
        self.schema_check = schema_check or _no_schema_check
        self.packages: dict[str, Package] = {}
        self.commands: dict[str, Command] = {}
        self.queues: dict[str, ResourceQueue] = {}
        self.schemas: dict[str, dict[str, Any]] = {}
        self.next_order = 0
        #: Loaded from a snapshot a clean stop took (state.dump's `clean`): every lease
        #: made before it is on record (see `recover_leases`).
        self.stopped_cleanly = False
        #: Records committed since the server last drained them.
        self.outbox: list[Record] = []
        #: (waiter, command) pairs leased to blocked agents since the last drain.
        self.deliveries: list[tuple[Waiter, Command]] = []
        #: Packages that finished since the last drain (for WAIT).
        self.finished: list[Package] = []
        #: Commands made ready by a dependency's success since the last drain (the server
        #: tracks which record made a command deliverable: readiness.py).
        self.readied: list[Command] = []
        self._dirty: set[ResourceQueue] = set()
        self._owner_leases: dict[int, set[Command]] = {}
        # Deadline heaps, lazily cleaned: (when, tiebreak, key).
        self._lease_heap: list[tuple[float, int, Command]] = []
        self._ttl_heap: list[tuple[float, str]] = []
        self._retention_heap: list[tuple[float, str]] = []
        self._tiebreak = 0
        self._good_names: set[str] = set()
        self._names: dict[str, str] = {}
        #: The time of the record being applied (finish times come from it).
        self._now = 0.0

    # ------------------------------------------------------------------ lookups

    def _package(self, package_id: str) -> Package:
        pkg = self.packages.get(package_id)
        if pkg is None:
            raise BrokerError(ErrorCode.NOT_FOUND, f"no package {package_id}")
        if pkg.expired:
            raise BrokerError(ErrorCode.NOT_FOUND, f"package {package_id} expired")
        return pkg

    def _command(self, command_id: str) -> Command:
        cmd = self.commands.get(command_id)
        if cmd is None:
            raise BrokerError(ErrorCode.NOT_FOUND, f"no command {command_id}")
        return cmd

    def shared_name(self, action: str) -> str:
        """`action` as the one string object the broker keeps for that name, for the first
        SHARED_NAMES_MAX names: agents use a handful of actions, and a million commands that
        each hold a copy of the same name (as decoded from a request or a record) cost
        ~56 MB. Object identity only: no state depends on it."""
        shared = self._names.get(action)
        if shared is None:
            shared = action
            if len(self._names) < SHARED_NAMES_MAX:
                self._names[action] = action
        return shared

    def queue(self, name: str) -> ResourceQueue:
        """The queue of a command on resource `name`, made if missing (it stays: commands
        refer to it until they are forgotten)."""
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = ResourceQueue(name)
        q.agents_only = False
        return q

    # ------------------------------------------------------------------ live: producers

    def _commit(self, rec: Record) -> None:
        self.apply(rec)
        self.outbox.append(rec)

    def new_package(self, package_id: str, now: float) -> None:
        self._commit(PackageCreated(package_id, now))

    def add_commands(
        self, package_id: str, commands: list[NewCommand], ids: list[str], now: float
    ) -> list[str]:
        """ADD one or many commands to an open package, all or nothing."""
        pkg = self._package(package_id)
        if not pkg.is_open:
            raise BrokerError(ErrorCode.NOT_OPEN, f"package {package_id} is {pkg.state.value}")
        specs = self._check_commands(commands, ids, len(pkg.commands), pkg)
        self._commit(CommandsAdded(package_id, specs, now))
        return [s.id for s in specs]

    def enqueue(self, package_id: str, now: float) -> list[str]:
        pkg = self._package(package_id)
        if not pkg.is_open:
            raise BrokerError(ErrorCode.NOT_OPEN, f"package {package_id} is {pkg.state.value}")
        if not pkg.commands:
            raise BrokerError(ErrorCode.EMPTY_PACKAGE, f"package {package_id} has no commands")
        for cmd in pkg.commands:
            for dep in cmd.dependencies:
                if dep not in self.commands:
                    raise BrokerError(
                        ErrorCode.UNKNOWN_DEPENDENCY,
                        f"command {cmd.id} depends on {dep}, which has been forgotten",
                    )
        self._commit(PackageEnqueued(package_id, now))
        self._dispatch(now)
        return [c.id for c in pkg.commands]

    def submit(
        self, package_id: str, commands: list[NewCommand], ids: list[str], now: float
    ) -> list[str]:
        """NEW + ADD + ENQUEUE as one record."""
        if not commands:
            raise BrokerError(ErrorCode.EMPTY_PACKAGE, "SUBMIT needs at least one command")
        specs = self._check_commands(commands, ids, 0, None)
        self._commit(PackageSubmitted(package_id, specs, now))
        self._dispatch(now)
        return [s.id for s in specs]

    def _check_commands(
        self, commands: list[NewCommand], ids: list[str], existing: int, pkg: Package | None
    ) -> tuple[CommandSpec, ...]:
        limits = self.limits
        if existing + len(commands) > limits.max_commands_per_package:
            raise BrokerError(
                ErrorCode.LIMIT_EXCEEDED,
                f"a package holds at most {limits.max_commands_per_package} commands",
            )
        specs: list[CommandSpec] = []
        earlier: set[str] = set()  # ids of this request's commands so far
        for i, nc in enumerate(commands):
            where = f"command {i}: " if len(commands) > 1 else ""
            parameters = self._check_command(nc, where)
            deps: list[str] = []
            for dep in nc.dependencies:
                if isinstance(dep, int):
                    if not 0 <= dep < i:
                        raise BrokerError(
                            ErrorCode.UNKNOWN_DEPENDENCY,
                            f"{where}dependency #{dep} is not an earlier command of this request",
                        )
                    deps.append(ids[dep])
                    continue
                if dep not in earlier and not self._may_depend_on(dep, pkg):
                    raise BrokerError(
                        ErrorCode.UNKNOWN_DEPENDENCY,
                        f"{where}dependency {dep} names no command of this package "
                        "or of an enqueued package",
                    )
                deps.append(dep)
            # A dependency named twice counts once (as the same id and as its position, too):
            # a request must not make the log and the state grow by repeating one.
            unique = tuple(dict.fromkeys(deps))
            specs.append(CommandSpec(ids[i], nc.resource, nc.action, parameters, unique))
            earlier.add(ids[i])
        return tuple(specs)

    def _may_depend_on(self, command_id: str, pkg: Package | None) -> bool:
        """A dependency must be a command of the same package or of an enqueued one."""
        cmd = self.commands.get(command_id)
        return cmd is not None and (cmd.package is pkg or cmd.package.enqueued)

    def _check_command(self, nc: NewCommand, where: str) -> bytes:
        """Validate one command; returns its parameters, msgpack-encoded."""
        for field, value in (("resource", nc.resource), ("action", nc.action)):
            if value in self._good_names:
                continue
            check_name(f"{where}{field}", value)
            # A broker sees few distinct names: remember them instead of matching again.
            if len(self._good_names) < GOOD_NAMES_MAX:
                self._good_names.add(value)
        for key in nc.parameters:
            if not isinstance(key, str):
                raise BrokerError(
                    ErrorCode.BAD_REQUEST, f"{where}parameter names must be strings, not {key!r}"
                )
        try:
            packed: bytes = msgpack.packb(nc.parameters, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BrokerError(
                ErrorCode.BAD_REQUEST, f"{where}parameters cannot be encoded: {exc}"
            ) from None
        if len(packed) > self.limits.max_parameter_bytes:
            raise BrokerError(
                ErrorCode.LIMIT_EXCEEDED,
                f"{where}parameters take {len(packed)} bytes, "
                f"more than the limit of {self.limits.max_parameter_bytes}",
            )
        schema = self.schemas.get(nc.resource)
        if schema is not None:
            problem = self.schema_check(schema, nc.action, nc.parameters)
            if problem is not None:
                raise BrokerError(
                    ErrorCode.INVALID_COMMAND, f"{where}{nc.resource} {nc.action}: {problem}"
                )
        return packed

    def cancel(self, package_id: str, now: float) -> int:
        """CANCEL: every command not yet delivered is cancelled; returns how many."""
        pkg = self._package(package_id)
        cancellable = sum(1 for c in pkg.commands if c.state in (STAGED, WAITING, READY))
        if pkg.finished or (pkg.cancel_requested and not cancellable):
            return 0
        self._commit(PackageCancelled(package_id, now))
        return cancellable

    def announce(self, resource: str, schema: dict[str, Any], now: float) -> None:
        check_name("resource", resource)
        if self.schemas.get(resource) != schema:
            self._commit(SchemaAnnounced(resource, schema, now))

    # ------------------------------------------------------------------ live: agents

    def next(self, resource: str, waiter: Waiter, now: float, block: bool) -> Command | None:
        """NEXT: lease the first ready command of `resource` to `waiter`, or park the waiter
        (when `block`) behind the agents already waiting. Returns the leased command."""
        check_name("resource", resource)
        q = self.queues.get(resource)
        if q is None:
            if not block:
                return None  # no command was ever queued here: nothing to make
            q = self.queues[resource] = ResourceQueue(resource, agents_only=True)
        if not q.waiters:
            cmd = q.first_ready()
            if cmd is not None:
                self._lease(cmd, waiter, now)
                return cmd
        if block:
            waiter.queue = q
            q.waiters[waiter] = None
        return None

    def unpark(self, waiter: Waiter) -> None:
        """A blocked NEXT timed out or its connection closed. A queue only agents ever
        named goes with its last agent."""
        q = waiter.queue
        if q is not None:
            del q.waiters[waiter]
            waiter.queue = None
            if q.agents_only and not q.waiters:
                del self.queues[q.name]

    def _lease(self, cmd: Command, waiter: Waiter, now: float) -> None:
        deadline = None if waiter.ttr is None else now + waiter.ttr
        owner = waiter.owner if waiter.ttr is None else None
        number = cmd.delivery + 1
        if cmd.skip_delivery:
            number += 1
            waiter.skipped = True
        self._commit(CommandLeased(cmd.id, number, owner, deadline, now, waiter.ttr))

    def _dispatch(self, now: float) -> None:
        """Serve blocked agents from queues that gained ready commands, first come first
        served. Called at the end of every live method that can make commands ready, so
        that between requests a queue never has both ready commands and blocked agents."""
        dirty = self._dirty
        while dirty:
            q = dirty.pop()
            waiters = q.waiters
            while waiters and q.ready:
                cmd = q.first_ready()
                if cmd is None:  # pragma: no cover - the counter and the heap disagree
                    raise AssertionError(f"queue {q.name}: ready={q.ready} but none in heap")
                waiter, _ = waiters.popitem(last=False)
                waiter.queue = None
                self._lease(cmd, waiter, now)
                waiter.lease_record = len(self.outbox) - 1
                self.deliveries.append((waiter, cmd))

    def touch(
        self, command_id: str, ttr: float | None, delivery: int | None, now: float
    ) -> float | None:
        """TOUCH: restart a ttr lease's clock; returns the ttr now in force."""
        cmd = self._leased(command_id, delivery)
        if cmd.lease_deadline is None:
            return None
        ttr = cmd.ttr if ttr is None else ttr
        assert ttr is not None
        self._commit(LeaseTouched(command_id, now + ttr, now, ttr))
        return ttr

    def complete(
        self, command_id: str, success: bool, reason: str | None, delivery: int | None, now: float
    ) -> CommandState:
        self._leased(command_id, delivery)
        self._commit(CommandCompleted(command_id, success, reason, now))
        self._dispatch(now)
        return self.commands[command_id].state

    def _leased(self, command_id: str, delivery: int | None) -> Command:
        cmd = self._command(command_id)
        if cmd.state in (SUCCEEDED, FAILED):
            raise BrokerError(
                ErrorCode.ALREADY_COMPLETED, f"command {command_id} already {cmd.state.value}"
            )
        if cmd.state is not LEASED:
            raise BrokerError(ErrorCode.NOT_LEASED, f"command {command_id} is {cmd.state.value}")
        if delivery is not None and delivery != cmd.delivery:
            raise BrokerError(
                ErrorCode.STALE_DELIVERY,
                f"command {command_id} is on delivery {cmd.delivery}, not {delivery}",
            )
        return cmd

    def release_owner(self, owner: int, now: float) -> None:
        """The connection `owner` closed: its connection leases end."""
        for cmd in sorted(self._owner_leases.pop(owner, ()), key=lambda c: c.order):
            self._end_lease(cmd, now)
        self._dispatch(now)

    def owes_skips(self) -> bool:
        """Whether a command still has a delivery number to skip (`recover_leases`): a
        snapshot taken now must not say that every lease is on record, since a lease lost
        before the crash that flagged it is not. One pass over the commands (clean stop)."""
        return any(cmd.skip_delivery for cmd in self.commands.values())

    def give_again(
        self, command_id: str, delivery: int, ttr: float | None, now: float
    ) -> Command | None:
        """A lease (`delivery` of `command_id`) whose delivering reply failed with the log,
        for its agent's next NEXT (with `ttr`): the command to deliver again, its lease
        restarted as TOUCH restarts it, and logged the same way (a connection lease stays
        one). None if its package was cancelled since: its agent never got it, so the
        lease ends as CANCEL promises for what was not delivered (LeaseCancelled)."""
        cmd = self.commands[command_id]
        if cmd.package.cancel_requested:
            self._end_lease(cmd, now)
            self._dispatch(now)
            return None
        self.touch(command_id, ttr, delivery, now)
        return cmd

    def recover_leases(self, now: float, crashed: bool = True) -> None:
        """After a restart no lease is held: every leased command is ready again in its
        original place, its delivery count kept; one that has used up max_deliveries
        fails instead, as for any lost lease. Called once, after replay.

        `crashed`: the broker may have stopped without logging every lease it made. A NEXT
        reply does not wait for its own lease record (protocol.md, Durability), so a
        command ready here may have been delivered just before the crash, under the number
        after its count; its next delivery skips that number, so that the agent which may
        hold it cannot complete the new one (delivery numbers are never given twice). At
        most one lease per command can be lost this way, the one after its count: a
        redelivery's reply waits for every record before its lease, and a delivery that
        skipped a number waits for its own lease record too (`Waiter.skipped`), so the
        skipped-to number is never seen unless it is on record. A clean stop logs every
        lease: no skip then.

        After a clean stop its first record says that a broker started on that state:
        should this one crash before a clean stop of its own, the clean stop's snapshot is
        no longer the last word (records follow it)."""
        if not crashed:
            self._commit(BrokerStarted(now))
        leased = []
        for cmd in self.commands.values():
            state = cmd.state
            if state is LEASED:
                leased.append(cmd)
            elif crashed and state is READY:
                cmd.skip_delivery = True
        for cmd in sorted(leased, key=lambda c: c.order):
            self._end_lease(cmd, now)

    def _end_lease(self, cmd: Command, now: float) -> None:
        if cmd.package.cancel_requested:
            self._commit(LeaseCancelled(cmd.id, now))
        elif cmd.delivery >= self.limits.max_deliveries:
            reason = (
                f"lease lost after {cmd.delivery} deliveries "
                f"(max_deliveries={self.limits.max_deliveries})"
            )
            self._commit(CommandCompleted(cmd.id, False, reason, now))
        else:
            self._commit(LeaseReleased(cmd.id, now))

    # ------------------------------------------------------------------ live: time

    def tick(self, now: float) -> None:
        """Expire ttr leases and open packages, forget old finished packages."""
        heap = self._lease_heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if _lease_entry_valid(entry):
                self._end_lease(entry[2], now)
        ttl = self._ttl_heap
        while ttl and ttl[0][0] <= now:
            _, package_id = heapq.heappop(ttl)
            pkg = self.packages.get(package_id)
            if pkg is not None and pkg.is_open:
                self._commit(PackageExpired(package_id, now))
        ret = self._retention_heap
        while ret and ret[0][0] <= now:
            _, package_id = heapq.heappop(ret)
            if package_id in self.packages:
                self._commit(PackageForgotten(package_id, now))
        self._dispatch(now)

    def next_deadline(self) -> float | None:
        """The earliest time at which `tick` has work, or None. Stale heap heads (leases
        already ended, packages already enqueued or forgotten) are dropped on the way."""
        lease, ttl, ret = self._lease_heap, self._ttl_heap, self._retention_heap
        while lease and not _lease_entry_valid(lease[0]):
            heapq.heappop(lease)
        packages = self.packages
        while ttl and not ((p := packages.get(ttl[0][1])) is not None and p.is_open):
            heapq.heappop(ttl)
        while ret and ret[0][1] not in packages:
            heapq.heappop(ret)
        heads = [h[0][0] for h in (lease, ttl, ret) if h]
        return min(heads) if heads else None

    # ------------------------------------------------------------------ queries

    def status(self, any_id: str, with_commands: bool = False) -> dict[str, Any]:
        pkg = self.packages.get(any_id)
        if pkg is not None:
            return pkg.status(with_commands)
        cmd = self.commands.get(any_id)
        if cmd is not None:
            return cmd.status()
        raise BrokerError(ErrorCode.NOT_FOUND, f"no package or command {any_id}")

    def wait_target(self, package_id: str) -> Package:
        """The package a WAIT names (expired packages are not found)."""
        return self._package(package_id)

    def stats(self) -> dict[str, Any]:
        resources = {
            name: q.stats()
            for name, q in sorted(self.queues.items())
            if q.ready or q.waiting or q.leased or q.waiters
        }
        totals = {k: sum(r[k] for r in resources.values()) for k in ("ready", "waiting")}
        totals["leased"] = sum(r["leased"] for r in resources.values())
        totals["agents"] = sum(r["agents"] for r in resources.values())
        totals["packages"] = len(self.packages)
        totals["commands"] = len(self.commands)
        return {"resources": resources, "totals": totals}

    # ------------------------------------------------------------------ apply

    def apply(self, rec: Record) -> None:
        """Apply one record. Records are trusted: they were validated when made."""
        self._now = rec.at
        _APPLY[type(rec)](self, rec)

    def _apply_submitted(self, rec: PackageSubmitted) -> None:
        # Enqueued at once: no TTL to watch.
        specs = rec.commands
        if len(specs) == 1 and not specs[0].dependencies:
            spec = specs[0]
            self.apply_submitted_one(
                rec.package, spec.id, spec.resource, spec.action, spec.parameters, rec.at
            )
            return
        self.packages[rec.package] = Package(rec.package, rec.at)
        self._apply_added(rec.package, specs)
        self._apply_enqueued(rec.package)

    def apply_submitted_one(
        self,
        package_id: str,
        command_id: str,
        resource: str,
        action: str,
        parameters: bytes,
        at: float,
    ) -> None:
        """Apply the commonest record, a `PackageSubmitted` of one command without
        dependencies, in one step (ready at once), from its fields: replay hands them over
        without building the record (persist.py)."""
        self._now = at
        pkg = _new(Package)
        pkg.id, pkg.created_at, pkg.cancelled_any, pkg.unsettled = package_id, at, False, 1
        pkg.enqueued, pkg.cancel_requested, pkg.expired = True, False, False
        pkg.finished_at = pkg.causer = pkg.reason = None
        q = self.queues.get(resource)
        if q is None or q.agents_only:
            q = self.queue(resource)
        cmd = _new(Command)
        shared = self._names.get(action)
        cmd.id, cmd.package, cmd.queue = command_id, pkg, q
        cmd.action = shared if shared is not None else self.shared_name(action)
        cmd.parameters, cmd.dependencies = parameters, ()
        cmd.reason = cmd.causer = cmd.dependents = None
        cmd.lease_owner = cmd.lease_deadline = cmd.ttr = None
        cmd.delivery = cmd.unmet = 0
        cmd.skip_delivery = False
        cmd.order = order = self.next_order
        self.next_order = order + 1
        cmd.state = READY
        pkg.commands = (cmd,)
        self.packages[package_id] = pkg
        self.commands[command_id] = cmd
        q.ready += 1
        q.ready_line.append(cmd)  # the newest order of all: last in line
        self._dirty.add(q)

    def _apply_created(self, rec: PackageCreated) -> None:
        self.packages[rec.package] = Package(rec.package, rec.at)
        self.schedule_expiry(rec.package, rec.at)

    def _apply_touched(self, rec: LeaseTouched) -> None:
        cmd = self.commands[rec.command]
        cmd.lease_deadline = rec.deadline
        cmd.ttr = rec.ttr
        self.schedule_lease_expiry(cmd, rec.deadline)

    def _apply_announced(self, rec: SchemaAnnounced) -> None:
        self.schemas[rec.resource] = rec.schema

    def schedule_expiry(self, package_id: str, created_at: float) -> None:
        heapq.heappush(self._ttl_heap, (created_at + self.limits.package_ttl, package_id))

    def schedule_forget(self, package_id: str, finished_at: float) -> None:
        heapq.heappush(self._retention_heap, (finished_at + self.limits.retention, package_id))

    def schedule_lease_expiry(self, cmd: Command, deadline: float) -> None:
        self._tiebreak += 1
        heapq.heappush(self._lease_heap, (deadline, self._tiebreak, cmd))

    def _apply_added(self, package_id: str, specs: Iterable[CommandSpec]) -> None:
        pkg = self.packages[package_id]
        for spec in specs:
            cmd = Command(spec, pkg, self.queue(spec.resource), self.shared_name(spec.action))
            self.commands[spec.id] = cmd
            assert isinstance(pkg.commands, list), "ADD to an enqueued package"
            pkg.commands.append(cmd)
            pkg.unsettled += 1

    def _apply_enqueued(self, package_id: str) -> None:
        pkg = self.packages[package_id]
        pkg.enqueued = True
        pkg.commands = tuple(pkg.commands)
        commands = self.commands
        for cmd in pkg.commands:
            cmd.order = self.next_order
            self.next_order += 1
            unmet = 0
            dead: Command | None = None
            for dep_id in cmd.dependencies:
                dep = commands[dep_id]
                state = dep.state
                if state is SUCCEEDED:
                    continue
                if state is FAILED or state is CANCELLED:
                    dead = dep
                    break
                unmet += 1
                if dep.dependents is None:
                    dep.dependents = [cmd]
                else:
                    dep.dependents.append(cmd)
            if dead is not None:
                self._cancel_through(cmd, dead)
                continue
            cmd.unmet = unmet
            if unmet:
                cmd.state = WAITING
                cmd.queue.waiting += 1
            else:
                self._make_ready(cmd)

    def _make_ready(self, cmd: Command) -> None:
        cmd.state = READY
        q = cmd.queue
        q.ready += 1
        q.push_ready(cmd)
        self._dirty.add(q)

    def _apply_leased(self, rec: CommandLeased) -> None:
        cmd = self.commands[rec.command]
        q = cmd.queue
        if cmd.state is READY:
            q.ready -= 1
            # NEXT leases the first ready command, so it is at the head once stale
            # entries are dropped.
            head = q.first_ready()
            assert head is cmd, f"leasing {cmd.id} but {head and head.id} is first in line"
            q.take_first()
        cmd.state = LEASED
        q.leased += 1
        cmd.delivery = rec.delivery
        cmd.skip_delivery = False
        cmd.ttr = rec.ttr
        cmd.lease_owner = rec.owner
        cmd.lease_deadline = rec.deadline
        if rec.owner is not None:
            self._owner_leases.setdefault(rec.owner, set()).add(cmd)
        if rec.deadline is not None:
            self.schedule_lease_expiry(cmd, rec.deadline)

    def _drop_lease(self, cmd: Command) -> None:
        cmd.queue.leased -= 1
        if cmd.lease_owner is not None:
            held = self._owner_leases.get(cmd.lease_owner)
            if held is not None:
                held.discard(cmd)
                if not held:
                    del self._owner_leases[cmd.lease_owner]
        cmd.lease_owner = None
        cmd.lease_deadline = None

    def _apply_released(self, cmd: Command) -> None:
        self._drop_lease(cmd)
        self._make_ready(cmd)

    def _apply_lease_cancelled(self, cmd: Command) -> None:
        self._drop_lease(cmd)
        cmd.reason = PACKAGE_CANCELLED
        self._settle(cmd, CANCELLED)
        self._cascade(cmd)

    def _apply_completed(self, rec: CommandCompleted) -> None:
        cmd = self.commands[rec.command]
        self._drop_lease(cmd)
        cmd.reason = rec.reason
        if rec.success:
            self._settle(cmd, SUCCEEDED)
            for dep in cmd.dependents or ():
                if dep.state is WAITING:
                    dep.unmet -= 1
                    if dep.unmet == 0:
                        dep.queue.waiting -= 1
                        self._make_ready(dep)
                        self.readied.append(dep)
        else:
            self._settle(cmd, FAILED)
            pkg = cmd.package
            if pkg.causer is None:
                pkg.causer = cmd.id
                pkg.reason = rec.reason
            self._cascade(cmd)
        cmd.dependents = None

    def _cascade(self, root: Command) -> None:
        """Cancel every transitive dependent of `root` (failed or cancelled) still waiting."""
        stack = [root]
        while stack:
            cmd = stack.pop()
            for dep in cmd.dependents or ():
                if dep.state is WAITING:
                    dep.queue.waiting -= 1
                    self._cancel_through(dep, cmd)
                    stack.append(dep)
            cmd.dependents = None

    def _cancel_through(self, cmd: Command, dead: Command) -> None:
        """Cancel `cmd` because its dependency `dead` failed or was cancelled. The reason
        names the root of the chain, the command that failed (or was cancelled by CANCEL),
        and the root's own reason; it is passed down the chain as is, so it never depends
        on the root still being in memory."""
        if dead.causer is not None:  # `dead` was itself cancelled through the root
            causer, reason = dead.causer, dead.reason or f"dependency {dead.causer} failed"
        elif dead.state is FAILED:
            causer = dead.id
            reason = f"dependency {dead.id} failed"
            if dead.reason:
                reason = f"{reason}: {quote_reason(dead.reason)}"
        else:
            causer, reason = dead.id, f"dependency {dead.id} was cancelled"
        cmd.reason = reason
        cmd.causer = causer
        pkg = cmd.package
        if pkg.causer is None:
            pkg.causer = causer
            pkg.reason = reason
        self._settle(cmd, CANCELLED)

    def _settle(self, cmd: Command, state: CommandState) -> None:
        cmd.state = state
        pkg = cmd.package
        if state is CANCELLED:
            pkg.cancelled_any = True
        pkg.unsettled -= 1
        if pkg.unsettled == 0 and pkg.enqueued:
            self._finish(pkg)

    def _finish(self, pkg: Package) -> None:
        pkg.finished_at = self._now
        self.finished.append(pkg)
        self.schedule_forget(pkg.id, self._now)

    def _apply_cancelled(self, pkg: Package, at: float) -> None:
        pkg.cancel_requested = True
        victims = [c for c in pkg.commands if c.state in (STAGED, WAITING, READY)]
        for cmd in victims:
            q = cmd.queue
            if cmd.state is WAITING:
                q.waiting -= 1
            elif cmd.state is READY:
                q.ready -= 1
            cmd.reason = PACKAGE_CANCELLED
            cmd.state = CANCELLED
            pkg.cancelled_any = True
            pkg.unsettled -= 1
        for cmd in victims:
            self._cascade(cmd)
        if pkg.unsettled == 0 and not pkg.finished:
            self._finish(pkg)

    def _apply_expired(self, pkg: Package, at: float) -> None:
        pkg.expired = True
        for cmd in pkg.commands:
            del self.commands[cmd.id]
        pkg.commands = ()
        pkg.unsettled = 0
        self._finish(pkg)

    def _apply_forgotten(self, pkg: Package) -> None:
        for cmd in pkg.commands:
            self.commands.pop(cmd.id, None)
            cmd.dependents = None
        # Break the package <-> command cycle so refcounting frees them at once (the
        # server freezes recovered objects out of the cyclic collector).
        pkg.commands = ()


_APPLY: dict[type, Callable[[Broker, Any], None]] = {
    CommandLeased: Broker._apply_leased,
    CommandCompleted: Broker._apply_completed,
    PackageSubmitted: Broker._apply_submitted,
    PackageCreated: Broker._apply_created,
    CommandsAdded: lambda b, r: b._apply_added(r.package, r.commands),
    PackageEnqueued: lambda b, r: b._apply_enqueued(r.package),
    LeaseTouched: Broker._apply_touched,
    LeaseReleased: lambda b, r: b._apply_released(b.commands[r.command]),
    LeaseCancelled: lambda b, r: b._apply_lease_cancelled(b.commands[r.command]),
    PackageCancelled: lambda b, r: b._apply_cancelled(b.packages[r.package], r.at),
    PackageExpired: lambda b, r: b._apply_expired(b.packages[r.package], r.at),
    PackageForgotten: lambda b, r: b._apply_forgotten(b.packages.pop(r.package)),
    SchemaAnnounced: Broker._apply_announced,
    BrokerStarted: lambda b, r: None,
}
