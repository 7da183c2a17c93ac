"""Opening a log on real files: torn tails cut at every byte, corruption refused, repair."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from spinbroker.wal import Wal, WalCorruption
from spinbroker.wal.frame import SEGMENT_HEADER_SIZE, encode_record
from spinbroker.wal.reader import SECTOR
from spinbroker.wal.repair import repair
from spinbroker.wal.segment import segment_name


async def write_log(directory: Path, bodies: list[bytes], **options: object) -> None:
    wal, _ = Wal.open(directory, fsync="off", **options)  # type: ignore[arg-type]
    for body in bodies:
        wal.append(body)
        await wal.commit()
    await wal.close()


async def read_log(directory: Path, **options: object) -> list[bytes]:
    wal, _ = Wal.open(directory, fsync="off", **options)  # type: ignore[arg-type]
    _, records = wal.load()
    bodies = [body for _, body in records]
    await wal.close()
    return bodies


def record_offsets(first_lsn: int, bodies: list[bytes]) -> list[int]:
    offsets, offset = [], SEGMENT_HEADER_SIZE
    for i, body in enumerate(bodies):
        offsets.append(offset)
        offset += len(encode_record(first_lsn + i, body))
    return offsets


async def test_cut_at_every_byte_of_the_last_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bodies = [b"record %d " % i * 4 for i in range(5)]
    source = tmp_path / "source"
    await write_log(source, bodies, preallocate=False)
    data = (source / segment_name(1)).read_bytes()
    last = record_offsets(1, bodies)[-1]
    assert len(data) == last + len(encode_record(5, bodies[-1]))
    caplog.set_level(logging.WARNING, logger="spinbroker.wal")
    for cut in range(last, len(data)):
        directory = tmp_path / f"cut-{cut}"
        directory.mkdir()
        (directory / segment_name(1)).write_bytes(data[:cut])
        wal, recovery = Wal.open(directory, preallocate=False)
        if cut == last:
            assert recovery.torn is None
        else:
            torn = recovery.torn
            assert torn is not None
            assert (torn.file.name, torn.offset, torn.dropped) == (
                segment_name(1),
                last,
                cut - last,
            )
            assert torn.saved_to.read_bytes() == data[last:cut]
            assert f"offset {last}, {cut - last} bytes dropped" in caplog.text
        _, records = wal.load()
        assert [body for _, body in records] == bodies[:-1]
        assert wal.append(b"after") == 5
        await wal.commit()
        await wal.close()
        assert await read_log(directory, preallocate=False) == [*bodies[:-1], b"after"]


async def test_unwritten_sectors_of_a_preallocated_tail_are_torn(tmp_path: Path) -> None:
    bodies = [b"small", bytes(range(256)) * 12]
    source = tmp_path / "source"
    await write_log(source, bodies, segment_size=1 << 16)
    data = (source / segment_name(1)).read_bytes()
    assert len(data) == 1 << 16
    last = record_offsets(1, bodies)[-1]
    end = last + len(encode_record(2, bodies[-1]))
    boundaries = range((last // SECTOR + 1) * SECTOR, end, SECTOR)
    assert len(boundaries) >= 5
    for boundary in boundaries:
        for lost in ("rest", "one"):
            directory = tmp_path / f"zero-{boundary}-{lost}"
            directory.mkdir()
            damaged = bytearray(data)
            stop = len(data) if lost == "rest" else boundary + SECTOR
            damaged[boundary:stop] = bytes(stop - boundary)
            (directory / segment_name(1)).write_bytes(damaged)
            wal, recovery = Wal.open(directory, segment_size=1 << 16)
            assert recovery.torn is not None and recovery.torn.offset == last
            _, records = wal.load()
            assert [body for _, body in records] == bodies[:1]
            await wal.close()


async def test_flipped_bit_in_the_middle_is_refused_then_repaired(tmp_path: Path) -> None:
    bodies = [b"%03d" % i * 30 for i in range(30)]
    await write_log(tmp_path, bodies, segment_size=512, preallocate=False)
    segments = sorted(p for p in tmp_path.iterdir() if p.suffix == ".log")
    assert len(segments) >= 3
    middle = segments[1]
    first_lsn = int(middle.name[4:20], 16)
    in_middle = [b for i, b in enumerate(bodies, 1) if first_lsn <= i < first_lsn + 4][:2]
    offset = record_offsets(first_lsn, in_middle)[1]
    data = bytearray(middle.read_bytes())
    data[offset + 30] ^= 0x04
    middle.write_bytes(data)

    with pytest.raises(WalCorruption) as refused:
        Wal.open(tmp_path)
    assert (refused.value.file, refused.value.offset) == (middle, offset)
    assert "checksum" in refused.value.detail

    report = repair(tmp_path)
    assert report.truncated == [(middle, offset)]
    assert report.moved == segments[2:]
    assert report.backup is not None and report.remaining is None
    assert (report.backup / middle.name).read_bytes() == bytes(data)
    assert sorted(p.name for p in report.backup.iterdir() if p.suffix == ".log") == [
        p.name for p in segments[1:]
    ]
    assert "truncated" in report.describe()

    assert await read_log(tmp_path) == bodies[: first_lsn - 1 + 1]
    assert repair(tmp_path).changed is False


async def test_corruption_in_the_newest_segment_is_not_a_torn_tail(tmp_path: Path) -> None:
    bodies = [b"alpha" * 10, b"beta" * 10, b"gamma" * 10]
    await write_log(tmp_path, bodies, preallocate=False)
    path = tmp_path / segment_name(1)
    offsets = record_offsets(1, bodies)
    for position in (offsets[1] + 2, offsets[1] + 25, offsets[2] + 30):
        data = bytearray(path.read_bytes())
        data[position] ^= 0x01
        path.write_bytes(data)
        with pytest.raises(WalCorruption):
            Wal.open(tmp_path)
        data[position] ^= 0x01
        path.write_bytes(data)
    assert await read_log(tmp_path) == bodies


async def test_missing_segment_is_corruption(tmp_path: Path) -> None:
    bodies = [b"%03d" % i * 30 for i in range(30)]
    await write_log(tmp_path, bodies, segment_size=512)
    segments = sorted(p for p in tmp_path.iterdir() if p.suffix == ".log")
    segments[1].unlink()
    with pytest.raises(WalCorruption) as refused:
        Wal.open(tmp_path)
    assert refused.value.file == segments[2]
    assert "expected" in refused.value.detail


async def test_leftover_temp_files_are_removed(tmp_path: Path) -> None:
    await write_log(tmp_path, [b"one"])
    (tmp_path / (segment_name(9) + ".tmp")).write_bytes(b"half a segment")
    wal, recovery = Wal.open(tmp_path)
    assert [p.name for p in recovery.removed_temp] == [segment_name(9) + ".tmp"]
    _, records = wal.load()
    assert [b for _, b in records] == [b"one"]
    await wal.close()
