"""Group commit: concurrent committers share flushes; nothing is acknowledged early."""

from __future__ import annotations

import asyncio
import errno
import functools
import threading
import time
from pathlib import Path

import pytest

from spinbroker.wal import Wal, WalWriteError
from spinbroker.wal.files import OsFiles, WalFile
from spinbroker.wal.frame import SEGMENT_HEADER_SIZE, read_frames
from spinbroker.wal.memfiles import MemoryFiles
from spinbroker.wal.reader import iter_records, scan_segment
from spinbroker.wal.segment import segment_name
from spinbroker.wal.writer import IoThread

D = Path("/data/wal")


def open_wal(fs: MemoryFiles, **options: object) -> Wal:
    wal, _ = Wal.open(D, files=fs, segment_size=1 << 16, **options)  # type: ignore[arg-type]
    return wal


async def test_commits_appended_in_one_loop_turn_share_one_sync() -> None:
    fs = MemoryFiles()
    wal = open_wal(fs)
    syncs, writes = fs.calls["datasync"], fs.calls["write"]

    async def one(i: int) -> int:
        lsn = wal.append(b"record %d" % i)
        await wal.commit()
        assert wal.durable_lsn >= lsn
        return lsn

    lsns = await asyncio.gather(*(one(i) for i in range(100)))
    assert sorted(lsns) == list(range(1, 101))
    assert fs.calls["datasync"] - syncs == 1
    assert fs.calls["write"] - writes == 1
    await wal.close()


async def test_appends_during_a_flush_share_the_next_one() -> None:
    fs = MemoryFiles()
    wal = open_wal(fs)
    syncs = fs.calls["datasync"]
    in_sync, release = threading.Event(), threading.Event()

    def slow_disk(path: Path) -> None:
        in_sync.set()
        release.wait()

    fs.hooks["datasync"] = slow_disk
    wal.append(b"first")
    first = asyncio.ensure_future(wal.commit())
    await asyncio.to_thread(in_sync.wait)  # flush 1 is inside fdatasync now

    async def one(i: int) -> None:
        wal.append(b"later %d" % i)
        await wal.commit()

    later = [asyncio.ensure_future(one(i)) for i in range(99)]
    await asyncio.sleep(0)  # each task appends and waits
    assert wal.last_lsn == 100 and wal.durable_lsn == 0
    assert not first.done() and not any(task.done() for task in later)
    del fs.hooks["datasync"]
    release.set()
    await asyncio.gather(first, *later)
    assert fs.calls["datasync"] - syncs == 2
    await wal.close()
    # each flush wrote one frame: the lone first record, then the 99 as one batch
    data = fs.read(D / segment_name(1))
    frames = read_frames(data, SEGMENT_HEADER_SIZE, 1, len(data))
    assert [(lsn, count) for _, lsn, count in frames] == [(1, 1), (2, 99)]
    assert [lsn for lsn, _ in iter_records(data, 1, scan_segment(data, 1).end)] == list(
        range(1, 101)
    )


async def test_stats_count_syncs_and_the_records_they_made_durable() -> None:
    """STATS' log section: two flushes (one record, then 99 that waited behind it) are two
    syncs covering 100 records; the slow one is the slowest."""
    fs = MemoryFiles()
    wal = open_wal(fs)
    before = wal.stats()
    assert (before["syncs"], before["synced_records"]) == (0, 0)
    in_sync, release = threading.Event(), threading.Event()

    def slow_disk(path: Path) -> None:
        if not in_sync.is_set():
            in_sync.set()
            release.wait(10)

    fs.hooks["datasync"] = slow_disk
    wal.append(b"first")
    first = asyncio.ensure_future(wal.commit())
    await asyncio.to_thread(in_sync.wait, 10)
    for i in range(99):
        wal.append(b"later %d" % i)
    later = asyncio.ensure_future(wal.commit())
    await asyncio.to_thread(time.sleep, 0.05)  # the first sync is slow on purpose
    release.set()
    await asyncio.gather(first, later)
    stats = wal.stats()
    assert (stats["syncs"], stats["synced_records"]) == (2, 100)
    assert 50 <= stats["max_sync_ms"] <= stats["sync_seconds"] * 1000
    await wal.close()


async def test_commit_waits_for_the_sync() -> None:
    fs = MemoryFiles()
    wal = open_wal(fs)
    in_sync, release = threading.Event(), threading.Event()

    def slow_disk(path: Path) -> None:
        in_sync.set()
        release.wait()

    fs.hooks["datasync"] = slow_disk
    wal.append(b"record")
    commit = asyncio.ensure_future(wal.commit())
    await asyncio.to_thread(in_sync.wait)
    for _ in range(5):
        await asyncio.sleep(0)
    assert not commit.done()
    assert fs.durable_content(D / "wal-0000000000000001.log").count(b"record") == 0
    release.set()
    await commit
    assert fs.durable_content(D / "wal-0000000000000001.log").count(b"record") == 1
    await wal.close()


async def test_commit_with_nothing_new_returns_at_once() -> None:
    fs = MemoryFiles()
    wal = open_wal(fs)
    await wal.commit()
    wal.append(b"one")
    await wal.commit()
    syncs = fs.calls["datasync"]
    await wal.commit()
    assert fs.calls["datasync"] == syncs
    await wal.close()


class CountingFile:
    """A real file whose fdatasync calls are counted."""

    def __init__(self, handle: WalFile, counter: list[int]) -> None:
        self._handle = handle
        self._counter = counter
        self.pwrite = handle.pwrite
        self.sync = handle.sync
        self.truncate = handle.truncate
        self.allocate = handle.allocate
        self.size = handle.size
        self.close = handle.close

    def datasync(self) -> None:
        self._counter[0] += 1
        self._handle.datasync()


class CountingFiles(OsFiles):
    def __init__(self) -> None:
        self.syncs = [0]

    def create(self, path: Path) -> WalFile:
        return CountingFile(super().create(path), self.syncs)

    def open(self, path: Path) -> WalFile:
        return CountingFile(super().open(path), self.syncs)


async def test_real_disk_batches_many_committers(tmp_path: Path) -> None:
    files = CountingFiles()
    wal, _ = Wal.open(tmp_path, files=files, segment_size=1 << 20)

    async def committer(i: int) -> None:
        for j in range(10):
            wal.append(b"committer %d record %d" % (i, j))
            await wal.commit()

    await asyncio.gather(*(committer(i) for i in range(100)))
    assert wal.durable_lsn == 1000
    print(f"{files.syncs[0]} fdatasync calls for 1000 commits")
    assert files.syncs[0] <= 100, files.syncs
    await wal.close()


async def test_batch_mode_acks_after_write_and_syncs_within_the_interval() -> None:
    fs = MemoryFiles()
    wal = open_wal(fs, fsync="batch", batch_interval_ms=20)
    wal.append(b"one")
    await wal.commit()
    synced = threading.Event()
    fs.hooks["datasync"] = lambda path: synced.set()
    for i in range(50):
        wal.append(b"more %d" % i)
        await wal.commit()
    assert wal.durable_lsn == 51
    assert wal.synced_lsn < 51 or synced.is_set()
    assert await asyncio.to_thread(synced.wait, 5.0)
    while wal.synced_lsn < 51:  # the flush that synced reports back on the loop
        await asyncio.sleep(0)
    await wal.close()


async def test_on_commit_calls_back_once_synced_and_may_commit_again() -> None:
    """The callback form the server uses: called only after the fdatasync, at once when
    nothing is pending, and free to append and commit again from inside the callback."""
    fs = MemoryFiles()
    wal = open_wal(fs)
    got: list[tuple[str, BaseException | None, int]] = []
    done = asyncio.get_running_loop().create_future()

    def second(exc: BaseException | None) -> None:
        got.append(("second", exc, wal.durable_lsn))
        done.set_result(None)

    def first(exc: BaseException | None) -> None:
        got.append(("first", exc, wal.durable_lsn))
        wal.append(b"two")
        wal.on_commit(second)

    wal.append(b"one")
    wal.on_commit(first)
    assert got == []  # the flush runs on the IO thread: nothing synced yet
    await done
    assert got == [("first", None, 1), ("second", None, 2)]
    assert fs.durable_content(D / "wal-0000000000000001.log").count(b"two") == 1
    wal.on_commit(lambda exc: got.append(("now", exc, wal.durable_lsn)))
    assert got[-1] == ("now", None, 2)
    await wal.close()


async def test_on_commit_is_told_of_a_failed_sync() -> None:
    fs = MemoryFiles()
    wal = open_wal(fs)
    fs.fail("datasync", errno.EIO)
    failed = asyncio.get_running_loop().create_future()
    wal.append(b"lost")
    wal.on_commit(failed.set_result)
    exc = await failed
    assert isinstance(exc, WalWriteError) and exc.errno == errno.EIO
    assert wal.durable_lsn == 0
    fs.heal()
    await wal.close()


def running(name: str) -> bool:
    return any(t.name == name for t in threading.enumerate())


async def test_io_thread_runs_jobs_in_order_off_the_loop_and_reports_on_it() -> None:
    io = IoThread("test-io")
    loop = asyncio.get_running_loop()
    ran: list[tuple[int, str]] = []
    told: list[tuple[int, BaseException | None, str]] = []
    all_told = asyncio.Event()

    def job(i: int) -> None:
        ran.append((i, threading.current_thread().name))
        if i == 3:
            raise OSError(errno.EIO, "disk")

    def done(i: int, outcome: BaseException | None) -> None:
        told.append((i, outcome, threading.current_thread().name))
        if len(told) == 5:
            all_told.set()

    for i in range(5):
        io.submit(job, (i,), functools.partial(done, i), loop)
    await asyncio.wait_for(all_told.wait(), 10)
    assert ran == [(i, "test-io") for i in range(5)]
    loop_thread = threading.current_thread().name
    assert [(i, thread) for i, _, thread in told] == [(i, loop_thread) for i in range(5)]
    failures = [outcome for _, outcome, _ in told]
    assert isinstance(failures[3], OSError) and failures[:3] + failures[4:] == [None] * 4
    with pytest.raises(OSError, match="disk"):
        await io.run(job, 3)
    await io.run(job, 7)
    assert ran[-1] == (7, "test-io")
    io.stop()
    assert not running("test-io")


async def test_io_thread_starts_with_its_first_job_and_stops_idle() -> None:
    io = IoThread("test-io-lazy")
    assert not running("test-io-lazy")
    io.stop()  # never started: nothing to end
    await io.run(lambda: None)
    assert running("test-io-lazy")
    io.stop()
    assert not running("test-io-lazy")


@pytest.mark.parametrize("mode", ["off", "batch"])
async def test_a_segment_roll_syncs_off_the_loop_in_every_mode(mode: str) -> None:
    """Without an fdatasync a flush is a page-cache write on the loop thread, but one that
    starts a new segment syncs the old one, the directory and the log head: those run on
    the IO thread, or every roll would stall the loop."""
    fs = MemoryFiles()
    wal = open_wal(fs, fsync=mode, batch_interval_ms=60_000)
    loop_thread = threading.current_thread().name
    syncs: list[tuple[str, str]] = []
    for op in ("datasync", "sync", "sync_dir"):
        fs.hooks[op] = functools.partial(
            lambda op, path: syncs.append((op, threading.current_thread().name)), op
        )
    for i in range(100):  # 100 KiB of records: at least one roll of a 64 KiB segment
        wal.append(b"%d" % i + b"x" * 1024)
        await wal.commit()
    fs.hooks.clear()
    assert len(fs.listdir(D)) >= 3  # two segments and the head: it rolled
    assert syncs and all(thread != loop_thread for _, thread in syncs), syncs
    await wal.close()
    reopened = open_wal(fs)
    _, records = reopened.load()
    assert [lsn for lsn, _ in records] == list(range(1, 101))
    await reopened.close()
