"""Real broker processes: SIGKILL at random moments under load, and a corrupt log.

The kill-and-restart run is `tools/crashtest.py` (its docstring lists what it checks): 20
kills with `--fsync always` and a quarter of that with `batch` (which must survive a process
crash too: its acknowledged records were written to the OS). More kills:
`SPINBROKER_CRASH_KILLS=200`; another seed: `SPINBROKER_CRASH_SEED=<n>` or `=random`. A
failure prints the seed and keeps the data dir and broker.log under pytest's tmp dir.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

from spinbroker.client import Client, NotFound
from spinbroker.wal.files import OsFiles
from spinbroker.wal.frame import (
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    frame_end,
    read_frames,
)
from spinbroker.wal.segment import list_segments

ROOT = Path(__file__).resolve().parent.parent


def _load_crashtest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crashtest", ROOT / "tools" / "crashtest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


crashtest = _load_crashtest()

KILLS = int(os.environ.get("SPINBROKER_CRASH_KILLS", "20"))
_SEED = os.environ.get("SPINBROKER_CRASH_SEED", "20261126")
SEED = random.randrange(1 << 32) if _SEED == "random" else int(_SEED)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fsync", ["always", "batch"])
async def test_sigkill_under_load_keeps_every_promise(tmp_path: Path, fsync: str) -> None:
    """Producers and consumers work while the broker is SIGKILLed and restarted; then the
    history they saw is checked (tools/crashtest.py lists the rules)."""
    kills = KILLS if fsync == "always" else max(3, KILLS // 4)
    rerun = f"SPINBROKER_CRASH_SEED={SEED} SPINBROKER_CRASH_KILLS={KILLS}; logs in {tmp_path}"
    try:
        report = await crashtest.crashtest(tmp_path, kills, SEED, fsync)
    except crashtest.CrashTestError as exc:
        pytest.fail(f"{rerun}\n{exc}")
    print(report.summary())
    assert not report.violations, "\n".join([rerun, *report.violations[:30]])
    # What the run must have exercised to mean anything.
    assert report.packages and report.deliveries and report.ordered, report.summary()
    assert report.snapshots > 0, report.summary()
    if kills >= 5:
        assert report.snapshot_recoveries > 0, report.summary()


# --------------------------------------------------------------------------- corrupt log


async def _spinbroker(*argv: str) -> tuple[int, str]:
    """Run `python -m spinbroker ARGV...` to its end: exit code and its stderr (and stdout)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "spinbroker", *argv),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _serve_fails(data_dir: Path, socket: Path) -> tuple[int, str]:
    return await _spinbroker(
        "serve", "--data-dir", str(data_dir), "--socket", str(socket), "--no-tcp"
    )


async def _wal_repair(data_dir: Path) -> tuple[int, str]:
    return await _spinbroker("wal", "repair", str(data_dir))


@pytest.mark.timeout(90)
async def test_corrupt_log_refuses_to_start_until_repaired(tmp_path: Path) -> None:
    """A flipped byte in the middle of the log (not a torn tail): `serve` exits 1 naming the
    file and offset and pointing at `spinbroker wal repair`; after the repair it starts,
    with every package logged before the damage and none after it."""
    log = io.StringIO()
    options = {"--segment-size": "2048", "--snapshot-every": "1000000"}
    broker = crashtest.Broker(tmp_path, "always", log, options)
    try:
        await _corrupt_repair_restart(broker)
    finally:
        await broker.kill()  # a failing assertion must not leave a broker running


async def _corrupt_repair_restart(broker: crashtest.Broker) -> None:
    await broker.start()
    client = await Client.connect(broker.socket)
    packages = []
    for n in range(100):  # one SUBMIT record per package: package n is LSN n + 1
        package, _ = await client.submit([{"resource": "r", "action": "a", "parameters": {"n": n}}])
        packages.append(package)
    await client.close()
    await broker.kill()  # no shutdown snapshot: the log alone holds the state

    segments = list_segments(OsFiles(), broker.data_dir)
    assert len(segments) >= 3, segments
    first_lsn, path = segments[1]
    data = bytearray(path.read_bytes())
    frames = list(read_frames(bytes(data), SEGMENT_HEADER_SIZE, first_lsn, len(data)))
    offset, lsn, _ = frames[len(frames) // 2]
    body_start = offset + RECORD_HEADER_SIZE
    data[(body_start + frame_end(data, offset)) // 2] ^= 0xFF  # a body checksum failure
    path.write_bytes(bytes(data))

    code, err = await _serve_fails(broker.data_dir, broker.socket)
    assert code == 1, err
    assert f"{path}: offset {offset}: record body" in err, err
    assert f"spinbroker wal repair {broker.data_dir}" in err, err

    code, out = await _wal_repair(broker.data_dir)
    assert code == 0, out
    assert f"truncated {path.name} at offset {offset}" in out, out
    assert "backup: " in out and "the log opens" in out, out

    await broker.start()
    client = await Client.connect(broker.socket)
    for n, package in enumerate(packages):
        if n + 1 < lsn:
            assert (await client.status(package)).state == "pending"
        else:
            with pytest.raises(NotFound):
                await client.status(package)
    await client.submit([{"resource": "r", "action": "after-repair"}])
    await client.close()
    assert await broker.terminate() == 0
