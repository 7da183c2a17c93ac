"""The on-disk layout of record frames and of a segment header: bytes in, bytes out.

Holds the encoders and a decoder for frames and for the header that opens every segment
file. The decoder says what it found at an offset (a frame, zeros, a short frame, a bad
header, body or batch table); deciding whether that is a torn tail or corruption is
reader.py's job. Pure: must never touch files, clocks or logging, and never know what a
record body means.

A frame holds one record, or a batch of records written together (one group-commit flush):
one header and two checksums for all of them, so writing and checking cost per flush, not
per record. Little-endian, a 20-byte header then the body:

    0   u32  length     body length in bytes; bit 31 (BATCH) set for a batch frame
    4   u64  lsn        LSN of the (first) record; LSNs run 1, 2, 3, ... with no gaps
    12  u32  body_crc   CRC32C of the body
    16  u32  head_crc   CRC32C of bytes 0..16
    20  ...  body

The body of a single frame is the record. The body of a batch frame is a table, then the
records back to back, the i-th having LSN `lsn + i`:

    0   u32       count     records in the frame (at least 1)
    4   u64       synced    every record up to this LSN was fdatasync'ed before this frame
                            was written (0: nothing known)
    12  count u32 lengths   each record's length in bytes (they sum to the rest)

The log writes batch frames only (a lone record is a batch of one); single frames are what
logs written before batch frames hold, and still read. `synced` is what tells a torn final
write from damage to records that were already durable (reader.py): a crash can only tear
what was written after the last sync.

`head_crc` lets the decoder trust `length` before reading the body, so a flipped bit in a
length can never pass for a record that runs off the end of the file (a torn tail).
An all-zero header is never valid (its head_crc would be CRC32C(16 zero bytes) != 0), so
zero-filled preallocated space is told apart from a record by its header alone.
A frame is written whole or torn whole: a crash keeps all of a batch or none of it, and no
record of it was acknowledged before the whole frame was durable.

Segment header, 24 bytes at offset 0 of every `wal-<first lsn>.log`:

    0   8s   magic      b"SPBWAL" then the format version, a big-endian u16: 1
    8   u64  first_lsn  LSN of the first record the segment holds (or will hold)
    16  u32  crc        CRC32C of bytes 0..16
    20  u32  reserved   zero

A later format keeps the magic's first 6 bytes and raises the version: a segment of a
version above this one's is a newer spinbroker's (`NewerSegment`), never damage, whatever
follows its magic; unless its crc fits this version's magic: then it is this version's,
with damaged version bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

from crc32c import crc32c

RECORD_HEADER_SIZE = 20
MAX_BODY = 1 << 30
#: Flag in a header's length word: the body is a batch of records (see above).
BATCH = 1 << 31
#: `encode_frames` starts a new batch frame past this many bytes of records.
MAX_BATCH_BYTES = 1 << 20
_LENGTH_WORD = struct.Struct("<I")
#: The first fields of a batch body: its record count and synced watermark.
BATCH_HEAD = struct.Struct("<IQ")
_HEAD = struct.Struct("<IQI")
_HEAD_CRC = struct.Struct("<I")
_RECORD_HEADER = struct.Struct("<IQII")
#: The first two fields of a record header (length, lsn): all a walk over frames that were
#: already checked needs.
LENGTH_LSN = struct.Struct("<IQ")

#: What every segment starts with, of whatever version; the format version follows.
SEGMENT_MAGIC_PREFIX = b"SPBWAL"
SEGMENT_VERSION = 1
SEGMENT_MAGIC = SEGMENT_MAGIC_PREFIX + SEGMENT_VERSION.to_bytes(2, "big")
SEGMENT_HEADER_SIZE = 24
_SEGMENT = struct.Struct("<8sQ")
_SEGMENT_TAIL = struct.Struct("<II")

_ZERO_HEADER = bytes(RECORD_HEADER_SIZE)


def encode_record(lsn: int, body: bytes) -> bytes:
    """The frame for one record."""
    head = _HEAD.pack(len(body), lsn, crc32c(body))
    return head + _HEAD_CRC.pack(crc32c(head)) + body


def encode_batch(first_lsn: int, bodies: Sequence[bytes], synced: int = 0) -> bytes:
    """One batch frame holding `bodies` (LSNs first_lsn, first_lsn + 1, ...), written
    when every record up to LSN `synced` was durable."""
    count = len(bodies)
    table = struct.pack(f"<IQ{count}I", count, synced, *map(len, bodies))
    body = b"".join((table, *bodies))
    if len(body) > MAX_BODY:
        raise ValueError(f"batch of {len(body)} bytes exceeds {MAX_BODY}")
    head = _HEAD.pack(len(body) | BATCH, first_lsn, crc32c(body))
    return head + _HEAD_CRC.pack(crc32c(head)) + body


def encode_frames(first_lsn: int, bodies: Sequence[bytes], synced: int = 0) -> list[bytes]:
    """The batch frames for `bodies`, in order, of about MAX_BATCH_BYTES of records at
    most (a record bigger than that alone), each carrying the `synced` watermark."""
    frames: list[bytes] = []
    start, size, lsn = 0, 0, first_lsn
    for index, body in enumerate(bodies):
        if size and size + len(body) > MAX_BATCH_BYTES:
            frames.append(encode_batch(lsn, bodies[start:index], synced))
            lsn += index - start
            start, size = index, 0
        size += len(body)
    if start < len(bodies):
        frames.append(encode_batch(lsn, bodies[start:], synced))
    return frames


def batch_count(data: bytes | memoryview, start: int, length: int) -> int | None:
    """The record count of the batch body at data[start:start + length], if its table is
    sound (a count of at least 1, lengths that add up to the body); None if not."""
    if length < BATCH_HEAD.size:
        return None
    count, _ = BATCH_HEAD.unpack_from(data, start)
    table = BATCH_HEAD.size + 4 * count
    if count < 1 or table > length:
        return None
    lengths = struct.unpack_from(f"<{count}I", data, start + BATCH_HEAD.size)
    return count if sum(lengths) == length - table else None


def batch_records(data: bytes, start: int, lsn: int) -> Iterator[tuple[int, int, int]]:
    """(lsn, start, stop) of each record of the batch body at `start` of `data`, whose
    table `batch_count` found sound."""
    count, _ = BATCH_HEAD.unpack_from(data, start)
    offset = start + BATCH_HEAD.size + 4 * count
    for length in struct.unpack_from(f"<{count}I", data, start + BATCH_HEAD.size):
        yield lsn, offset, offset + length
        offset += length
        lsn += 1


def frame_synced(data: bytes, offset: int) -> int:
    """The synced watermark of the good frame at `offset` (0 for a single frame)."""
    (word,) = _LENGTH_WORD.unpack_from(data, offset)
    if not word & BATCH:
        return 0
    synced: int = BATCH_HEAD.unpack_from(data, offset + RECORD_HEADER_SIZE)[1]
    return synced


class Found(Enum):
    """What `decode_record` found at an offset."""

    RECORD = "record"
    #: A whole header of zeros: nothing was ever written here (or the write never landed).
    ZEROS = "zeros"
    #: The data ends inside the header or inside the body the header announces.
    SHORT = "short"
    #: The header fails its checksum (or announces an absurd length).
    BAD_HEADER = "bad header"
    #: The header is sound but the body fails its checksum.
    BAD_BODY = "bad body"
    #: A batch frame whose checksums pass but whose table does not describe its body:
    #: written so, not torn (a torn write fails a checksum).
    BAD_BATCH = "bad batch table"


@dataclass(frozen=True, slots=True)
class Decoded:
    found: Found
    offset: int
    #: Past the frame for RECORD; past its claimed extent for SHORT/BAD_BODY/BAD_BATCH
    #: when the header is sound; offset + header size otherwise (clamped to the data).
    end: int
    lsn: int = 0
    #: The frame's body: the record, or for a batch frame its table and records.
    body: memoryview | None = None
    #: Records in the frame (1 for a single frame).
    count: int = 1


def decode_record(data: bytes | memoryview, offset: int) -> Decoded:
    """Decode the frame starting at `offset` of `data` (the bytes of a segment)."""
    size = len(data)
    head_end = offset + RECORD_HEADER_SIZE
    if head_end > size:
        return Decoded(Found.SHORT, offset, size)
    header = bytes(data[offset:head_end])
    if header == _ZERO_HEADER:
        return Decoded(Found.ZEROS, offset, head_end)
    word, lsn, body_crc = _HEAD.unpack_from(header)
    (head_crc,) = _HEAD_CRC.unpack_from(header, 16)
    length = word & ~BATCH
    if crc32c(header[:16]) != head_crc or length > MAX_BODY:
        return Decoded(Found.BAD_HEADER, offset, head_end, lsn)
    end = head_end + length
    if end > size:
        return Decoded(Found.SHORT, offset, end, lsn)
    body = memoryview(data)[head_end:end]
    if crc32c(body) != body_crc:
        return Decoded(Found.BAD_BODY, offset, end, lsn)
    if not word & BATCH:
        return Decoded(Found.RECORD, offset, end, lsn, body)
    count = batch_count(data, head_end, length)
    if count is None:
        return Decoded(Found.BAD_BATCH, offset, end, lsn)
    return Decoded(Found.RECORD, offset, end, lsn, body, count)


def read_frames(data: bytes, offset: int, lsn: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(offset, lsn, count) of the good frames in [offset, end) whose LSNs run on from
    `lsn`, each with `count` records; stops silently at the first frame that is not one
    (decode it to learn why). The fast path of every scan: no objects per frame."""
    view = memoryview(data)
    unpack = _RECORD_HEADER.unpack_from
    end = min(end, len(data))
    while offset + RECORD_HEADER_SIZE <= end:
        word, found_lsn, body_crc, head_crc = unpack(data, offset)
        if found_lsn != lsn or crc32c(view[offset : offset + 16]) != head_crc:
            return
        length = word & ~BATCH
        start = offset + RECORD_HEADER_SIZE
        stop = start + length
        if stop > end or length > MAX_BODY or crc32c(view[start:stop]) != body_crc:
            return
        count = batch_count(data, start, length) if word & BATCH else 1
        if count is None:
            return
        yield offset, lsn, count
        offset = stop
        lsn += count


def frame_records(data: bytes, offset: int, lsn: int) -> Iterator[tuple[int, int, int]]:
    """(lsn, start, stop) of each record of the frame at `offset`, which `read_frames` or
    `decode_record` found good (not checked again)."""
    (word,) = _LENGTH_WORD.unpack_from(data, offset)
    start = offset + RECORD_HEADER_SIZE
    if word & BATCH:
        return batch_records(data, start, lsn)
    return iter(((lsn, start, start + word),))


def frame_end(data: bytes, offset: int) -> int:
    """Past the frame at `offset` (its header read as is)."""
    word: int = _LENGTH_WORD.unpack_from(data, offset)[0]
    return offset + RECORD_HEADER_SIZE + (word & ~BATCH)


class BadSegmentHeader(ValueError):
    """The first bytes of a segment file are not a valid segment header."""


class NewerSegment(ValueError):
    """A segment of a format version above SEGMENT_VERSION: not damage but, most likely, a
    newer spinbroker's segment, which only that version may judge (let alone cut). Not a
    BadSegmentHeader, so that no handler of damage takes it for some."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"segment format version {version} is unknown to this spinbroker (it reads version "
            f"{SEGMENT_VERSION}): likely written by a newer spinbroker"
        )
        self.version = version


def damaged_magic_only(data: bytes | memoryview) -> bool:
    """A header of this version whose magic (its version bytes, say) was damaged: its
    checksum fits this version's magic, which a newer writer's checksum of its own magic
    would not. One flipped bit there is damage, not a newer spinbroker's file, and
    `wal repair` puts the magic back rather than cut the log there."""
    if len(data) < SEGMENT_HEADER_SIZE or bytes(data[: len(SEGMENT_MAGIC)]) == SEGMENT_MAGIC:
        return False
    (crc,) = struct.unpack_from("<I", data, _SEGMENT.size)
    return bool(crc32c(SEGMENT_MAGIC + bytes(data[len(SEGMENT_MAGIC) : _SEGMENT.size])) == crc)


def encode_segment_header(first_lsn: int) -> bytes:
    head = _SEGMENT.pack(SEGMENT_MAGIC, first_lsn)
    return head + _SEGMENT_TAIL.pack(crc32c(head), 0)


def decode_segment_header(data: bytes | memoryview) -> int:
    """The first LSN a segment header names; raises NewerSegment for a newer format
    version (whose header need not even be laid out as this one), else BadSegmentHeader."""
    prefix = len(SEGMENT_MAGIC_PREFIX)
    if len(data) >= len(SEGMENT_MAGIC) and bytes(data[:prefix]) == SEGMENT_MAGIC_PREFIX:
        version = int.from_bytes(data[prefix : len(SEGMENT_MAGIC)], "big")
        if version > SEGMENT_VERSION and not damaged_magic_only(data):
            raise NewerSegment(version)
    if len(data) < SEGMENT_HEADER_SIZE:
        raise BadSegmentHeader(f"file is {len(data)} bytes, shorter than a segment header")
    head = bytes(data[: _SEGMENT.size])
    magic, first_lsn = _SEGMENT.unpack(head)
    crc, _reserved = _SEGMENT_TAIL.unpack_from(data, _SEGMENT.size)
    if magic != SEGMENT_MAGIC and damaged_magic_only(data):
        damaged = "version bytes are" if magic.startswith(SEGMENT_MAGIC_PREFIX) else "magic is"
        raise BadSegmentHeader(
            f"bad magic {magic!r}: a version {SEGMENT_VERSION} header whose {damaged} "
            "damaged (its checksum fits that version)"
        )
    if magic != SEGMENT_MAGIC:
        raise BadSegmentHeader(f"bad magic {magic!r}, expected {SEGMENT_MAGIC!r}")
    if crc32c(head) != crc:
        raise BadSegmentHeader("segment header checksum mismatch")
    if first_lsn < 1:
        raise BadSegmentHeader("segment header names LSN 0")
    return int(first_lsn)
