"""Record frames and segment headers, from bytes: every prefix, every bit, zeros."""

from __future__ import annotations

import pytest

from spinbroker.wal.frame import (
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    BadSegmentHeader,
    Found,
    decode_record,
    decode_segment_header,
    encode_record,
    encode_segment_header,
)
from spinbroker.wal.reader import SECTOR, RecordError, iter_records, scan_segment


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


def test_every_prefix_is_short() -> None:
    frame = encode_record(3, b"a body of some length")
    for cut in range(len(frame)):
        assert decode_record(frame[:cut], 0).found is Found.SHORT, cut


def test_every_flipped_bit_is_detected() -> None:
    frame = encode_record(3, b"payload")
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
