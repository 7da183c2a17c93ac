"""Opening a log on real files: torn tails cut at every byte, corruption refused, repair."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from spinbroker.wal import Wal, WalCorruption, WalNewerVersion
from spinbroker.wal.frame import SEGMENT_HEADER_SIZE, encode_batch
from spinbroker.wal.reader import SECTOR
from spinbroker.wal.repair import repair
from spinbroker.wal.segment import segment_name

from .conftest import as_newer_version


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


async def small_log(directory: Path, preallocate: bool = False) -> tuple[list[bytes], list[Path]]:
    """A log of 30 records over at least 3 small segments: its records and segments."""
    bodies = [b"%03d" % i * 30 for i in range(30)]
    await write_log(directory, bodies, segment_size=512, preallocate=preallocate)
    segments = sorted(p for p in directory.iterdir() if p.suffix == ".log")
    assert len(segments) >= 3
    return bodies, segments


def record_offsets(first_lsn: int, bodies: list[bytes]) -> list[int]:
    offsets, offset = [], SEGMENT_HEADER_SIZE
    for i, body in enumerate(bodies):
        offsets.append(offset)
        offset += len(encode_batch(first_lsn + i, [body]))
    return offsets


async def test_cut_at_every_byte_of_the_last_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bodies = [b"record %d " % i * 4 for i in range(5)]
    source = tmp_path / "source"
    await write_log(source, bodies, preallocate=False)
    data = (source / segment_name(1)).read_bytes()
    last = record_offsets(1, bodies)[-1]
    assert len(data) == last + len(encode_batch(5, [bodies[-1]]))
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
    end = last + len(encode_batch(2, [bodies[-1]]))
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
    bodies, segments = await small_log(tmp_path)
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
    # the damaged record (LSN first_lsn + 1) and every one after it
    assert report.dropped == (first_lsn + 1, len(bodies) + 1)
    assert f"dropped at least {len(bodies) - first_lsn} records, LSN {first_lsn + 1} to 30" in (
        report.describe()
    )

    assert await read_log(tmp_path) == bodies[: first_lsn - 1 + 1]
    assert repair(tmp_path).changed is False


async def test_a_segment_of_a_newer_version_is_refused_and_never_cut(tmp_path: Path) -> None:
    """A segment with the segment magic but a higher version is a newer spinbroker's: open
    refuses it as that, not as corruption, even with damage in an older segment before it
    and what would be a torn tail after it, and changes nothing (a leftover temp file
    included); nor does repair (once it was corruption, and repair cut the log there: all of
    the newer version's records)."""
    _, segments = await small_log(tmp_path)
    newest, older = segments[-1], segments[1]
    newest.write_bytes(as_newer_version(newest.read_bytes()) + b"torn?")
    data = bytearray(older.read_bytes())
    data[SEGMENT_HEADER_SIZE + 30] ^= 0x04
    older.write_bytes(data)
    (tmp_path / (newest.name + ".tmp")).write_bytes(b"the next segment, half made")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    with pytest.raises(WalNewerVersion, match=r"version 2 .*likely written by a newer") as refused:
        Wal.open(tmp_path)
    assert refused.value.file == newest
    report = repair(tmp_path)
    assert not report.changed and report.refused is not None and report.remaining is not None
    assert f"refused, nothing changed: {newest.name}: segment format version 2" in (
        report.describe()
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


async def test_repair_puts_back_a_damaged_version_byte_instead_of_cutting(
    tmp_path: Path,
) -> None:
    """A flipped bit in a segment's version bytes is damage (the header's checksum still
    fits version 1), not a newer spinbroker's segment; its records are intact, so repair
    puts the magic back, keeping the original, and cuts nothing (once it moved the
    segment and every later one aside: all their records)."""
    bodies, segments = await small_log(tmp_path)
    middle = segments[1]
    original = middle.read_bytes()
    middle.write_bytes(original[:7] + bytes([original[7] ^ 0x04]) + original[8:])
    with pytest.raises(WalCorruption, match="version bytes are damaged"):
        Wal.open(tmp_path)
    report = repair(tmp_path)
    assert report.restored == [middle] and not report.moved and not report.truncated
    assert report.remaining is None and report.dropped is None
    assert middle.read_bytes() == original
    assert report.backup is not None
    assert (report.backup / middle.name).read_bytes()[7] == original[7] ^ 0x04
    assert await read_log(tmp_path) == bodies


@pytest.mark.parametrize(
    ("byte", "reason"),
    [(9, "the first LSN"), (17, "the checksum")],
)
async def test_repair_rebuilds_a_damaged_header_from_the_file_name(
    tmp_path: Path, byte: int, reason: str
) -> None:
    """Review h15: a segment header holds only the magic and the first LSN, which the file
    name gives. Damaged anywhere else than its version bytes alone (two bytes of it, as a
    segment named by `--not-newer` always is), repair cut the log at its offset 0 and set
    every later segment aside: all their records, intact, gone from the log. Now the header
    is written again (original kept), and nothing is dropped."""
    bodies, segments = await small_log(tmp_path)
    middle = segments[1]
    original = middle.read_bytes()
    damaged = bytearray(original)
    damaged[byte] ^= 0x10
    middle.write_bytes(bytes(damaged))
    with pytest.raises(WalCorruption):
        Wal.open(tmp_path)
    report = repair(tmp_path)
    assert report.rebuilt == [middle], reason
    assert not report.moved and not report.truncated and report.dropped is None
    assert report.remaining is None and middle.read_bytes() == original
    assert report.backup is not None and (report.backup / middle.name).read_bytes() == damaged
    assert "rebuilt the header of" in report.describe()
    assert await read_log(tmp_path) == bodies


async def test_a_damaged_header_before_damaged_records_is_cut_as_before(
    tmp_path: Path,
) -> None:
    """The header is only rebuilt when the records after it check: with the first record
    damaged as well, the segment is cut at its start, as any damage."""
    _, segments = await small_log(tmp_path)
    middle = segments[1]
    damaged = bytearray(middle.read_bytes())
    damaged[9] ^= 0x10
    damaged[SEGMENT_HEADER_SIZE + 2] ^= 0x10
    middle.write_bytes(bytes(damaged))
    report = repair(tmp_path)
    assert not report.rebuilt and middle in report.moved
    assert report.remaining is None and report.dropped is not None


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
    _, segments = await small_log(tmp_path, preallocate=True)
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


@pytest.mark.parametrize("damage", ["zeroed sector", "zeroed header"])
async def test_damage_before_records_synced_after_it_is_refused_not_cut(
    tmp_path: Path, damage: str
) -> None:
    """A crash tears only what was written after the last fdatasync. Damage in the middle
    of the newest segment, with records after it that were written once the damaged ones
    were synced (each frame says what was synced when it was written), is a lost sector,
    not a torn write: cutting there would drop acknowledged records, so open refuses."""
    bodies = [b"small"] + [bytes(range(256)) * 4] * 10 + [b"late %d" % i for i in range(20)]
    wal, _ = Wal.open(tmp_path, fsync="always", segment_size=1 << 20)
    for body in bodies:  # one fdatasync each: every frame is written after the last sync
        wal.append(body)
        await wal.commit()
    await wal.close()
    path = tmp_path / segment_name(1)
    data = bytearray(path.read_bytes())
    offsets = record_offsets(1, bodies)
    if damage == "zeroed sector":  # a whole sector inside the 6th record (1 KiB body)
        start = (offsets[5] // SECTOR + 1) * SECTOR
        data[start : start + SECTOR] = bytes(SECTOR)
    else:
        data[offsets[5] : offsets[5] + 20] = bytes(20)
    path.write_bytes(bytes(data))
    with pytest.raises(WalCorruption, match="were durable, not torn"):
        Wal.open(tmp_path, fsync="always", segment_size=1 << 20)
    assert path.read_bytes() == data  # nothing cut


async def test_damage_before_records_never_synced_is_still_a_torn_tail(tmp_path: Path) -> None:
    """Mode `off` (or `batch` between syncs) writes many frames with no sync between them:
    a power loss may keep later ones and lose a sector of an earlier one. Their watermark
    says nothing was synced past the damage, so it is a torn tail: cut, with a warning."""
    bodies = [b"small"] + [bytes(range(256)) * 4] * 10
    await write_log(tmp_path, bodies, segment_size=1 << 20)
    path = tmp_path / segment_name(1)
    data = bytearray(path.read_bytes())
    start = (record_offsets(1, bodies)[5] // SECTOR + 1) * SECTOR
    data[start : start + SECTOR] = bytes(SECTOR)
    path.write_bytes(bytes(data))
    wal, recovery = Wal.open(tmp_path, fsync="off", segment_size=1 << 20)
    assert recovery.torn is not None and recovery.torn.offset == record_offsets(1, bodies)[5]
    _, records = wal.load()
    assert [body for _, body in records] == bodies[:5]
    await wal.close()
