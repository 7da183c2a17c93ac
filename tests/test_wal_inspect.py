"""`spinbroker wal inspect|repair DATADIR`: what a person sees."""

from __future__ import annotations

import io
import os
from pathlib import Path

import msgpack
import pytest

from spinbroker.wal import Wal
from spinbroker.wal.files import LOCK_NAME, lock_directory
from spinbroker.wal.head import HEAD_NAME
from spinbroker.wal.inspect import decode_msgpack, inspect, main
from spinbroker.wal.repair import repair
from spinbroker.wal.segment import segment_name
from spinbroker.wal.snapshot import snapshot_name

from .conftest import as_newer_version


def damage_twice(path: Path) -> bytes:
    """Damage `path`'s header in its version and in the byte after: it reads as a newer
    version's. Returns the damaged content."""
    data = bytearray(path.read_bytes())
    data[7] = 2  # the version (the low byte of a segment's u16) ...
    data[9] ^= 0x01  # ... and the LSN after it: no checksum fits any more
    path.write_bytes(bytes(data))
    return bytes(data)


def directory_state(directory: Path) -> dict[str, bytes]:
    """The files of a data dir and their content; not the empty `lock` file, which repair
    creates as a broker would (it is not part of the log)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != LOCK_NAME
    }


async def make_log(directory: Path) -> None:
    wal, _ = Wal.open(directory, fsync="off", segment_size=512, preallocate=False)
    for i in range(20):
        wal.append(msgpack.packb({"verb": "enqueue", "n": i}))
        await wal.commit()
    await wal.write_snapshot(5, b"opaque state")
    await wal.close()


async def test_inspect_lists_and_verifies(tmp_path: Path) -> None:
    await make_log(tmp_path)
    out = io.StringIO()
    assert inspect(tmp_path, out, show_records=True) is True
    text = out.getvalue()
    assert "snap-0000000000000005.snap  lsn 5  12 B body  ok" in text
    assert "{'verb': 'enqueue', 'n': 19}" in text
    assert "lsn 1..20" not in text and "status: ok" in text
    assert text.count(".log  lsn ") >= 2


async def test_inspect_reports_corruption_and_torn_tails(tmp_path: Path) -> None:
    await make_log(tmp_path)
    first = tmp_path / segment_name(1)
    data = bytearray(first.read_bytes())
    data[40] ^= 0x80
    first.write_bytes(data)
    out = io.StringIO()
    assert inspect(tmp_path, out) is False
    assert f"CORRUPT: {first.name} offset 24" in out.getvalue()
    data[40] ^= 0x80
    first.write_bytes(data)

    last = sorted(tmp_path.glob("wal-*.log"))[-1]
    last.write_bytes(last.read_bytes()[:-3])
    out = io.StringIO()
    assert inspect(tmp_path, out) is True
    assert "torn tail" in out.getvalue() and "open will cut it" in out.getvalue()


@pytest.mark.parametrize("kind", ["segment", "snapshot"])
async def test_inspect_and_repair_name_a_newer_versions_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """A segment or snapshot with its magic but a higher version: inspect calls it a newer
    spinbroker's, not CORRUPT or INVALID (once it did, pointing at repair), and repair
    refuses it, changing nothing."""
    await make_log(tmp_path)
    if kind == "segment":
        path = sorted(tmp_path.glob("wal-*.log"))[-1]
    else:
        path = tmp_path / snapshot_name(5)
    path.write_bytes(as_newer_version(path.read_bytes()))
    before = directory_state(tmp_path)

    assert main(["inspect", str(tmp_path), "--records"]) == 1
    out = capsys.readouterr().out
    assert f"{path.name}  " in out and "  NEWER VERSION: " in out
    assert f"status: NEWER VERSION: {path.name}: {kind} " in out
    assert "likely written by a newer spinbroker" in out
    assert "CORRUPT" not in out and "INVALID" not in out and "; repair" not in out
    assert main(["repair", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"refused, nothing changed: {path.name}: {kind} " in out
    assert directory_state(tmp_path) == before


def test_decode_falls_back_to_bytes() -> None:
    assert decode_msgpack(msgpack.packb([1, "a"])) == "[1, 'a']"
    assert decode_msgpack(b"\xc1").startswith("(not msgpack)")


async def test_main_inspect_and_repair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await make_log(tmp_path)
    assert main(["inspect", str(tmp_path), "--records"]) == 0
    assert "enqueue" in capsys.readouterr().out
    assert main(["repair", str(tmp_path)]) == 0
    assert "nothing to repair" in capsys.readouterr().out

    last = sorted(tmp_path.glob("wal-*.log"))[-2]
    data = bytearray(last.read_bytes())
    data[50] ^= 0x01
    last.write_bytes(data)
    assert main(["inspect", str(tmp_path)]) == 1
    assert main(["repair", str(tmp_path)]) == 0
    assert "truncated" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path)]) == 0
    assert main(["inspect", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("kind", ["segment", "snapshot", "head"])
async def test_repair_not_newer_takes_a_header_damaged_twice_for_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """A header damaged in its version *and* elsewhere fits no checksum, so it reads as a
    newer version's and plain repair leaves it alone. `--not-newer FILE`, a person's word
    that no newer spinbroker wrote it, puts this version's magic back (original kept), and
    the rest is repaired as damage."""
    await make_log(tmp_path)
    path = {
        "segment": sorted(tmp_path.glob("wal-*.log"))[-1],
        "snapshot": tmp_path / snapshot_name(5),
        "head": tmp_path / HEAD_NAME,
    }[kind]
    data = damage_twice(path)
    assert main(["repair", str(tmp_path)]) == 1
    assert "refused, nothing changed" in capsys.readouterr().out

    code = main(["repair", str(tmp_path), "--not-newer", path.name])
    out = capsys.readouterr().out
    assert "refused" not in out and f"restored the header magic of {path.name}" in out
    backups = list(tmp_path.glob("repair-*"))
    assert len(backups) == 1 and (backups[0] / path.name).read_bytes() == data
    assert code == 0 and "the log opens" in out
    if kind != "head":  # its header rebuilt from its name: nothing lost (review h15)
        assert f"rebuilt the header of {path.name}" in out and "dropped" not in out
        assert "into the backup" not in out  # once the snapshot was set aside: a dead end
    assert main(["inspect", str(tmp_path)]) == 0
    capsys.readouterr()


def test_repair_not_newer_names_a_file_of_the_log(tmp_path: Path) -> None:
    assert main(["repair", str(tmp_path), "--not-newer", "wal-0000000000000009.log"]) == 2
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["repair", str(tmp_path), "--not-newer", "notes.txt"]) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"


async def test_repair_keeps_every_version_of_a_file_it_changes_twice(tmp_path: Path) -> None:
    """A segment with a damaged magic *and* a damaged record: repair puts the magic back,
    then cuts at the record. Both steps keep what they found (once the second one failed
    on the first one's copy, File exists), the original under its own name."""
    await make_log(tmp_path)
    path = sorted(tmp_path.glob("wal-*.log"))[-2]
    original = bytearray(path.read_bytes())
    original[7] = 2  # the version alone: this version's checksum still fits
    original[-5] ^= 0x01  # and a record
    path.write_bytes(bytes(original))
    report = repair(tmp_path)
    assert report.remaining is None and report.restored == [path] and report.truncated
    assert report.backup is not None
    assert (report.backup / path.name).read_bytes() == bytes(original)
    restored = (report.backup / f"{path.name}.1").read_bytes()
    assert restored[7] == 1 and restored[8:] == bytes(original[8:])


@pytest.mark.parametrize("command", ["inspect", "repair"])
def test_an_unreadable_file_stops_with_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    (tmp_path / segment_name(1)).mkdir()  # a directory where a segment should be
    assert main([command, str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"spinbroker wal {command}: stopped: " in err and "Is a directory" in err
    extra = ["--not-newer", segment_name(1)] if command == "repair" else []
    assert main([command, str(tmp_path), *extra]) == 1


@pytest.mark.parametrize("second", ["nosuch.log", "notes.txt", "./{name}"])
async def test_repair_not_newer_checks_every_name_before_it_changes_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], second: str
) -> None:
    """Review h15: the first name's magic was put back (and a backup folder made) before
    a bad second name stopped repair with exit 2, 'nothing changed' implied."""
    await make_log(tmp_path)
    path = sorted(tmp_path.glob("wal-*.log"))[-1]
    damage_twice(path)
    (tmp_path / "notes.txt").write_text("mine")
    before = directory_state(tmp_path)
    bad = second.format(name=path.name)
    assert main(["repair", str(tmp_path), "--not-newer", path.name, "--not-newer", bad]) == 2
    err = capsys.readouterr().err
    assert ("not a segment" if bad == "notes.txt" else "`spinbroker wal inspect` lists it") in err
    assert directory_state(tmp_path) == before
    assert not list(tmp_path.glob("repair-*"))


async def test_repair_not_newer_changes_nothing_when_another_file_is_a_newer_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review h15: a log still refused after the named file's magic was put back (another
    file is a newer version's) said 'refused, nothing changed', yet the named file had
    been rewritten behind a backup folder that no line named."""
    await make_log(tmp_path)
    older, newest = sorted(tmp_path.glob("wal-*.log"))[-2:]
    damage_twice(newest)
    older.write_bytes(as_newer_version(older.read_bytes()))
    before = directory_state(tmp_path)
    assert main(["repair", str(tmp_path), "--not-newer", newest.name]) == 1
    out = capsys.readouterr().out
    assert f"refused, nothing changed: {older.name}" in out and "--not-newer FILE" in out
    assert directory_state(tmp_path) == before
    assert not list(tmp_path.glob("repair-*"))


@pytest.mark.parametrize("kind", ["segment", "head"])
async def test_repair_not_newer_removes_a_temporary_file_left_by_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """Review h15: a `.tmp` left by a crash (while the head or a segment was written) made
    putting the magic back fail on its exclusive create: 'File exists', exit 1."""
    await make_log(tmp_path)
    path = sorted(tmp_path.glob("wal-*.log"))[-1] if kind == "segment" else tmp_path / HEAD_NAME
    damage_twice(path)
    (tmp_path / f"{path.name}.tmp").write_bytes(b"half written")
    assert main(["repair", str(tmp_path), "--not-newer", path.name]) == 0
    assert "the log opens" in capsys.readouterr().out
    assert not (tmp_path / f"{path.name}.tmp").exists()


@pytest.mark.parametrize("command", ["inspect", "repair"])
def test_a_file_gone_while_read_stops_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Review h15: a segment listed but gone when read (here a dangling symlink) was taken
    for an unknown `--not-newer` name: exit 2 and no 'stopped'."""
    (tmp_path / segment_name(1)).symlink_to(tmp_path / "gone")
    assert main([command, str(tmp_path)]) == 1
    assert f"spinbroker wal {command}: stopped: " in capsys.readouterr().err


async def test_repair_refuses_a_data_dir_a_running_broker_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review h15: repair took no lock, so beside a live broker it read a segment being
    written and rewrote wal.head behind it. It now takes the broker's data dir lock (the
    one `spinbroker serve` holds, server.py) and refuses, changing nothing, while another
    process holds it; inspect, which only reads, still runs and says a broker is running."""
    await make_log(tmp_path)
    head = tmp_path / HEAD_NAME
    head.write_bytes(head.read_bytes()[:-1] + b"\x00")  # damage: repair would rewrite it
    held = lock_directory(tmp_path)  # as a running broker holds it
    assert held is not None
    try:
        before = directory_state(tmp_path)
        assert main(["repair", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert "refused, nothing changed" in err and "in use by another broker" in err
        assert directory_state(tmp_path) == before and not list(tmp_path.glob("repair-*"))
        assert main(["inspect", str(tmp_path)]) == 1  # the damaged head
        assert "a broker is running on" in capsys.readouterr().err
    finally:
        os.close(held)
    assert main(["repair", str(tmp_path)]) == 0
    assert "the log opens" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path)]) == 0
    assert "a broker is running" not in capsys.readouterr().err


async def test_inspect_reads_a_data_dir_whose_lock_file_it_may_not_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inspect only reads: a lock file it may not open (another user's broker) does not
    stop it, it only cannot tell whether a broker is running."""
    await make_log(tmp_path)

    def refused(directory: Path, *, create: bool = True) -> int | None:
        raise PermissionError(13, "Permission denied", str(directory / "lock"))

    monkeypatch.setattr("spinbroker.wal.inspect.lock_directory", refused)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "stopped" not in capsys.readouterr().err
