"""Record frames and segment headers, from bytes: every prefix, every bit, zeros."""

from __future__ import annotations

import struct

import pytest
from crc32c import crc32c

from spinbroker.wal.frame import (
    BATCH,
    MAX_BATCH_BYTES,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    BadSegmentHeader,
    Found,
    NewerSegment,
    decode_record,
    decode_segment_header,
    encode_batch,
    encode_frames,
    encode_record,
    encode_segment_header,
    frame_records,
    frame_synced,
)
from spinbroker.wal.reader import SECTOR, RecordError, iter_checked, iter_records, scan_segment

from .conftest import as_newer_version


def test_record_roundtrip() -> None:
    frame = encode_record(7, b"hello")
    decoded = decode_record(frame, 0)
    assert decoded.found is Found.RECORD
    assert (decoded.lsn, decoded.end) == (7, len(frame))
    assert decoded.body is not None and bytes(decoded.body) == b"hello"
    assert len(frame) == RECORD_HEADER_SIZE + 5


def test_empty_body_and_offset() -> None:
    data = b"junk" + encode_record(1, b"")
    decoded = decode_record(data, 4)
    assert decoded.found is Found.RECORD
    assert decoded.body is not None and bytes(decoded.body) == b""


SINGLE_AND_BATCH = pytest.mark.parametrize(
    "frame",
    [encode_record(3, b"a body of some length"), encode_batch(3, [b"first", b"", b"third"])],
    ids=["single", "batch"],
)


@SINGLE_AND_BATCH
def test_every_prefix_is_short(frame: bytes) -> None:
    for cut in range(len(frame)):
        assert decode_record(frame[:cut], 0).found is Found.SHORT, cut


@SINGLE_AND_BATCH
def test_every_flipped_bit_is_detected(frame: bytes) -> None:
    for bit in range(len(frame) * 8):
        damaged = bytearray(frame)
        damaged[bit // 8] ^= 1 << (bit % 8)
        found = decode_record(bytes(damaged), 0).found
        expected = Found.BAD_BODY if bit >= RECORD_HEADER_SIZE * 8 else Found.BAD_HEADER
        assert found is expected, bit


def test_flipped_length_bit_never_reads_as_short() -> None:
    frame = encode_record(1, b"x" * 40) + bytes(100)
    for bit in range(32):
        damaged = bytearray(frame)
        damaged[bit // 8] ^= 1 << (bit % 8)
        assert decode_record(bytes(damaged), 0).found is Found.BAD_HEADER


def test_zero_header_is_zeros() -> None:
    assert decode_record(bytes(64), 0).found is Found.ZEROS


def test_segment_header() -> None:
    header = encode_segment_header(0x1234)
    assert len(header) == SEGMENT_HEADER_SIZE
    assert decode_segment_header(header + b"rest") == 0x1234
    for damaged in (header[:10], b"X" + header[1:], header[:9] + b"\xff" + header[10:]):
        with pytest.raises(BadSegmentHeader):
            decode_segment_header(damaged)


def test_a_segment_header_of_a_newer_version_is_no_damage() -> None:
    """A header with the segment magic but a higher version is a newer spinbroker's, however
    the rest of it reads (a newer layout need not be this one); a lower version or another
    magic is damage (once a newer version was damage too, which repair would cut). So is a
    header of this version with a flipped bit in its version: its checksum still fits."""
    header = encode_segment_header(7)
    newer = (as_newer_version(header), as_newer_version(header, 256), b"SPBWAL\x00\x02")
    for data in newer:
        with pytest.raises(NewerSegment, match=r"version .* likely written by a newer spinbroker"):
            decode_segment_header(data)
    for damaged in (b"SPBWAL\x00\x00" + header[8:], b"SPBWAX\x00\x02" + header[8:]):
        with pytest.raises(BadSegmentHeader):
            decode_segment_header(damaged)
    for bit in range(16):
        flipped = bytearray(header)
        flipped[6 + bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(BadSegmentHeader, match="version bytes are damaged"):
            decode_segment_header(bytes(flipped))
    with pytest.raises(BadSegmentHeader, match="header whose magic is damaged"):
        decode_segment_header(b"R" + header[1:])


def _segment(count: int, body: bytes = b"body") -> bytes:
    return encode_segment_header(5) + b"".join(encode_record(5 + i, body) for i in range(count))


def test_scan_clean_segment_with_zero_tail() -> None:
    data = _segment(3) + bytes(1000)
    scan = scan_segment(data, 5)
    assert (scan.records, scan.next_lsn, scan.damage) == (3, 8, None)
    assert scan.end == len(_segment(3))
    assert [lsn for lsn, _ in iter_records(data, 5, scan.end)] == [5, 6, 7]


def test_scan_wrong_lsn_is_corruption() -> None:
    data = encode_segment_header(5) + encode_record(5, b"a") + encode_record(7, b"b")
    damage = scan_segment(data, 5).damage
    assert damage is not None and not damage.torn
    assert damage.offset == SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 1


def test_scan_zero_sector_inside_record_is_torn() -> None:
    good = _segment(1)
    big = encode_record(6, bytes(range(256)) * 8)
    data = bytearray(good + big)
    first_full_sector = (len(good) // SECTOR + 1) * SECTOR
    data[first_full_sector : first_full_sector + SECTOR] = bytes(SECTOR)
    damage = scan_segment(bytes(data), 5).damage
    assert damage is not None and damage.torn and damage.offset == len(good)


def test_scan_bit_flip_without_zero_sector_is_corruption() -> None:
    data = bytearray(_segment(3))
    data[-2] ^= 0x10
    damage = scan_segment(bytes(data), 5).damage
    assert damage is not None and not damage.torn


def test_scan_debris_after_zero_header_is_torn() -> None:
    data = _segment(2) + bytes(SECTOR) + encode_record(9, b"late")
    scan = scan_segment(data, 5)
    assert scan.records == 2
    assert scan.damage is not None and scan.damage.torn
    assert scan.damage.data_end == len(data)


def test_iter_records_refuses_changed_bytes() -> None:
    data = bytearray(_segment(2))
    end = len(data)
    data[-1] ^= 1
    with pytest.raises(RecordError):
        list(iter_records(bytes(data), 5, end))


# -- batch frames: many records, one header -----------------------------------------------

BODIES = [b"first", b"", b"third record", bytes(range(200))]


def _records_of(data: bytes, offset: int, lsn: int) -> list[tuple[int, bytes]]:
    return [(n, data[a:b]) for n, a, b in frame_records(data, offset, lsn)]


def test_batch_roundtrip() -> None:
    frame = encode_batch(9, BODIES)
    decoded = decode_record(frame, 0)
    assert decoded.found is Found.RECORD
    assert (decoded.lsn, decoded.count, decoded.end) == (9, 4, len(frame))
    assert _records_of(frame, 0, 9) == list(enumerate(BODIES, 9))
    # one header, count and watermark, and a 4-byte length per record
    assert len(frame) == RECORD_HEADER_SIZE + 12 + 4 * len(BODIES) + sum(map(len, BODIES))


def _with_body(lsn: int, body: bytes) -> bytes:
    """A batch frame around `body` as is, with sound checksums (what a buggy writer makes)."""
    head = struct.pack("<IQI", len(body) | BATCH, lsn, crc32c(body))
    return head + struct.pack("<I", crc32c(head)) + body


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no count
        struct.pack("<I", 1),  # no watermark
        struct.pack("<IQ", 0, 0),  # no records
        struct.pack("<IQI", 1, 0, 5) + b"abcd",  # lengths sum to more than the body
        struct.pack("<IQI", 1, 0, 3) + b"abcd",  # ... or to less
        struct.pack("<IQ", 1000, 0) + b"abcd",  # a table longer than the body
    ],
    ids=["empty", "no watermark", "count 0", "too short", "too long", "table past the end"],
)
def test_a_batch_whose_table_does_not_add_up_is_corruption(body: bytes) -> None:
    frame = _with_body(6, body)
    assert decode_record(frame, 0).found is Found.BAD_BATCH
    data = _segment(1) + frame + bytes(SECTOR)
    scan = scan_segment(data, 5)
    assert scan.records == 1 and scan.damage is not None
    assert not scan.damage.torn and scan.damage.offset == len(_segment(1))
    assert "bad table" in scan.damage.detail


def test_scan_and_iterators_walk_single_and_batch_frames() -> None:
    data = (
        encode_segment_header(5)
        + encode_record(5, b"one")
        + encode_batch(6, BODIES)
        + encode_record(10, b"after")
        + encode_batch(11, [b"x", b"y"])
    )
    scan = scan_segment(data + bytes(100), 5)
    assert (scan.records, scan.next_lsn, scan.end, scan.damage) == (8, 13, len(data), None)
    expected = [(5, b"one"), *enumerate(BODIES, 6), (10, b"after"), (11, b"x"), (12, b"y")]
    assert list(iter_records(data, 5, scan.end)) == expected
    assert list(iter_checked(data, 5, scan.end, 5)) == expected
    # a snapshot may cover part of a batch: the rest of it is still replayed
    assert list(iter_checked(data, 5, scan.end, 8)) == expected[3:]


def test_a_torn_batch_at_the_end_is_cut_whole() -> None:
    good = _segment(2)
    batch = encode_batch(7, [bytes(range(256)) * 4] * 3)
    data = bytearray(good + batch)
    first_full_sector = (len(good) // SECTOR + 1) * SECTOR
    data[first_full_sector : first_full_sector + SECTOR] = bytes(SECTOR)
    scan = scan_segment(bytes(data), 5)
    assert scan.records == 2 and scan.end == len(good)
    assert scan.damage is not None and scan.damage.torn


def test_encode_frames_batches_runs_each_with_the_synced_watermark() -> None:
    assert encode_frames(4, [b"lone"], 2) == [encode_batch(4, [b"lone"], 2)]
    assert encode_frames(4, [b"a", b"b"], 3) == [encode_batch(4, [b"a", b"b"], 3)]
    assert frame_synced(encode_batch(4, [b"a"], 3), 0) == 3
    assert frame_synced(encode_record(4, b"a"), 0) == 0  # an old single frame: nothing known
    third = MAX_BATCH_BYTES // 3
    big = bytes(MAX_BATCH_BYTES + 1)
    bodies = [bytes(third)] * 4 + [big, b"z"]
    frames = encode_frames(1, bodies)
    # three thirds fit a frame; the fourth starts the next; the big one goes alone
    assert [decode_record(f, 0).count for f in frames] == [3, 1, 1, 1]
    assert [decode_record(f, 0).lsn for f in frames] == [1, 4, 5, 6]
    data = encode_segment_header(1) + b"".join(frames)
    assert [b for _, b in iter_records(data, 1, len(data))] == bodies
