"""Durability glue between the pure core and the write-ahead log.

Holds recovery (newest snapshot + the records after it -> a `Broker` equal to the one that
wrote them) and taking snapshots while serving. The log never interprets bodies and the
core never touches files; this module is the only place that knows both: a record body is
`msgpack(records.to_wire(rec))`, a snapshot body is `msgpack(state.dump(broker))`.

Snapshots while serving must not stall the event loop, so the state is serialised in a
forked child (copy-on-write, as Redis' BGSAVE does): the fork is the only pause the loop
sees. The child writes and syncs `snap-<lsn>.snap.tmp` and exits; the parent then waits
until the log itself is synced up to that LSN and only then renames the snapshot into
place, so a snapshot is never ahead of the log.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

from . import records, state
from .config import Limits
from .core import Broker, SchemaCheck
from .wal import OsFiles, Wal
from .wal.recovery import detach_forked_child
from .wal.snapshot import snapshot_tmp_path, write_snapshot_tmp

log = logging.getLogger("spinbroker.persist")

#: How often (seconds) a long recovery reports progress.
PROGRESS_EVERY = 2.0


def pack_record(packer: msgpack.Packer, rec: records.Record) -> bytes:
    body: bytes = packer.pack(records.to_wire(rec))
    return body


@dataclass(slots=True)
class RecoveryReport:
    snapshot_lsn: int
    snapshot_seconds: float
    records: int
    replay_seconds: float
    leases_released: int

    @property
    def replay_rate(self) -> float:
        return self.records / self.replay_seconds if self.replay_seconds > 0 else 0.0

    def describe(self) -> str:
        return (
            f"snapshot at lsn {self.snapshot_lsn} loaded in {self.snapshot_seconds:.2f}s; "
            f"replayed {self.records} records in {self.replay_seconds:.2f}s "
            f"({self.replay_rate:,.0f}/s); {self.leases_released} leases released"
        )


def recover(
    wal: Wal,
    limits: Limits,
    schema_check: SchemaCheck | None,
    now: float,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[Broker, RecoveryReport]:
    """Rebuild the broker from `wal` (freshly opened, nothing appended yet); `now` is the
    server's clock, for the records recovery itself makes (released leases). Raises
    `WalCorruption` when the log cannot be read past some point, `WalNewerVersion` when
    the newest snapshot file is of a newer version, and ValueError when a body does not
    decode as a snapshot or a record (one of a newer version included: a snapshot format or
    a record tag this version does not know). None touches a file: what this version
    cannot read stays as it is, for the version that wrote it."""
    # Recovery builds millions of objects that all stay alive: a cyclic collection run in
    # the middle would only walk them again and again. So: collect what garbage there is
    # now, while the heap is small; build with the collector off; then move everything
    # out of its way (gc.freeze), where refcounting still frees it.
    #
    # No collection after the build: it would walk every recovered object (~0.8 s per
    # million) to find nothing, because replay and snapshot load make no cyclic garbage.
    # The only cycles they build are live state (package <-> its commands, queue heap ->
    # command -> queue), and every path that drops such state breaks the cycle first
    # (`_apply_forgotten` and `_apply_expired` empty `pkg.commands`, completion clears
    # `dependents`); records and msgpack values are acyclic, and a failed recovery raises
    # (the broker is never frozen). tests/test_recovery_speed.py checks this over random
    # workloads: replaying their logs and loading their snapshots leave nothing for the
    # collector. Were some cycle missed, the cost is memory held by that garbage, never a
    # wrong state.
    gc.collect()
    gc.disable()
    try:
        broker, report = _recover(wal, limits, schema_check, now, clock)
    finally:
        gc.enable()
    gc.freeze()
    return broker, report


def _recover(
    wal: Wal,
    limits: Limits,
    schema_check: SchemaCheck | None,
    now: float,
    clock: Callable[[], float],
) -> tuple[Broker, RecoveryReport]:
    started = clock()
    snapshot, bodies = wal.load()
    if snapshot is None:
        broker = Broker(limits, schema_check)
        snapshot_lsn = 0
    else:
        broker = state.load_packed(snapshot.body, limits, schema_check, str(snapshot.path))
        snapshot_lsn = snapshot.lsn
    loaded = clock()
    if snapshot is not None:
        log.info("loaded snapshot %s in %.2fs", snapshot.path.name, loaded - started)
    last = _replay(broker, bodies, snapshot_lsn, loaded, clock)
    count = last - snapshot_lsn
    replayed = clock()
    broker.outbox.clear()
    broker.finished.clear()
    # Leases do not survive a restart: those commands are ready again in their places.
    # Only a clean stop's snapshot with nothing after it says every lease is on record.
    broker.recover_leases(now, crashed=not (broker.stopped_cleanly and count == 0))
    released = sum(not isinstance(rec, records.BrokerStarted) for rec in broker.outbox)
    report = RecoveryReport(snapshot_lsn, loaded - started, count, replayed - loaded, released)
    return broker, report


def _replay(
    broker: Broker,
    bodies: Iterator[tuple[int, bytes]],
    snapshot_lsn: int,
    loaded: float,
    clock: Callable[[], float],
) -> int:
    """Apply the records of `bodies` (LSNs snapshot_lsn + 1, + 2, ...: the log hands them
    out with no gaps); returns the last LSN applied. Runs once per record of the log, so it
    does nothing per record beyond decoding and applying it."""
    apply, from_wire, unpackb = broker.apply, records.from_wire, msgpack.unpackb
    one = records.SUBMITTED_ONE
    submitted_one = broker.apply_submitted_one
    report_at = loaded + PROGRESS_EVERY
    lsn = snapshot_lsn
    for lsn, body in bodies:
        wire = unpackb(body, raw=False, strict_map_key=False, use_list=True)
        if not isinstance(wire, list):
            raise ValueError(f"record {lsn} is not a record: {wire!r}")
        if len(wire) == 7 and wire[0] == one:  # the commonest record, applied unbuilt
            submitted_one(wire[1], wire[2], wire[3], wire[4], wire[5], wire[6])
        else:
            try:
                rec = from_wire(wire)
            except ValueError as exc:  # named by its LSN, for `spinbroker wal inspect`
                raise ValueError(f"record at LSN {lsn}: {exc}") from exc
            apply(rec)
        if not lsn & 0x3FFF and clock() >= report_at:
            report_at = clock() + PROGRESS_EVERY
            done = lsn - snapshot_lsn
            log.info("recovery: replayed %d records (%.0f/s)", done, done / (clock() - loaded))
    return lsn


class Snapshotter:
    """Takes snapshots of a live broker in a forked child, one at a time."""

    def __init__(self, wal: Wal) -> None:
        self.wal = wal
        self.last_lsn = 0
        self.last_at = time.monotonic()
        self.running: asyncio.Task[None] | None = None
        self.taken = 0
        #: The last snapshot taken by a child: how long the loop paused for the fork, and
        #: how long the whole snapshot took (seconds).
        self.last_fork_s = 0.0
        self.last_took_s = 0.0

    def due(self, lsn: int, every_records: int, every_seconds: float) -> bool:
        if self.running is not None or lsn <= self.last_lsn:
            return False
        if lsn - self.last_lsn >= every_records:
            return True
        return time.monotonic() - self.last_at >= every_seconds

    def start(self, broker: Broker, lsn: int) -> asyncio.Task[None]:
        """Snapshot the state at `lsn`, which must be the broker's state right now: the
        fork happens before this returns (a task would fork later, after other requests
        changed the state), and the rest goes on in the background. A log on another file
        layer than the real one (tests) cannot be written from a child: serialise inline."""
        loop = asyncio.get_running_loop()
        if not isinstance(self.wal.files, OsFiles):
            body = state.dump_packed(broker)
            self.running = loop.create_task(self._store(lsn, body))
            return self.running
        started = time.monotonic()
        try:
            pid = _fork_writer(broker, self.wal.directory, lsn)
        except OSError as exc:
            log.error("cannot fork to snapshot at lsn %d: %s", lsn, exc)
            self.last_at = time.monotonic()
            raise
        forked = time.monotonic() - started
        self.running = loop.create_task(self._finish(pid, lsn, started, forked))
        return self.running

    async def _store(self, lsn: int, body: bytes) -> None:
        try:
            await self.wal.write_snapshot(lsn, body)
            self.last_lsn = lsn
            self.taken += 1
        except Exception as exc:
            log.error("snapshot at lsn %d failed: %s", lsn, exc)
        finally:
            self.last_at = time.monotonic()
            self.running = None

    async def _finish(self, pid: int, lsn: int, started: float, forked: float) -> None:
        try:
            loop = asyncio.get_running_loop()
            _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                raise RuntimeError(f"snapshot child exited with {code}")
            await self.wal.install_snapshot(lsn)
            self.last_lsn = lsn
            self.taken += 1
            self.last_fork_s, self.last_took_s = forked, time.monotonic() - started
            log.info(
                "snapshot at lsn %d in %.2fs (loop paused %.1f ms for the fork)",
                lsn,
                self.last_took_s,
                forked * 1000,
            )
        except Exception as exc:
            log.error("snapshot at lsn %d failed: %s", lsn, exc)
            tmp = snapshot_tmp_path(self.wal.directory, lsn)
            tmp.unlink(missing_ok=True)
        finally:
            self.last_at = time.monotonic()
            self.running = None

    async def take_inline(self, broker: Broker, lsn: int) -> None:
        """At clean shutdown, once every record is logged: serialise in this process
        (nothing left to stall), marked clean (see `Broker.recover_leases`) unless a skip
        owed since a crash is still pending."""
        if self.running is not None:
            await asyncio.wait([self.running])
        if lsn < self.last_lsn:
            return
        body = state.dump_packed(broker, clean=not broker.owes_skips())
        await self.wal.write_snapshot(lsn, body)
        self.last_lsn = lsn
        self.taken += 1


def _fork_writer(broker: Broker, directory: Path, lsn: int) -> int:
    """Fork a child that writes the snapshot's temporary file and exits."""
    parent = os.getpid()
    pid = os.fork()
    if pid != 0:
        return pid
    # The child: never return into the parent's code, never touch its event loop.
    code = 1
    try:
        detach_forked_child(parent)
        body = state.dump_packed(broker)
        write_snapshot_tmp(OsFiles(), directory, lsn, body)
        code = 0
    except BaseException:
        traceback.print_exc(file=sys.stderr)
    finally:
        os._exit(code)
