"""`spinbroker wal inspect|repair DATADIR`: what a person sees."""

from __future__ import annotations

import io
from pathlib import Path

import msgpack
import pytest

from spinbroker.wal import Wal
from spinbroker.wal.inspect import decode_msgpack, inspect, main
from spinbroker.wal.segment import segment_name
from spinbroker.wal.snapshot import snapshot_name

from .conftest import as_newer_version


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
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    assert main(["inspect", str(tmp_path), "--records"]) == 1
    out = capsys.readouterr().out
    assert f"{path.name}  " in out and "  NEWER VERSION: " in out
    assert f"status: NEWER VERSION: {path.name}: {kind} " in out
    assert "likely written by a newer spinbroker" in out
    assert "CORRUPT" not in out and "INVALID" not in out and "; repair" not in out
    assert main(["repair", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"refused, nothing changed: {path.name}: {kind} " in out
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


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
