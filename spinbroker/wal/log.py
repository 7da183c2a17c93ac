"""The `Wal`: the one object the server holds to make its records durable.

Holds `Wal`, which ties the pieces together: `open` recovers the directory (recovery.py) and
starts the active segment's writer, `load` hands back the newest usable snapshot and the
records after it, `append`/`commit` are the group commit (writer.py), `write_snapshot`
stores a snapshot and deletes what it makes obsolete. Must never interpret a record or a
snapshot body: both are opaque bytes produced and consumed by the core.

Usage, in this order:

    wal, recovery = Wal.open(directory, fsync="always")
    snapshot, records = wal.load()          # once, before the first append
    for lsn, body in records: ...           # replay
    lsn = wal.append(body)                  # on the event-loop thread; never blocks
    await wal.commit()                      # before acknowledging anything that depends on it
    await wal.write_snapshot(lsn, body)     # the state after applying records 1..lsn
    await wal.close()

A `Wal` belongs to the event loop that first appends or commits through it; its file IO
runs on one dedicated thread (plus one for snapshots, and from `open` to `load` up to two
reading ahead the files recovery needs next).

Every frame's checksums are verified once: `open` checks every segment frame by frame and
keeps those bytes (up to `keep_checked_bytes`) for `load`, which replays them as they are;
only a segment beyond that budget is read again, and then checked again frame by frame.

The log head (head.py) names the newest segment: `open` brings it up to date, and so does
every roll, so that a lost newest segment is refused rather than read as a shorter log.

Retention: the newest `keep_snapshots` snapshots are kept, and the segments whose records
are all covered by the oldest of them are deleted. With the default of 2, an invalid newest
snapshot can still be recovered from the previous one plus the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from spinbroker.wal.errors import WalCorruption, WalNewerVersion, WalWriteError
from spinbroker.wal.files import FileLayer, OsFiles, ReadAhead, WalFile
from spinbroker.wal.frame import (
    SEGMENT_HEADER_SIZE,
    BadSegmentHeader,
    NewerSegment,
    decode_segment_header,
)
from spinbroker.wal.head import write_head
from spinbroker.wal.reader import RecordError, iter_checked, iter_records
from spinbroker.wal.recovery import KEEP_CHECKED_BYTES, Recovery, recover
from spinbroker.wal.segment import SegmentList, SegmentWriter, allocate, create_segment
from spinbroker.wal.snapshot import (
    Snapshot,
    choose_snapshot,
    list_snapshots,
    publish_snapshot,
    write_snapshot_file,
)
from spinbroker.wal.writer import FsyncMode, GroupCommit

log = logging.getLogger("spinbroker.wal")

MIN_SEGMENT_SIZE = 256


class Wal:
    """A write-ahead log in one directory; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        files: FileLayer,
        recovery: Recovery,
        group: GroupCommit,
        segments: SegmentList,
        keep_snapshots: int,
        checked: dict[Path, bytes] | None = None,
        reader: ReadAhead | None = None,
    ) -> None:
        self._directory = directory
        self._files = files
        self._recovery = recovery
        #: Segment bytes `open` checked, until `load` replays (and drops) them.
        self._checked = checked if checked is not None else {}
        #: What `open` started reading for `load` (the newest snapshot), until load.
        self._reader = reader
        self._group = group
        self._segments = segments
        self._keep_snapshots = keep_snapshots
        self._snapshot_lock = asyncio.Lock()
        self._snapshot_executor = ThreadPoolExecutor(1, thread_name_prefix="spinbroker-snap")

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        fsync: FsyncMode | str = FsyncMode.ALWAYS,
        batch_interval_ms: float = 10.0,
        segment_size: int = 64 << 20,
        preallocate: bool = True,
        keep_snapshots: int = 2,
        files: FileLayer | None = None,
        keep_checked_bytes: int = KEEP_CHECKED_BYTES,
    ) -> tuple[Wal, Recovery]:
        """Recover `directory` (created if missing) and open it for appending.

        Raises WalCorruption if a checksum fails anywhere but in a torn tail of the newest
        segment, which is cut (kept aside, with a warning), and WalNewerVersion, before
        cutting anything, if a segment is a newer spinbroker's. Blocking: call it at startup.
        Up to `keep_checked_bytes` of the checked segments stay in memory until `load`.
        """
        mode = FsyncMode(fsync)
        if segment_size < MIN_SEGMENT_SIZE:
            raise ValueError(f"segment_size must be at least {MIN_SEGMENT_SIZE} bytes")
        if keep_snapshots < 1:
            raise ValueError("keep_snapshots must be at least 1")
        files = files if files is not None else OsFiles()
        reader = ReadAhead(files)
        try:
            recovery, checked = recover(files, directory, keep_checked_bytes, reader)
            preallocated = segment_size if preallocate else 0
            segments = SegmentList([(lsn, path) for lsn, path, _ in recovery.segments])
            if recovery.segments:
                newest, path, end = recovery.segments[-1]
                handle = _open_active(files, path, preallocated)
            else:
                newest = recovery.next_lsn
                path, handle = create_segment(files, directory, newest, preallocated)
                segments.add(newest, path)
                end = SEGMENT_HEADER_SIZE
        except BaseException:
            reader.close()
            raise
        if recovery.head != newest:  # none yet, or a crash came before its update
            _name_in_head(files, directory, newest, path)
        writer = SegmentWriter(
            files,
            directory,
            handle,
            end=end,
            next_lsn=recovery.next_lsn,
            segment_size=segment_size,
            preallocate=preallocate,
            on_roll=functools.partial(_rolled, files, directory, segments),
        )
        group = GroupCommit(writer, mode, batch_interval_ms, recovery.next_lsn)
        wal = cls(directory, files, recovery, group, segments, keep_snapshots, checked, reader)
        return wal, recovery

    # -- recovery -------------------------------------------------------------------------

    def load(self) -> tuple[Snapshot | None, Iterator[tuple[int, bytes]]]:
        """The newest usable snapshot, and an iterator of (lsn, body) for every record after
        it, in order. Call once, after open and before the first append. Raises
        WalCorruption if no snapshot plus the log covers the state (and the iterator raises
        it if a segment changed on disk since open), WalNewerVersion if the newest snapshot
        is a newer spinbroker's."""
        if self._group.next_lsn != self._recovery.next_lsn:
            raise RuntimeError("Wal.load() must run before the first append")
        recovery = self._recovery
        reader, self._reader = self._reader, None
        try:
            read = reader.read if reader is not None else None
            snapshot = choose_snapshot(
                self._files, self._directory, recovery.first_lsn, recovery.next_lsn, read
            )
        finally:
            if reader is not None:
                reader.close()
        start = snapshot.lsn + 1 if snapshot is not None else 1
        # Take the checked bytes out of the Wal, and drop those of segments the snapshot
        # covers right away: the iterator holds the rest, each until it is replayed.
        checked, self._checked = self._checked, {}
        listed = recovery.segments
        needed = [
            (first_lsn, path, end, checked.get(path))
            for index, (first_lsn, path, end) in enumerate(listed)
            if index + 1 == len(listed) or listed[index + 1][0] > start
        ]
        return snapshot, self._records_from(start, needed)

    def _records_from(
        self, start: int, segments: list[tuple[int, Path, int, bytes | None]]
    ) -> Iterator[tuple[int, bytes]]:
        segments.reverse()  # popped oldest first, so each segment's bytes go once replayed
        while segments:
            first_lsn, path, end, data = segments.pop()
            try:
                if data is not None:
                    # The very bytes open() checked frame by frame: not checked again.
                    yield from iter_checked(data, first_lsn, end, start)
                    continue
                data = self._files.read(path)
                if decode_segment_header(data) != first_lsn:
                    raise BadSegmentHeader("segment header changed since open")
                for lsn, body in iter_records(data, first_lsn, end):
                    if lsn >= start:
                        yield lsn, body
            except RecordError as exc:
                raise WalCorruption(path, exc.offset, exc.detail) from exc
            except BadSegmentHeader as exc:
                raise WalCorruption(path, 0, str(exc)) from exc
            except NewerSegment as exc:
                raise WalNewerVersion(path, str(exc)) from exc

    # -- the log --------------------------------------------------------------------------

    @property
    def files(self) -> FileLayer:
        return self._files

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def fsync(self) -> FsyncMode:
        return self._group.mode

    @property
    def next_lsn(self) -> int:
        """The LSN the next append gets."""
        return self._group.next_lsn

    @property
    def last_lsn(self) -> int:
        """The LSN of the last record appended (0 if none ever was)."""
        return self._group.next_lsn - 1

    @property
    def durable_lsn(self) -> int:
        """The highest LSN a commit() has been (or would be) released for."""
        return self._group.durable_lsn

    @property
    def synced_lsn(self) -> int:
        """The highest LSN known to be on disk (fdatasync'ed), in every fsync mode."""
        return self._group.synced_lsn

    @property
    def error(self) -> WalWriteError | None:
        """The last write failure, until a flush succeeds again (refuse new work while set)."""
        return self._group.error

    def stats(self) -> dict[str, int | float]:
        """Group commit's counters (see `GroupCommit.stats`)."""
        return self._group.stats()

    def append(self, body: bytes) -> int:
        """Buffer one record and return its LSN. Cheap and synchronous; durable only once a
        later `commit()` returns. Must be called on the event-loop thread."""
        return self._group.append(body)

    def write_now(self) -> int:
        """With fsync `off` or `batch`, write the buffered records now, on this thread, when
        that needs no fdatasync; returns the LSN acknowledged so far (see writer.py)."""
        return self._group.write_now()

    def on_commit(self, callback: Callable[[BaseException | None], None]) -> None:
        """Like `commit()`, as a callback given None or the failure; starts the flush at
        once if none is running (see writer.py)."""
        self._group.on_commit(callback)

    async def commit(self) -> None:
        """Return once every record appended so far is acknowledged in this log's fsync mode
        (see writer.py). Raises WalWriteError if a write or sync failed before that."""
        await self._group.commit()

    # -- snapshots ------------------------------------------------------------------------

    async def write_snapshot(self, lsn: int, body: bytes) -> None:
        """Store `body` as the state after applying records 1..`lsn`, durably, then delete
        the snapshots and segments it makes obsolete. The records up to `lsn` are synced
        first (in every fsync mode), so a snapshot is never ahead of the log. Runs on its
        own thread: group commit goes on meanwhile. Raises WalWriteError if a write fails
        (an older snapshot and the log are then still there)."""
        if not 0 < lsn <= self.last_lsn:
            raise ValueError(f"snapshot LSN {lsn} is not in 1..{self.last_lsn}")
        await self._group.wait_for(lsn, sync=True)
        async with self._snapshot_lock:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._snapshot_executor, self._store_snapshot, lsn, body)
            except OSError as exc:
                raise WalWriteError(f"snapshot write failed: {exc}", exc.errno) from exc

    async def install_snapshot(self, lsn: int) -> None:
        """Publish a snapshot whose body another process already wrote and synced under
        `snapshot_tmp_path(directory, lsn)` (the server forks a child to serialize the state
        without stalling the loop): wait until the log is synced up to `lsn`, then rename
        it into place and delete what it makes obsolete."""
        if not 0 < lsn <= self.last_lsn:
            raise ValueError(f"snapshot LSN {lsn} is not in 1..{self.last_lsn}")
        await self._group.wait_for(lsn, sync=True)
        async with self._snapshot_lock:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._snapshot_executor, self._publish_snapshot, lsn)
            except OSError as exc:
                raise WalWriteError(f"snapshot rename failed: {exc}", exc.errno) from exc

    def _publish_snapshot(self, lsn: int) -> None:
        publish_snapshot(self._files, self._directory, lsn)
        self._drop_obsolete()

    def _store_snapshot(self, lsn: int, body: bytes) -> None:
        files, directory = self._files, self._directory
        write_snapshot_file(files, directory, lsn, body)
        self._drop_obsolete()

    def _drop_obsolete(self) -> None:
        files, directory = self._files, self._directory
        snapshots = list_snapshots(files, directory)
        kept, obsolete = snapshots[-self._keep_snapshots :], snapshots[: -self._keep_snapshots]
        removed = self._segments.take_covered(kept[0][0])
        removed.extend(path for _, path in obsolete)
        for path in removed:
            with contextlib.suppress(FileNotFoundError):
                files.remove(path)
        if removed:
            files.sync_dir(directory)

    async def close(self) -> None:
        """Write and sync everything appended, then release the files and threads. Raises
        WalWriteError if that last flush failed (the resources are released anyway)."""
        self._checked = {}
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        try:
            await self._group.close()
        finally:
            async with self._snapshot_lock:
                self._snapshot_executor.shutdown(wait=True)


def _open_active(files: FileLayer, path: Path, preallocate: int) -> WalFile:
    handle = files.open(path)
    try:
        if preallocate and handle.size() < preallocate:
            allocate(handle, preallocate)
            handle.sync()
    except BaseException:
        handle.close()
        raise
    return handle


def _rolled(
    files: FileLayer, directory: Path, segments: SegmentList, first_lsn: int, path: Path
) -> None:
    """A new newest segment, created durably (by `SegmentWriter._roll`, on whichever thread
    flushes): list it, then name it in the log head."""
    segments.add(first_lsn, path)
    _name_in_head(files, directory, first_lsn, path)


def _name_in_head(files: FileLayer, directory: Path, first_lsn: int, path: Path) -> None:
    """Name the newest segment in the log head. A head that cannot be written (a full disk)
    lags behind, as after a crash between creating a segment and naming it: the log is as
    good, and a later open or roll brings the head up to date; until then only the guard
    against losing this segment is off, so this neither fails a commit nor a start."""
    try:
        write_head(files, directory, first_lsn)
    except OSError as exc:
        log.warning("wal: could not name segment %s in the log head: %s", path.name, exc)
