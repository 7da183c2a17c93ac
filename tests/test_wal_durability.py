"""Power loss and failing disks, through the in-memory file layer."""

from __future__ import annotations

import contextlib
import errno
import random
from pathlib import Path

import pytest

from spinbroker.wal import Wal, WalError, WalWriteError
from spinbroker.wal.memfiles import MemoryFiles

D = Path("/data/wal")


def open_wal(fs: MemoryFiles, **options: object) -> Wal:
    options.setdefault("segment_size", 1 << 16)  # the simulated disk copies whole files
    wal, _ = Wal.open(D, files=fs, **options)  # type: ignore[arg-type]
    return wal


async def crash(fs: MemoryFiles, wal: Wal, rng: random.Random | None = None) -> MemoryFiles:
    """Cut the power, then let the dead process's Wal release its thread."""
    after = fs.crash(rng)
    with contextlib.suppress(WalError):
        await wal.close()
    return after


async def replay(fs: MemoryFiles, **options: object) -> list[bytes]:
    wal = open_wal(fs, **options)
    _, records = wal.load()
    bodies = [body for _, body in records]
    await wal.close()
    return bodies


async def test_committed_records_survive_power_loss_uncommitted_vanish() -> None:
    fs = MemoryFiles()
    wal = open_wal(fs, segment_size=1024)
    committed = [b"committed %d" % i for i in range(100)]
    for body in committed:
        wal.append(body)
    await wal.commit()
    for i in range(5):
        wal.append(b"not committed %d" % i)
    fs = await crash(fs, wal)
    assert await replay(fs) == committed


@pytest.mark.parametrize("seed", range(20))
async def test_torn_power_loss_keeps_a_prefix_with_every_commit(seed: int) -> None:
    rng = random.Random(seed)
    fs = MemoryFiles()
    wal = open_wal(fs, segment_size=2048, fsync="batch", batch_interval_ms=1e9)
    bodies = [bytes([i]) * rng.randrange(1, 700) for i in range(40)]
    for body in bodies[:20]:
        wal.append(body)
    await wal.commit()
    await wal.write_snapshot(wal.last_lsn, b"state")  # syncs 1..20
    for body in bodies[20:]:
        wal.append(body)
        await wal.commit()  # batch: written, not synced
    fs = await crash(fs, wal, rng)
    recovered = await replay(fs)
    assert 0 <= len(recovered) <= 20
    assert recovered == bodies[20 : 20 + len(recovered)]


async def test_batch_mode_loss_window_is_the_unsynced_writes() -> None:
    fs = MemoryFiles()
    wal = open_wal(fs, fsync="batch", batch_interval_ms=1e9)
    wal.append(b"first")
    await wal.commit()  # the first flush of a batch log syncs
    wal.append(b"second")
    await wal.commit()  # written only: survives a process crash, not a power loss
    assert b"second" in fs.read(D / "wal-0000000000000001.log")
    fs = await crash(fs, wal)
    assert await replay(fs) == [b"first"]


async def test_off_mode_never_syncs_until_close() -> None:
    fs = MemoryFiles()
    wal = open_wal(fs, fsync="off")
    before = fs.calls["datasync"]
    for i in range(10):
        wal.append(b"%d" % i)
        await wal.commit()
    assert fs.calls["datasync"] == before
    await wal.close()
    assert fs.calls["datasync"] == before + 1
    assert await replay(fs.crash()) == [b"%d" % i for i in range(10)]


@pytest.mark.parametrize(
    ("op", "code"),
    [("write", errno.ENOSPC), ("write", errno.EIO), ("datasync", errno.EIO)],
)
async def test_failed_write_is_never_acknowledged_and_the_log_recovers(op: str, code: int) -> None:
    fs = MemoryFiles()
    wal = open_wal(fs)
    wal.append(b"good")
    await wal.commit()
    fs.fail(op, code, partial=9)
    wal.append(b"during failure 1")
    with pytest.raises(WalWriteError) as failed:
        await wal.commit()
    assert failed.value.errno == code
    assert wal.error is not None and wal.durable_lsn == 1
    wal.append(b"during failure 2")
    with pytest.raises(WalWriteError):
        await wal.commit()

    lost = await crash(fs, wal)
    assert await replay(lost) == [b"good"]


@pytest.mark.parametrize("op", ["write", "datasync", "truncate"])
async def test_writes_resume_after_the_disk_heals(op: str) -> None:
    fs = MemoryFiles()
    wal = open_wal(fs)
    wal.append(b"good")
    await wal.commit()
    fs.fail("datasync", errno.EIO, times=1)
    fs.fail(op, errno.ENOSPC)
    wal.append(b"retried")
    for _ in range(3):
        with pytest.raises(WalWriteError):
            await wal.commit()
    fs.heal()
    wal.append(b"after")
    await wal.commit()
    assert wal.error is None and wal.durable_lsn == 3
    fs = await crash(fs, wal)
    assert await replay(fs) == [b"good", b"retried", b"after"]


async def test_failed_fdatasync_data_is_written_again() -> None:
    """Linux drops the dirty pages a failed fdatasync covered; a retry must rewrite them."""
    fs = MemoryFiles()
    wal = open_wal(fs)
    wal.append(b"x" * 3000)
    fs.fail("datasync", errno.EIO, times=1)
    with pytest.raises(WalWriteError):
        await wal.commit()
    writes = fs.calls["write"]
    await wal.commit()  # nothing new appended: the retry rewrites and syncs
    assert fs.calls["write"] == writes + 1
    fs = await crash(fs, wal)
    assert await replay(fs) == [b"x" * 3000]


async def test_failed_segment_roll_keeps_a_consistent_log() -> None:
    fs = MemoryFiles()
    wal = open_wal(fs, segment_size=512)
    bodies = [b"%02d" % i * 40 for i in range(30)]
    fs.fail("create", errno.ENOSPC)
    acked = []
    for body in bodies:
        wal.append(body)
        try:
            await wal.commit()
            acked.append(body)
        except WalWriteError:
            pass
    assert len(acked) < len(bodies)
    fs.heal()
    await wal.commit()
    fs = await crash(fs, wal)
    assert await replay(fs) == bodies
    assert len([n for n in fs.listdir(D) if n.endswith(".log")]) >= 2


async def test_close_flushes_and_reports_a_failure() -> None:
    fs = MemoryFiles()
    wal = open_wal(fs)
    wal.append(b"pending")
    fs.fail("write", errno.EIO)
    with pytest.raises(WalWriteError):
        await wal.close()
    with pytest.raises(WalError):
        wal.append(b"too late")
    fs.heal()
    assert await replay(fs.crash()) == []
