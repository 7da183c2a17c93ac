"""Group commit: turning many `append`s into few writes and syncs, off the event loop.

Holds `FsyncMode` and `GroupCommit`, the event-loop side of the log. `append` buffers a
record body and returns its LSN; it never blocks. One flush at a time runs on a dedicated IO
thread (`SegmentWriter.flush`: one write, then one fdatasync); everything appended while a
flush runs goes out together in the next one, framed as one batch (frame.py), so N
concurrent committers cost about one sync per flush, not N, and the frame's header and
checksums are paid per flush, not per record. A flush without an fdatasync (modes `off`, and `batch`
between syncs) is only a write to the page cache and runs on the event-loop thread itself:
the hand-off to the thread and back cost more than the write; unless it starts a new
segment, which syncs the old one and the directory. Must never fdatasync on the
event-loop thread, and must never release a `commit()` before the flush that covers its LSN
has returned.

Modes (what a resolved `commit()` means):

* ``always``: the records are on disk: written and fdatasync'ed. A power loss loses nothing
  acknowledged.
* ``batch``: the records were written to the OS (they survive the broker process dying, not
  a power loss or kernel crash). fdatasync runs at most every `batch_interval_ms`, and within
  that long after any write. Loss window on power loss: up to about `batch_interval_ms` plus
  one sync of acknowledged records.
* ``off``: like batch but never syncs while running (only when a segment is sealed and on
  `close`). For tests and benchmarks only: a power loss can lose any amount of acknowledged
  records.

Failures: when a write or sync raises, every `commit()` waiting for a record not yet durable
raises `WalWriteError`, and so does each later one until a flush succeeds again. The records
stay buffered, in order, and are written again (after truncating back to the last synced
offset) by the next flush, which a later `append`/`commit`, or a retry timer, starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errnos
import functools
import logging
import queue
import threading
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from spinbroker.wal.errors import WalClosed, WalWriteError
from spinbroker.wal.frame import MAX_BODY, encode_frames
from spinbroker.wal.segment import SegmentWriter

log = logging.getLogger("spinbroker.wal")

#: How a commit waits: called once with None (acknowledged) or the failure (see on_commit).
Resolve = Callable[[BaseException | None], None]

RETRY_DELAY = 0.1


class FsyncMode(StrEnum):
    ALWAYS = "always"
    BATCH = "batch"
    OFF = "off"


class GroupCommit:
    """Buffers appends and runs flushes on one IO thread; see the module docstring."""

    def __init__(
        self, writer: SegmentWriter, mode: FsyncMode, batch_interval_ms: float, next_lsn: int
    ) -> None:
        self._writer = writer
        self.mode = mode
        self._interval = batch_interval_ms / 1000.0
        self._io = IoThread("spinbroker-wal")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer: list[bytes] = []
        self._next_lsn = next_lsn
        self._written_lsn = next_lsn - 1
        self._synced_lsn = next_lsn - 1
        self._acked_lsn = next_lsn - 1
        #: commit() callers: wait for the mode's acknowledgement, or for a sync.
        self._waiters: list[tuple[int, Resolve]] = []
        self._sync_waiters: list[tuple[int, Resolve]] = []
        self._inflight: asyncio.Future[None] | None = None
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_sync = float("-inf")
        #: The batch-mode timer fired: the next flush syncs.
        self._sync_due = False
        self._closed = False
        #: The last flush failure, until a flush succeeds again.
        self.error: WalWriteError | None = None
        #: Counters for STATS (see `stats`): flushes that ended with an fdatasync, the
        #: records they made durable, and their time from start to settled on the loop.
        self._syncs = 0
        self._synced_records = 0
        self._sync_seconds = 0.0
        self._max_sync_seconds = 0.0
        self._flush_started = 0.0

    @property
    def next_lsn(self) -> int:
        return self._next_lsn

    @property
    def durable_lsn(self) -> int:
        """The highest LSN whose commit() has resolved (per the mode's meaning)."""
        return self._acked_lsn

    @property
    def synced_lsn(self) -> int:
        return self._synced_lsn

    def stats(self) -> dict[str, int | float]:
        """What group commit has done since the log was opened: `syncs` fdatasyncs made
        `synced_records` records durable (their ratio is the mean group size), taking
        `sync_seconds` in all from the start of each flush to its settling on the event
        loop (the IO thread's hand-offs included), `max_sync_ms` for the slowest."""
        return {
            "syncs": self._syncs,
            "synced_records": self._synced_records,
            "sync_seconds": round(self._sync_seconds, 6),
            "max_sync_ms": round(self._max_sync_seconds * 1000, 3),
        }

    def append(self, body: bytes) -> int:
        if self._closed:
            raise WalClosed("append on a closed log")
        if len(body) > MAX_BODY:
            raise ValueError(f"record body of {len(body)} bytes exceeds {MAX_BODY}")
        lsn = self._next_lsn
        self._buffer.append(body)
        self._next_lsn = lsn + 1
        self._kick()
        return lsn

    def write_now(self) -> int:
        """Modes `off` and `batch`: if no flush is in flight, write what is buffered right
        here (a page-cache write) instead of at the next loop pass, so that the caller can
        acknowledge in the same pass. Returns the acknowledged LSN either way."""
        if (
            self.mode is not FsyncMode.ALWAYS
            and self._inflight is None
            and self._buffer
            and not self._closed
            and self._bind_loop() is not None
            and not self._sync_now(self._next_lsn - 1)
        ):
            self._start_flush()
        return self._acked_lsn

    def on_commit(self, callback: Resolve) -> None:
        """Call `callback(None)` once every record appended so far is acknowledged, or
        `callback(error)` if a flush fails first. It runs right where the flush is settled,
        not a loop pass later as a future's callbacks would, and the flush starts at once
        when none is in flight (not at the next loop pass): both save a pass on every
        acknowledgement."""
        lsn = self._next_lsn - 1
        sync = self.mode is FsyncMode.ALWAYS
        if lsn <= (self._synced_lsn if sync else self._acked_lsn):
            callback(None)
        elif self._closed:
            callback(WalClosed("commit on a closed log"))
        else:
            (self._sync_waiters if sync else self._waiters).append((lsn, callback))
            if self._inflight is None:
                assert self._bind_loop() is not None, "on_commit() needs a running event loop"
                self._start_flush()

    async def commit(self) -> None:
        """Resolve once every record appended so far is acknowledged (see the modes)."""
        await self.wait_for(self._next_lsn - 1, sync=self.mode is FsyncMode.ALWAYS)

    async def wait_for(self, lsn: int, *, sync: bool) -> None:
        """Resolve once `lsn` is acknowledged, or synced if `sync`."""
        if lsn <= (self._synced_lsn if sync else self._acked_lsn):
            return
        if self._closed:
            raise WalClosed("commit on a closed log")
        loop = self._bind_loop()
        assert loop is not None
        future: asyncio.Future[None] = loop.create_future()
        (self._sync_waiters if sync else self._waiters).append(
            (lsn, functools.partial(_resolve, future))
        )
        self._kick()
        await future

    async def close(self) -> None:
        """Write and sync everything appended, in every mode, then stop the IO thread."""
        if self._closed:
            return
        self._closed = True
        self._cancel_timer()
        if self._inflight is not None:
            await asyncio.wait([self._inflight])
        frames = self._take_frames()
        loop = asyncio.get_running_loop()
        self._flush_started = loop.time()
        failure: BaseException | None = None
        try:
            await self._io.run(self._writer.flush, frames, self._next_lsn - 1, True)
        except Exception as exc:
            failure = exc
        self._settle(failure)
        for _, resolve in (*self._waiters, *self._sync_waiters):
            resolve(WalClosed("the log was closed"))
        try:
            await self._io.run(self._writer.close)
        except OSError as exc:
            failure = failure or exc
        finally:
            self._io.stop()
        if failure is not None:
            raise _write_error(failure) from failure

    # -- scheduling (event-loop thread) ---------------------------------------------------

    def _bind_loop(self) -> asyncio.AbstractEventLoop | None:
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return None
        return self._loop

    def _kick(self) -> None:
        if self._inflight is not None or self._scheduled or self._closed:
            return
        loop = self._bind_loop()
        if loop is not None:
            self._scheduled = True
            loop.call_soon(self._start_flush)

    def _start_flush(self) -> None:
        self._scheduled = False
        if self._inflight is not None or self._closed:
            return
        last = self._next_lsn - 1
        sync = self._sync_now(last)
        if not self._buffer and not sync and self._written_lsn >= last:
            return
        self._cancel_timer()
        frames = self._take_frames()
        loop = self._loop
        assert loop is not None
        self._flush_started = loop.time()
        if sync:
            self._last_sync = self._flush_started
            self._sync_due = False
        if not sync and not self._writer.rolls_next:
            # Without an fdatasync the write only reaches the page cache: cheaper here than
            # the round trip to the IO thread and back (nothing else writes meanwhile:
            # no flush is in flight). A write that starts a new segment syncs the old one
            # and the directory, so it goes to the IO thread like a sync.
            failure: BaseException | None = None
            try:
                self._writer.flush(frames, last, False)
            except Exception as exc:
                failure = exc
            self._flushed(failure)
            return
        # The IO thread hands the result straight back to the loop (one wake-up, one loop
        # pass), not through run_in_executor's chain of futures, which costs extra passes
        # on every acknowledgement.
        self._inflight = loop.create_future()
        self._io.submit(self._writer.flush, (frames, last, sync), self._flush_done, loop)

    def _take_frames(self) -> list[bytes]:
        """The frames of every buffered record, which leave the buffer."""
        bodies, self._buffer = self._buffer, []
        if not bodies:
            return []
        # The synced watermark: what the log knows to be durable as this flush starts.
        return encode_frames(self._next_lsn - len(bodies), bodies, self._synced_lsn)

    def _sync_now(self, last: int) -> bool:
        """Whether the next flush should end with an fdatasync."""
        if self._synced_lsn >= last:
            return False
        if self.mode is FsyncMode.ALWAYS or self._sync_waiters or self._sync_due:
            return True
        if self.mode is FsyncMode.OFF:
            return False
        loop = self._loop
        assert loop is not None
        return loop.time() - self._last_sync >= self._interval

    def _flush_done(self, failure: BaseException | None) -> None:
        inflight, self._inflight = self._inflight, None
        self._flushed(failure)
        if inflight is not None:
            inflight.set_result(None)  # close() waits on it

    def _flushed(self, failure: BaseException | None) -> None:
        self._settle(failure)
        if self._closed:
            return
        if failure is not None:
            self._arm_timer(RETRY_DELAY)
            return
        if self._buffer or self._waiters or self._sync_waiters:
            self._start_flush()
        if self._synced_lsn < self._written_lsn and self.mode is FsyncMode.BATCH:
            self._arm_timer(max(0.0, self._last_sync + self._interval - self._loop_time()))

    def _settle(self, failure: BaseException | None) -> None:
        """Release the waiters a finished flush covers; fail the rest if it failed."""
        synced = self._writer.synced_lsn
        if synced > self._synced_lsn and self._loop is not None:
            took = self._loop.time() - self._flush_started
            self._syncs += 1
            self._synced_records += synced - self._synced_lsn
            self._sync_seconds += took
            self._max_sync_seconds = max(self._max_sync_seconds, took)
        self._synced_lsn = synced
        if failure is None:
            self._written_lsn = self._writer.written_lsn
            self.error = None
            synced_only = self.mode is FsyncMode.ALWAYS
            self._acked_lsn = max(
                self._acked_lsn, self._synced_lsn if synced_only else self._written_lsn
            )
        else:
            self._written_lsn = self._synced_lsn
            self._acked_lsn = max(self._acked_lsn, self._synced_lsn)
            self.error = _write_error(failure)
            log.error("wal: %s", self.error)
        # Take the lists first: a callback (see on_commit) may commit again, appending a
        # waiter and starting the next flush, while these resolve.
        waiters, self._waiters = self._waiters, []
        sync_waiters, self._sync_waiters = self._sync_waiters, []
        self._waiters[:0] = _release(waiters, self._acked_lsn, failure)
        self._sync_waiters[:0] = _release(sync_waiters, self._synced_lsn, failure)

    def _arm_timer(self, delay: float) -> None:
        if self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._sync_due = self.mode is FsyncMode.BATCH
        self._kick()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _loop_time(self) -> float:
        assert self._loop is not None
        return self._loop.time()


#: A job for the IO thread: a function, its arguments, and what to call on the event loop
#: with its outcome (None, or what it raised).
_Job = tuple[
    Callable[..., object],
    tuple[Any, ...],
    Callable[[BaseException | None], None],
    asyncio.AbstractEventLoop,
]


class IoThread:
    """The log's IO thread: runs the jobs handed to it one at a time, in order, and hands
    each outcome to the event loop. Leaner than a one-worker ThreadPoolExecutor on the
    path every acknowledgement takes: a queue put and get per job and no Future, lock or
    condition, so that the thread holds the GIL for less and the loop spends less CPU per
    flush. Started by the first job."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(
        self,
        fn: Callable[..., object],
        args: tuple[Any, ...],
        done: Callable[[BaseException | None], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Run `fn(*args)` on the thread, then `done(outcome)` on `loop`."""
        if self._thread is None:
            # A daemon: an exit without close() must not hang on an idle thread. A job
            # cut short by exit was not acknowledged to anybody.
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put((fn, args, done, loop))

    async def run(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn(*args)` on the thread and wait for it; raises what it raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self.submit(fn, args, functools.partial(_resolve, future), loop)
        await future

    def stop(self) -> None:
        """End the thread once the jobs handed to it are done."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        get = self._jobs.get
        while (job := get()) is not None:
            fn, args, done, loop = job
            outcome: BaseException | None = None
            try:
                fn(*args)
            except BaseException as exc:  # the loop's side decides what it means
                outcome = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(done, outcome)


def _resolve(future: asyncio.Future[None], failure: BaseException | None) -> None:
    """A commit() waiter: resolve its future, unless its caller gave up (cancelled)."""
    if future.done():
        return
    if failure is None:
        future.set_result(None)
    else:
        future.set_exception(failure)


def _release(
    waiters: list[tuple[int, Resolve]], lsn: int, failure: BaseException | None
) -> list[tuple[int, Resolve]]:
    """Resolve the waiters up to `lsn`; fail all others if the flush failed. Returns the rest."""
    remaining = []
    for target, resolve in waiters:
        if target <= lsn:
            resolve(None)
        elif failure is not None:
            resolve(_write_error(failure))
        else:
            remaining.append((target, resolve))
    return remaining


def _write_error(failure: BaseException) -> WalWriteError:
    if isinstance(failure, OSError):
        name = errnos.errorcode.get(failure.errno or 0, "error")
        return WalWriteError(f"log write failed ({name}): {failure}", failure.errno)
    return WalWriteError(f"log write failed: {failure!r}")
