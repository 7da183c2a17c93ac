"""Which log position made each deliverable command deliverable.

A NEXT reply reveals one command, so it needs on disk only what made that command
deliverable: the record that enqueued its package and, for a command with dependencies,
the record completing the last of them. It does not need the unrelated records appended
before it (another producer's SUBMIT, another agent's COMPLETE), nor its own lease record
(leases do not survive a restart anyway). Waiting for exactly that lets a NEXT overtake an
fsync in flight: an agent that pipelines COMPLETE with NEXT gets its next command while the
completion is still being synced.

`ReadyLsns` answers that question without one more field per command (a million queued
commands would pay for it): enqueue order numbers grow with the log, so for enqueues it
keeps one mark per logged batch that is not durable yet, (order numbers below, LSN); the
few commands made ready by a dependency get an entry each, until that entry is durable.
Pure bookkeeping: the server feeds it each logged batch and each durable LSN.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection

from .core import Command


class ReadyLsns:
    __slots__ = ("_by_command", "_durable_order", "_marked_order", "_orders", "_readied")

    def __init__(self, next_order: int) -> None:
        #: (enqueue order numbers below this were logged by then, LSN), not durable yet.
        self._orders: deque[tuple[int, int]] = deque()
        #: Commands with an order number below this were enqueued by durable records.
        self._durable_order = next_order
        #: ... and below this, by logged ones.
        self._marked_order = next_order
        #: Commands made ready by a dependency's completion whose record is not durable yet.
        self._by_command: dict[Command, int] = {}
        self._readied: deque[tuple[int, list[Command]]] = deque()

    def logged(self, next_order: int, readied: list[Command], lsn: int) -> None:
        """A batch of records, ending at `lsn`, was appended: the core's order counter is
        now `next_order`, and `readied` were made ready by dependencies in that batch."""
        if next_order != self._marked_order:
            self._orders.append((next_order, lsn))
            self._marked_order = next_order
        if readied:
            for cmd in readied:
                self._by_command[cmd] = lsn
            self._readied.append((lsn, readied))

    def durable(self, lsn: int) -> None:
        """Everything up to `lsn` is durable: forget the marks it covers."""
        orders = self._orders
        while orders and orders[0][1] <= lsn:
            self._durable_order = orders.popleft()[0]
        readied, by_command = self._readied, self._by_command
        while readied and readied[0][0] <= lsn:
            for cmd in readied.popleft()[1]:
                if by_command.get(cmd, lsn + 1) <= lsn:
                    del by_command[cmd]

    def need(self, cmd: Command, unlogged: Collection[Command]) -> int | None:
        """The LSN that must be durable before `cmd` may be delivered (0: it already is), or
        None when what made it ready is not logged yet (enqueued in the batch being built,
        or made ready by a command in `unlogged`, the core's readied list not yet drained):
        then the caller waits for everything made so far."""
        if cmd.order >= self._marked_order or (unlogged and cmd in unlogged):
            return None
        need = 0
        if cmd.order >= self._durable_order:
            for below, lsn in self._orders:
                if cmd.order < below:
                    need = lsn
                    break
        by_dependency = self._by_command.get(cmd)
        return need if by_dependency is None else max(need, by_dependency)

    def __len__(self) -> int:
        """Marks held (for tests: they must drain as the log becomes durable)."""
        return len(self._orders) + len(self._by_command)
