"""The log head (spinbroker/wal/head.py): a lost newest segment is refused, not read as a
shorter log; `wal repair` accepts the loss; a crash between creating a segment and naming it
in the head, and a data dir made before heads existed, open as before."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest
from crc32c import crc32c

from spinbroker.wal import Wal, WalCorruption, WalNewerVersion
from spinbroker.wal.files import OsFiles
from spinbroker.wal.head import HEAD_NAME, encode_head, read_head, write_head
from spinbroker.wal.inspect import inspect
from spinbroker.wal.memfiles import MemoryFiles
from spinbroker.wal.repair import repair
from spinbroker.wal.segment import list_segments

from .test_wal_recovery import read_log, write_log

BODIES = [b"record %03d " % i * 8 for i in range(40)]  # ~100 B each: 8 segments of 512 B
SMALL = {"segment_size": 512, "preallocate": False}


def head_lsn(directory: Path) -> int | None:
    head = read_head(OsFiles(), directory)
    return None if head is None else head.first_lsn


def head_lsn_in(fs: MemoryFiles, directory: Path) -> int | None:
    head = read_head(fs, directory)
    return None if head is None else head.first_lsn


def segments(directory: Path) -> list[int]:
    return [lsn for lsn, _ in list_segments(OsFiles(), directory)]


async def test_the_head_names_the_newest_segment_after_every_roll(tmp_path: Path) -> None:
    wal, _ = Wal.open(tmp_path, fsync="off", **SMALL)  # type: ignore[arg-type]
    assert head_lsn(tmp_path) == 1  # a fresh log's first segment
    for body in BODIES:
        wal.append(body)
        await wal.commit()
        assert head_lsn(tmp_path) == segments(tmp_path)[-1]
    await wal.close()
    assert len(segments(tmp_path)) > 3


async def test_a_lost_newest_segment_refuses_to_open_until_repaired(tmp_path: Path) -> None:
    await write_log(tmp_path, BODIES, **SMALL)
    *kept, newest = segments(tmp_path)
    (tmp_path / f"wal-{newest:016x}.log").unlink()
    with pytest.raises(WalCorruption, match=f"wal-{newest:016x}.log, is missing") as refused:
        Wal.open(tmp_path, **SMALL)  # type: ignore[arg-type]
    assert refused.value.file.name == HEAD_NAME

    out = io.StringIO()
    assert not inspect(tmp_path, out)
    assert "CORRUPT: wal.head" in out.getvalue()

    report = repair(tmp_path)
    assert report.remaining is None and report.head_fixed and report.head_lsn == kept[-1]
    assert "is missing" in report.describe() and "the log head now names" in report.describe()
    assert report.backup is not None and (report.backup / HEAD_NAME).exists()
    assert await read_log(tmp_path, **SMALL) == BODIES[: newest - 1]


async def test_a_log_that_lost_every_segment_refuses_to_open(tmp_path: Path) -> None:
    await write_log(tmp_path, BODIES[:2])
    for lsn in segments(tmp_path):
        (tmp_path / f"wal-{lsn:016x}.log").unlink()
    with pytest.raises(WalCorruption, match="is missing"):
        Wal.open(tmp_path)
    report = repair(tmp_path)
    assert report.remaining is None and report.head_fixed and report.head_lsn is None
    assert await read_log(tmp_path) == []


async def test_a_head_behind_the_newest_segment_is_brought_up_to_date(tmp_path: Path) -> None:
    """What a crash between creating a segment and writing the head leaves."""
    await write_log(tmp_path, BODIES, **SMALL)
    newest = segments(tmp_path)[-1]
    write_head(OsFiles(), tmp_path, 1)
    assert await read_log(tmp_path, **SMALL) == BODIES
    assert head_lsn(tmp_path) == newest


async def test_a_data_dir_from_before_the_head_gets_one(tmp_path: Path) -> None:
    await write_log(tmp_path, BODIES, **SMALL)
    (tmp_path / HEAD_NAME).unlink()
    assert await read_log(tmp_path, **SMALL) == BODIES
    assert head_lsn(tmp_path) == segments(tmp_path)[-1]


async def test_a_damaged_head_refuses_to_open_until_repaired(tmp_path: Path) -> None:
    await write_log(tmp_path, BODIES, **SMALL)
    path = tmp_path / HEAD_NAME
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(WalCorruption, match="log head is damaged"):
        Wal.open(tmp_path, **SMALL)  # type: ignore[arg-type]
    report = repair(tmp_path)
    assert report.remaining is None and report.head_fixed
    assert report.head_lsn == segments(tmp_path)[-1]
    assert await read_log(tmp_path, **SMALL) == BODIES


async def test_a_newer_version_s_head_is_refused_and_left_alone(tmp_path: Path) -> None:
    await write_log(tmp_path, BODIES[:3])
    path = tmp_path / HEAD_NAME
    body = b"SPBHEAD" + bytes([2]) + (1).to_bytes(8, "little")  # as a version 2 would write
    newer = body + crc32c(body).to_bytes(4, "little")
    path.write_bytes(newer)
    with pytest.raises(WalNewerVersion, match="log head version 2"):
        Wal.open(tmp_path)
    report = repair(tmp_path)
    assert report.refused is not None and "log head version 2" in report.refused
    assert path.read_bytes() == newer


async def test_a_newer_head_of_another_size_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A newer version may lay its head out otherwise (h13): its size is no damage."""
    await write_log(tmp_path, BODIES[:3])
    path = tmp_path / HEAD_NAME
    body = b"SPBHEAD" + bytes([2]) + (1).to_bytes(8, "little") + (7).to_bytes(8, "little")
    newer = body + crc32c(body).to_bytes(4, "little")
    path.write_bytes(newer)
    out = io.StringIO()
    assert not inspect(tmp_path, out)
    assert "NEWER VERSION" in out.getvalue() and "CORRUPT" not in out.getvalue()
    with pytest.raises(WalNewerVersion, match="log head version 2"):
        Wal.open(tmp_path)
    assert repair(tmp_path).refused is not None
    assert path.read_bytes() == newer


async def test_a_full_disk_neither_fails_a_roll_nor_a_start_over_the_head(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The head is only a guard (h13): a disk too full to write it lags the head behind,
    with a warning, as a crash between a roll and the head's update would; every commit
    and the next start go on as before the head existed."""
    fs = MemoryFiles()
    directory = Path("/data")
    options = {"segment_size": 512, "preallocate": False, "files": fs}
    wal, _ = Wal.open(directory, fsync="always", **options)  # type: ignore[arg-type]
    fs.fail("write", errno.ENOSPC, path_contains=HEAD_NAME)
    for body in BODIES:
        wal.append(body)
        await wal.commit()
    await wal.close()
    assert "could not name segment" in caplog.text
    assert head_lsn_in(fs, directory) == 1  # lagging: every roll's update failed

    wal, _ = Wal.open(directory, fsync="always", **options)  # type: ignore[arg-type]
    _, records = wal.load()
    assert [body for _, body in records] == BODIES
    await wal.close()

    fs.heal()
    wal, _ = Wal.open(directory, fsync="always", **options)  # type: ignore[arg-type]
    await wal.close()
    assert head_lsn_in(fs, directory) == list_segments(fs, directory)[-1][0]


async def test_a_leftover_head_temp_file_is_removed_at_open(tmp_path: Path) -> None:
    await write_log(tmp_path, BODIES[:3])
    leftover = tmp_path / (HEAD_NAME + ".tmp")
    leftover.write_bytes(b"SPBHE")  # a crash in the middle of write_head
    wal, recovery = Wal.open(tmp_path)
    await wal.close()
    assert leftover in recovery.removed_temp and not leftover.exists()


async def test_a_damaged_version_byte_is_damage_not_a_newer_head(tmp_path: Path) -> None:
    """The checksum fits this version's number: the byte was damaged (as for segments)."""
    await write_log(tmp_path, BODIES[:3])
    path = tmp_path / HEAD_NAME
    damaged = bytearray(encode_head(1))
    damaged[7] = 2
    path.write_bytes(bytes(damaged))
    with pytest.raises(WalCorruption, match="log head is damaged"):
        Wal.open(tmp_path)
    report = repair(tmp_path)
    assert report.refused is None and report.remaining is None and report.head_fixed
    assert await read_log(tmp_path) == BODIES[:3]


async def test_repair_that_sets_segments_aside_renames_the_head_quietly(tmp_path: Path) -> None:
    """A cut in an older segment moves the later ones aside, the newest included: the head
    then names what the cut left, and the report tells the loss once, with the cut."""
    await write_log(tmp_path, BODIES, **SMALL)
    second = segments(tmp_path)[1]
    path = tmp_path / f"wal-{second:016x}.log"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    report = repair(tmp_path)
    assert report.remaining is None and report.head_fixed
    assert [p.file.name for p in report.problems] == [path.name]
    assert head_lsn(tmp_path) == second
    assert len(await read_log(tmp_path, **SMALL)) < len(BODIES)
