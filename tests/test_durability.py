"""Durability at the server level: a broker in this process, driven through the client, over
a file layer that loses power and fills up (`MemoryFiles`), or over real files.

What is checked is what a client was promised. With `fsync always` every acknowledged change
survives a power loss; `batch` loses at most its window; `off` can lose anything. A failing
disk answers `storage_failed`, never a false OK, and the log it leaves always opens. A restart
(clean, or a power cut with no shutdown snapshot) keeps the state, puts leased commands back
in their places with their delivery counts, and keeps expiry and retention on the broker's
clock. Some tests pin bugs this file found (named in their docstrings), fixed since.

A "power loss" is `MemoryFiles.crash()`: only what a sync covered survives (with an rng, each
unsynced sector may survive too: torn writes). The old server is then stopped on the dead
disk, which refuses every call, so it can neither write nor take a shutdown snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import io
import random
import re
import shutil
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

from spinbroker import server as server_module
from spinbroker.client import (
    BadRequest,
    Client,
    CommandStatus,
    NotFound,
    PackageStatus,
    ShuttingDown,
    StaleDelivery,
    StorageFailed,
    UnknownDependency,
)
from spinbroker.config import Limits, ServerConfig
from spinbroker.core import Broker
from spinbroker.records import from_wire
from spinbroker.server import Server
from spinbroker.state import load as load_state
from spinbroker.wal import Wal, WalNewerVersion
from spinbroker.wal.files import FileLayer, OsFiles
from spinbroker.wal.inspect import inspect
from spinbroker.wal.memfiles import MemoryFiles
from spinbroker.wal.segment import list_segments
from spinbroker.wal.snapshot import encode_snapshot, list_snapshots, read_snapshot

from .conftest import as_newer_version

#: The deadline of every test here: no wait can hang the suite (blocking requests also
#: carry their own timeouts).
pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- harness


def make_config(root: Path, **options: Any) -> ServerConfig:
    options.setdefault("segment_size", 1 << 16)  # the simulated disk copies whole files
    options.setdefault("snapshot_every", 1 << 30)
    options.setdefault("snapshot_interval", 1e9)
    options.setdefault("tcp", None)
    return ServerConfig(data_dir=root / "data", socket=root / "b.sock", **options)


class Brokers:
    """Starts servers and clients for one test and stops whatever is left at its end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[Server] = []
        self.clients: list[Client] = []

    def config(self, **options: Any) -> ServerConfig:
        return make_config(self.root, **options)

    async def start(
        self,
        config: ServerConfig,
        files: FileLayer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Server:
        server = Server(config, clock=clock, files=files)
        await server.start()
        self.servers.append(server)
        return server

    async def client(self, server: Server) -> Client:
        client = await Client.connect(server.socket_path, timeout=5)
        self.clients.append(client)
        return client

    async def close_clients(self) -> None:
        clients, self.clients = self.clients, []
        for client in clients:
            await client.close()

    async def power_loss(
        self, server: Server, fs: MemoryFiles, rng: random.Random | None = None
    ) -> MemoryFiles:
        """Cut the power under `server`: returns the disk as it comes back. Clients lose
        their connections, as they would; nothing the old server does after this is kept."""
        after = fs.crash(rng)
        await self.close_clients()
        await server.stop()
        return after

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.close_clients()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.stop()


@pytest.fixture
async def brokers(tmp_path: Path) -> AsyncIterator[Brokers]:
    b = Brokers(tmp_path)
    try:
        yield b
    finally:
        await b.aclose()


async def reboot(
    brokers: Brokers,
    server: Server,
    fs: MemoryFiles,
    how: str,
    clock: Callable[[], float] = time.time,
) -> tuple[Server, MemoryFiles]:
    """Restart `server` cleanly ("clean") or after a power cut ("power-loss")."""
    if how == "clean":
        await server.stop()  # answers blocked requests, closes connections, snapshots
        await brokers.close_clients()
    else:
        fs = await brokers.power_loss(server, fs)
    return await brokers.start(server.config, files=fs, clock=clock), fs


def log_opens(fs: MemoryFiles, config: ServerConfig) -> str:
    """`spinbroker wal inspect`'s verdict on the disk; asserts the log opens and loads."""
    out = io.StringIO()
    assert inspect(config.data_dir, out, files=fs), out.getvalue()
    return out.getvalue()


def one(resource: str = "r", action: str = "run", **parameters: Any) -> list[dict[str, Any]]:
    return [{"resource": resource, "action": action, "parameters": parameters}]


async def package_status(client: Client, package: str) -> PackageStatus:
    status = await client.status(package, commands=True)
    assert isinstance(status, PackageStatus)
    return status


async def command_status(client: Client, command: str) -> CommandStatus:
    status = await client.status(command)
    assert isinstance(status, CommandStatus)
    return status


async def missing(client: Client, package: str) -> bool:
    try:
        await client.status(package)
    except NotFound:
        return True
    return False


# --------------------------------------------------------------------------- power loss

RESOURCES = ("disk", "vm")


@dataclass
class Ledger:
    """What the broker acknowledged, as its clients saw it."""

    #: Acknowledged package -> its acknowledged command ids, in package order.
    packages: dict[str, list[str]] = field(default_factory=dict)
    #: Packages whose SUBMIT or ENQUEUE was acknowledged.
    enqueued: set[str] = field(default_factory=set)
    #: Commands of enqueued packages: what a new command may depend on.
    dependable: list[str] = field(default_factory=list)
    #: Package -> commands an acknowledged CANCEL cancelled.
    cancelled: dict[str, int] = field(default_factory=dict)
    #: Command -> "succeeded" / "failed", for every acknowledged COMPLETE.
    completed: dict[str, str] = field(default_factory=dict)
    #: Command -> (delivery, lease known durable) for acknowledged NEXTs not completed.
    leased: dict[str, tuple[int, bool]] = field(default_factory=dict)
    #: Commands a COMPLETE was sent for (acknowledged or not).
    complete_sent: set[str] = field(default_factory=set)
    #: Packages a CANCEL was sent for (acknowledged or not).
    cancel_sent: set[str] = field(default_factory=set)
    refused: int = 0


async def op_submit(c: Client, led: Ledger, rng: random.Random) -> None:
    commands = []
    for i in range(rng.randint(1, 3)):
        deps: list[str | int] = []
        if i and rng.random() < 0.5:
            deps.append(rng.randrange(i))
        if led.dependable and rng.random() < 0.3:
            deps.append(rng.choice(led.dependable))
        commands.append(
            {
                "resource": rng.choice(RESOURCES),
                "action": "run",
                "parameters": {"i": i, "blob": "x" * rng.randrange(200)},
                "dependencies": deps,
            }
        )
    package, ids = await c.submit(commands)
    led.packages[package] = ids
    led.enqueued.add(package)
    led.dependable.extend(ids)


async def op_build(c: Client, led: Ledger, rng: random.Random) -> None:
    """NEW, ADD, ADD, ENQUEUE: every step acknowledged on its own."""
    package = await c.new()
    led.packages[package] = []
    for _ in range(rng.randint(1, 2)):
        command = await c.add(package, rng.choice(RESOURCES), "build", {"n": rng.random()})
        led.packages[package].append(command)
    if rng.random() < 0.8:
        ids = await c.enqueue(package)
        led.enqueued.add(package)
        led.dependable.extend(ids)


async def op_take(c: Client, led: Ledger, rng: random.Random) -> None:
    got = await c.next(rng.choice(RESOURCES), timeout=0)
    if got is None:
        return
    led.leased[got.id] = (got.delivery, False)
    if rng.random() < 0.25:
        # Keep the lease. The reply to a later change on this connection waited for every
        # record before it, the lease's included: from now on the lease is durable. (TOUCH,
        # a change, not PING: a read may answer from memory while the log fails.)
        await c.request("TOUCH", {"command": got.id, "delivery": got.delivery})
        led.leased[got.id] = (got.delivery, True)
        return
    success = rng.random() < 0.85
    led.complete_sent.add(got.id)
    state = await c.complete(got.id, success, None if success else "broken", got.delivery)
    del led.leased[got.id]
    led.completed[got.id] = state


async def op_cancel(c: Client, led: Ledger, rng: random.Random) -> None:
    if not led.enqueued:
        return
    package = rng.choice(sorted(led.enqueued))
    led.cancel_sent.add(package)
    led.cancelled[package] = await c.cancel(package)


Op = Callable[[Client, Ledger, random.Random], Awaitable[None]]
OPS: list[Op] = [op_submit, op_build, op_take, op_cancel]
WEIGHTS = [4, 1, 4, 1]


async def worker(c: Client, led: Ledger, rng: random.Random, ops: int) -> None:
    """Random requests, one at a time, until `ops` are done or the disk refuses one."""
    for _ in range(ops):
        op = rng.choices(OPS, WEIGHTS)[0]
        try:
            await op(c, led, rng)
        except StorageFailed:
            led.refused += 1
            return


class PowerCut:
    """A `MemoryFiles` hook that cuts the power just before the `at`-th call of its op."""

    def __init__(self, fs: MemoryFiles, at: int, rng: random.Random | None) -> None:
        self.fs = fs
        self.at = at
        self.rng = rng
        self.calls = 0
        self.after: MemoryFiles | None = None

    def __call__(self, path: Path) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.after = self.fs.crash(self.rng)


async def check_ledger(c: Client, led: Ledger) -> None:
    """Every acknowledged change is in the recovered broker."""
    for package, ids in led.packages.items():
        assert not await missing(c, package), f"acknowledged package {package} lost"
        status = await package_status(c, package)
        assert status.commands is not None
        held = [s.id for s in status.commands]
        assert held[: len(ids)] == ids, f"package {package}: {held} lost acknowledged {ids}"
        if package in led.enqueued:
            assert status.state != "open", f"acknowledged ENQUEUE of {package} lost"
        if led.cancelled.get(package):
            assert status.state in ("cancelled", "failed"), status
    for command, state in led.completed.items():
        got = await command_status(c, command)
        assert got.state == state, f"acknowledged COMPLETE of {command} lost: {got}"
    for command, (delivery, durable) in led.leased.items():
        got = await command_status(c, command)
        if command not in led.complete_sent:
            # No lease survives a restart: the command is ready again, or cancelled if its
            # package was (CANCEL spares a leased command only while its lease lasts).
            expected = {"ready"}
            if got.package in led.cancelled:
                expected = {"cancelled"}
            elif got.package in led.cancel_sent:  # the crash came before the CANCEL's reply
                expected = {"ready", "cancelled"}
            assert got.state in expected, f"leased at the crash: {got}, expected {expected}"
        # A NEXT reply does not wait for its own lease record: the count may be one lower,
        # unless a later reply proved the lease durable.
        lowest = delivery if durable else delivery - 1
        assert lowest <= got.delivery <= delivery, (command, delivery, durable, got)


async def drain(c: Client, led: Ledger) -> int:
    """Take and complete everything ready; settled commands never come back, and nothing
    is delivered before its dependencies succeeded. Returns how many were taken."""
    taken, progress = 0, True
    while progress:  # completing a command of one resource can ready one of another
        progress = False
        for resource in RESOURCES:
            while (got := await c.next(resource, timeout=0)) is not None:
                assert got.id not in led.completed, f"completed command {got.id} delivered again"
                for dep in got.dependencies:
                    assert (await command_status(c, dep)).state == "succeeded", (got, dep)
                await c.complete(got.id, True, delivery=got.delivery)
                taken, progress = taken + 1, True
    for package in led.enqueued:
        done = await c.wait(package, timeout=5)
        assert done is not None and done.finished, f"package {package} never finished"
    return taken


@pytest.mark.parametrize("seed", range(12))
async def test_power_loss_keeps_every_acknowledged_change(brokers: Brokers, seed: int) -> None:
    """Three clients make random changes; the power goes just before a random write or sync
    of the log (sometimes tearing what was not synced); a new broker on what survived holds
    every change anyone was told succeeded, and carries on."""
    rng = random.Random(seed)
    fs = MemoryFiles()
    config = brokers.config(fsync="always", segment_size=rng.choice((2048, 1 << 16)))
    server = await brokers.start(config, files=fs)
    torn = random.Random(seed) if seed % 2 else None
    cut = PowerCut(fs, rng.randint(1, 30), torn)
    fs.hooks[rng.choice(("write", "datasync"))] = cut

    led = Ledger()
    clients = [await brokers.client(server) for _ in range(3)]
    workers = [worker(c, led, random.Random(rng.random()), 25) for c in clients]
    await asyncio.gather(*workers)
    after = cut.after or fs.crash(torn)  # the clients finished first: cut it now
    await brokers.close_clients()
    await server.stop()

    log_opens(after, config)
    server = await brokers.start(config, files=after)
    c = await brokers.client(server)
    await check_ledger(c, led)
    await drain(c, led)


@pytest.mark.parametrize(("mode", "kept"), [("always", True), ("off", False)])
async def test_fsync_off_loses_acknowledged_changes_on_power_loss(
    brokers: Brokers, mode: str, kept: bool
) -> None:
    """The documented risk of `--fsync off`: acknowledged SUBMITs vanish with the power
    (it never syncs while running), where `always` keeps every one."""
    fs = MemoryFiles()
    config = brokers.config(fsync=mode)
    server = await brokers.start(config, files=fs)
    c = await brokers.client(server)
    packages = [(await c.submit(one(n=n)))[0] for n in range(5)]
    fs = await brokers.power_loss(server, fs)

    server = await brokers.start(config, files=fs)
    c = await brokers.client(server)
    lost = [p for p in packages if await missing(c, p)]
    assert lost == ([] if kept else packages)


async def test_batch_loses_only_what_it_had_not_synced(brokers: Brokers) -> None:
    """`batch` acknowledges once written: with no sync due yet, a power loss takes the
    acknowledged records written since the last sync, and only those."""
    fs = MemoryFiles()
    config = brokers.config(fsync="batch", fsync_interval_ms=1e9)
    server = await brokers.start(config, files=fs)
    c = await brokers.client(server)
    first, _ = await c.submit(one())  # the first flush of a batch log syncs
    later = [(await c.submit(one(n=n)))[0] for n in range(3)]
    fs = await brokers.power_loss(server, fs)

    server = await brokers.start(config, files=fs)
    c = await brokers.client(server)
    assert not await missing(c, first)
    assert [p for p in later if await missing(c, p)] == later


@pytest.mark.parametrize("seed", range(3))
async def test_batch_loss_window_is_bounded(brokers: Brokers, seed: int) -> None:
    """With `--fsync batch` a sync runs within the interval after any write, so a power
    loss keeps everything acknowledged longer ago than the interval (plus scheduling
    slack), and what it loses is always a suffix of what was acknowledged."""
    interval = 0.02
    slack = 0.5  # event-loop and thread scheduling on a loaded machine; MemoryFiles syncs are free
    rng = random.Random(seed)
    fs = MemoryFiles()
    config = brokers.config(fsync="batch", fsync_interval_ms=interval * 1000)
    server = await brokers.start(config, files=fs)
    c = await brokers.client(server)
    loop = asyncio.get_running_loop()
    acked: list[tuple[float, str]] = []
    stop_at = loop.time() + 0.8 + rng.random() * 0.4
    while loop.time() < stop_at:
        package, _ = await c.submit(one(n=len(acked)))
        acked.append((loop.time(), package))
    # One more write, then quiet: only the batch timer can sync it. Waiting out the
    # promised window is the test's input here, not a synchronisation.
    package, _ = await c.submit(one(n="last"))
    acked.append((loop.time(), package))
    await asyncio.sleep(interval + slack)
    cut_at = loop.time()
    fs = await brokers.power_loss(server, fs, random.Random(seed))

    server = await brokers.start(config, files=fs)
    c = await brokers.client(server)
    survived = [not await missing(c, p) for _, p in acked]
    kept = survived.index(False) if False in survived else len(survived)
    assert all(survived[:kept]) and not any(survived[kept:]), "lost records are not a suffix"
    for (at, package), ok in zip(acked, survived, strict=True):
        if at < cut_at - interval - slack:
            assert ok, f"{package} acknowledged {cut_at - at:.3f}s before the power cut, lost"


class Gate:
    """A `MemoryFiles` hook that holds the IO thread in its first call until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, path: Path) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.released.wait(10)

    async def wait_entered(self) -> None:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, self.entered.wait, 10)


async def test_no_reply_reveals_a_change_before_it_is_durable(brokers: Brokers) -> None:
    """A SUBMIT's fsync is stuck: an agent's NEXT would lease the new command and STATS
    would count it, so neither may answer until the SUBMIT is durable. The power goes: all
    three answer storage_failed and the restarted broker has never heard of any of it."""
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs)
    producer, agent, watcher = [await brokers.client(server) for _ in range(3)]
    gate = Gate()
    fs.hooks["datasync"] = gate
    submit = asyncio.ensure_future(producer.submit(one()))
    await gate.wait_entered()
    take = asyncio.ensure_future(agent.next("r", timeout=0))
    stats = asyncio.ensure_future(watcher.stats())
    # Negative: nothing may answer while the fsync hangs (a buggy broker answers at once).
    done, _ = await asyncio.wait([submit, take, stats], timeout=0.3)
    assert not done, [t.result() for t in done]
    fs_after = fs.crash()
    gate.released.set()
    for request in (submit, take, stats):
        with pytest.raises(StorageFailed):
            await request
    await brokers.close_clients()
    await server.stop()

    server = await brokers.start(server.config, files=fs_after)
    c = await brokers.client(server)
    assert (await c.stats())["totals"]["commands"] == 0
    assert await c.next("r", timeout=0) is None


# --------------------------------------------------------------------------- failing disks

FAILURES = [
    pytest.param("write", errno.ENOSPC, 0, 1 << 16, id="enospc-write"),
    pytest.param("write", errno.ENOSPC, 9, 1 << 16, id="enospc-short-write"),
    pytest.param("datasync", errno.EIO, 0, 1 << 16, id="eio-datasync"),
    pytest.param("create", errno.ENOSPC, 0, 256, id="enospc-new-segment"),
]


async def refused(request: Any) -> bool:
    """True if the broker answered storage_failed; an OK here would be a false one."""
    try:
        result = await request
    except StorageFailed:
        return True
    raise AssertionError(f"the broker acknowledged a change on a failing disk: {result!r}")


async def accepted_again(c: Client) -> str:
    """SUBMIT until the broker takes it: it retries the log on its own timer, which a
    client cannot await, so this polls (a refused SUBMIT changes nothing). The package."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        try:
            package, _ = await c.submit(one(n="after"))
            return package
        except StorageFailed:
            if loop.time() > deadline:
                raise
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(("op", "code", "partial", "segment_size"), FAILURES)
@pytest.mark.parametrize("heal", [True, False], ids=["space-returns", "power-loss-while-full"])
async def test_failing_disk_refuses_changes_and_leaves_a_log_that_opens(
    brokers: Brokers, op: str, code: int, partial: int, segment_size: int, heal: bool
) -> None:
    """While the log cannot be written every change is answered storage_failed (never a
    false OK) and later ones are refused; the log on disk always opens; once space returns
    the broker takes changes again. The one change that was in flight when the disk failed
    stays queued for the log and lands when space returns: storage_failed means "not
    acknowledged", not "undone" (wal/errors.py)."""
    fs = MemoryFiles()
    config = brokers.config(segment_size=segment_size)
    server = await brokers.start(config, files=fs)
    c = await brokers.client(server)
    # Records bigger than a 256-byte segment: with the last one written, the next flush
    # must start a new segment (the enospc-new-segment case).
    big = "x" * 300
    before = [await c.submit(one(n=n, big=big)) for n in range(2)]
    agent = await brokers.client(server)
    taken = await agent.next("r", timeout=0)
    assert taken is not None
    before.append(await c.submit(one(n=2, big=big)))

    fs.fail(op, code, partial=partial)
    tried = fs.calls[op]
    assert await refused(c.submit(one(n="in flight")))  # appended, then its commit failed
    assert fs.calls[op] > tried, f"the failing {op} was never attempted"
    assert await refused(c.submit(one(n="refused")))
    assert await refused(c.new())
    assert await refused(c.cancel(before[2][0]))
    assert await refused(agent.complete(taken.id, True))
    assert await refused(agent.next("r", timeout=0))
    assert server.wal is not None and server.wal.error is not None

    if heal:
        fs.heal()
        after_heal = await accepted_again(c)
        assert await agent.complete(taken.id, True) == "succeeded"
    fs = await brokers.power_loss(server, fs)

    log_opens(fs, config)
    server = await brokers.start(config, files=fs)
    c = await brokers.client(server)
    for package, _ in before:
        assert (await package_status(c, package)).state in ("pending", "succeeded")
    totals = (await c.stats())["totals"]
    if heal:
        assert not await missing(c, after_heal)
        assert (await command_status(c, taken.id)).state == "succeeded"
        assert totals["packages"] == len(before) + 2  # + the one in flight at the failure
    else:
        assert (await command_status(c, taken.id)).state == "ready"
        assert totals["packages"] == len(before)
    assert await c.submit(one(n="new broker"))


async def test_reads_still_answer_while_the_disk_fails(brokers: Brokers) -> None:
    """Reads answer from memory while changes are refused (once a bug: every reply was held
    behind the failed records, so PING, STATUS and STATS answered storage_failed too)."""
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs)
    c = await brokers.client(server)
    package, _ = await c.submit(one())
    fs.fail("write", errno.ENOSPC)
    assert await refused(c.submit(one()))
    await c.ping()
    assert (await package_status(c, package)).state == "pending"
    assert await c.wait(package, timeout=0) is None
    # From memory: the SUBMIT in flight at the failure shows, though it is not durable yet.
    assert (await c.stats())["totals"]["packages"] == 2
    assert await refused(c.new())  # answering reads unblocked no change


async def delivery_failed_with_the_disk(
    brokers: Brokers, ttr: float | None = None, clock: Callable[[], float] = time.time
) -> tuple[Server, Client, Client]:
    """A broker whose agent's parked NEXT on "q" (with `ttr`) was served by a SUBMIT whose
    flush failed: both answered storage_failed, the lease made all the same; the log works
    again after. Returns the server, the producer and the agent."""
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs, clock=clock)
    producer = await brokers.client(server)
    agent = await brokers.client(server)
    take = asyncio.ensure_future(agent.next("q", timeout=30, ttr=ttr))
    await asyncio.sleep(0)  # let the NEXT task send its request
    await agent.ping()  # answered after the NEXT was read: the NEXT is parked
    fs.fail("datasync", errno.EIO, times=1)
    assert await refused(producer.submit(one("q")))  # not acknowledged, but made
    assert await refused(take)
    assert await refused(agent.next("q", timeout=0))  # while the log fails
    await accepted_again(producer)
    return server, producer, agent


async def test_a_delivery_whose_reply_failed_with_the_disk_is_delivered_again(
    brokers: Brokers,
) -> None:
    """Audit h4: a parked NEXT served by a SUBMIT whose flush failed was answered
    storage_failed, yet its lease was made (its record waits in the log) and stayed: the
    command was leased to an agent that had been told it got nothing, and no NEXT got it
    again. Now the connection's next NEXT on that resource gets that same delivery."""
    server, _, agent = await delivery_failed_with_the_disk(brokers)
    other = await brokers.client(server)
    assert await other.next("q", timeout=0) is None  # still leased: to the first agent
    assert await agent.next("r", timeout=0) is not None  # another resource: not it
    again = await agent.next("q", timeout=0)
    assert again is not None and again.delivery == 1
    assert await agent.complete(again.id, True, delivery=1) == "succeeded"
    assert await agent.next("q", timeout=0) is None


@pytest.mark.parametrize(
    ("first_ttr", "next_ttr", "ttr", "deadline"),
    [(5, 60, 60, 1064.0), (5, None, 5, 1009.0), (None, 60, None, None)],
    ids=["ttr lease, new ttr", "ttr lease, no ttr", "connection lease, ttr"],
)
async def test_a_delivery_given_again_restarts_its_lease_as_touch_would(
    brokers: Brokers,
    first_ttr: float | None,
    next_ttr: float | None,
    ttr: float | None,
    deadline: float | None,
) -> None:
    """A delivery given again after its reply failed with the disk is given now, to the new
    NEXT: a ttr lease's clock restarts with that NEXT's ttr (or the one in force), as TOUCH
    would, with TOUCH's record, so the log alone rebuilds it. A connection lease stays one
    (the reply's ttr says so). Once the old lease's deadline stayed, maybe nearly spent
    while the agent was told nothing, and the reply showed the old ttr, not the new
    NEXT's."""
    now = [1000.0]
    server, _, agent = await delivery_failed_with_the_disk(brokers, first_ttr, lambda: now[0])
    now[0] = 1004.0
    again = await agent.next("q", timeout=0, ttr=next_ttr)
    assert again is not None and (again.delivery, again.ttr) == (1, ttr)
    assert server.core.commands[again.id].lease_deadline == deadline
    assert isinstance(server.files, MemoryFiles)
    disk = await brokers.power_loss(server, server.files)  # the reply left: all is durable
    wal, _ = Wal.open(server.config.data_dir, files=disk, segment_size=server.config.segment_size)
    _, bodies = wal.load()
    replayed = Broker(server.config.limits)
    for _, body in bodies:
        replayed.apply(from_wire(msgpack.unpackb(body, raw=False, strict_map_key=False)))
    await wal.close()
    leased = replayed.commands[again.id]
    assert (leased.state.value, leased.ttr, leased.lease_deadline) == ("leased", ttr, deadline)


# --------------------------------------------------------------------------- restarts


class CutAtNextWrite:
    """Cuts the power just before the log's next write (a lease record, say), from the IO
    thread; `await cut.done()` returns the disk as it comes back."""

    def __init__(self, fs: MemoryFiles) -> None:
        self.fs = fs
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self.after: MemoryFiles | None = None
        fs.hooks["write"] = self

    def __call__(self, path: Path) -> None:
        if self.after is None:
            self.after = self.fs.crash()
            self.loop.call_soon_threadsafe(self.event.set)

    async def done(self) -> MemoryFiles:
        await self.event.wait()
        assert self.after is not None
        return self.after


async def restart_after_the_cut(brokers: Brokers, server: Server, cut: CutAtNextWrite) -> Server:
    after = await cut.done()
    await brokers.close_clients()
    await server.stop()
    return await brokers.start(server.config, files=after)


@pytest.mark.parametrize("how", ["clean", "power-loss"])
async def test_no_delivery_number_is_given_twice_across_a_restart(
    brokers: Brokers, how: str
) -> None:
    """Audit h4: a first delivery's reply does not wait for its lease record. With that
    record lost in a crash, the restarted broker gave the same delivery number again, and
    the first agent's COMPLETE with `delivery` ended the new lease with its old result. A
    command that was ready at a crash now skips a number at its next delivery; after a
    clean stop, which logs every lease, nothing is skipped."""
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs)
    producer = await brokers.client(server)
    _, (taken, untouched) = await producer.submit(one("r", "x") + one("r", "y"))
    agent = await brokers.client(server)
    cut = CutAtNextWrite(fs) if how == "power-loss" else None
    got = await agent.next("r", timeout=0)  # answered before its lease record is written
    assert got is not None and (got.id, got.delivery) == (taken, 1)
    if cut is not None:
        server = await restart_after_the_cut(brokers, server, cut)
    else:
        server, _ = await reboot(brokers, server, fs, how)
    c = await brokers.client(server)
    again = await c.next("r", timeout=0)
    assert again is not None and (again.id, again.delivery) == (taken, 2)
    with pytest.raises(StaleDelivery):
        await c.complete(taken, True, delivery=1)  # the first agent, back: too late
    assert await c.complete(taken, False, "ran again", delivery=2) == "failed"
    other = await c.next("r", timeout=0)
    assert other is not None and other.id == untouched
    assert other.delivery == (1 if how == "clean" else 2)


async def test_a_crash_after_a_clean_restart_skips_a_delivery_number_too(
    brokers: Brokers,
) -> None:
    """A clean stop's snapshot says every lease is on record, but only until a broker
    starts after it: each start logs that it did (BrokerStarted), so a crash of the
    restarted broker before it made any other durable record is still a crash."""
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs)
    producer = await brokers.client(server)
    _, (command,) = await producer.submit(one())
    server, fs = await reboot(brokers, server, fs, "clean")
    agent = await brokers.client(server)
    cut = CutAtNextWrite(fs)
    got = await agent.next("r", timeout=0)
    assert got is not None and (got.id, got.delivery) == (command, 1)
    server = await restart_after_the_cut(brokers, server, cut)
    c = await brokers.client(server)
    again = await c.next("r", timeout=0)
    assert again is not None and (again.id, again.delivery) == (command, 2)
    with pytest.raises(StaleDelivery):
        await c.complete(command, True, delivery=1)


async def test_a_delivery_that_skipped_a_number_is_on_record_before_it_is_seen(
    brokers: Brokers,
) -> None:
    """Crashtest (seed 43, batch): the number a restart skips to was given, its lease lost
    in a second crash, and the next restart skipped to the same number again. A delivery
    that skips a number now waits for its own lease record: no agent sees that number
    unless the log holds it."""
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs)
    producer = await brokers.client(server)
    _, (command,) = await producer.submit(one())
    cut = CutAtNextWrite(fs)
    got = await (await brokers.client(server)).next("r", timeout=0)
    assert got is not None and got.delivery == 1  # its lease record is lost below
    server = await restart_after_the_cut(brokers, server, cut)
    cut = CutAtNextWrite(await cut.done())
    seen = []
    try:  # skips to 2; the power goes as its lease record is written
        got = await (await brokers.client(server)).next("r", timeout=0)
        assert got is not None
        seen.append(got.delivery)
    except (StorageFailed, ConnectionError):
        pass
    server = await restart_after_the_cut(brokers, server, cut)
    again = await (await brokers.client(server)).next("r", timeout=0)
    assert again is not None and again.id == command
    assert again.delivery not in seen and again.delivery not in (0, 1)


async def test_a_clean_stop_after_a_crash_keeps_the_skip_it_owes(brokers: Brokers) -> None:
    """Audit h7: a clean stop logs its own leases, not one lost in the crash before it.
    Its snapshot said "clean" all the same, and the next start gave delivery 1 again. A
    clean stop with a skip still owed now writes a snapshot that is not marked clean."""
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs)
    _, (command,) = await (await brokers.client(server)).submit(one())
    cut = CutAtNextWrite(fs)
    got = await (await brokers.client(server)).next("r", timeout=0)
    assert got is not None and got.delivery == 1  # its lease record is lost below
    server = await restart_after_the_cut(brokers, server, cut)
    assert server.recovery is not None and server.recovery.leases_released == 0
    server, _ = await reboot(brokers, server, await cut.done(), "clean")  # nobody took it
    c = await brokers.client(server)
    again = await c.next("r", timeout=0)
    assert again is not None and (again.id, again.delivery) == (command, 2)
    with pytest.raises(StaleDelivery):
        await c.complete(command, True, delivery=1)
    assert server.recovery is not None and server.recovery.leases_released == 0


async def test_a_failed_delivery_of_a_package_cancelled_since_is_not_handed_out(
    brokers: Brokers,
) -> None:
    """Audit h7: the connection's next NEXT got a command whose reply had failed with the
    disk even though its package was cancelled meanwhile. Its agent never had it, so it is
    cancelled, as CANCEL promises for what was not delivered."""
    server, producer, agent = await delivery_failed_with_the_disk(brokers)
    [package] = {c.package.id for c in server.core.commands.values() if c.queue.name == "q"}
    await producer.cancel(package)
    assert await agent.next("q", timeout=0) is None
    assert (await package_status(producer, package)).state == "cancelled"


async def build_state(c: Client, agent: Client) -> dict[str, str]:
    """A little of everything: finished, failed with a cascade, cancelled, open, pending,
    leased. Returns name -> id."""
    ok, (ok1,) = await c.submit(one(step="ok"))
    bad, (bad1, _) = await c.submit(
        [
            {"resource": "r", "action": "break"},
            {"resource": "r", "action": "after", "dependencies": [0]},
        ]
    )
    gone, _ = await c.submit(one("idle", "never"))
    assert await c.cancel(gone) == 1
    opened = await c.new()
    await c.add(opened, "r", "staged", {"nested": {"list": [1, 2.5, b"\x00"]}})
    pending, (lease1, _) = await c.submit(
        [{"resource": "q", "action": "first"}, {"resource": "q", "action": "second"}]
    )
    for command, success in ((ok1, True), (bad1, False)):
        got = await agent.next("r", timeout=0)
        assert got is not None and got.id == command
        await agent.complete(command, success, None if success else "disk on fire")
    got = await agent.next("q", timeout=0)
    assert got is not None and got.id == lease1
    return {"ok": ok, "bad": bad, "gone": gone, "open": opened, "pending": pending}


async def snapshot_of(c: Client, packages: dict[str, str]) -> dict[str, Any]:
    out = {}
    for name, package in packages.items():
        status = (await package_status(c, package)).to_json()
        for command in status["commands"]:
            if command["state"] == "leased":  # no lease outlives a restart
                command["state"] = "ready"
        status["counts"]["ready"] += status["counts"]["leased"]
        status["counts"]["leased"] = 0
        out[name] = status
    return out


@pytest.mark.parametrize("how", ["clean", "power-loss"])
async def test_state_survives_a_restart(brokers: Brokers, how: str) -> None:
    """A clean stop writes a snapshot the next start loads with nothing to replay; a power
    cut leaves no shutdown snapshot and the log alone rebuilds the same state."""
    fs = MemoryFiles()
    config = brokers.config()
    server = await brokers.start(config, files=fs)
    c, agent = await brokers.client(server), await brokers.client(server)
    packages = await build_state(c, agent)
    await agent.ping()  # the lease is durable too
    expected = await snapshot_of(c, packages)
    last_lsn = server.appended_lsn

    server, fs = await reboot(brokers, server, fs, how)
    report = server.recovery
    assert report is not None
    if how == "clean":
        # The shutdown snapshot holds everything (also the lease its connection's close
        # released, if that came first); nothing is left to replay.
        assert report.snapshot_lsn >= last_lsn and report.records == 0
    else:
        assert (report.snapshot_lsn, report.records, report.leases_released) == (0, last_lsn, 1)
    c = await brokers.client(server)
    assert await snapshot_of(c, packages) == expected
    status = await package_status(c, packages["open"])
    assert status.commands is not None and status.state == "open"
    await c.add(packages["open"], "r", "more")  # an open package is still open
    assert len(await c.enqueue(packages["open"])) == 2


async def test_snapshot_and_log_recovery_on_real_files(brokers: Brokers) -> None:
    """Snapshots taken while serving (in a forked child, on real files), then the records
    after the newest one: the data dir copied while the broker runs is what a killed
    process leaves, and a broker started on the copy loads snapshot + log."""
    config = brokers.config(snapshot_every=4)
    server = await brokers.start(config)
    c, agent = await brokers.client(server), await brokers.client(server)
    packages = await build_state(c, agent)
    for n in range(6):
        packages[f"more{n}"] = (await c.submit(one(n=n)))[0]
    snapshots = server.snapshotter
    assert snapshots is not None
    # Let the snapshots in progress finish, and stop where the log holds records after the
    # newest one (fewer than snapshot_every, so no new one starts).
    for n in range(20):
        if snapshots.running is not None:
            await snapshots.running
        behind = server.appended_lsn - snapshots.last_lsn
        if snapshots.running is None and 0 < behind < config.snapshot_every:
            break
        packages[f"tail{n}"] = (await c.submit(one(n=n)))[0]
    assert snapshots.taken >= 1 and snapshots.running is None
    await agent.ping()
    expected = await snapshot_of(c, packages)

    copy = make_config(brokers.root / "copy")
    shutil.copytree(config.data_dir, copy.data_dir, ignore=shutil.ignore_patterns("lock"))
    server = await brokers.start(copy)
    report = server.recovery
    assert report is not None
    assert report.snapshot_lsn == snapshots.last_lsn > 0 and report.records > 0
    c = await brokers.client(server)
    assert await snapshot_of(c, packages) == expected


async def test_snapshots_while_serving_go_through_the_servers_file_layer(
    brokers: Brokers,
) -> None:
    """Snapshots while serving reach the server's own file layer, so power-loss tests cover
    snapshot + log recovery (once a bug: the forked child always wrote real files)."""
    fs = MemoryFiles()
    config = brokers.config(snapshot_every=4)
    server = await brokers.start(config, files=fs)
    c = await brokers.client(server)
    for n in range(8):
        await c.submit(one(n=n))
    snapshots = server.snapshotter
    assert snapshots is not None
    if snapshots.running is not None:
        await snapshots.running
    fs = await brokers.power_loss(server, fs)
    server = await brokers.start(config, files=fs)
    assert server.recovery is not None and server.recovery.snapshot_lsn > 0


@pytest.mark.parametrize("how", ["clean", "power-loss"])
async def test_leased_commands_come_back_in_their_places(brokers: Brokers, how: str) -> None:
    """After a restart no lease is held: each leased command is ready again ahead of the
    commands enqueued after it, its delivery count kept."""
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs)
    c = await brokers.client(server)
    _, (a1,) = await c.submit(one(action="a1"))
    first = await brokers.client(server)
    got = await first.next("r", timeout=0)
    assert got is not None and got.id == a1
    await first.close()  # its connection lease ends: a1 is back in line, delivered once
    agent = await brokers.client(server)
    got = await agent.next("r", timeout=10)  # the only command: comes once it is released
    assert got is not None and (got.id, got.delivery) == (a1, 2)
    _, (a2, a3) = await c.submit([{"resource": "r", "action": a} for a in ("a2", "a3")])
    _, (b1,) = await c.submit(one(action="b1"))
    for command in (a2, a3):
        got = await agent.next("r", timeout=0)
        assert got is not None and (got.id, got.delivery) == (command, 1)
    await agent.ping()  # every lease is durable: the counts after the restart are exact

    server, fs = await reboot(brokers, server, fs, how)
    agent = await brokers.client(server)
    # b1 was ready: after a crash its next delivery skips the one that may have been lost.
    b1_delivery = 1 if how == "clean" else 2
    for command, delivery in ((a1, 3), (a2, 2), (a3, 2), (b1, b1_delivery)):
        got = await agent.next("r", timeout=0)
        assert got is not None and (got.id, got.delivery) == (command, delivery)


@pytest.mark.parametrize("how", ["clean", "power-loss"])
async def test_a_lease_lost_to_a_restart_counts_toward_max_deliveries(
    brokers: Brokers, how: str
) -> None:
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(limits=Limits(max_deliveries=2)), files=fs)
    c = await brokers.client(server)
    package, (command,) = await c.submit(one())
    for delivery in (1, 2):
        agent = await brokers.client(server)
        got = await agent.next("r", timeout=10)  # the second waits for the first's release
        assert got is not None and got.delivery == delivery
        if delivery == 1:
            await agent.close()
    await agent.ping()

    server, fs = await reboot(brokers, server, fs, how)
    c = await brokers.client(server)
    assert await c.next("r", timeout=0) is None
    status = await command_status(c, command)
    assert (status.state, status.delivery) == ("failed", 2)
    assert status.reason == "lease lost after 2 deliveries (max_deliveries=2)"
    assert (await package_status(c, package)).state == "failed"


@pytest.mark.parametrize("how", ["clean", "power-loss"])
async def test_wait_on_a_package_from_before_the_restart(brokers: Brokers, how: str) -> None:
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs)
    c = await brokers.client(server)
    package, (first, second) = await c.submit(
        [
            {"resource": "r", "action": "one"},
            {"resource": "r", "action": "two", "dependencies": [0]},
        ]
    )
    waiter = await brokers.client(server)
    blocked = asyncio.ensure_future(waiter.wait(package))
    await asyncio.sleep(0)  # let the WAIT task send its request
    await waiter.ping()  # answered after the WAIT was read: the WAIT is parked
    assert not blocked.done()

    server, fs = await reboot(brokers, server, fs, how)
    if how == "clean":
        with pytest.raises(ShuttingDown):
            await blocked
    else:
        with pytest.raises(ConnectionError):
            await blocked
    waiter = await brokers.client(server)
    blocked = asyncio.ensure_future(waiter.wait(package, timeout=10))
    agent = await brokers.client(server)
    for command in (first, second):
        got = await agent.next("r", timeout=5)
        assert got is not None and got.id == command
        await agent.complete(command, True)
    done = await blocked
    assert done is not None and (done.state, done.finished) == ("succeeded", True)


async def test_expiry_and_forgetting_across_restarts(brokers: Brokers) -> None:
    """Package TTL and retention run on the broker's clock, which keeps going while the
    broker is down: each restart (here all power cuts) catches up with what fell due."""
    now = [1000.0]

    def clock() -> float:
        return now[0]

    fs = MemoryFiles()
    config = brokers.config(limits=Limits(package_ttl=10, retention=20))
    server = await brokers.start(config, files=fs, clock=clock)
    c = await brokers.client(server)
    opened = await c.new()
    await c.add(opened, "r", "never")
    finished, (done,) = await c.submit(one())
    pending, _ = await c.submit(one("q"))
    got = await c.next("r", timeout=0)
    assert got is not None
    await c.complete(done, True)

    async def restart_at(t: float) -> Client:
        nonlocal server, fs
        now[0] = t
        server, fs = await reboot(brokers, server, fs, "power-loss", clock)
        return await brokers.client(server)

    c = await restart_at(1005.0)
    assert (await c.status(opened)).state == "open"
    assert (await c.status(finished)).state == "succeeded"

    c = await restart_at(1011.0)  # the open package outlived its TTL while we were down
    status = await c.status(opened)
    assert (status.state, status.finished) == ("expired", True)
    with pytest.raises(NotFound):
        await c.enqueue(opened)
    with pytest.raises(NotFound):
        await c.wait(opened, timeout=0)
    assert (await c.status(finished)).state == "succeeded"  # retained until 1020

    c = await restart_at(1021.0)  # the finished package is forgotten, its commands too
    for gone in (finished, done):
        with pytest.raises(NotFound):
            await c.status(gone)
    with pytest.raises(UnknownDependency):
        await c.submit([{"resource": "r", "action": "x", "dependencies": [done]}])
    assert (await c.status(opened)).state == "expired"  # expired at 1011, kept until 1031
    assert (await c.status(pending)).state == "pending"  # never finished: never forgotten

    c = await restart_at(1032.0)
    with pytest.raises(NotFound):
        await c.status(opened)
    assert (await c.status(pending)).state == "pending"


async def test_a_restart_dates_its_own_records_on_the_servers_clock(brokers: Brokers) -> None:
    """The lease a restart ends is ended at the broker's clock, and retention counts from
    then (once a bug: recovery used time.time(), whatever the server's clock)."""
    now = [1000.0]

    def clock() -> float:
        return now[0]

    fs = MemoryFiles()
    config = brokers.config(limits=Limits(max_deliveries=1, retention=20))
    server = await brokers.start(config, files=fs, clock=clock)
    c = await brokers.client(server)
    package, _ = await c.submit(one())
    assert await c.next("r", timeout=0) is not None
    await c.ping()
    now[0] = 1005.0
    server, fs = await reboot(brokers, server, fs, "power-loss", clock)
    c = await brokers.client(server)
    assert (await c.status(package)).state == "failed"  # lease lost at 1005
    now[0] = 1026.0
    server, fs = await reboot(brokers, server, fs, "power-loss", clock)
    c = await brokers.client(server)
    with pytest.raises(NotFound):
        await c.status(package)


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file of a data dir but its lock: name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "lock"}


async def stopped_twice(brokers: Brokers) -> ServerConfig:
    """A data dir on real files that two clean stops left (two snapshots, a log between
    them), holding a pending package."""
    config = brokers.config()
    for n in range(2):
        server = await brokers.start(config)
        await (await brokers.client(server)).submit(one(n=n))
        await brokers.close_clients()
        await server.stop()
    assert len(list_snapshots(OsFiles(), config.data_dir)) == 2
    return config


async def test_a_snapshot_of_a_newer_format_is_refused_and_kept_as_it_is(
    brokers: Brokers,
) -> None:
    """A data dir a newer broker wrote: its newest snapshot has a format this version does
    not know (here with one item more). The start is refused, naming the file and the
    format, without falling back to the older snapshot, and every file stays as it was for
    the version that wrote it (once the message said only "a list of 6, not of 4 or 5")."""
    config = await stopped_twice(brokers)
    lsn, path = list_snapshots(OsFiles(), config.data_dir)[-1]
    body = read_snapshot(OsFiles(), lsn, path).body
    dumped = msgpack.unpackb(body, raw=False, strict_map_key=False)
    newer = [99, *dumped[1:], {"what": "a newer broker keeps here"}]
    path.write_bytes(encode_snapshot(lsn, msgpack.packb(newer, use_bin_type=True)))
    before = files_of(config.data_dir)
    refused = re.escape(f"{path}: snapshot format 99 is unknown to this spinbroker")
    with pytest.raises(ValueError, match=refused):
        await brokers.start(config)
    assert files_of(config.data_dir) == before


async def test_a_record_of_a_newer_type_is_refused_and_kept_as_it_is(brokers: Brokers) -> None:
    """A data dir a newer broker wrote: its log holds a record type this version does not
    know, sound frames around it. The start is refused, naming the record's LSN and tag;
    nothing is cut, every file stays as it was (once the message did not say which record,
    so `spinbroker wal inspect` could not find it)."""
    config = await stopped_twice(brokers)
    wal, _ = Wal.open(config.data_dir, segment_size=config.segment_size)
    _, replay = wal.load()
    assert not list(replay)
    newer = wal.append(msgpack.packb(["frobnicated", "p", 2000.0]))
    wal.append(msgpack.packb(["started", 2001.0]))  # a record this version knows, after it
    await wal.commit()
    await wal.close()
    before = files_of(config.data_dir)
    refused = re.escape(f"record at LSN {newer}: unknown record tag 'frobnicated'")
    with pytest.raises(ValueError, match=refused):
        await brokers.start(config)
    assert files_of(config.data_dir) == before


async def test_a_snapshot_file_of_a_newer_version_is_refused_and_kept_as_it_is(
    brokers: Brokers,
) -> None:
    """A data dir a newer broker wrote: its newest snapshot file has the snapshot magic with
    a higher version (the rest as this version wrote it). The start is refused, naming the
    file as likely a newer spinbroker's, and every file stays as it was (once it was taken
    for damage: skipped for the older snapshot and the log, then deleted by retention)."""
    config = await stopped_twice(brokers)
    _, path = list_snapshots(OsFiles(), config.data_dir)[-1]
    path.write_bytes(as_newer_version(path.read_bytes()))
    before = files_of(config.data_dir)
    refused = re.escape(f"{path}: snapshot file version 2 is unknown to this spinbroker")
    with pytest.raises(WalNewerVersion, match=f"{refused}.*likely written by a newer"):
        await brokers.start(config)
    assert files_of(config.data_dir) == before


async def test_a_segment_of_a_newer_version_is_refused_and_kept_as_it_is(
    brokers: Brokers, caplog: pytest.LogCaptureFixture
) -> None:
    """A data dir a newer broker wrote: its newest log segment has the segment magic with a
    higher version. `serve` exits 1 naming the segment as likely a newer spinbroker's,
    without pointing at `spinbroker wal repair` (once it did: that repair cut the newer log),
    and every file stays as it was."""
    config = await stopped_twice(brokers)
    _, path = list_segments(OsFiles(), config.data_dir)[-1]
    path.write_bytes(as_newer_version(path.read_bytes()))
    before = files_of(config.data_dir)
    assert await server_module._serve(config) == 1
    refused = f"{path}: segment format version 2 is unknown to this spinbroker"
    assert refused in caplog.text and "likely written by a newer spinbroker" in caplog.text
    assert "wal repair" not in caplog.text and "corrupt" not in caplog.text
    assert files_of(config.data_dir) == before


async def test_an_error_reply_is_never_a_durable_change(brokers: Brokers) -> None:
    """protocol.md: "A bad `next` is refused before anything is completed" (once a bug: the
    command was completed, durably, and the reply said bad_request)."""
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs)
    c = await brokers.client(server)
    _, (command,) = await c.submit(one())
    assert await c.next("r", timeout=0) is not None
    with pytest.raises(BadRequest):
        await c.complete_and_next(command, True, "no such/name!")
    await c.ping()
    fs = await brokers.power_loss(server, fs)
    server = await brokers.start(server.config, files=fs)
    c = await brokers.client(server)
    assert (await command_status(c, command)).state == "ready"


async def test_complete_and_next_is_durable_before_its_reply(brokers: Brokers) -> None:
    """COMPLETE + NEXT in one round trip: once its reply (the next command) is in, the
    completion survives a power cut, though the new lease need not."""
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs)
    c = await brokers.client(server)
    _, (first, second) = await c.submit([{"resource": "r", "action": a} for a in "ab"])
    got = await c.next("r", timeout=0)
    assert got is not None and got.id == first
    got = await c.complete_and_next(first, True, "r", delivery=1, timeout=0)
    assert got is not None and got.id == second
    fs = await brokers.power_loss(server, fs)
    server = await brokers.start(server.config, files=fs)
    c = await brokers.client(server)
    assert (await command_status(c, first)).state == "succeeded"
    assert (await command_status(c, second)).state == "ready"


async def test_a_snapshot_holds_exactly_the_records_up_to_its_lsn(brokers: Brokers) -> None:
    """Every record here is one SUBMIT, so the state at LSN n holds n packages. Two clients
    send at once, so two requests arrive in one loop iteration while a snapshot starts.
    (Once a bug: the fork ran in a task, after the other request, so a snapshot named n held
    n + 1 records; recovery applied the extra one twice and the broker could not restart.)"""
    config = brokers.config(snapshot_every=3)
    server = await brokers.start(config)
    a, b = await brokers.client(server), await brokers.client(server)
    snapshots = server.snapshotter
    assert snapshots is not None
    files = OsFiles()
    held: dict[int, int] = {}
    for n in range(12):
        await asyncio.gather(a.submit(one(n=n)), b.submit(one(n=-n)))
        if snapshots.running is not None:
            await snapshots.running
        for lsn, path in list_snapshots(files, config.data_dir):
            body = read_snapshot(files, lsn, path).body
            held[lsn] = len(load_state(msgpack.unpackb(body, strict_map_key=False)).packages)
    assert held and all(n == lsn for lsn, n in held.items()), f"lsn -> packages: {held}"


# --------------------------------------------------------------------------- what NEXT waits for


async def two_ready(brokers: Brokers, deps: bool = False) -> tuple[Server, MemoryFiles, list[str]]:
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs)
    c = await brokers.client(server)
    second: dict[str, Any] = {"resource": "r", "action": "b"}
    if deps:
        second["dependencies"] = [0]
    _, ids = await c.submit([{"resource": "r", "action": "a"}, second])
    return server, fs, ids


async def lease_first_then_gate(
    brokers: Brokers, deps: bool = False
) -> tuple[Server, MemoryFiles, Client, Gate, list[str]]:
    """`two_ready`, with an agent holding the first command and the next fdatasync held
    at a gate."""
    server, fs, ids = await two_ready(brokers, deps)
    agent = await brokers.client(server)
    got = await agent.next("r", timeout=0)
    assert got is not None and got.id == ids[0]
    gate = Gate()
    fs.hooks["datasync"] = gate
    return server, fs, agent, gate, ids


async def restart_on(brokers: Brokers, server: Server, disk: MemoryFiles) -> Client:
    """Stop `server` (its disk already lost power) and start it again on `disk`."""
    await brokers.close_clients()
    await server.stop()
    return await brokers.client(await brokers.start(server.config, files=disk))


async def test_next_does_not_wait_for_an_unrelated_fsync(brokers: Brokers) -> None:
    """A NEXT reveals one command: it waits for what made that command deliverable (here
    long durable), not for another producer's SUBMIT stuck in its fsync. STATS, which
    counts the new package, still waits."""
    server, fs, (a, _) = await two_ready(brokers)
    producer, agent, watcher = [await brokers.client(server) for _ in range(3)]
    gate = Gate()
    fs.hooks["datasync"] = gate
    submit = asyncio.ensure_future(producer.submit(one()))
    await gate.wait_entered()
    got = await asyncio.wait_for(agent.next("r", timeout=0), 5)
    assert got is not None and got.id == a
    stats = asyncio.ensure_future(watcher.stats())
    done, _ = await asyncio.wait([submit, stats], timeout=0.3)
    assert not done, [t.result() for t in done]
    gate.released.set()
    await submit
    assert (await stats)["totals"]["commands"] == 3


async def test_an_agent_may_pipeline_complete_with_next(brokers: Brokers) -> None:
    """COMPLETE then NEXT, sent together: the next command comes at once while the
    completion is still being synced, and the completion's own reply waits for its sync.
    If the power goes before that, the completion was never acknowledged and is lost (the
    command is delivered again); the command leased meanwhile is ready again."""
    server, fs, agent, gate, (a, b) = await lease_first_then_gate(brokers)
    complete = asyncio.ensure_future(agent.complete(a, True, delivery=1))
    take = asyncio.ensure_future(agent.next("r", timeout=5))
    await gate.wait_entered()
    got = await asyncio.wait_for(take, 5)
    assert got is not None and got.id == b
    assert not complete.done()
    after = fs.crash()
    gate.released.set()
    assert await refused(complete)
    c = await restart_on(brokers, server, after)
    assert [(await command_status(c, x)).state for x in (a, b)] == ["ready", "ready"]


async def test_next_waits_for_the_completion_that_made_its_command_ready(
    brokers: Brokers,
) -> None:
    """b depends on a: a NEXT that would deliver b must wait until a's completion is
    durable. The power goes first: neither is acknowledged, and b was never delivered."""
    server, fs, agent, gate, (a, b) = await lease_first_then_gate(brokers, deps=True)
    complete = asyncio.ensure_future(agent.complete(a, True, delivery=1))
    await gate.wait_entered()
    take = asyncio.ensure_future(agent.next("r", timeout=5))
    done, _ = await asyncio.wait([complete, take], timeout=0.3)
    assert not done, [t.result() for t in done]
    after = fs.crash()
    gate.released.set()
    assert await refused(complete)
    assert await refused(take)
    c = await restart_on(brokers, server, after)
    assert [(await command_status(c, x)).state for x in (a, b)] == ["ready", "waiting"]


async def test_text_mode_replies_stay_in_request_order(brokers: Brokers) -> None:
    """A person reads text replies by position: the NEXT typed after a COMPLETE whose sync
    is stuck may not answer before it, though in msgpack mode it would."""
    server, fs, (a, b) = await two_ready(brokers)
    reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    try:
        writer.write(b"NEXT r 0\n")
        assert a in (await asyncio.wait_for(reader.readline(), 5)).decode()
        gate = Gate()
        fs.hooks["datasync"] = gate
        writer.write(f"COMPLETE {a} true\nNEXT r 0\n".encode())
        await gate.wait_entered()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readline(), 0.3)
        gate.released.set()
        first = (await asyncio.wait_for(reader.readline(), 5)).decode()
        second = (await asyncio.wait_for(reader.readline(), 5)).decode()
        assert first.startswith("OK ") and '"state": "succeeded"' in first.replace('":"', '": "')
        assert second.startswith("OK ") and b in second
    finally:
        writer.close()


async def test_a_held_next_leaves_as_soon_as_its_own_record_is_durable(brokers: Brokers) -> None:
    """Replies held on one msgpack connection leave in the order of the LSN they need, not
    of the requests: a NEXT for a command whose SUBMIT is being synced, sent after a
    COMPLETE logged later, answers once that SUBMIT is durable, while the COMPLETE still
    waits for the next sync."""
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs)
    producer, agent = [await brokers.client(server) for _ in range(2)]
    _, (x,) = await producer.submit(one())
    assert (got := await agent.next("r", timeout=0)) is not None and got.id == x
    await agent.ping()  # its reply waits for the lease record: no sync is left in flight
    first, second = Gate(), Gate()
    fs.hooks["datasync"] = first
    submit = asyncio.ensure_future(producer.submit(one()))
    await first.wait_entered()
    fs.hooks["datasync"] = second
    complete = asyncio.ensure_future(agent.complete(x, True, delivery=1))
    take = asyncio.ensure_future(agent.next("r", timeout=5))
    deadline = asyncio.get_running_loop().time() + 5
    # No event says "both requests were handled": poll the server, bounded.
    while not any(len(c.held) == 2 for c in server.connections.values()):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)
    first.released.set()
    await second.wait_entered()
    _, (y,) = await submit
    assert (got := await asyncio.wait_for(take, 5)) is not None and got.id == y
    assert not complete.done()
    second.released.set()
    assert await complete == "succeeded"


async def test_requests_read_in_one_loop_pass_share_one_fsync(brokers: Brokers) -> None:
    """Group commit starts at the end of the loop pass, not with the first request of it:
    eight SUBMITs on eight connections, written before the broker's next pass, cost one
    fdatasync between them."""
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(), files=fs)
    clients = [await brokers.client(server) for _ in range(8)]
    await clients[0].ping()
    before = fs.calls["datasync"]
    # gather runs each request up to its write in this same pass; the broker reads them all
    # in its next one.
    await asyncio.gather(*(c.submit(one(n=i)) for i, c in enumerate(clients)))
    assert fs.calls["datasync"] - before == 1


async def test_the_state_is_frozen_out_of_the_collectors_way_as_it_grows(
    brokers: Brokers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every FREEZE_EVERY records the broker moves what is alive out of the cyclic
    collector's reach (full collections would otherwise walk the whole state); what it
    froze is still there and still served."""
    monkeypatch.setattr(server_module, "FREEZE_EVERY", 5)
    server = await brokers.start(brokers.config())
    c = await brokers.client(server)
    frozen = gc.get_freeze_count()
    try:
        ids = [(await c.submit(one(n=i)))[1][0] for i in range(6)]
        assert gc.get_freeze_count() > frozen
        assert [(await c.next("r", timeout=0)).id for _ in ids] == ids  # type: ignore[union-attr]
    finally:
        gc.unfreeze()  # give the test process its collector back


def holding_is_exact(server: Server) -> bool:
    """The connections a commit visits are exactly those holding replies."""
    return server.holding == {c for c in server.connections.values() if c.held}


async def test_a_commit_visits_only_the_connections_holding_replies(brokers: Brokers) -> None:
    """A commit releases held replies by visiting `server.holding`, not every connection
    (idle agents would make every fsync cost O(connections)): the set follows replies
    being held, released, failed and dropped with their connection."""
    fs = MemoryFiles()
    server = await brokers.start(brokers.config(tcp=("127.0.0.1", 0)), files=fs)
    idle = [await brokers.client(server) for _ in range(20)]
    for c in idle:
        await c.ping()
    producer = await brokers.client(server)
    leaver = await Client.connect(f"127.0.0.1:{server.tcp_port}", timeout=5)
    assert server.holding == set() and holding_is_exact(server)

    gate = Gate()
    fs.hooks["datasync"] = gate
    submit = asyncio.ensure_future(producer.submit(one()))
    await gate.wait_entered()
    lost = asyncio.ensure_future(leaver.submit(one()))
    deadline = asyncio.get_running_loop().time() + 5
    # No event says "the second request was handled": poll the server, bounded.
    while len(server.holding) < 2:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)
    assert holding_is_exact(server) and len(server.holding) == 2
    # Vanishes with its reply still held: a reset (after a mere close, EOF, the broker
    # keeps the connection until that reply can be written: see half-close).
    transport = leaver._protocol._transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    await leaver.close()
    with contextlib.suppress(Exception):
        await lost
    while len(server.connections) > 21:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)
    assert holding_is_exact(server) and len(server.holding) == 1
    gate.released.set()
    await submit
    assert server.holding == set() and holding_is_exact(server)

    # A failed sync fails the held replies and empties the set too.
    fs.fail("datasync", errno.EIO)
    assert await refused(producer.submit(one()))
    assert server.holding == set() and holding_is_exact(server)
