"""The server's clock (spinbroker/clock.py): a step of the system clock while the broker
runs moves no lease and no package deadline.

The end-to-end test steps the real broker's wall clock with libfaketime (Debian package
`faketime`, which `make test` installs): LD_PRELOAD'ed into `spinbroker serve`, it adds
the offset written in a file to CLOCK_REALTIME, read afresh on every call, and leaves
CLOCK_MONOTONIC and CLOCK_BOOTTIME alone.
"""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pytest

from spinbroker import server as server_module
from spinbroker.client import Client, PackageStatus
from spinbroker.clock import SteadyWallClock, elapsed_seconds
from spinbroker.server import Server

from .test_crash import crashtest
from .test_durability import make_config

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


class Source:
    """A settable clock reading."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_reads_the_wall_clock_at_start_then_moves_with_elapsed_time() -> None:
    wall, elapsed = Source(1_800_000_000.0), Source(50.0)
    clock = SteadyWallClock(wall, elapsed)
    assert clock() == 1_800_000_000.0
    elapsed.now += 2.5
    assert clock() == 1_800_000_002.5


@pytest.mark.parametrize("step", [7200.0, -7200.0])
def test_a_step_of_the_wall_clock_moves_nothing(step: float) -> None:
    wall, elapsed = Source(1_800_000_000.0), Source(50.0)
    clock = SteadyWallClock(wall, elapsed)
    wall.now += step
    elapsed.now += 1.0
    assert clock() == 1_800_000_001.0
    # A clock made after the step (the next start) reads the stepped wall clock.
    assert SteadyWallClock(wall, elapsed)() == wall.now


def test_the_default_clock_is_close_to_the_wall_clock() -> None:
    before = time.time()
    now = SteadyWallClock()()
    assert before - 1.0 < now < time.time() + 1.0
    assert elapsed_seconds() <= elapsed_seconds()


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs Debian's faketime (make test)")
@pytest.mark.timeout(60)
async def test_a_broker_keeps_its_leases_and_packages_across_a_clock_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The system clock jumps 2 h forward under a running broker. Before the fix the broker
    ran its timers on the stepped clock: a 0.2 s lease taken after the step did not expire
    until the 60 s lease's deadline had passed in real time, and that timer pass would have
    expired everything at once: the 60 s lease an agent had just taken, and a package made
    a moment before (package_ttl 1 h)."""
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    monkeypatch.setenv("LD_PRELOAD", str(LIBFAKETIME))
    monkeypatch.setenv("FAKETIME_TIMESTAMP_FILE", str(offset))
    monkeypatch.setenv("FAKETIME_NO_CACHE", "1")
    monkeypatch.setenv("FAKETIME_DONT_FAKE_MONOTONIC", "1")
    broker = crashtest.Broker(tmp_path, "always", io.StringIO())
    await broker.start()
    try:
        async with await Client.connect(broker.socket) as c:
            _, (held,) = await c.submit([{"resource": "disk", "action": "mkfs"}])
            idle = await c.new()  # never enqueued: expires after package_ttl (1 h)
            taken = await c.next("disk", timeout=5, ttr=60)
            assert taken is not None and taken.id == held

            offset.write_text("+2h\n")
            # A short lease makes the broker's timer run soon after the step: its expiry
            # (a redelivery of that command) shows that the timer pass has run.
            _, (short,) = await c.submit([{"resource": "net", "action": "up"}])
            first = await c.next("net", timeout=5, ttr=0.2)
            assert first is not None and first.id == short
            again = await c.next("net", timeout=5)
            assert again is not None and (again.id, again.delivery) == (short, 2)

            pending = await c.status(idle)
            assert isinstance(pending, PackageStatus) and pending.state == "open"
            assert await c.complete(held, True, delivery=taken.delivery) == "succeeded"
    finally:
        await broker.kill()


@pytest.mark.timeout(30)
async def test_a_deadline_passed_during_a_suspend_is_met_soon_after_the_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A suspended machine's sleep moves the server's clock (CLOCK_BOOTTIME) but not the
    event loop's, on which the timer pass is scheduled. Before the fix a lease of 60 s whose
    deadline passed in a 2 h sleep was ended 60 s of the loop's time after it was taken:
    the agent parked behind it waited out the whole minute after the resume. Now the timer
    pass looks at the server's clock at least every TICK_CHECK_SECONDS."""
    monkeypatch.setattr(server_module, "TICK_CHECK_SECONDS", 0.05)
    clock = Source(1_800_000_000.0)
    server = Server(make_config(tmp_path), clock=clock)
    await server.start()
    try:
        async with await Client.connect(server.socket_path, timeout=5) as c:
            _, (held,) = await c.submit([{"resource": "disk", "action": "mkfs"}])
            taken = await c.next("disk", timeout=5, ttr=60)
            assert taken is not None and taken.id == held
            async with await Client.connect(server.socket_path, timeout=5) as other:
                parked = asyncio.ensure_future(other.next("disk", timeout=20))
                await other.ping()  # answered after the NEXT was read: it is parked
                clock.now += 7200.0  # the machine slept 2 h; the loop's clock did not move
                again = await asyncio.wait_for(parked, 10)
                assert again is not None and (again.id, again.delivery) == (held, 2)
    finally:
        await server.stop()
