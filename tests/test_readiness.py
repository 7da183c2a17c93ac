"""ReadyLsns: which log position a NEXT reply must wait for, driven by a real core.

"Logging a batch" here is what the server does after each pass: it appends the core's
outbox (LSNs counted by `Log`) and reports the order counter and the readied commands."""

from __future__ import annotations

from spinbroker.core import Command
from spinbroker.readiness import ReadyLsns
from tests.test_core import Harness, nc


class Log:
    def __init__(self, h: Harness) -> None:
        self.h = h
        self.lsn = 0
        self.ready = ReadyLsns(h.b.next_order)

    def batch(self) -> int:
        """Append what the core made since the last batch; its last LSN."""
        b = self.h.b
        self.lsn += len(b.outbox)
        b.outbox.clear()
        self.ready.logged(b.next_order, b.readied, self.lsn)
        b.readied = []
        return self.lsn

    def need(self, command_id: str) -> int | None:
        cmd: Command = self.h.b.commands[command_id]
        return self.ready.need(cmd, self.h.b.readied)


def test_an_enqueued_command_needs_the_batch_that_enqueued_it() -> None:
    h = Harness()
    log = Log(h)
    _, (a,) = h.submit(nc())
    first = log.batch()
    _, (b, c) = h.submit(nc(), nc())
    second = log.batch()
    assert (log.need(a), log.need(b), log.need(c)) == (first, second, second)
    log.ready.durable(first)
    assert (log.need(a), log.need(b)) == (0, second)
    log.ready.durable(second)
    assert (log.need(a), log.need(b), log.need(c)) == (0, 0, 0)
    assert len(log.ready) == 0


def test_a_command_enqueued_in_the_batch_being_built_needs_everything() -> None:
    h = Harness()
    log = Log(h)
    _, (a,) = h.submit(nc())
    log.batch()
    _, (b,) = h.submit(nc())  # not logged yet
    assert log.need(b) is None
    assert log.need(a) == 1


def test_a_batch_that_enqueues_nothing_leaves_no_mark() -> None:
    h = Harness()
    log = Log(h)
    _, (a,) = h.submit(nc())
    log.batch()
    log.ready.durable(1)
    h.next_id()  # a lease: a record, but no enqueue
    log.batch()
    assert log.need(a) == 0 and len(log.ready) == 0


def test_a_command_made_ready_by_a_dependency_needs_that_completion() -> None:
    h = Harness()
    log = Log(h)
    _, (a, b) = h.submit(nc(), nc(deps=[0]))
    enqueued = log.batch()
    log.ready.durable(enqueued)
    h.run(a)
    assert h.b.readied == [h.b.commands[b]]
    assert log.need(b) is None  # its completion is not logged yet
    completed = log.batch()
    assert completed > enqueued
    assert log.need(b) == completed
    log.ready.durable(completed - 1)
    assert log.need(b) == completed
    log.ready.durable(completed)
    assert log.need(b) == 0 and len(log.ready) == 0


def test_a_dependency_completed_later_outweighs_an_enqueue_still_in_flight() -> None:
    h = Harness()
    log = Log(h)
    _, (a,) = h.submit(nc("x"))
    first = log.batch()
    _, (b,) = h.submit(nc(deps=[a]))
    second = log.batch()
    h.run(a)
    third = log.batch()
    assert first < second < third
    assert log.need(b) == third  # max of its enqueue (second) and its dependency (third)
