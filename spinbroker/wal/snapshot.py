"""Snapshot files: `snap-<lsn as 16 hex digits>.snap`, a checked header then an opaque body.

Holds the snapshot format, writing one durably (temp file, fsync, rename, fsync of the
directory), reading and verifying one, and choosing which one recovery starts from. The
body is whatever the core serialized; this module must never look inside it, and must never
delete segments (the `Wal` decides what a new snapshot makes obsolete).

Layout, little-endian, a 32-byte header then the body:

    0   8s   magic      b"SPBSNAP" then the format version, one byte: 1
    8   u64  lsn        the state includes every record up to and including this LSN
    16  u64  length     body length in bytes
    24  u32  body_crc   CRC32C of the body
    28  u32  head_crc   CRC32C of bytes 0..28

A later format keeps the magic's first 7 bytes and raises the version: a snapshot of a
version above this one's is a newer spinbroker's (`read_snapshot` raises WalNewerVersion),
never an invalid snapshot to skip, whatever follows its magic; unless its head_crc fits
this version's magic: then it is this version's, with a damaged version byte.
"""

from __future__ import annotations

import contextlib
import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crc32c import crc32c

from spinbroker.wal.errors import WalCorruption, WalNewerVersion
from spinbroker.wal.files import FileLayer, rename_durably, write_file_durably

log = logging.getLogger("spinbroker.wal")

#: A snapshot is written and synced this many bytes at a time (see `write_file_durably`):
#: with 1M queued commands, a one-piece write made the log's fsyncs, and so the replies
#: behind them, wait ~70 ms when the snapshot's ~230 MB were synced.
SYNC_EVERY = 8 << 20

#: What every snapshot starts with, of whatever version; the format version follows.
MAGIC_PREFIX = b"SPBSNAP"
VERSION = 1
MAGIC = MAGIC_PREFIX + bytes((VERSION,))
_HEAD = struct.Struct("<8sQQI")
_HEAD_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _HEAD_CRC.size
_NAME = re.compile(r"snap-([0-9a-f]{16})\.snap")
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True, slots=True)
class Snapshot:
    lsn: int
    #: A read-only view of the body inside the file's bytes: not a copy of what can be
    #: hundreds of megabytes.
    body: memoryview
    path: Path


class BadSnapshot(ValueError):
    def __init__(self, offset: int, detail: str) -> None:
        super().__init__(f"offset {offset}: {detail}")
        self.offset = offset
        self.detail = detail


class NewerSnapshot(ValueError):
    """A snapshot of a format version above VERSION: not damage but, most likely, a newer
    spinbroker's. Not a BadSnapshot, so that it is never skipped as one."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"snapshot file version {version} is unknown to this spinbroker (it reads version "
            f"{VERSION}): likely written by a newer spinbroker"
        )
        self.version = version


def snapshot_name(lsn: int) -> str:
    return f"snap-{lsn:016x}.snap"


def parse_snapshot_name(name: str) -> int | None:
    match = _NAME.fullmatch(name)
    return int(match.group(1), 16) if match else None


def encode_snapshot(lsn: int, body: bytes) -> bytes:
    return _header(lsn, len(body), crc32c(body)) + body


def _header(lsn: int, length: int, body_crc: int) -> bytes:
    head = _HEAD.pack(MAGIC, lsn, length, body_crc)
    return head + _HEAD_CRC.pack(crc32c(head))


def decode_snapshot(data: bytes, expected_lsn: int) -> memoryview:
    """The body of a snapshot file (a view into `data`); raises NewerSnapshot for a newer
    format version (whose header need not even be laid out as this one), else BadSnapshot."""
    if len(data) >= len(MAGIC) and data[: len(MAGIC_PREFIX)] == MAGIC_PREFIX:
        version = data[len(MAGIC_PREFIX)]
        if version > VERSION and not damaged_magic_only(data):
            raise NewerSnapshot(version)
    if len(data) < HEADER_SIZE:
        raise BadSnapshot(0, f"file is {len(data)} bytes, shorter than a snapshot header")
    magic, lsn, length, body_crc = _HEAD.unpack_from(data)
    (head_crc,) = _HEAD_CRC.unpack_from(data, _HEAD.size)
    if magic != MAGIC and damaged_magic_only(data):
        damaged = "version byte is" if magic.startswith(MAGIC_PREFIX) else "magic is"
        detail = f"a version {VERSION} header whose {damaged} damaged (its checksum fits)"
        raise BadSnapshot(0, f"bad magic {magic!r}: {detail}")
    if magic != MAGIC:
        raise BadSnapshot(0, f"bad magic {magic!r}")
    if crc32c(data[: _HEAD.size]) != head_crc:
        raise BadSnapshot(0, "header checksum mismatch")
    if lsn != expected_lsn:
        raise BadSnapshot(8, f"header says LSN {lsn}, file name says {expected_lsn}")
    if len(data) != HEADER_SIZE + length:
        found = len(data) - HEADER_SIZE
        raise BadSnapshot(HEADER_SIZE, f"body is {found} bytes, header says {length}")
    body = memoryview(data)[HEADER_SIZE:]
    if crc32c(body) != body_crc:
        raise BadSnapshot(HEADER_SIZE, "body checksum mismatch")
    return body


def rebuilt_header(data: bytes, lsn: int) -> bytes | None:
    """`data`, a snapshot file of `lsn` (its name's) whose header is damaged, with the
    header written again: this version's magic, `lsn`, the body's length, and the body
    checksum the header stored, if that checksum fits the body (then the body is intact,
    whatever else of the header was hit). None if it does not: the body is not known good."""
    if len(data) < HEADER_SIZE:
        return None
    body_crc = _HEAD.unpack_from(data)[3]
    body = memoryview(data)[HEADER_SIZE:]
    if crc32c(body) != body_crc:
        return None
    return _header(lsn, len(body), body_crc) + data[HEADER_SIZE:]


def damaged_magic_only(data: bytes) -> bool:
    """A header of this version whose magic (its version byte, say) was damaged: its
    checksum fits this version's magic, which a newer writer's checksum of its own magic
    would not. One flipped bit there is damage, not a newer spinbroker's file, and
    `wal repair` puts the magic back rather than set the snapshot aside."""
    if len(data) < HEADER_SIZE or data[: len(MAGIC)] == MAGIC:
        return False
    (head_crc,) = _HEAD_CRC.unpack_from(data, _HEAD.size)
    return bool(crc32c(MAGIC + data[len(MAGIC) : _HEAD.size]) == head_crc)


def list_snapshots(files: FileLayer, directory: Path) -> list[tuple[int, Path]]:
    """(LSN by name, path) of every snapshot file, oldest first."""
    found = []
    for name in files.listdir(directory):
        lsn = parse_snapshot_name(name)
        if lsn is not None:
            found.append((lsn, directory / name))
    return sorted(found)


def read_snapshot(
    files: FileLayer, lsn: int, path: Path, read: Callable[[Path], bytes] | None = None
) -> Snapshot:
    """Read (with `read` if given, else `files.read`) and verify one snapshot; raises
    BadSnapshot, or WalNewerVersion for a newer spinbroker's."""
    data = read(path) if read is not None else files.read(path)
    try:
        return Snapshot(lsn, decode_snapshot(data, lsn), path)
    except NewerSnapshot as exc:
        raise WalNewerVersion(path, str(exc)) from exc


def write_snapshot_file(files: FileLayer, directory: Path, lsn: int, body: bytes) -> Path:
    """Write `snap-<lsn>.snap` so that it either exists whole and durable or not at all."""
    write_snapshot_tmp(files, directory, lsn, body)
    return publish_snapshot(files, directory, lsn)


def snapshot_tmp_path(directory: Path, lsn: int) -> Path:
    return directory / (snapshot_name(lsn) + TMP_SUFFIX)


def write_snapshot_tmp(files: FileLayer, directory: Path, lsn: int, body: bytes) -> Path:
    """First half of a snapshot write: the whole file under its temporary name, synced.
    Safe to run in a forked child: it touches nothing but that file."""
    tmp = snapshot_tmp_path(directory, lsn)
    with contextlib.suppress(FileNotFoundError):
        files.remove(tmp)
    write_file_durably(files, tmp, encode_snapshot(lsn, body), SYNC_EVERY)
    return tmp


def publish_snapshot(files: FileLayer, directory: Path, lsn: int) -> Path:
    """Second half: rename the synced temporary file into place and sync the directory."""
    path = directory / snapshot_name(lsn)
    rename_durably(files, snapshot_tmp_path(directory, lsn), path)
    return path


def choose_snapshot(
    files: FileLayer,
    directory: Path,
    log_first: int,
    log_next: int,
    read: Callable[[Path], bytes] | None = None,
) -> Snapshot | None:
    """The newest valid snapshot, which the log must continue without a gap.

    The log holds LSNs [log_first, log_next). An invalid newer snapshot is skipped with a
    warning only if the chosen older one (or the log from LSN 1) still reaches past it;
    otherwise recovery would silently lose state, so this raises WalCorruption naming it.
    A newer spinbroker's snapshot (of a file version above this one's) is never skipped:
    this raises WalNewerVersion.
    """
    skipped: list[tuple[int, Path, BadSnapshot]] = []
    chosen = None
    for lsn, path in reversed(list_snapshots(files, directory)):
        try:
            chosen = read_snapshot(files, lsn, path, read)
            break
        except BadSnapshot as exc:
            skipped.append((lsn, path, exc))
    base = chosen.lsn if chosen is not None else 0
    start = f"snapshot {base}" if chosen is not None else "LSN 1"
    problem = None
    if base + 1 < log_first:
        problem = f"the log starts at LSN {log_first}, records after {start} are missing"
    elif base >= log_next:
        problem = f"snapshot {base} is past the end of the log (next LSN {log_next})"
    elif skipped and skipped[0][0] >= log_next:
        problem = f"the log ends before LSN {skipped[0][0]}"
    if problem is not None:
        if skipped:
            _, path, bad = skipped[0]
            raise WalCorruption(path, bad.offset, f"{bad.detail}; {problem}")
        raise WalCorruption(chosen.path if chosen is not None else directory, 0, problem)
    for _, path, bad in skipped:
        log.warning(
            "wal: skipping invalid snapshot %s (offset %d: %s); recovering from %s and the log",
            path,
            bad.offset,
            bad.detail,
            start,
        )
    return chosen
