"""The on-disk layout of one record and of a segment header: bytes in, bytes out.

Holds the encoder and a decoder for record frames and for the header that opens every
segment file. The decoder says what it found at an offset (a record, zeros, a short frame,
a bad header or body); deciding whether that is a torn tail or corruption is reader.py's job.
Pure: must never touch files, clocks or logging, and never know what a body means.

Record frame, little-endian, 20-byte header then the body:

    0   u32  length     body length in bytes
    4   u64  lsn        log sequence number, 1, 2, 3, ... with no gaps
    12  u32  body_crc   CRC32C of the body
    16  u32  head_crc   CRC32C of bytes 0..16
    20  ...  body

`head_crc` lets the decoder trust `length` before reading the body, so a flipped bit in a
length can never pass for a record that runs off the end of the file (a torn tail).
An all-zero header is never valid (its head_crc would be CRC32C(16 zero bytes) != 0), so
zero-filled preallocated space is told apart from a record by its header alone.

Segment header, 24 bytes at offset 0 of every `wal-<first lsn>.log`:

    0   8s   magic      b"SPBWAL\\x00\\x01" (format version 1)
    8   u64  first_lsn  LSN of the first record the segment holds (or will hold)
    16  u32  crc        CRC32C of bytes 0..16
    20  u32  reserved   zero
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from crc32c import crc32c

RECORD_HEADER_SIZE = 20
MAX_BODY = 1 << 30
_HEAD = struct.Struct("<IQI")
_HEAD_CRC = struct.Struct("<I")
_RECORD_HEADER = struct.Struct("<IQII")
#: The first two fields of a record header (length, lsn): all a walk over frames that were
#: already checked needs.
LENGTH_LSN = struct.Struct("<IQ")

SEGMENT_MAGIC = b"SPBWAL\x00\x01"
SEGMENT_HEADER_SIZE = 24
_SEGMENT = struct.Struct("<8sQ")
_SEGMENT_TAIL = struct.Struct("<II")

_ZERO_HEADER = bytes(RECORD_HEADER_SIZE)


def encode_record(lsn: int, body: bytes) -> bytes:
    """The frame for one record."""
    head = _HEAD.pack(len(body), lsn, crc32c(body))
    return head + _HEAD_CRC.pack(crc32c(head)) + body


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


@dataclass(frozen=True, slots=True)
class Decoded:
    found: Found
    offset: int
    #: Past the record for RECORD; past its claimed extent for SHORT/BAD_BODY when the
    #: header is sound; offset + header size otherwise (clamped to the data).
    end: int
    lsn: int = 0
    body: memoryview | None = None


def decode_record(data: bytes | memoryview, offset: int) -> Decoded:
    """Decode the frame starting at `offset` of `data` (the bytes of a segment)."""
    size = len(data)
    head_end = offset + RECORD_HEADER_SIZE
    if head_end > size:
        return Decoded(Found.SHORT, offset, size)
    header = bytes(data[offset:head_end])
    if header == _ZERO_HEADER:
        return Decoded(Found.ZEROS, offset, head_end)
    length, lsn, body_crc = _HEAD.unpack_from(header)
    (head_crc,) = _HEAD_CRC.unpack_from(header, 16)
    if crc32c(header[:16]) != head_crc or length > MAX_BODY:
        return Decoded(Found.BAD_HEADER, offset, head_end, lsn)
    end = head_end + length
    if end > size:
        return Decoded(Found.SHORT, offset, end, lsn)
    body = memoryview(data)[head_end:end]
    if crc32c(body) != body_crc:
        return Decoded(Found.BAD_BODY, offset, end, lsn)
    return Decoded(Found.RECORD, offset, end, lsn, body)


def read_records(
    data: bytes, offset: int, lsn: int, end: int
) -> Iterator[tuple[int, int, memoryview]]:
    """(offset, lsn, body) of the good records in [offset, end) whose LSNs run on from
    `lsn`; stops silently at the first frame that is not one (decode it to learn why).
    The fast path of every scan: no objects per record beyond the body view."""
    view = memoryview(data)
    unpack = _RECORD_HEADER.unpack_from
    end = min(end, len(data))
    while offset + RECORD_HEADER_SIZE <= end:
        length, found_lsn, body_crc, head_crc = unpack(data, offset)
        if found_lsn != lsn or crc32c(view[offset : offset + 16]) != head_crc:
            return
        start = offset + RECORD_HEADER_SIZE
        stop = start + length
        if stop > end or length > MAX_BODY:
            return
        body = view[start:stop]
        if crc32c(body) != body_crc:
            return
        yield offset, lsn, body
        offset = stop
        lsn += 1


class BadSegmentHeader(ValueError):
    """The first bytes of a segment file are not a valid segment header."""


def encode_segment_header(first_lsn: int) -> bytes:
    head = _SEGMENT.pack(SEGMENT_MAGIC, first_lsn)
    return head + _SEGMENT_TAIL.pack(crc32c(head), 0)


def decode_segment_header(data: bytes | memoryview) -> int:
    """The first LSN a segment header names; raises BadSegmentHeader."""
    if len(data) < SEGMENT_HEADER_SIZE:
        raise BadSegmentHeader(f"file is {len(data)} bytes, shorter than a segment header")
    head = bytes(data[: _SEGMENT.size])
    magic, first_lsn = _SEGMENT.unpack(head)
    crc, _reserved = _SEGMENT_TAIL.unpack_from(data, _SEGMENT.size)
    if magic != SEGMENT_MAGIC:
        raise BadSegmentHeader(f"bad magic {magic!r}, expected {SEGMENT_MAGIC!r}")
    if crc32c(head) != crc:
        raise BadSegmentHeader("segment header checksum mismatch")
    if first_lsn < 1:
        raise BadSegmentHeader("segment header names LSN 0")
    return int(first_lsn)
