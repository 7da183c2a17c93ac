"""Random appends, commits, snapshots, disk failures and power cuts against a model.

The model is the list of every record appended, in LSN order. After any power cut the log
must open without WalCorruption and hold a prefix of the model that contains every record a
commit() (always) or a sync (batch) confirmed; the snapshot must match the model too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spinbroker.wal import Wal, WalError, WalWriteError
from spinbroker.wal.memfiles import MemoryFiles

D = Path("/data/wal")

Op = tuple[object, ...]
appends = st.tuples(st.just("append"), st.lists(st.binary(max_size=300), min_size=1, max_size=8))
commits = st.tuples(st.just("commit"))
failures = st.tuples(
    st.just("fail"),
    st.sampled_from(["write", "datasync", "truncate", "create", "sync_dir", "sync"]),
    st.sampled_from([errno.ENOSPC, errno.EIO]),
)
crashes = st.tuples(
    st.sampled_from(["crash", "crash_in_sync"]), st.booleans(), st.integers(0, 2**32)
)
simple = st.sampled_from([("commit",)] * 4 + [("snapshot",), ("heal",), ("heal",)])
ops = st.lists(
    st.one_of(appends, simple, crashes, failures),
    min_size=5,
    max_size=60,
)


@dataclass
class Model:
    mode: str
    options: dict[str, object]
    fs: MemoryFiles = field(default_factory=MemoryFiles)
    records: list[bytes] = field(default_factory=list)
    #: Every record up to here must survive a power cut.
    durable: int = 0

    def open(self) -> Wal:
        wal, _ = Wal.open(D, files=self.fs, fsync=self.mode, **self.options)  # type: ignore[arg-type]
        snapshot, replay = wal.load()
        start = 0
        if snapshot is not None:
            assert msgpack.unpackb(snapshot.body) == self.records[: snapshot.lsn]
            start = snapshot.lsn
        recovered = [body for _, body in replay]
        end = start + len(recovered)
        assert recovered == self.records[start:end], "not a prefix of what was appended"
        assert end >= self.durable, f"lost acknowledged records: {end} < {self.durable}"
        assert wal.next_lsn == end + 1
        del self.records[end:]
        self.durable = end
        return wal

    def confirmed(self, wal: Wal, lsn: int) -> None:
        if self.mode == "always":
            self.durable = max(self.durable, lsn)
        self.durable = max(self.durable, wal.synced_lsn)


async def run(mode: str, options: dict[str, object], program: list[Op]) -> None:
    model = Model(mode, options)
    wal = model.open()
    for op in program:
        if op[0] == "append":
            for body in op[1]:  # type: ignore[attr-defined]
                model.records.append(body)
                assert wal.append(body) == len(model.records)
        elif op[0] == "commit":
            await commit(model, wal)
        elif op[0] == "snapshot" and wal.last_lsn > 0:
            lsn = wal.last_lsn
            with contextlib.suppress(WalWriteError):
                await wal.write_snapshot(lsn, msgpack.packb(model.records[:lsn]))
        elif op[0] == "fail":
            model.fs.fail(str(op[1]), int(op[2]))  # type: ignore[call-overload]
        elif op[0] == "heal":
            model.fs.heal()
        elif op[0] in ("crash", "crash_in_sync"):
            rng = random.Random(int(op[2])) if op[1] else None  # type: ignore[call-overload]
            wal = await power_cut(model, wal, rng, in_sync=op[0] == "crash_in_sync")
    model.fs.heal()
    await wal.close()
    model.durable = len(model.records)
    model.fs = model.fs.crash()
    await model.open().close()


async def commit(model: Model, wal: Wal) -> None:
    lsn = wal.last_lsn
    with contextlib.suppress(WalWriteError):
        await wal.commit()
        model.confirmed(wal, lsn)


async def power_cut(model: Model, wal: Wal, rng: random.Random | None, in_sync: bool) -> Wal:
    """Cut the power, either now or while a flush of a few large records waits in
    fdatasync (its write done, not yet durable), then reopen the log."""
    after: list[MemoryFiles] = []
    if in_sync:
        filler = random.Random(len(model.records))
        for _ in range(filler.randrange(1, 6)):
            model.records.append(filler.randbytes(filler.randrange(1, 1500)))
            wal.append(model.records[-1])
        model.fs.hooks["datasync"] = lambda path: after.append(model.fs.crash(rng))
        await commit(model, wal)
    model.confirmed(wal, 0)
    if not after:
        after.append(model.fs.crash(rng))
    with contextlib.suppress(WalError):
        await wal.close()
    model.fs = after[0]
    return model.open()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["always", "batch"]),
    segment_size=st.sampled_from([256, 1024, 1 << 14]),
    preallocate=st.booleans(),
    keep_snapshots=st.sampled_from([1, 2]),
    program=ops,
)
def test_random_programs_never_lose_or_corrupt(
    mode: str, segment_size: int, preallocate: bool, keep_snapshots: int, program: list[Op]
) -> None:
    options: dict[str, object] = {
        "segment_size": segment_size,
        "preallocate": preallocate,
        "keep_snapshots": keep_snapshots,
        "batch_interval_ms": 1e9,
    }
    asyncio.run(run(mode, options, program))
