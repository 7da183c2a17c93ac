"""The log's head file, `wal.head`: which segment is the newest, so that losing it shows.

Every other lost file of the log shows: the segments' LSNs must follow on from one to the
next, and a snapshot is never ahead of the log. The newest segment is the exception: gone
(deleted by hand, lost with a damaged file system) with no snapshot taken since it was
created, it leaves a shorter log that reads as whole, and the records it held, acknowledged
ones among them, would be silently missing from the next start.

So once a segment is created, durably, `wal.head` is durably replaced (a temp file, synced,
renamed, the directory synced) by one naming the segment's first LSN. Opening the log
compares: a newest segment older than the head names is damage (`WalCorruption`, which
`spinbroker wal repair` resolves by accepting the loss), a newer one is what a crash between
creating a segment and writing the head leaves, and the head is brought up to date. A data
dir without a head (made before it existed) gets one.

Format, 20 bytes: magic ``SPBHEAD``, a version byte (1), the u64 first LSN of the newest
segment (little-endian), and the CRC32C of those 16 bytes. A head of a newer version is a
newer spinbroker's (`WalNewerVersion`), whatever its size, unless it is this version's size
and its checksum fits this version's number in its place (then that byte is damaged); one
that fails its checksum is damage. A head that cannot be written (a full disk) is only a
guard that lags: the writers log a warning and carry on.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass
from pathlib import Path

from crc32c import crc32c

from spinbroker.wal.errors import WalCorruption, WalNewerVersion
from spinbroker.wal.files import FileLayer, rename_durably, write_file_durably
from spinbroker.wal.segment import TMP_SUFFIX, segment_name

HEAD_NAME = "wal.head"
MAGIC_PREFIX = b"SPBHEAD"
VERSION = 1
MAGIC = MAGIC_PREFIX + bytes((VERSION,))
_BODY = struct.Struct("<7sBQ")
_CRC = struct.Struct("<I")
SIZE = _BODY.size + _CRC.size


@dataclass(frozen=True, slots=True)
class Head:
    path: Path
    #: First LSN of the newest segment when the head was written.
    first_lsn: int


def head_path(directory: Path) -> Path:
    return directory / HEAD_NAME


def encode_head(first_lsn: int) -> bytes:
    body = _BODY.pack(MAGIC_PREFIX, VERSION, first_lsn)
    return body + _CRC.pack(crc32c(body))


def read_head(files: FileLayer, directory: Path) -> Head | None:
    """The head of `directory`, or None if it has none. Raises WalCorruption if it is
    damaged and WalNewerVersion if a newer spinbroker wrote it."""
    path = head_path(directory)
    if HEAD_NAME not in files.listdir(directory):
        return None
    data = files.read(path)
    if len(data) > len(MAGIC_PREFIX) and data.startswith(MAGIC_PREFIX):
        version = data[len(MAGIC_PREFIX)]
        # Whatever its size: a newer version may lay its head out otherwise.
        if version > VERSION and not (len(data) == SIZE and _fits_this_version(data)):
            raise WalNewerVersion(
                path,
                f"log head version {version} (this spinbroker reads {VERSION}): likely "
                "written by a newer spinbroker",
            )
    if len(data) != SIZE or crc32c(data[: _BODY.size]) != _CRC.unpack_from(data, _BODY.size)[0]:
        raise WalCorruption(path, 0, "the log head is damaged (checksum)")
    magic, version, first_lsn = _BODY.unpack_from(data)
    if magic != MAGIC_PREFIX or version != VERSION:
        raise WalCorruption(path, 0, "the log head is damaged (magic)")
    return Head(path, first_lsn)


def _fits_this_version(data: bytes) -> bool:
    """Whether the checksum fits the head with this version's number in it: then a higher
    number there is a damaged byte, not a newer spinbroker's head (as for segments)."""
    body = MAGIC_PREFIX + bytes([VERSION]) + data[len(MAGIC_PREFIX) + 1 : _BODY.size]
    return bool(crc32c(body) == _CRC.unpack_from(data, _BODY.size)[0])


def write_head(files: FileLayer, directory: Path, first_lsn: int) -> None:
    """Durably replace the head by one naming the segment that starts at `first_lsn`.
    Raises OSError; the head is then as it was (a leftover temp file is harmless)."""
    path = head_path(directory)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with contextlib.suppress(FileNotFoundError):
        files.remove(tmp)
    write_file_durably(files, tmp, encode_head(first_lsn))
    rename_durably(files, tmp, path)


def missing_newest(head: Head, newest_first_lsn: int | None) -> WalCorruption | None:
    """The damage if the log's newest segment (None: no segment at all) is older than the
    one `head` names: that segment is lost, and whatever it held with it."""
    if newest_first_lsn is not None and newest_first_lsn >= head.first_lsn:
        return None
    return WalCorruption(
        head.path,
        0,
        f"the newest segment, {segment_name(head.first_lsn)}, is missing: records from LSN "
        f"{head.first_lsn} on, if it held any, are lost (`spinbroker wal repair` accepts "
        "the loss)",
    )
