"""`spinbroker wal inspect|repair DATADIR`: a log directory, read by a person.

Holds `inspect`, which lists segments and snapshots, verifies every checksum and optionally
prints every record (decoded with msgpack by default), and `main(argv)`, the command line the
CLI delegates to. Read-only except for `repair`: must never change a file while inspecting.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import msgpack

from spinbroker.wal.errors import WalCorruption, WalNewerVersion
from spinbroker.wal.files import DirectoryInUse, FileLayer, OsFiles, lock_directory
from spinbroker.wal.frame import BadSegmentHeader, NewerSegment, decode_segment_header
from spinbroker.wal.head import missing_newest, read_head
from spinbroker.wal.reader import RecordError, iter_records
from spinbroker.wal.recovery import ScannedSegment, first_problem, scan_directory
from spinbroker.wal.repair import UnknownFile, newer_version, repair
from spinbroker.wal.segment import segment_name
from spinbroker.wal.snapshot import BadSnapshot, choose_snapshot, list_snapshots, read_snapshot

_MAX_REPR = 300


def decode_msgpack(body: bytes) -> str:
    """A record body as msgpack, repr'd; raw bytes if it is not msgpack."""
    try:
        text = repr(msgpack.unpackb(body, raw=False, strict_map_key=False))
    except Exception:
        text = f"(not msgpack) {body!r}"
    return text if len(text) <= _MAX_REPR else text[:_MAX_REPR] + "..."


def inspect(
    directory: Path,
    out: TextIO,
    show_records: bool = False,
    decode: Callable[[bytes], str] | None = None,
    files: FileLayer | None = None,
) -> bool:
    """Print what `directory` holds and verify it. True if the log opens and loads as is
    (a torn tail that open would cut counts as fine, and is reported)."""
    files = files if files is not None else OsFiles()
    decode = decode if decode is not None else decode_msgpack
    segments = scan_directory(files, directory)
    print(f"wal directory {directory}", file=out)
    print(f"segments: {len(segments)}", file=out)
    for segment in segments:
        _print_segment(segment, out)
        if show_records:
            _print_records(files, segment, out, decode)
    _print_snapshots(files, directory, out)
    _print_head(files, directory, out)
    verdict, opens = _verdict(files, directory, segments)
    print(f"status: {verdict}", file=out)
    return opens


def _print_segment(segment: ScannedSegment, out: TextIO) -> None:
    scan = segment.scan
    span = f"lsn {scan.first_lsn}..{scan.next_lsn - 1}" if scan.records else "no records"
    line = f"  {segment.path.name}  {span} ({scan.records} records)  {scan.end}/{scan.size} bytes"
    damage = scan.damage
    if damage is not None and damage.newer:
        line += f"  NEWER VERSION: {damage.detail}"
    elif damage is not None:
        kind = "possible torn write" if damage.torn else "CORRUPT"
        line += f"  {kind} at offset {damage.offset}: {damage.detail}"
    print(line, file=out)


def _print_records(
    files: FileLayer, segment: ScannedSegment, out: TextIO, decode: Callable[[bytes], str]
) -> None:
    data = files.read(segment.path)
    try:
        decode_segment_header(data)
        for lsn, body in iter_records(data, segment.scan.first_lsn, segment.scan.end):
            print(f"    {lsn:>10}  {len(body):>7} B  {decode(body)}", file=out)
    except (BadSegmentHeader, NewerSegment, RecordError) as exc:
        print(f"    (cannot read records: {exc})", file=out)


def _print_snapshots(files: FileLayer, directory: Path, out: TextIO) -> None:
    snapshots = list_snapshots(files, directory)
    print(f"snapshots: {len(snapshots)}", file=out)
    for lsn, path in snapshots:
        try:
            snapshot = read_snapshot(files, lsn, path)
        except BadSnapshot as exc:
            where = f"INVALID at offset {exc.offset}: {exc.detail}"
            print(f"  {path.name}  lsn {lsn}  {where}", file=out)
            continue
        except WalNewerVersion as exc:
            print(f"  {path.name}  lsn {lsn}  NEWER VERSION: {exc.detail}", file=out)
            continue
        print(f"  {path.name}  lsn {lsn}  {len(snapshot.body)} B body  ok", file=out)


def _print_head(files: FileLayer, directory: Path, out: TextIO) -> None:
    try:
        head = read_head(files, directory)
    except (WalCorruption, WalNewerVersion) as exc:
        print(f"head: {exc}", file=out)
        return
    named = "none (the next start writes one)" if head is None else segment_name(head.first_lsn)
    print(f"head: newest segment {named}", file=out)


def _verdict(files: FileLayer, directory: Path, segments: list[ScannedSegment]) -> tuple[str, bool]:
    """A one-line status, and whether `Wal.open` plus `load` would succeed."""
    newer = newer_version(files, directory, segments)
    if newer is not None:
        return (
            f"NEWER VERSION: {newer}; not damage: open it with that spinbroker (if none"
            " wrote it, the header is damaged twice: `wal repair --not-newer FILE`)",
            False,
        )
    found = first_problem(segments)
    if found is not None and not found.torn:
        return f"CORRUPT: {found.file.name} offset {found.offset}: {found.detail}; repair", False
    try:
        head = read_head(files, directory)
        lost = None if head is None else missing_newest(head, _newest(segments))
    except WalCorruption as exc:
        lost = exc
    if lost is not None:
        return f"CORRUPT: {lost.file.name}: {lost.detail}; repair", False
    if segments:
        try:
            first, end = segments[0].scan.first_lsn, segments[-1].scan.next_lsn
            choose_snapshot(files, directory, first, end)
        except WalCorruption as exc:
            return f"CANNOT LOAD: {exc}", False
    if found is not None:
        return f"torn tail in {found.file.name} at offset {found.offset}; open will cut it", True
    return "ok", True


def _newest(segments: list[ScannedSegment]) -> int | None:
    return segments[-1].scan.first_lsn if segments else None


def main(argv: Sequence[str] | None = None) -> int:
    """`inspect DATADIR [--records] [--raw]` or `repair DATADIR`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="spinbroker wal",
        description="Inspect or repair the write-ahead log of a broker's data directory "
        "(while no broker runs on it). `spinbroker wal inspect --help` lists its options.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("inspect", help="list segments and snapshots, verify checksums")
    show.add_argument("directory", type=Path)
    show.add_argument("--records", action="store_true", help="print every record")
    show.add_argument("--raw", action="store_true", help="print bodies as bytes, not msgpack")
    fix = commands.add_parser("repair", help="truncate at corruption, keeping a backup")
    fix.add_argument("directory", type=Path)
    fix.add_argument(
        "--not-newer",
        metavar="FILE",
        action="append",
        default=[],
        help="a segment, snapshot or wal.head that no newer spinbroker wrote, though its "
        "header reads as a newer version's (damaged in its version and elsewhere): repair "
        "it as damage (repeatable)",
    )
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"spinbroker wal: {args.directory} is not a directory", file=sys.stderr)
        return 2
    lock: int | None = None
    try:
        if args.command == "inspect":
            _warn_if_in_use(args.directory)
            decode = repr if args.raw else None
            return 0 if inspect(args.directory, sys.stdout, args.records, decode) else 1
        # Held while repair runs: no broker may write the log meanwhile, nor start on it.
        lock = lock_directory(args.directory)
        report = repair(args.directory, not_newer=args.not_newer)
    except DirectoryInUse as exc:
        print(
            f"spinbroker wal repair: refused, nothing changed: {exc}; stop it first",
            file=sys.stderr,
        )
        return 1
    except UnknownFile as exc:  # --not-newer names no file of the log
        print(f"spinbroker wal: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable (a directory where a file should be, permissions)
        print(f"spinbroker wal {args.command}: stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            os.close(lock)
    print(report.describe())
    return 0 if report.remaining is None else 1


def _warn_if_in_use(directory: Path) -> None:
    """Inspect only reads, so it runs beside a broker; but then the newest segment may be
    mid-write (a torn tail that is none) and files may come and go: say so."""
    try:
        fd = lock_directory(directory, create=False)
    except OSError:  # a lock file this user may not open: inspect reads all the same
        return
    except DirectoryInUse:
        print(
            f"spinbroker wal inspect: a broker is running on {directory}: the newest segment"
            " may be mid-write, and files may change while they are read",
            file=sys.stderr,
        )
        return
    if fd is not None:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
