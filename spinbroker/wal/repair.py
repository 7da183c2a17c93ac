"""Repairing a damaged log, on a person's request, without destroying anything.

Holds `repair(directory)`: it finds the earliest damage, copies or moves every file it
changes into a new `repair-<time>/` directory inside the log directory, and then either
drops the damaged segment (when a valid snapshot already covers all its records) or
truncates it at the damaged offset and moves the later segments into the backup (if a
snapshot is then past the end of the cut log, it holds more state than the log: the log's
remaining segments go aside instead, and the log restarts after the snapshot). A damaged
segment or snapshot header is written again from the file name instead when what follows
it checks (a segment header holds nothing else; a snapshot's body checksum must fit).
Invalid snapshots are moved into the backup too, and a log head (head.py) that is damaged
or names a segment that is gone is made to name the newest one left. It returns what it
did. Must never run implicitly: `Wal.open` refuses corruption, a person runs `spinbroker
wal repair DATADIR`. Must never touch a log holding a segment, snapshot or head of a newer
format version: that is no damage but a newer spinbroker's log, and cutting it would lose
what that version wrote; unless a person names the file (`--not-newer`), and then only
after checking that the log, with those files' magic put back, is not refused still.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from spinbroker.wal import frame, snapshot
from spinbroker.wal.errors import WalCorruption, WalNewerVersion
from spinbroker.wal.files import (
    FileLayer,
    OsFiles,
    WalFile,
    rename_durably,
    truncate_durably,
    write_file_durably,
)
from spinbroker.wal.head import (
    HEAD_NAME,
    head_path,
    missing_newest,
    read_head,
    write_head,
)
from spinbroker.wal.head import MAGIC as HEAD_MAGIC
from spinbroker.wal.reader import frames_after
from spinbroker.wal.recovery import (
    Problem,
    ScannedSegment,
    check_segment,
    first_problem,
    scan_directory,
)
from spinbroker.wal.segment import (
    TMP_SUFFIX,
    SegmentList,
    list_segments,
    parse_segment_name,
    segment_name,
)
from spinbroker.wal.snapshot import (
    BadSnapshot,
    choose_snapshot,
    list_snapshots,
    parse_snapshot_name,
    read_snapshot,
)

_MAX_ROUNDS = 1000


class UnknownFile(ValueError):
    """`--not-newer` named no segment, snapshot or head of the log (nothing was changed)."""


@dataclass(slots=True)
class RepairReport:
    directory: Path
    #: Every damage found, in the order it was handled.
    problems: list[Problem] = field(default_factory=list)
    #: Where the originals went (None if nothing needed repair).
    backup: Path | None = None
    #: (segment, offset) for each truncation.
    truncated: list[tuple[Path, int]] = field(default_factory=list)
    #: Files moved into the backup (they no longer belong to the log).
    moved: list[Path] = field(default_factory=list)
    #: Files whose damaged magic was put back (their originals are in the backup).
    restored: list[Path] = field(default_factory=list)
    #: Segments and snapshots whose damaged header was written again from the file name
    #: (what follows it checks; the originals are kept).
    rebuilt: list[Path] = field(default_factory=list)
    #: The log head was rewritten (it was damaged or named a segment that is gone), to name
    #: the segment starting at `head_lsn`, or removed when none is left (`head_lsn` None).
    head_fixed: bool = False
    head_lsn: int | None = None
    #: Why the log still cannot be loaded, if it cannot.
    remaining: str | None = None
    #: LSNs [first, end) a cut took out of the log: records acknowledged once, and gone
    #: unless restored from the backup by hand (None if no cut dropped any).
    dropped: tuple[int, int] | None = None
    #: Why nothing was even looked at for damage: the log is a newer spinbroker's (see
    #: `newer_version`). `remaining` says the same.
    refused: str | None = None

    @property
    def changed(self) -> bool:
        return bool(
            self.truncated or self.moved or self.restored or self.rebuilt or self.head_fixed
        )

    def describe(self) -> str:
        lines = [f"wal repair of {self.directory}"]
        if self.refused is not None:
            lines.append(f"  refused, nothing changed: {self.refused}")
            lines.append(
                "  if no newer spinbroker wrote that file (a header damaged twice reads as a"
                " newer version's): spinbroker wal repair --not-newer FILE DATADIR"
            )
            return "\n".join(lines)
        if not self.changed:
            lines.append("  nothing to repair")
        for problem in self.problems:
            lines.append(f"  found: {problem.file.name} offset {problem.offset}: {problem.detail}")
        for path in self.restored:
            lines.append(f"  restored the header magic of {path.name} (original kept)")
        for path in self.rebuilt:
            lines.append(
                f"  rebuilt the header of {path.name} from its name: what follows it checks"
                " (original kept)"
            )
        for path, offset in self.truncated:
            lines.append(f"  truncated {path.name} at offset {offset} (original kept)")
        for path in self.moved:
            lines.append(f"  moved {path.name} into the backup")
        if self.head_fixed:
            lsn = self.head_lsn
            done = "removed (no segment is left)" if lsn is None else f"names {segment_name(lsn)}"
            lines.append(f"  the log head now {done} (original kept)")
        if self.dropped is not None:
            first, end = self.dropped
            lines.append(
                f"  dropped at least {end - first} records, LSN {first} to {end - 1} (their bytes"
                " are in the backup)"
            )
        if self.backup is not None:
            lines.append(f"  backup: {self.backup}")
        if self.remaining is not None:
            lines.append(f"  the log still cannot be loaded: {self.remaining}")
        else:
            lines.append("  the log opens")
        return "\n".join(lines)


def repair(
    directory: Path, files: FileLayer | None = None, not_newer: Collection[str] = ()
) -> RepairReport:
    """Make `directory` a log that opens and loads, keeping every changed file in a backup.

    `not_newer` names files of `directory` that a person knows no newer spinbroker wrote
    (`wal repair --not-newer FILE`): a header damaged in its version *and* elsewhere fits
    no checksum and reads as a newer version's, which repair must otherwise leave alone.
    Their magic is put back to this version's first, as for a damaged magic alone (the
    originals are kept), and what is still damaged is then repaired as any damage.
    Raises UnknownFile for a name that is not a segment, snapshot or the head there.
    Nothing is changed before every name is found and the log, with those files' magic
    put back, is known not to be refused as a newer version's."""
    files = files if files is not None else OsFiles()
    report = RepairReport(directory)
    assumed = _assumed_this_version(files, directory, not_newer)
    seen = _Overlay(files, {path: _with_magic(*found) for path, found in assumed.items()})
    report.refused = newer_version(seen, directory, scan_directory(seen, directory))
    if report.refused is not None:
        report.remaining = report.refused
        return report
    for path, (data, magic) in assumed.items():
        _put_magic_back(files, directory, path, data, magic, report)
    _restore_magic(files, directory, report)
    _set_aside_bad_snapshots(files, directory, report)
    for _ in range(_MAX_ROUNDS):
        segments = scan_directory(files, directory)
        problem = first_problem(segments)
        if problem is None:
            break
        report.problems.append(problem)
        if _rebuild_header(files, directory, segments[problem.index], report):
            continue
        if not _drop_covered(files, directory, segments, problem, report):
            _truncate(files, directory, segments, problem, report)
    restarted = _restart_after_snapshot(files, directory, scan_directory(files, directory), report)
    _fix_head(files, directory, report, restarted)
    report.remaining = _check_loads(files, directory)
    return report


def newer_version(files: FileLayer, directory: Path, segments: list[ScannedSegment]) -> str | None:
    """Which file of `directory` (scanned into `segments`) a newer spinbroker wrote, and
    why it is taken for one, if any does: a segment or a snapshot of a newer format version.
    Such a log is not this version's to judge, let alone cut."""
    problem = first_problem(segments)
    if problem is not None and problem.newer:
        return f"{problem.file.name}: {problem.detail}"
    try:
        read_head(files, directory)
    except WalNewerVersion as exc:
        return f"{exc.file.name}: {exc.detail}"
    except WalCorruption:
        pass  # damage: `_fix_head`
    # The snapshots a start would read (choose_snapshot): newest first, up to the first
    # valid one. A newer version's snapshot behind that one is never read; it stays.
    for lsn, path in reversed(list_snapshots(files, directory)):
        try:
            read_snapshot(files, lsn, path)
        except WalNewerVersion as exc:
            return f"{path.name}: {exc.detail}"
        except BadSnapshot:
            continue
        return None
    return None


def _restore_magic(files: FileLayer, directory: Path, report: RepairReport) -> None:
    """A segment or snapshot of this version whose magic alone is damaged (its header's
    checksum fits this version's magic) holds intact records: put the magic back, keeping
    the original in the backup, rather than cut the log or drop the snapshot there."""
    paths = [(path, True) for _, path in list_segments(files, directory)]
    paths += [(path, False) for _, path in list_snapshots(files, directory)]
    for path, is_segment in paths:
        data = files.read(path)
        if is_segment and frame.damaged_magic_only(data):
            magic = frame.SEGMENT_MAGIC
        elif not is_segment and snapshot.damaged_magic_only(data):
            magic = snapshot.MAGIC
        else:
            continue
        _put_magic_back(files, directory, path, data, magic, report)


def _rebuild_header(
    files: FileLayer, directory: Path, segment: ScannedSegment, report: RepairReport
) -> bool:
    """A segment whose header is damaged (as one named by `--not-newer` always is: its
    damage lies in the checked bytes) but whose records are intact: a header holds nothing
    but this version's magic and the first LSN, which the file name gives, so write it
    again (keeping the original) rather than cut the segment, and every later one, at
    offset 0. Only if the records after it then check from that LSN on. Whether it did."""
    damage = segment.scan.damage
    name_lsn = parse_segment_name(segment.path.name)
    if damage is None or damage.offset != 0 or damage.newer or name_lsn is None:
        return False
    data = files.read(segment.path)
    fixed = frame.encode_segment_header(name_lsn) + data[frame.SEGMENT_HEADER_SIZE :]
    if fixed == data or check_segment(name_lsn, fixed).records == 0:
        return False
    _replace(files, directory, segment.path, data, fixed, report)
    report.rebuilt.append(segment.path)
    return True


def _assumed_this_version(
    files: FileLayer, directory: Path, names: Collection[str]
) -> dict[Path, tuple[bytes, bytes]]:
    """The files a person says no newer spinbroker wrote (see `repair`): for each, its
    content and the magic of this version's file of its kind; those that hold that magic
    already are left out. Reads only: raises UnknownFile for a name that is no file of the
    log."""
    present = set(files.listdir(directory))
    assumed: dict[Path, tuple[bytes, bytes]] = {}
    for name in names:
        if name not in present:
            raise UnknownFile(
                f"{directory / name}: no such file in the log (give the name as "
                "`spinbroker wal inspect` lists it)"
            )
        if parse_segment_name(name) is not None:
            magic = frame.SEGMENT_MAGIC
        elif parse_snapshot_name(name) is not None:
            magic = snapshot.MAGIC
        elif name == HEAD_NAME:
            magic = HEAD_MAGIC
        else:
            raise UnknownFile(f"{directory / name}: not a segment, snapshot or head")
        path = directory / name
        data = files.read(path)
        if not data.startswith(magic):
            assumed[path] = (data, magic)
    return assumed


class _Overlay:
    """`files` as it would read with some files' content replaced: what repair checks
    before it changes anything. Only reading is ever asked of it."""

    def __init__(self, files: FileLayer, content: dict[Path, bytes]) -> None:
        self._files = files
        self._content = content

    def read(self, path: Path) -> bytes:
        found = self._content.get(path)
        return found if found is not None else self._files.read(path)

    def listdir(self, directory: Path) -> list[str]:
        return self._files.listdir(directory)

    def create(self, path: Path) -> WalFile:
        raise _read_only(path)

    def open(self, path: Path) -> WalFile:
        raise _read_only(path)

    def rename(self, src: Path, dst: Path) -> None:
        raise _read_only(src)

    def remove(self, path: Path) -> None:
        raise _read_only(path)

    def sync_dir(self, directory: Path) -> None:
        raise _read_only(directory)

    def makedirs(self, directory: Path) -> None:
        raise _read_only(directory)


def _read_only(path: Path) -> OSError:
    return PermissionError(f"{path}: repair's check before any change only reads")


def _put_magic_back(
    files: FileLayer, directory: Path, path: Path, data: bytes, magic: bytes, report: RepairReport
) -> None:
    _replace(files, directory, path, data, _with_magic(data, magic), report)
    report.restored.append(path)


def _with_magic(data: bytes, magic: bytes) -> bytes:
    return magic + data[len(magic) :]


def _replace(
    files: FileLayer, directory: Path, path: Path, data: bytes, fixed: bytes, report: RepairReport
) -> None:
    """Replace `path` (holding `data`) with `fixed`, durably, keeping the original."""
    _keep_copy(files, directory, report, path, data)
    temporary = path.with_name(path.name + TMP_SUFFIX)
    with contextlib.suppress(FileNotFoundError):  # left by a crash
        files.remove(temporary)
    write_file_durably(files, temporary, fixed)
    rename_durably(files, temporary, path)


def _backup(files: FileLayer, directory: Path, report: RepairReport) -> Path:
    if report.backup is None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        taken = set(files.listdir(directory))
        name, n = f"repair-{stamp}", 0
        while name in taken:
            n += 1
            name = f"repair-{stamp}.{n}"
        report.backup = directory / name
        files.makedirs(report.backup)
    return report.backup


def _backup_path(files: FileLayer, directory: Path, report: RepairReport, name: str) -> Path:
    """An unused name for `name` in the backup: a file kept twice in one repair (its magic
    put back, then cut or moved) keeps every version, the original under its own name."""
    backup = _backup(files, directory, report)
    taken = set(files.listdir(backup))
    candidate, n = name, 0
    while candidate in taken:
        n += 1
        candidate = f"{name}.{n}"
    return backup / candidate


def _keep_copy(
    files: FileLayer, directory: Path, report: RepairReport, path: Path, data: bytes
) -> None:
    target = _backup_path(files, directory, report, path.name)
    write_file_durably(files, target, data)
    files.sync_dir(target.parent)


def _move(files: FileLayer, directory: Path, path: Path, report: RepairReport) -> None:
    target = _backup_path(files, directory, report, path.name)
    files.rename(path, target)
    files.sync_dir(target.parent)
    files.sync_dir(directory)
    report.moved.append(path)


def _set_aside_bad_snapshots(files: FileLayer, directory: Path, report: RepairReport) -> None:
    for lsn, path in list_snapshots(files, directory):
        try:
            read_snapshot(files, lsn, path)
        except BadSnapshot as exc:
            report.problems.append(Problem(-1, path, exc.offset, exc.detail, False, 0))
            data = files.read(path)
            fixed = snapshot.rebuilt_header(data, lsn)
            if fixed is not None and fixed != data:  # the header alone is damaged
                _replace(files, directory, path, data, fixed, report)
                report.rebuilt.append(path)
            else:
                _move(files, directory, path, report)
        except WalNewerVersion:
            continue  # no damage; behind a valid snapshot (newer_version), never read


def _newest_valid_snapshot(files: FileLayer, directory: Path) -> int | None:
    for lsn, path in reversed(list_snapshots(files, directory)):
        try:
            read_snapshot(files, lsn, path)
        except (BadSnapshot, WalNewerVersion):
            continue
        return lsn
    return None


def _drop_covered(
    files: FileLayer,
    directory: Path,
    segments: list[ScannedSegment],
    problem: Problem,
    report: RepairReport,
) -> bool:
    """If a valid snapshot holds every record of the damaged segment, drop it and the
    segments before it: nothing is lost but the fallback to an older snapshot."""
    snapshot_lsn = _newest_valid_snapshot(files, directory)
    listed = SegmentList([(s.scan.first_lsn, s.path) for s in segments])
    if snapshot_lsn is None or problem.index + 1 >= len(segments):
        return False
    covered = listed.take_covered(snapshot_lsn)
    if len(covered) <= problem.index:
        return False
    for path in covered[: problem.index + 1]:
        _move(files, directory, path, report)
    return True


def _restart_after_snapshot(
    files: FileLayer, directory: Path, segments: list[ScannedSegment], report: RepairReport
) -> bool:
    """The newest valid snapshot goes past the end of the log: the log's newest segment
    is missing (deleted, lost with a disk). The snapshot holds everything the log did up
    to its LSN, so the log is set aside and restarts after it. Records past the
    snapshot's LSN, if the missing segment held any, are gone: nothing can bring them
    back, and the report says so. Returns whether it did that."""
    snapshot_lsn = _newest_valid_snapshot(files, directory)
    if not segments or snapshot_lsn is None:
        return False
    end = segments[-1].scan.next_lsn
    if snapshot_lsn < end:
        return False
    detail = (
        f"the log ends before LSN {end} but snapshot {snapshot_lsn} goes past it: a segment "
        f"is missing; the log restarts after the snapshot (records after LSN "
        f"{snapshot_lsn}, if the missing segment held any, are lost)"
    )
    last = segments[-1]
    report.problems.append(Problem(-1, last.path, last.scan.end, detail, False, 0))
    for segment in segments:
        _move(files, directory, segment.path, report)
    return True


def _truncate(
    files: FileLayer,
    directory: Path,
    segments: list[ScannedSegment],
    problem: Problem,
    report: RepairReport,
) -> None:
    """Cut the log at the damage: keep a copy of the segment, truncate it (or move it whole
    if the damage is at its start), move every later segment aside."""
    damaged = segments[problem.index]
    original = files.read(damaged.path)
    if problem.offset == 0:
        _move(files, directory, damaged.path, report)
        next_lsn = damaged.scan.first_lsn
    else:
        _keep_copy(files, directory, report, damaged.path, original)
        truncate_durably(files, damaged.path, problem.offset)
        report.truncated.append((damaged.path, problem.offset))
        next_lsn = damaged.scan.next_lsn
    for later in segments[problem.index + 1 :]:
        _move(files, directory, later.path, report)
    # Everything from the damage to the end of the log is gone from it, unless a snapshot
    # holds part of it. The end is a lower bound: the damaged record's own count cannot be
    # read, and a later segment may itself end early.
    first, end = next_lsn, max(next_lsn + 1, segments[-1].scan.next_lsn)
    if problem.index + 1 == len(segments):  # intact frames after the damage say more
        end = max(end, _end_after(original, problem.offset, next_lsn))
    snapshots = list_snapshots(files, directory)
    if snapshots and snapshots[-1][0] >= next_lsn:
        # A snapshot holds more than the cut log: keep it, set the shorter log aside.
        for kept in segments[: problem.index + 1]:
            if kept.path.name in files.listdir(directory):
                _move(files, directory, kept.path, report)
        first = snapshots[-1][0] + 1
    if first < end:
        earlier = report.dropped
        report.dropped = (first, end) if earlier is None else (min(first, earlier[0]), end)


def _fix_head(files: FileLayer, directory: Path, report: RepairReport, restarted: bool) -> None:
    """Make the log head name the newest segment left, if it is damaged or names one that
    is gone: lost (reported here: whatever it held is gone, unless the log `restarted`
    after a snapshot holding it) or set aside by this repair (reported with the cut). A
    head naming an older segment is left to `Wal.open`."""
    segments = list_segments(files, directory)
    newest = segments[-1][0] if segments else None
    path = head_path(directory)
    try:
        head = read_head(files, directory)
    except WalCorruption as exc:
        report.problems.append(Problem(-1, path, exc.offset, exc.detail, False, 0))
    else:
        lost = None if head is None else missing_newest(head, newest)
        if lost is None:
            return
        assert head is not None
        if not restarted and directory / segment_name(head.first_lsn) not in report.moved:
            report.problems.append(Problem(-1, path, 0, lost.detail, False, 0))
    _keep_copy(files, directory, report, path, files.read(path))
    if newest is None:
        files.remove(path)
        files.sync_dir(directory)
    else:
        write_head(files, directory, newest)
    report.head_fixed, report.head_lsn = True, newest


def _end_after(data: bytes, offset: int, lsn: int) -> int:
    """Past the last LSN of the intact frames after the damage at `offset` (0 if none)."""
    end = 0
    for _, frame_lsn, count in frames_after(data, offset + 1, len(data), lsn):
        end = frame_lsn + count
    return end


def _check_loads(files: FileLayer, directory: Path) -> str | None:
    segments = scan_directory(files, directory)
    problem = first_problem(segments)
    if problem is not None:
        return f"{problem.file.name} offset {problem.offset}: {problem.detail}"
    if not segments:
        return None
    try:
        choose_snapshot(files, directory, segments[0].scan.first_lsn, segments[-1].scan.next_lsn)
    except WalCorruption as exc:
        return str(exc)
    return None
