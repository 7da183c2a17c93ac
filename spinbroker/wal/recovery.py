"""Opening a log directory: scan every segment, cut a torn tail, refuse corruption.

Holds `scan_directory` (read-only: every segment checked, frame by frame, plus the LSN
continuity between segments), `first_problem` (the earliest spot that is not a good record),
and `recover`, which `Wal.open` calls: it deletes leftover temp files, cuts a torn tail of the
newest segment (keeping the cut bytes in `<segment>.torn-<offset>` and logging a warning with
file, offset and bytes dropped), and raises `WalCorruption` for anything else. Must never
write records, and never repair corruption silently: that is repair.py, run by a person.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from spinbroker.wal.errors import WalCorruption
from spinbroker.wal.files import FileLayer, rename_durably, write_file_durably
from spinbroker.wal.frame import BadSegmentHeader, decode_segment_header
from spinbroker.wal.reader import Damage, SegmentScan, scan_segment
from spinbroker.wal.segment import TMP_SUFFIX, list_segments
from spinbroker.wal.snapshot import list_snapshots

log = logging.getLogger("spinbroker.wal")


@dataclass(frozen=True, slots=True)
class ScannedSegment:
    path: Path
    scan: SegmentScan


@dataclass(frozen=True, slots=True)
class Problem:
    """The earliest spot of the log that is not a good record."""

    index: int
    file: Path
    offset: int
    detail: str
    #: A torn write at the end of the newest segment: recovery may cut it.
    torn: bool
    #: Offset past the written data of the file (what cutting at `offset` drops).
    data_end: int


@dataclass(frozen=True, slots=True)
class TornTail:
    file: Path
    offset: int
    #: Bytes cut from the end of the segment (whole zero sectors after them, preallocated
    #: space, are not counted).
    dropped: int
    #: Where the cut bytes were kept.
    saved_to: Path
    detail: str


@dataclass(frozen=True, slots=True)
class Recovery:
    """What `Wal.open` found and did."""

    directory: Path
    #: (first LSN, path, end of the good records) of every segment, oldest first.
    segments: tuple[tuple[int, Path, int], ...]
    #: The first LSN the log holds (== next_lsn when it holds none).
    first_lsn: int
    #: The LSN the next append gets.
    next_lsn: int
    torn: TornTail | None
    removed_temp: tuple[Path, ...]


def scan_directory(files: FileLayer, directory: Path) -> list[ScannedSegment]:
    """Every segment of `directory`, each fully checked. Reads one segment at a time."""
    scanned = []
    for name_lsn, path in list_segments(files, directory):
        data = files.read(path)
        try:
            first_lsn = decode_segment_header(data)
        except BadSegmentHeader as exc:
            damage = Damage(0, str(exc), False, len(data))
            scanned.append(ScannedSegment(path, SegmentScan(name_lsn, 0, 0, len(data), damage)))
            continue
        if first_lsn != name_lsn:
            detail = f"header names LSN {first_lsn}, the file name {name_lsn}"
            damage = Damage(0, detail, False, len(data))
            scanned.append(ScannedSegment(path, SegmentScan(name_lsn, 0, 0, len(data), damage)))
            continue
        scanned.append(ScannedSegment(path, scan_segment(data, first_lsn)))
    return scanned


def first_problem(segments: list[ScannedSegment]) -> Problem | None:
    """The earliest damage or LSN discontinuity; `torn` only for the newest segment."""
    for index, segment in enumerate(segments):
        scan = segment.scan
        if index > 0:
            expected = segments[index - 1].scan.next_lsn
            if scan.first_lsn != expected:
                detail = f"segment starts at LSN {scan.first_lsn}, expected {expected}"
                return Problem(index, segment.path, 0, detail, False, scan.size)
        damage = scan.damage
        if damage is not None:
            torn = damage.torn and index == len(segments) - 1
            return Problem(index, segment.path, damage.offset, damage.detail, torn, damage.data_end)
    return None


def recover(files: FileLayer, directory: Path) -> Recovery:
    """Make `directory` a log that can be appended to; see the module docstring."""
    files.makedirs(directory)
    removed = _remove_temp_files(files, directory)
    segments = scan_directory(files, directory)
    problem = first_problem(segments)
    torn = None
    if problem is not None:
        if not problem.torn:
            raise WalCorruption(problem.file, problem.offset, problem.detail)
        torn = cut_tail(files, problem)
    listed = tuple((s.scan.first_lsn, s.path, s.scan.end) for s in segments)
    if segments:
        first_lsn, next_lsn = segments[0].scan.first_lsn, segments[-1].scan.next_lsn
    else:
        snapshots = list_snapshots(files, directory)
        first_lsn = next_lsn = snapshots[-1][0] + 1 if snapshots else 1
    return Recovery(directory, listed, first_lsn, next_lsn, torn, removed)


def cut_tail(files: FileLayer, problem: Problem) -> TornTail:
    """Keep the bytes from `problem.offset` on aside, durably, then truncate the segment."""
    data = files.read(problem.file)
    cut = data[problem.offset : problem.data_end]
    name = f"{problem.file.name}.torn-{problem.offset}"
    saved = _unused_name(files, problem.file.with_name(name))
    tmp = saved.with_name(saved.name + TMP_SUFFIX)
    write_file_durably(files, tmp, cut)
    rename_durably(files, tmp, saved)
    handle = files.open(problem.file)
    try:
        handle.truncate(problem.offset)
        handle.sync()
    finally:
        handle.close()
    log.warning(
        "wal: torn tail cut: %s at offset %d, %d bytes dropped (kept in %s): %s",
        problem.file,
        problem.offset,
        len(cut),
        saved.name,
        problem.detail,
    )
    return TornTail(problem.file, problem.offset, len(cut), saved, problem.detail)


def _unused_name(files: FileLayer, path: Path) -> Path:
    taken = set(files.listdir(path.parent))
    candidate, n = path, 0
    while candidate.name in taken:
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _remove_temp_files(files: FileLayer, directory: Path) -> tuple[Path, ...]:
    """Temp files are half-made segments, snapshots or torn copies: never part of the log."""
    removed = []
    for name in files.listdir(directory):
        if name.endswith(TMP_SUFFIX) and (name.startswith("wal-") or name.startswith("snap-")):
            files.remove(directory / name)
            removed.append(directory / name)
    if removed:
        files.sync_dir(directory)
    return tuple(removed)
