"""Reading a segment's bytes: where its good records end and what lies after them.

Holds `scan_segment`, which walks every frame of one segment and reports the first thing that
is not a good record, classified as a possible torn write or not; `iter_records`, which
yields the records of a scanned range checking every frame again (for bytes read anew), and
`iter_checked`, which yields them from the very bytes `scan_segment` checked, without
checking twice. Pure over bytes: must never open files, log, or decide what to do about
damage (recovery.py cuts torn tails and refuses corruption; repair.py truncates).

How damage is classified (the decision the preallocated segments force):

* Zeros after the last record (a zero header with only zeros to the end of the file) are
  preallocated space that was never written: a clean end, not damage.
* A frame cut short by the end of the file, a zero header followed by non-zero bytes, or a
  frame failing a checksum while one 512-byte sector of it is all zeros, is what an
  unfinished write leaves behind: sectors reach the disk whole, in any order, and unwritten
  ones read as zeros. `torn=True`. Recovery accepts this only at the end of the newest
  segment, where the write that was interrupted can only be one nobody was told succeeded.
* Anything else (a checksum failure with no zero sector, a record with the wrong LSN, a
  batch table that does not describe its frame, a bad segment header) is corruption: a
  torn write cannot produce it. `torn=False`.
* A segment header of a newer format version is no damage at all but a newer spinbroker's
  segment (`newer=True`), which this version must neither cut nor set aside.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from spinbroker.wal.frame import (
    BATCH,
    BATCH_HEAD,
    LENGTH_LSN,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    Found,
    decode_record,
    frame_end,
    frame_records,
    frame_synced,
    read_frames,
)

SECTOR = 512


@dataclass(frozen=True, slots=True)
class Damage:
    """The first spot of a segment that is not a good record nor clean zeros."""

    offset: int
    detail: str
    #: An unfinished write can explain it (see the module docstring).
    torn: bool
    #: Offset past the last sector of the file holding a non-zero byte: the bytes
    #: [offset, data_end) are what cutting here drops.
    data_end: int
    #: Not damage: the segment is of a newer format version (see `frame.NewerSegment`).
    newer: bool = False


@dataclass(frozen=True, slots=True)
class SegmentScan:
    first_lsn: int
    records: int
    #: Offset just past the last good record.
    end: int
    size: int
    damage: Damage | None

    @property
    def next_lsn(self) -> int:
        return self.first_lsn + self.records


class RecordError(ValueError):
    """A frame inside a range that was scanned good no longer is."""

    def __init__(self, offset: int, detail: str) -> None:
        super().__init__(f"offset {offset}: {detail}")
        self.offset = offset
        self.detail = detail


def scan_segment(data: bytes, first_lsn: int) -> SegmentScan:
    """Check every frame after the segment header; stop at the first that is not good."""
    offset, expected = SEGMENT_HEADER_SIZE, first_lsn
    for frame_offset, lsn, count in read_frames(data, offset, first_lsn, len(data)):
        offset, expected = frame_end(data, frame_offset), lsn + count
    decoded = decode_record(data, offset)
    damage = _classify(data, offset, decoded.found, decoded.end, decoded.lsn, expected)
    return SegmentScan(first_lsn, expected - first_lsn, offset, len(data), damage)


def _classify(
    data: bytes, offset: int, found: Found, end: int, lsn: int, expected: int
) -> Damage | None:
    size = len(data)
    zeros_after = data.count(0, offset) == size - offset
    if found in (Found.ZEROS, Found.SHORT) and zeros_after:
        return None
    data_end = _written_end(data)
    if found is Found.RECORD:
        return Damage(offset, f"record has LSN {lsn}, expected {expected}", False, data_end)
    if found is Found.ZEROS:
        detail = f"zero header followed by non-zero bytes up to offset {data_end}"
        return _torn_unless_followed(data, Damage(offset, detail, True, data_end), expected)
    if found is Found.SHORT:
        present = size - offset
        detail = f"record runs past the end of the file ({end - offset} bytes, {present} present)"
        return Damage(offset, detail, True, data_end)
    if found is Found.BAD_BATCH:
        # Both checksums pass: the frame was written so; a torn write cannot do this.
        return Damage(offset, f"batch frame (LSN {lsn}) with a bad table", False, data_end)
    what = "header" if found is Found.BAD_HEADER else f"body (LSN {lsn})"
    detail = f"record {what} checksum mismatch"
    if has_zero_sector(data, offset, min(end, size)):
        return _torn_unless_followed(data, Damage(offset, detail, True, data_end), expected)
    return Damage(offset, detail, False, data_end)


def _torn_unless_followed(data: bytes, damage: Damage, expected: int) -> Damage:
    """`damage` looks torn: it is, unless a good frame after it says that the records at
    the damage (LSN `expected` on) were synced before it was written. A crash can only
    tear what was written after the last sync; damage to synced records is a lost or
    zeroed sector or a stray write, and cutting there would drop acknowledged records.
    (Good frames after a torn spot are normal when several writes were not synced yet:
    mode `batch`, or a rewrite after a failed sync; their watermark is below the damage.)"""
    for frame, _, _ in frames_after(data, damage.offset + 1, damage.data_end, expected):
        synced = frame_synced(data, frame)
        if synced >= expected:
            detail = (
                f"{damage.detail}; the frame at offset {frame} was written after LSN {synced}"
                f" was synced: records at the damage were durable, not torn"
            )
            return Damage(damage.offset, detail, False, damage.data_end)
    return damage


_NON_ZERO = re.compile(rb"[^\x00]")


def frames_after(data: bytes, start: int, stop: int, lsn: int) -> Iterator[tuple[int, int, int]]:
    """(offset, lsn, count) of the good frames after damage: the first one starting in
    [start, stop) with an LSN above `lsn` (see `_first_frame_after`), and those that chain
    on from it, as `read_frames` gives them."""
    found = _first_frame_after(data, start, stop, lsn)
    if found is not None:
        at, first = found
        yield from read_frames(data, at, first, stop)


def _first_frame_after(data: bytes, start: int, stop: int, lsn: int) -> tuple[int, int] | None:
    """(offset, LSN) of the first good frame starting in [start, stop) with an LSN above
    `lsn`, or None. Frames start at any offset, so this looks for the upper five bytes of
    the LSNs that can follow (`lsn` up to 2^24 past it), checks a header at each hit, and
    skips runs of zeros (which hold no header) whole: C-speed scans, Python per hit."""
    first_block = lsn >> 24
    best: tuple[int, int] | None = None
    for block in (first_block, first_block + 1):
        pattern = block.to_bytes(5, "little")  # bytes 7..12 of a header: the LSN's top 5
        position = start + 7
        while (hit := data.find(pattern, position, stop + 7)) >= 0:
            header = hit - 7
            if best is not None and header >= best[0]:
                break
            if not any(data[header : header + RECORD_HEADER_SIZE]):
                # A zero run: a header holds a non-zero byte among its first 12 (LSN >= 1),
                # so the next one starts at most 11 bytes before the run's end.
                after = _NON_ZERO.search(data, hit)
                if after is None:
                    break
                position = max(hit + 1, after.start() - 4)
                continue
            decoded = decode_record(data, header)
            if decoded.found is Found.RECORD and decoded.lsn > lsn:
                best = (header, decoded.lsn)
                break
            position = hit + 1
    return best


def _written_end(data: bytes) -> int:
    """Past the last sector holding a non-zero byte (capped at the file size): the rest is
    preallocated space, not data anybody wrote."""
    last_nonzero = len(data.rstrip(b"\0"))
    return min(len(data), -(-last_nonzero // SECTOR) * SECTOR)


def has_zero_sector(data: bytes, start: int, end: int) -> bool:
    """Whether the part of [start, end) inside some 512-byte-aligned sector is all zeros."""
    while start < end:
        stop = min(end, (start // SECTOR + 1) * SECTOR)
        if data.count(0, start, stop) == stop - start:
            return True
        start = stop
    return False


def iter_records(data: bytes, first_lsn: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(lsn, body) of every record in [segment header, end); raises RecordError if one
    fails its checks (the range was scanned good, so the file changed underneath)."""
    offset, expected = SEGMENT_HEADER_SIZE, first_lsn
    for frame_offset, lsn, count in read_frames(data, offset, first_lsn, end):
        for record_lsn, start, stop in frame_records(data, frame_offset, lsn):
            yield record_lsn, data[start:stop]
        offset, expected = frame_end(data, frame_offset), lsn + count
    if offset < end:
        decoded = decode_record(data, offset)
        if decoded.found is Found.RECORD:
            raise RecordError(offset, f"record has LSN {decoded.lsn}, expected {expected}")
        raise RecordError(offset, f"{decoded.found.value} where a record was")


def iter_checked(data: bytes, first_lsn: int, end: int, start: int) -> Iterator[tuple[int, bytes]]:
    """(lsn, body) of the records in [segment header, end) with an LSN >= `start`, from the
    same (immutable) `data` that `scan_segment` found good up to `end`: every checksum and
    batch table was verified there, once, so this only walks the frames (the replay's fast
    path). Raises RecordError if the frames do not chain as that scan found them, which
    only a caller passing other bytes or another `end` can cause."""
    unpack, unpack_batch = LENGTH_LSN.unpack_from, BATCH_HEAD.unpack_from
    offset, expected = SEGMENT_HEADER_SIZE, first_lsn
    end = min(end, len(data))
    # Every pass moves `offset` forward by at least a header: at most `end` / 20 passes.
    while offset + RECORD_HEADER_SIZE <= end:
        word, lsn = unpack(data, offset)
        body_start = offset + RECORD_HEADER_SIZE
        stop = body_start + (word & ~BATCH)
        if lsn != expected or stop > end:
            raise RecordError(offset, f"LSN {lsn}, length {word}: not what the scan found")
        if not word & BATCH:
            if lsn >= start:
                yield lsn, data[body_start:stop]
            expected = lsn + 1
        else:  # batch_records, inlined: this loop runs once per record of the log
            count, _ = unpack_batch(data, body_start)
            position = body_start + BATCH_HEAD.size + 4 * count
            for length in struct.unpack_from(f"<{count}I", data, body_start + BATCH_HEAD.size):
                if lsn >= start:
                    yield lsn, data[position : position + length]
                position += length
                lsn += 1
            expected = lsn
        offset = stop
    if offset != end:
        raise RecordError(offset, f"frames end at offset {offset}, the scan found {end}")
