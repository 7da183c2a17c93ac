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
runs on one dedicated thread (plus one for snapshots).

Retention: the newest `keep_snapshots` snapshots are kept, and the segments whose records
are all covered by the oldest of them are deleted. With the default of 2, an invalid newest
snapshot can still be recovered from the previous one plus the log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from spinbroker.wal.errors import WalCorruption, WalWriteError
from spinbroker.wal.files import FileLayer, OsFiles, WalFile
from spinbroker.wal.frame import SEGMENT_HEADER_SIZE, BadSegmentHeader, decode_segment_header
from spinbroker.wal.reader import RecordError, iter_records
from spinbroker.wal.recovery import Recovery, recover
from spinbroker.wal.segment import SegmentList, SegmentWriter, allocate, create_segment
from spinbroker.wal.snapshot import (
    Snapshot,
    choose_snapshot,
    list_snapshots,
    publish_snapshot,
    write_snapshot_file,
)
from spinbroker.wal.writer import FsyncMode, GroupCommit

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
    ) -> None:
        self._directory = directory
        self._files = files
        self._recovery = recovery
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
    ) -> tuple[Wal, Recovery]:
        """Recover `directory` (created if missing) and open it for appending.

        Raises WalCorruption if a checksum fails anywhere but in a torn tail of the newest
        segment, which is cut (kept aside, with a warning). Blocking: call it at startup.
        """
        mode = FsyncMode(fsync)
        if segment_size < MIN_SEGMENT_SIZE:
            raise ValueError(f"segment_size must be at least {MIN_SEGMENT_SIZE} bytes")
        if keep_snapshots < 1:
            raise ValueError("keep_snapshots must be at least 1")
        files = files if files is not None else OsFiles()
        recovery = recover(files, directory)
        preallocated = segment_size if preallocate else 0
        segments = SegmentList([(lsn, path) for lsn, path, _ in recovery.segments])
        if recovery.segments:
            _, path, end = recovery.segments[-1]
            handle = _open_active(files, path, preallocated)
        else:
            path, handle = create_segment(files, directory, recovery.next_lsn, preallocated)
            segments.add(recovery.next_lsn, path)
            end = SEGMENT_HEADER_SIZE
        writer = SegmentWriter(
            files,
            directory,
            handle,
            end=end,
            next_lsn=recovery.next_lsn,
            segment_size=segment_size,
            preallocate=preallocate,
            on_roll=segments.add,
        )
        group = GroupCommit(writer, mode, batch_interval_ms, recovery.next_lsn)
        return cls(directory, files, recovery, group, segments, keep_snapshots), recovery

    # -- recovery -------------------------------------------------------------------------

    def load(self) -> tuple[Snapshot | None, Iterator[tuple[int, bytes]]]:
        """The newest usable snapshot, and an iterator of (lsn, body) for every record after
        it, in order. Call once, after open and before the first append. Raises
        WalCorruption if no snapshot plus the log covers the state (and the iterator raises
        it if a segment changed on disk since open)."""
        if self._group.next_lsn != self._recovery.next_lsn:
            raise RuntimeError("Wal.load() must run before the first append")
        recovery = self._recovery
        snapshot = choose_snapshot(
            self._files, self._directory, recovery.first_lsn, recovery.next_lsn
        )
        start = snapshot.lsn + 1 if snapshot is not None else 1
        return snapshot, self._records_from(start)

    def _records_from(self, start: int) -> Iterator[tuple[int, bytes]]:
        listed = self._recovery.segments
        for index, (first_lsn, path, end) in enumerate(listed):
            if index + 1 < len(listed) and listed[index + 1][0] <= start:
                continue
            data = self._files.read(path)
            try:
                if decode_segment_header(data) != first_lsn:
                    raise BadSegmentHeader("segment header changed since open")
                for lsn, body in iter_records(data, first_lsn, end):
                    if lsn >= start:
                        yield lsn, body
            except RecordError as exc:
                raise WalCorruption(path, exc.offset, exc.detail) from exc
            except BadSegmentHeader as exc:
                raise WalCorruption(path, 0, str(exc)) from exc

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
