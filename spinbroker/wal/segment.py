"""Segment files: their names, their durable creation, and appending to the active one.

Holds the naming rule (`wal-<first lsn as 16 hex digits>.log`), `create_segment` (temp file,
header, preallocation, fsync, rename, fsync of the directory), `SegmentList` (the segments
in LSN order, shared by the IO thread that rolls and the snapshotter that deletes), and
`SegmentWriter`, which appends frames to the newest segment and syncs them.

`SegmentWriter` is confined to the one IO thread of a `Wal`; it must never be called from the
event loop. The invariants it keeps:

* bytes are written only at the end of what is already written, in LSN order;
* a segment is synced in full before the next one is created, so only the newest segment
  can ever hold a torn write;
* frames after the last successful sync are kept in memory until a sync covers them. After
  any failed write or sync the file is truncated back to the last synced offset and all of
  them are written again: a failed fdatasync may have dropped the dirty pages (Linux marks
  them clean), so a later fsync alone would return success for data never stored.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

from spinbroker.wal.files import FileLayer, WalFile, rename_durably
from spinbroker.wal.frame import SEGMENT_HEADER_SIZE, encode_segment_header

log = logging.getLogger("spinbroker.wal")

_SEGMENT_NAME = re.compile(r"wal-([0-9a-f]{16})\.log")
TMP_SUFFIX = ".tmp"


def segment_name(first_lsn: int) -> str:
    return f"wal-{first_lsn:016x}.log"


def parse_segment_name(name: str) -> int | None:
    match = _SEGMENT_NAME.fullmatch(name)
    return int(match.group(1), 16) if match else None


def list_segments(files: FileLayer, directory: Path) -> list[tuple[int, Path]]:
    """(first LSN by name, path) of every segment file, in LSN order."""
    found = []
    for name in files.listdir(directory):
        lsn = parse_segment_name(name)
        if lsn is not None:
            found.append((lsn, directory / name))
    return sorted(found)


def create_segment(
    files: FileLayer, directory: Path, first_lsn: int, preallocate: int
) -> tuple[Path, WalFile]:
    """Create `wal-<first_lsn>.log` holding only its header, durably, and open it.

    Preallocation is best effort: without it the log is as correct, only its syncs are slower.
    """
    path = directory / segment_name(first_lsn)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with contextlib.suppress(FileNotFoundError):
        files.remove(tmp)
    handle = files.create(tmp)
    try:
        handle.pwrite(encode_segment_header(first_lsn), 0)
        allocate(handle, preallocate)
        handle.sync()
        rename_durably(files, tmp, path)
    except BaseException:
        handle.close()
        raise
    return path, handle


def allocate(handle: WalFile, size: int) -> None:
    """Preallocate up to `size` bytes if asked; a failure only costs speed."""
    if size <= 0:
        return
    try:
        handle.allocate(size)
    except OSError as exc:
        log.warning("wal: cannot preallocate %d bytes (%s); continuing without", size, exc)


class SegmentList:
    """The segments of a log in LSN order; the last one is the active segment."""

    def __init__(self, segments: list[tuple[int, Path]]) -> None:
        self._lock = threading.Lock()
        self._segments = list(segments)

    def add(self, first_lsn: int, path: Path) -> None:
        with self._lock:
            self._segments.append((first_lsn, path))

    def snapshot(self) -> list[tuple[int, Path]]:
        with self._lock:
            return list(self._segments)

    def take_covered(self, lsn: int) -> list[Path]:
        """Remove and return the sealed segments whose every record has an LSN <= `lsn`."""
        with self._lock:
            count = 0
            while count + 1 < len(self._segments) and self._segments[count + 1][0] <= lsn + 1:
                count += 1
            taken = [path for _, path in self._segments[:count]]
            del self._segments[:count]
            return taken


class SegmentWriter:
    """Appends frames to the active segment and syncs them (see the module docstring)."""

    def __init__(
        self,
        files: FileLayer,
        directory: Path,
        handle: WalFile,
        *,
        end: int,
        next_lsn: int,
        segment_size: int,
        preallocate: bool,
        on_roll: Callable[[int, Path], None],
    ) -> None:
        self._files = files
        self._directory = directory
        self._handle: WalFile | None = handle
        self._segment_size = segment_size
        self._preallocate = segment_size if preallocate else 0
        self._on_roll = on_roll
        self._synced_offset = end
        self._written_offset = end
        #: Frames from the synced offset on; the first `_written` of them are in the file.
        self._unsynced: list[bytes] = []
        self._written = 0
        self._last_lsn = next_lsn - 1
        self.written_lsn = next_lsn - 1
        self.synced_lsn = next_lsn - 1
        self._needs_rewind = False

    def flush(self, frames: list[bytes], last_lsn: int, sync: bool) -> None:
        """Append `frames` (ending with `last_lsn`) after any earlier ones, write everything
        unwritten, and if `sync`, make it durable. Raises OSError; the next call then
        rewinds to the last synced offset and writes everything after it again."""
        if frames:
            self._unsynced.extend(frames)
            self._last_lsn = last_lsn
        try:
            if self._needs_rewind:
                self._rewind()
            unwritten = self._written < len(self._unsynced)
            if unwritten and self._written_offset >= self._segment_size:
                self._roll()
            if unwritten:
                self._write()
            if sync and self._written:
                self._sync()
        except OSError:
            self._needs_rewind = True
            raise

    @property
    def rolls_next(self) -> bool:
        """Whether the next write starts a new segment (seals this one: an fdatasync, a
        directory sync and the head's update, see `_roll`)."""
        return self._written_offset >= self._segment_size

    def seal(self) -> None:
        """Sync whatever is written (used on close, in every fsync mode)."""
        self.flush([], self._last_lsn, sync=True)

    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.close()

    def _file(self) -> WalFile:
        if self._handle is None:
            raise OSError("wal segment writer is closed")
        return self._handle

    def _write(self) -> None:
        data = b"".join(self._unsynced[self._written :])
        self._file().pwrite(data, self._written_offset)
        self._written_offset += len(data)
        self._written = len(self._unsynced)
        self.written_lsn = self._last_lsn

    def _sync(self) -> None:
        self._file().datasync()
        self._synced_offset = self._written_offset
        del self._unsynced[: self._written]
        self._written = 0
        self.synced_lsn = self.written_lsn

    def _rewind(self) -> None:
        handle = self._file()
        handle.truncate(self._synced_offset)
        allocate(handle, self._preallocate)
        self._written_offset = self._synced_offset
        self._written = 0
        self.written_lsn = self.synced_lsn
        self._needs_rewind = False

    def _roll(self) -> None:
        if self._written:
            self._sync()
        first_lsn = self.synced_lsn + 1
        path, handle = create_segment(self._files, self._directory, first_lsn, self._preallocate)
        old, self._handle = self._handle, handle
        self._synced_offset = self._written_offset = SEGMENT_HEADER_SIZE
        self._on_roll(first_lsn, path)
        if old is not None:
            try:
                old.close()
            except OSError as exc:
                log.warning("wal: closing a sealed segment failed: %s", exc)
