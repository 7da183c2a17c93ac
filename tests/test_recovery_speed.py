"""Recovery's fast paths keep every check of the slow ones.

- The log: `Wal.open` checks every frame and keeps those bytes, so `Wal.load` replays them
  without checking again; past the memory budget a segment is read and checked again.
  Either way every frame's checksums are verified, once at least, before it is handed out.
  Checking half of the segments in a forked child finds exactly what checking them here
  finds, and any failure of the child falls back to checking here.
- Snapshots: `state.load_packed` (decoding package by package) builds what
  `state.load(msgpack.unpackb(body))` builds, and refuses what it would refuse.
- `persist.recover` freezes the recovered objects without a last full collection: that is
  only safe if replay and snapshot load leave no cyclic garbage, checked here on random
  workloads.

No timings here: these are the properties the speed must not cost.
"""

from __future__ import annotations

import gc
import os
import select
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spinbroker import persist, records, state
from spinbroker.core import Broker
from spinbroker.wal import OsFiles, Wal, WalCorruption, recovery
from spinbroker.wal import frame as wal_frame
from spinbroker.wal.frame import SEGMENT_HEADER_SIZE, encode_batch, encode_record
from spinbroker.wal.memfiles import MemoryFiles
from spinbroker.wal.reader import RecordError, iter_checked, scan_segment
from spinbroker.wal.segment import segment_name
from tests.test_state import LIMITS, observable, run_workload

D = Path("/data/wal")


def body(lsn: int) -> bytes:
    return b"record %04d " % lsn * 3


async def write_log(fs: MemoryFiles, count: int, **options: Any) -> None:
    wal, _ = Wal.open(D, files=fs, segment_size=1024, **options)
    for _ in range(count):
        wal.append(body(wal.next_lsn))
        await wal.commit()  # a segment rolls at a flush that finds it full
    await wal.close()


def open_wal(fs: MemoryFiles, **options: Any) -> Wal:
    wal, _ = Wal.open(D, files=fs, segment_size=1024, **options)
    return wal


def segments(fs: MemoryFiles) -> list[str]:
    return sorted(n for n in fs.listdir(D) if n.endswith(".log"))


@pytest.fixture
def crc_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the checksums the frame decoder computes."""
    calls = [0]
    real = wal_frame.crc32c

    def counting(data: Any, *args: Any) -> int:
        calls[0] += 1
        result: int = real(data, *args)
        return result

    monkeypatch.setattr(wal_frame, "crc32c", counting)
    yield calls


async def test_open_checks_every_frame_and_load_checks_none_again(crc_calls: list[int]) -> None:
    fs = MemoryFiles()
    await write_log(fs, 60)
    files = len(segments(fs))
    assert files >= 4
    crc_calls[0] = 0
    reads = fs.calls["read"]
    wal = open_wal(fs)
    # Each record: one checksum of its header, one of its body; each segment: its header.
    assert crc_calls[0] == 2 * 60 + files
    assert fs.calls["read"] - reads == files + 1  # and the log head
    _, replay = wal.load()
    assert list(replay) == [(lsn, body(lsn)) for lsn in range(1, 61)]
    assert crc_calls[0] == 2 * 60 + files, "load checked a frame a second time"
    assert fs.calls["read"] - reads == files + 1, "load read a segment a second time"
    await wal.close()


async def test_beyond_the_budget_load_reads_and_checks_again(crc_calls: list[int]) -> None:
    fs = MemoryFiles()
    await write_log(fs, 60)
    files = len(segments(fs))
    assert files >= 4
    crc_calls[0] = 0
    wal = open_wal(fs, keep_checked_bytes=0)
    opened = crc_calls[0]
    _, replay = wal.load()
    assert list(replay) == [(lsn, body(lsn)) for lsn in range(1, 61)]
    assert crc_calls[0] == 2 * opened
    await wal.close()


async def test_the_budget_keeps_the_oldest_segments_and_load_mixes_both() -> None:
    fs = MemoryFiles()
    await write_log(fs, 60)
    sizes = [len(fs.read(D / name)) for name in segments(fs)]
    reads = fs.calls["read"]
    wal = open_wal(fs, keep_checked_bytes=sizes[0] + sizes[1])
    _, replay = wal.load()
    assert list(replay) == [(lsn, body(lsn)) for lsn in range(1, 61)]
    # Every segment (and the log head) read at open, all but the two kept ones again at load.
    assert fs.calls["read"] - reads == 2 * len(sizes) - 2 + 1
    await wal.close()


async def test_a_segment_changed_after_open_is_refused_when_read_again() -> None:
    fs = MemoryFiles()
    await write_log(fs, 60)
    path = D / segments(fs)[1]
    wal = open_wal(fs, keep_checked_bytes=0)
    data = bytearray(fs.read(path))
    offset = SEGMENT_HEADER_SIZE + len(encode_batch(1, [body(1)]))  # the second record
    data[offset + 25] ^= 0x10
    fs.corrupt(path, bytes(data))
    _, replay = wal.load()
    with pytest.raises(WalCorruption) as refused:
        list(replay)
    assert (refused.value.file, refused.value.offset) == (path, offset)
    await wal.close()


async def test_kept_bytes_are_the_ones_open_checked() -> None:
    """What open checked is what load hands out, whatever happens to the file after."""
    fs = MemoryFiles()
    await write_log(fs, 60)
    path = D / segments(fs)[1]
    wal = open_wal(fs)
    fs.corrupt(path, b"overwritten after the check")
    _, replay = wal.load()
    assert list(replay) == [(lsn, body(lsn)) for lsn in range(1, 61)]
    await wal.close()


async def test_load_after_a_snapshot_starts_inside_a_kept_segment() -> None:
    fs = MemoryFiles()
    wal = open_wal(fs, keep_snapshots=2)
    for _ in range(60):
        wal.append(body(wal.next_lsn))
        await wal.commit()
    await wal.write_snapshot(37, b"state at 37")
    await wal.close()
    wal = open_wal(fs)
    snapshot, replay = wal.load()
    assert snapshot is not None and snapshot.lsn == 37
    assert bytes(snapshot.body) == b"state at 37"
    assert list(replay) == [(lsn, body(lsn)) for lsn in range(38, 61)]
    await wal.close()


def test_iter_checked_refuses_other_bytes_than_the_scan_saw() -> None:
    data = bytearray(wal_frame.encode_segment_header(5))
    for lsn in (5, 6, 7):
        data += encode_record(lsn, body(lsn))
    scan = scan_segment(bytes(data), 5)
    assert [lsn for lsn, _ in iter_checked(bytes(data), 5, scan.end, 6)] == [6, 7]
    with pytest.raises(RecordError):
        list(iter_checked(bytes(data), 5, scan.end - 1, 0))
    with pytest.raises(RecordError):
        list(iter_checked(bytes(data), 4, scan.end, 0))


async def damaged_logs(root: Path) -> list[Path]:
    """Log directories of several segments each: clean, a flipped bit in the newest half
    of the segments (which the child checks), and a torn newest segment."""
    clean = root / "clean"
    wal, _ = Wal.open(clean, fsync="off", segment_size=1024, preallocate=False)
    for _ in range(80):
        wal.append(body(wal.next_lsn))
        await wal.commit()
    await wal.close()
    names = sorted(p.name for p in clean.iterdir() if p.suffix == ".log")
    assert len(names) >= 4
    flipped, torn = root / "flipped", root / "torn"
    for target in (flipped, torn):
        target.mkdir()
        for name in names:
            (target / name).write_bytes((clean / name).read_bytes())
    middle = flipped / names[-2]
    data = bytearray(middle.read_bytes())
    data[SEGMENT_HEADER_SIZE + 30] ^= 0x02
    middle.write_bytes(bytes(data))
    newest = torn / names[-1]
    newest.write_bytes(newest.read_bytes()[:-7])
    return [clean, flipped, torn]


class ChildSpy:
    """Counts the children `scan_directory` starts, and those whose scans came back (a
    child that fails is replaced by checking here, silently but for the time it costs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = 0
        self.answered = 0
        real = recovery._ChildCheck

        def spy(segments: list[tuple[int, Path, bytes]]) -> recovery._ChildCheck:
            check = real(segments)
            self.started += 1 if check._pid else 0
            collect = check._collect

            def counted() -> list[Any] | None:
                answer = collect()
                self.answered += answer is not None
                return answer

            check._collect = counted  # type: ignore[method-assign]
            return check

        monkeypatch.setattr(recovery, "_ChildCheck", spy)


def scan_both_ways(directory: Path) -> tuple[list[Any], list[Any]]:
    files = OsFiles()
    here = recovery.scan_directory(files, directory, 1 << 30, fork_bytes=1 << 62)
    forked = recovery.scan_directory(files, directory, 1 << 30, fork_bytes=0)
    return here, forked


async def test_a_child_checking_half_finds_what_checking_here_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ChildSpy(monkeypatch)
    for directory in await damaged_logs(tmp_path):
        here, forked = scan_both_ways(directory)
        assert forked == here
        assert all(s.data is not None for s in forked)
    assert recovery.first_problem(here) is not None  # the torn log
    if recovery._cores() > 1:
        assert spy.started == spy.answered == 3


async def test_no_fork_means_checking_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fork() -> int:
        raise OSError("no fork today")

    directories = await damaged_logs(tmp_path)
    monkeypatch.setattr(recovery.os, "fork", no_fork)
    for directory in directories:
        here, forked = scan_both_ways(directory)
        assert forked == here


async def test_a_child_that_dies_means_checking_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def dies(*_: object) -> None:  # whatever _child_main is given
        os._exit(3)

    directories = await damaged_logs(tmp_path)
    monkeypatch.setattr(recovery, "_child_main", dies)
    for directory in directories:
        here, forked = scan_both_ways(directory)
        assert forked == here


def test_halfway_splits_by_bytes() -> None:
    def segments(*sizes: int) -> list[tuple[int, Path, bytes]]:
        return [(i, Path(str(i)), bytes(size)) for i, size in enumerate(sizes)]

    assert recovery._halfway(segments(10, 10)) == 1
    assert recovery._halfway(segments(10, 10, 10, 10)) == 2
    assert recovery._halfway(segments(100, 1, 1)) == 1
    assert recovery._halfway(segments(1, 1, 100)) == 2


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_load_packed_builds_what_load_builds(data: st.DataObject) -> None:
    live = run_workload(data)
    body = state.dump_packed(live)
    image = msgpack.unpackb(body, raw=False, strict_map_key=False)
    whole = state.load(image, LIMITS)
    streamed = state.load_packed(memoryview(body), LIMITS)
    assert observable(streamed) == observable(whole) == observable(live)
    assert streamed.next_deadline() == whole.next_deadline() == live.next_deadline()


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb([state.FORMAT, 0, {}, []]) + b"\x00",
        msgpack.packb([state.FORMAT, 0, {}, []])[:-1],
        msgpack.packb([state.FORMAT + 1, 0, {}, []]),
        msgpack.packb([state.FORMAT, 0, {}]),
        msgpack.packb({"format": state.FORMAT}),
        msgpack.packb([state.FORMAT, 0, {}, [["p", 0.0, True]]]),
        b"",
    ],
    ids=["trailing bytes", "truncated", "other format", "3 fields", "a map", "short", "empty"],
)
def test_load_packed_refuses_what_is_not_one_state(body: bytes) -> None:
    with pytest.raises(ValueError):
        state.load_packed(body, LIMITS, name="snap-x")


def test_load_packed_of_an_empty_broker() -> None:
    empty = Broker(LIMITS)
    assert observable(state.load_packed(state.dump_packed(empty), LIMITS)) == observable(empty)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_replay_and_snapshot_load_leave_no_cyclic_garbage(data: st.DataObject) -> None:
    """What lets `persist.recover` freeze without collecting first (see its comment)."""
    live = run_workload(data)
    log = [msgpack.packb(records.to_wire(r), use_bin_type=True) for r in live.outbox]
    gc.collect()
    gc.disable()
    try:
        replayed = Broker(LIMITS)
        for wire in log:
            replayed.apply(records.from_wire(msgpack.unpackb(wire, strict_map_key=False)))
        restored = state.load_packed(state.dump_packed(replayed), LIMITS)
        garbage = gc.collect()
    finally:
        gc.enable()
    assert garbage == 0
    assert observable(restored) == observable(replayed) == observable(live)


async def test_recover_counts_the_records_after_the_snapshot() -> None:
    fs = MemoryFiles()
    live = Broker(LIMITS)
    wal = open_wal(fs)
    for n in range(30):
        live.submit(f"p{n}", [_command()], [f"c{n}"], float(n))
    for rec in live.outbox:
        wal.append(msgpack.packb(records.to_wire(rec), use_bin_type=True))
    snapshot_at = Broker(LIMITS)
    for rec in live.outbox[:12]:
        snapshot_at.apply(rec)
    await wal.write_snapshot(12, state.dump_packed(snapshot_at))
    await wal.close()
    wal = open_wal(fs)
    recovered, report = persist.recover(wal, LIMITS, None, 100.0)
    assert (report.snapshot_lsn, report.records) == (12, 18)
    assert observable(recovered) == observable(live)
    await wal.close()


def _command() -> Any:
    from spinbroker.core import NewCommand

    return NewCommand("r", "run", {"n": 1}, [])


def test_segment_names_used_here_are_the_logs() -> None:
    assert segment_name(1) == "wal-0000000000000001.log"


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_replay_gives_the_state_applying_every_record_gives(data: st.DataObject) -> None:
    """persist's replay applies one-command SUBMITs from their wire fields, skipping the
    record objects; every workload must come out as when each record is decoded and
    applied (and as the live broker that made the records)."""
    live = run_workload(data)
    wires = [records.to_wire(r) for r in live.outbox]
    bodies = [(n, msgpack.packb(w, use_bin_type=True)) for n, w in enumerate(wires, 1)]
    applied = Broker(LIMITS)
    for wire in wires:
        applied.apply(records.from_wire(wire))
    replayed = Broker(LIMITS)
    assert persist._replay(replayed, iter(bodies), 0, 0.0, lambda: 0.0) == len(bodies)
    assert observable(replayed) == observable(applied) == observable(live)
    assert replayed.next_order == live.next_order


@pytest.mark.parametrize(
    "wire",
    [
        [records.SUBMITTED_ONE, "p1", "c1", "r", "run", b"\x80"],
        [records.SUBMITTED_ONE, "p1", "c1", "r", "run", b"\x80", 1.0, "extra"],
        ["submitted", "p1", [["c1", "r", "run", b"\x80", None]], 1.0],
    ],
    ids=["flat short", "flat long", "nested"],
)
def test_replay_sends_a_malformed_submit_to_the_checked_decoder(wire: list[Any]) -> None:
    body = msgpack.packb(wire)
    with pytest.raises(ValueError):
        persist._replay(Broker(LIMITS), iter([(1, body)]), 0, 0.0, lambda: 0.0)


def test_replay_of_the_nested_one_command_submit_of_older_logs() -> None:
    """A log written before the flat form holds nested one-command SUBMITs: they replay
    through the general path to the same state as the flat form."""
    spec = records.CommandSpec("c1", "r", "run", b"\x80", ())
    rec = records.PackageSubmitted("p1", (spec,), 1.0)
    flat = msgpack.packb(records.to_wire(rec))
    nested = msgpack.packb(["submitted", "p1", [spec.to_wire()], 1.0])
    assert flat != nested
    brokers = [Broker(LIMITS), Broker(LIMITS)]
    for broker, body in zip(brokers, (flat, nested), strict=True):
        assert persist._replay(broker, iter([(1, body)]), 0, 0.0, lambda: 0.0) == 1
    assert observable(brokers[0]) == observable(brokers[1])
    assert brokers[0].commands["c1"].state == brokers[1].commands["c1"].state


#: A broker stand-in: forks a snapshot writer that waits on the named pipe `go` (after
#: saying so on `ready`), prints its pid, then waits to be killed.
_PARENT = """
import os, sys
from pathlib import Path
from spinbroker import persist, state
from spinbroker.core import Broker
ready, go = sys.argv[1], sys.argv[2]
dump = state.dump_packed

def slow_dump(broker):
    with open(ready, "wb") as said:
        said.write(b"r")
    with open(go, "rb") as told:
        told.read(1)
    return dump(broker)

state.dump_packed = slow_dump
print(persist._fork_writer(Broker(), Path(sys.argv[3]), 1), flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfds")
def test_a_snapshot_child_dies_with_its_broker(tmp_path: Path) -> None:
    """A broker killed alone (kill -9, the OOM killer) during a snapshot takes its child
    with it: the child would otherwise hold its copy-on-write share of the broker's heap,
    and go on writing, while the restarted broker recovers."""
    import signal
    import subprocess
    import sys

    ready, go = tmp_path / "ready", tmp_path / "go"
    os.mkfifo(ready)
    os.mkfifo(go)
    ready_read = os.open(ready, os.O_RDONLY | os.O_NONBLOCK)
    go_write = os.open(go, os.O_RDWR)  # Linux: opens at once, with no reader yet
    root = str(Path(__file__).resolve().parent.parent)
    broker = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(ready), str(go), str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": root},
    )
    child = -1
    try:
        assert broker.stdout is not None
        child = int(broker.stdout.readline())
        exited = os.pidfd_open(child)
        assert select.select([ready_read], [], [], 10.0)[0], "the child never started"
        broker.send_signal(signal.SIGKILL)
        broker.wait(10)
        assert select.select([exited], [], [], 10.0)[0], "the child outlived its broker"
        os.close(exited)
    finally:
        os.write(go_write, b"x")  # the child, if alive, finishes
        broker.kill()
        broker.wait(10)
        for fd in (ready_read, go_write):
            os.close(fd)


def test_a_snapshot_child_holds_none_of_the_parents_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forked snapshot writer closes every descriptor it inherited before anything else.
    - The data dir lock: a broker killed alone while its snapshot child runs must be
      restartable at once (a flock is held while any copy of its descriptor is open).
    - A connection: one the broker closes must end for its client at once, not when the
      child exits (the client would wait for the end of a QUIT or a refused request).
    The child and the test talk through named pipes, which the child opens by name after
    it has closed what it inherited."""
    import fcntl
    import socket

    lock_path = tmp_path / "lock"
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ours, theirs = socket.socketpair()  # the broker's end of a connection, its client's
    ready, go = tmp_path / "ready", tmp_path / "go"
    os.mkfifo(ready)
    os.mkfifo(go)
    ready_read = os.open(ready, os.O_RDONLY | os.O_NONBLOCK)
    go_write = os.open(go, os.O_RDWR)  # Linux: opens at once, with no reader yet
    dump = state.dump_packed

    def slow_dump(broker: Broker) -> bytes:  # runs in the child: wait for the test's word
        with open(ready, "wb") as said:
            said.write(b"r")  # the child is past its start-up (descriptors closed)
        with open(go, "rb") as told:
            told.read(1)
        return dump(broker)

    monkeypatch.setattr(persist.state, "dump_packed", slow_dump)
    pid = persist._fork_writer(Broker(LIMITS), tmp_path, 1)
    try:
        assert select.select([ready_read], [], [], 10.0)[0], "the child never started"
        os.close(lock_fd)  # the parent is gone: only the child could hold the lock now
        again = os.open(lock_path, os.O_RDWR)
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the child holds it
        os.close(again)
        ours.close()  # the broker closes the connection: its client sees the end
        assert select.select([theirs], [], [], 10.0)[0], "the child holds the connection"
        assert theirs.recv(1) == b""
    finally:
        os.write(go_write, b"x")
        _, status = os.waitpid(pid, 0)
        for fd in (ready_read, go_write):
            os.close(fd)
        theirs.close()
    assert os.waitstatus_to_exitcode(status) == 0
