"""A micro-benchmark of the log on this machine's disk: `python -m spinbroker.wal.bench`.

Holds one measurement: N committers each loop `append` + `await commit()`, for each fsync
mode and committer count, on a fresh directory; it prints commits/s, fdatasync calls and
commit latency, plus the raw floor of one 100-byte write + fdatasync. Not a test: numbers
depend on the disk. Must never be imported by the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from spinbroker.wal.files import OsFiles, WalFile
from spinbroker.wal.log import Wal


class _CountingFile:
    def __init__(self, handle: WalFile, counter: list[int]) -> None:
        self._handle, self._counter = handle, counter
        self.pwrite, self.sync, self.truncate = handle.pwrite, handle.sync, handle.truncate
        self.allocate, self.size, self.close = handle.allocate, handle.size, handle.close

    def datasync(self) -> None:
        self._counter[0] += 1
        self._handle.datasync()


class _CountingFiles(OsFiles):
    def __init__(self) -> None:
        self.syncs = [0]

    def create(self, path: Path) -> WalFile:
        return _CountingFile(super().create(path), self.syncs)

    def open(self, path: Path) -> WalFile:
        return _CountingFile(super().open(path), self.syncs)


async def measure(directory: Path, mode: str, committers: int, total: int, size: int) -> str:
    files = _CountingFiles()
    wal, _ = Wal.open(directory, fsync=mode, files=files)
    body = os.urandom(size)
    latencies: list[float] = []
    per_task = max(1, total // committers)

    async def committer() -> None:
        for _ in range(per_task):
            start = time.perf_counter()
            wal.append(body)
            await wal.commit()
            latencies.append(time.perf_counter() - start)

    syncs_before = files.syncs[0]
    start = time.perf_counter()
    await asyncio.gather(*(committer() for _ in range(committers)))
    elapsed = time.perf_counter() - start
    syncs = files.syncs[0] - syncs_before
    await wal.close()
    latencies.sort()
    done = per_task * committers
    p50 = statistics.median(latencies) * 1e6
    p99 = latencies[int(len(latencies) * 0.99)] * 1e6
    return (
        f"| {mode} | {committers} | {done / elapsed:,.0f} | {syncs} | "
        f"{done / max(syncs, 1):,.1f} | {p50:,.0f} | {p99:,.0f} |"
    )


def sync_floor(directory: Path, count: int, preallocate: bool) -> str:
    path = directory / f"floor-{preallocate}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if preallocate:
            os.posix_fallocate(fd, 0, count * 100 + 4096)
            os.fsync(fd)
        start = time.perf_counter()
        for i in range(count):
            os.pwrite(fd, b"x" * 100, i * 100)
            os.fdatasync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    kind = "preallocated" if preallocate else "appending"
    return f"raw 100 B write + fdatasync, {kind}: {count / elapsed:,.0f}/s"


async def main_async(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="wal-bench-", dir=args.dir))
    print(f"directory: {base}")
    print(sync_floor(base, 2000, preallocate=False))
    print(sync_floor(base, 2000, preallocate=True))
    print("| fsync | committers | commits/s | fdatasyncs | records/sync | p50 µs | p99 µs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    run = 0
    for mode in args.modes:
        for committers in args.committers:
            run += 1
            print(await measure(base / f"run{run}", mode, committers, args.n, args.size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=None, help="where to make the temp directory")
    parser.add_argument("--n", type=int, default=20_000, help="commits per measurement")
    parser.add_argument("--size", type=int, default=100, help="record body bytes")
    parser.add_argument("--modes", nargs="+", default=["always", "batch", "off"])
    parser.add_argument("--committers", nargs="+", type=int, default=[1, 100])
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(main_async(args))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
