"""Opening a log directory: scan every segment, cut a torn tail, refuse corruption.

Holds `scan_directory` (read-only: every segment checked, frame by frame, plus the LSN
continuity between segments), `first_problem` (the earliest spot that is not a good record),
and `recover`, which `Wal.open` calls: it deletes leftover temp files, cuts a torn tail of the
newest segment (keeping the cut bytes in `<segment>.torn-<offset>` and logging a warning with
file, offset and bytes dropped), and raises `WalCorruption` for anything else. A segment of
a newer format version is no damage: for it, `recover` raises `WalNewerVersion` before it
changes anything. A newest segment older than the one the log head names is lost (head.py):
`WalCorruption`. Must never write records, and never repair corruption silently: that is
repair.py, run by a person.

`recover` also hands back the bytes it checked (up to a memory budget), so that `Wal.load`
replays from them without reading and checking every frame a second time; a segment beyond
the budget is read and checked again at load. Given a `ReadAhead`, it reads the next segment
and the newest snapshot (which `Wal.load` reads next) while it checks the current segment.
Checking is Python, one core's work: when the kept segments are large, a forked child checks
the newer half of them (it sees the very bytes this process read, copy-on-write) while this
process checks the rest; if the child fails in any way, its half is checked here.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import pickle
import signal
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from spinbroker.wal.errors import WalCorruption, WalNewerVersion
from spinbroker.wal.files import (
    FileLayer,
    ReadAhead,
    rename_durably,
    truncate_durably,
    write_file_durably,
)
from spinbroker.wal.frame import BadSegmentHeader, NewerSegment, decode_segment_header
from spinbroker.wal.head import HEAD_NAME, missing_newest, read_head
from spinbroker.wal.reader import Damage, SegmentScan, scan_segment
from spinbroker.wal.segment import TMP_SUFFIX, list_segments
from spinbroker.wal.snapshot import list_snapshots

log = logging.getLogger("spinbroker.wal")


#: Default budget of segment bytes `recover` keeps for `Wal.load` (see the module docstring).
KEEP_CHECKED_BYTES = 512 << 20
#: Kept segments totalling this much are checked by two processes (see `scan_directory`).
FORK_CHECK_BYTES = 32 << 20
#: prctl(2): the signal a process gets when the thread that forked it ends (Linux).
_PR_SET_PDEATHSIG = 1


def _find_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up here in the parent, not in a forked child."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _find_prctl()


@dataclass(frozen=True, slots=True)
class ScannedSegment:
    path: Path
    scan: SegmentScan
    #: The bytes `scan` was made from, if the caller asked to keep them.
    data: bytes | None = None


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
    #: Not damage: a segment of a newer format version (see `frame.NewerSegment`).
    newer: bool = False


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
    #: The first LSN of the newest segment as the log head names it (None: no head yet).
    head: int | None = None


def check_segment(name_lsn: int, data: bytes) -> SegmentScan:
    """The bytes of the segment named for `name_lsn`, fully checked. Pure: a forked child
    runs it too (see `scan_directory`)."""
    try:
        first_lsn = decode_segment_header(data)
    except NewerSegment as exc:
        damage = Damage(0, str(exc), False, len(data), newer=True)
        return SegmentScan(name_lsn, 0, 0, len(data), damage)
    except BadSegmentHeader as exc:
        return SegmentScan(name_lsn, 0, 0, len(data), Damage(0, str(exc), False, len(data)))
    if first_lsn != name_lsn:
        detail = f"header names LSN {first_lsn}, the file name {name_lsn}"
        return SegmentScan(name_lsn, 0, 0, len(data), Damage(0, detail, False, len(data)))
    return scan_segment(data, first_lsn)


def scan_directory(
    files: FileLayer,
    directory: Path,
    keep_bytes: int = 0,
    reader: ReadAhead | None = None,
    fork_bytes: int | None = None,
) -> list[ScannedSegment]:
    """Every segment of `directory`, each fully checked, oldest first.

    The oldest segments are read first, and kept with the result, while they total at
    most `keep_bytes`; when they total `fork_bytes` (default FORK_CHECK_BYTES) or more, a
    forked child checks the newer half of them meanwhile (checking is Python: one core's
    work each). The rest are read and checked one at a time. With a `reader`, the next
    segment is read while the current one is handled."""
    fork_bytes = FORK_CHECK_BYTES if fork_bytes is None else fork_bytes
    listed = list_segments(files, directory)
    read = reader.read if reader is not None else files.read
    kept: list[tuple[int, Path, bytes]] = []
    total = 0
    scanned: list[ScannedSegment] = []
    for index, (name_lsn, path) in enumerate(listed):
        if reader is not None and index + 1 < len(listed):
            reader.ahead(listed[index + 1][1])
        data = read(path)
        if not scanned and total + len(data) <= keep_bytes:
            kept.append((name_lsn, path, data))
            total += len(data)
            continue
        if not scanned:
            scanned = _check_kept(kept, total >= fork_bytes)
        scanned.append(ScannedSegment(path, check_segment(name_lsn, data)))
    return scanned or _check_kept(kept, total >= fork_bytes)


def _check_kept(kept: list[tuple[int, Path, bytes]], fork: bool) -> list[ScannedSegment]:
    """Check the kept segments, the newer half (by bytes) in a forked child if `fork`."""
    split = _halfway(kept) if fork and len(kept) > 1 and _cores() > 1 else len(kept)
    child = _ChildCheck(kept[split:]) if split < len(kept) else None
    try:
        scans = [check_segment(name_lsn, data) for name_lsn, _, data in kept[:split]]
        if child is not None:
            scans.extend(child.results())
    finally:
        if child is not None:
            child.close()
    return [
        ScannedSegment(path, scan, data) for (_, path, data), scan in zip(kept, scans, strict=True)
    ]


def _halfway(segments: list[tuple[int, Path, bytes]]) -> int:
    """The index that splits `segments` (two or more) into two non-empty halves by bytes."""
    half = sum(len(data) for _, _, data in segments) / 2
    running = 0
    for index, (_, _, data) in enumerate(segments[:-1]):
        running += len(data)
        if running >= half:
            return index + 1
    return len(segments) - 1


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _ChildCheck:
    """Checks segments in a forked child, which sees the very bytes this process read
    (copy-on-write), while this process checks others. The child only ever saves time:
    if it cannot start, dies or answers garbage, `results` checks the segments here."""

    def __init__(self, segments: list[tuple[int, Path, bytes]]) -> None:
        self._segments = segments
        self._pid = 0
        self._pipe = -1
        if not hasattr(os, "fork"):
            return
        try:
            read_end, write_end = os.pipe()
        except OSError:
            return
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            log.warning("wal: cannot fork to check segments (%s); checking them here", exc)
            return
        if pid == 0:
            os.close(read_end)
            _child_main(segments, parent, write_end)
        os.close(write_end)
        self._pid, self._pipe = pid, read_end

    def results(self) -> list[SegmentScan]:
        """The child's scans (waiting for it), or else the scans made here."""
        answer = self._collect() if self._pid else None
        if answer is None:
            return [check_segment(name_lsn, data) for name_lsn, _, data in self._segments]
        return answer

    def close(self) -> None:
        """Stop and reap the child if it is still there (when this process failed)."""
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        if self._pid:
            with contextlib.suppress(OSError):
                os.kill(self._pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                self._reap()

    def _collect(self) -> list[SegmentScan] | None:
        try:
            with os.fdopen(self._pipe, "rb") as pipe:
                self._pipe = -1
                payload = pipe.read()  # to EOF: the child's end closes when it exits
            code = self._reap()
            failure = f"exit code {code}"
            answer = pickle.loads(payload) if code == 0 else None
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
            failure, answer = str(exc), None
        if (
            isinstance(answer, list)
            and len(answer) == len(self._segments)
            and all(isinstance(scan, SegmentScan) for scan in answer)
        ):
            return answer
        log.warning("wal: checking segments in a child failed (%s); checking them here", failure)
        return None

    def _reap(self) -> int:
        pid, self._pid = self._pid, 0
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)


def detach_forked_child(parent: int, keep: Collection[int] = ()) -> None:
    """First thing in a forked helper child (segment checks, snapshots) of `parent`:
    - die with it (Linux): the helper of a broker killed alone (kill -9, the OOM killer)
      must not hold on to its copy-on-write share of the broker's heap, nor go on writing,
      while the restarted broker recovers;
    - default SIGINT/SIGTERM with no wakeup fd, so that a signal meant for the child
      cannot reach the parent's event loop through the wakeup fd the child inherited;
    - close every descriptor inherited from the parent but stdio and `keep`. A copy the
      child held would outlive the parent's own close: of a connection the broker closes,
      its client would see no end until the child exits; of a listener, a restarted broker
      could not bind its address; of the data dir lock (a flock holds while any copy is
      open), a broker killed alone (kill -9, the OOM killer) could not restart until the
      child ended;
    - no cyclic collection, which would touch (and so copy) every page of the parent's
      heap."""
    _die_with(parent)
    with contextlib.suppress(ValueError):  # only the main thread may (re)set these
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
    first = 3
    for fd in sorted(keep):
        os.closerange(first, fd)
        first = max(first, fd + 1)
    os.closerange(first, max(first, os.sysconf("SC_OPEN_MAX")))
    gc.disable()


def _die_with(parent: int) -> None:
    """SIGKILL this process once `parent` ends (prctl PR_SET_PDEATHSIG; Linux only).
    Linux sends it when the *thread* that forked ends, so a helper must be forked from a
    thread that outlives it: the event loop's, or the thread that waits for the child."""
    if _PRCTL is None or _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # refused (seccomp): the helper just finishes on its own, as before
    if os.getppid() != parent:  # it ended before the prctl: nothing would signal this
        os._exit(1)


def _child_main(segments: list[tuple[int, Path, bytes]], parent: int, pipe: int) -> NoReturn:
    """The forked child: check, send the scans, exit without running any of the parent's
    cleanup (atexit, buffered files, the event loop)."""
    code = 1
    try:
        detach_forked_child(parent, keep=(pipe,))
        payload = pickle.dumps([check_segment(lsn, data) for lsn, _, data in segments])
        with os.fdopen(pipe, "wb") as out:
            out.write(payload)
        code = 0
    finally:
        os._exit(code)


def first_problem(segments: list[ScannedSegment]) -> Problem | None:
    """The earliest damage or LSN discontinuity; `torn` only for the newest segment. Before
    all of them, a segment of a newer format version (`newer`) wherever it is: a log
    holding one is not this version's to judge."""
    for index, segment in enumerate(segments):
        damage = segment.scan.damage
        if damage is not None and damage.newer:
            return Problem(
                index, segment.path, 0, damage.detail, False, damage.data_end, newer=True
            )
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


def recover(
    files: FileLayer, directory: Path, keep_bytes: int = 0, reader: ReadAhead | None = None
) -> tuple[Recovery, dict[Path, bytes]]:
    """Make `directory` a log that can be appended to; see the module docstring. Also
    returns the checked bytes of segments (path -> bytes, within `keep_bytes`): only the
    part before each segment's `end` in `Recovery.segments` is good."""
    files.makedirs(directory)
    snapshots = list_snapshots(files, directory)
    if reader is not None and snapshots:
        reader.ahead(snapshots[-1][1])
    segments = scan_directory(files, directory, keep_bytes, reader)
    problem = first_problem(segments)
    if problem is not None and problem.newer:  # before changing anything, temp files too
        raise WalNewerVersion(problem.file, problem.detail)
    head = read_head(files, directory)
    if head is not None:
        lost = missing_newest(head, segments[-1].scan.first_lsn if segments else None)
        if lost is not None:
            raise lost
    removed = _remove_temp_files(files, directory)
    torn = None
    if problem is not None:
        if not problem.torn:
            raise WalCorruption(problem.file, problem.offset, problem.detail)
        torn = cut_tail(files, problem)
    listed = tuple((s.scan.first_lsn, s.path, s.scan.end) for s in segments)
    if segments:
        first_lsn, next_lsn = segments[0].scan.first_lsn, segments[-1].scan.next_lsn
    else:
        first_lsn = next_lsn = snapshots[-1][0] + 1 if snapshots else 1
    checked = {s.path: s.data for s in segments if s.data is not None}
    head_lsn = None if head is None else head.first_lsn
    return Recovery(directory, listed, first_lsn, next_lsn, torn, removed, head_lsn), checked


def cut_tail(files: FileLayer, problem: Problem) -> TornTail:
    """Keep the bytes from `problem.offset` on aside, durably, then truncate the segment."""
    data = files.read(problem.file)
    cut = data[problem.offset : problem.data_end]
    name = f"{problem.file.name}.torn-{problem.offset}"
    saved = _unused_name(files, problem.file.with_name(name))
    tmp = saved.with_name(saved.name + TMP_SUFFIX)
    write_file_durably(files, tmp, cut)
    rename_durably(files, tmp, saved)
    truncate_durably(files, problem.file, problem.offset)
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
    """Temp files are half-made segments, snapshots, torn copies or log heads: never part
    of the log."""
    removed = []
    for name in files.listdir(directory):
        half_made = (
            name.startswith("wal-") or name.startswith("snap-") or name == HEAD_NAME + TMP_SUFFIX
        )
        if name.endswith(TMP_SUFFIX) and half_made:
            files.remove(directory / name)
            removed.append(directory / name)
    if removed:
        files.sync_dir(directory)
    return tuple(removed)
