"""Agents against a real broker whose disk fails (`MemoryFiles`): `storage_failed` is no
refusal. The broker takes changes again as soon as a write succeeds, so an agent retries
ANNOUNCE, NEXT, TOUCH and COMPLETE with backoff instead of exiting or giving up."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from spinbroker.agent import Agent, AgentClient, Backoff, CommandContext
from spinbroker.client import Client, CommandStatus, DeliveredCommand, StorageFailed
from spinbroker.config import ServerConfig
from spinbroker.server import Server
from spinbroker.wal.memfiles import MemoryFiles

pytestmark = pytest.mark.timeout(60)


def quick_backoff() -> Backoff:
    return Backoff(initial=0.005, cap=0.05)


class Calls:
    """Connects real clients for an agent and records how each of its requests ended:
    (verb, None) when acknowledged, (verb, error code) when refused."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.log: list[tuple[str, str | None]] = []
        self.changed = asyncio.Condition()

    async def connect(self) -> AgentClient:
        return _Recorded(await Client.connect(self.address), self)

    async def record(self, verb: str, error: BaseException | None) -> None:
        code = None if error is None else getattr(error, "code", type(error).__name__)
        async with self.changed:
            self.log.append((verb, code))
            self.changed.notify_all()

    async def wake(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def count(self, verb: str, code: str | None) -> int:
        return self.log.count((verb, code))

    async def until(self, predicate: Callable[[], bool], running: Running | None = None) -> None:
        """Waits until `predicate` holds; fails at once if `running` ends first."""
        async with asyncio.timeout(10):
            async with self.changed:
                await self.changed.wait_for(
                    lambda: predicate() or (running is not None and running.task.done())
                )
        if running is not None and running.task.done() and not predicate():
            raise AssertionError(f"the agent ended: {running.task!r}")


class _Recorded:
    def __init__(self, client: Client, calls: Calls) -> None:
        self._client = client
        self._calls = calls

    @property
    def is_closed(self) -> bool:
        return self._client.is_closed

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, verb: str, request: Any) -> Any:
        try:
            result = await request
        except Exception as exc:
            await self._calls.record(verb, exc)
            raise
        await self._calls.record(verb, None)
        return result

    async def announce(self, resource: str, schema: Mapping[str, Any]) -> None:
        await self._call("ANNOUNCE", self._client.announce(resource, schema))

    async def next(
        self, resource: str, timeout: float | None = None, ttr: float | None = None
    ) -> DeliveredCommand | None:
        result: DeliveredCommand | None = await self._call(
            "NEXT", self._client.next(resource, timeout, ttr)
        )
        return result

    async def touch(
        self, command: str, ttr: float | None = None, delivery: int | None = None
    ) -> float | None:
        result: float | None = await self._call("TOUCH", self._client.touch(command, ttr, delivery))
        return result

    async def complete(
        self, command: str, success: bool, reason: str | None = None, delivery: int | None = None
    ) -> str:
        result: str = await self._call(
            "COMPLETE", self._client.complete(command, success, reason, delivery)
        )
        return result


class Disk:
    """A broker on a simulated disk, and a client of it."""

    def __init__(self, server: Server, fs: MemoryFiles, client: Client) -> None:
        self.server = server
        self.fs = fs
        self.client = client

    async def fill(self) -> None:
        """The disk fills: the next change is answered storage_failed, and from then on
        every change is refused until a write succeeds again."""
        self.fs.fail("write", errno.ENOSPC)
        with pytest.raises(StorageFailed):
            await self.client.submit([{"resource": "elsewhere", "action": "pad"}])
        assert self.server.wal is not None and self.server.wal.error is not None

    async def status(self, command: str) -> CommandStatus:
        status = await self.client.status(command)
        assert isinstance(status, CommandStatus)
        return status


@pytest.fixture
async def disk(tmp_path: Path) -> AsyncIterator[Disk]:
    config = ServerConfig(
        data_dir=tmp_path / "data",
        socket=tmp_path / "b.sock",
        tcp=None,
        segment_size=1 << 16,
        snapshot_every=1 << 30,
        snapshot_interval=1e9,
    )
    fs = MemoryFiles()
    server = Server(config, files=fs)
    await server.start()
    client = await Client.connect(server.socket_path)
    try:
        yield Disk(server, fs, client)
    finally:
        fs.heal()
        await client.close()
        await server.stop()


class Running:
    def __init__(self, agent: Agent, calls: Calls) -> None:
        self.calls = calls
        self.stop = asyncio.Event()
        self.task = asyncio.ensure_future(agent.run(stop=self.stop, connect=calls.connect))
        # a test waiting for requests also wakes when the agent ends (as it did on these bugs)
        self.task.add_done_callback(lambda _: asyncio.ensure_future(calls.wake()))

    async def finish(self) -> None:
        self.stop.set()
        async with asyncio.timeout(10):
            await self.task


@pytest.fixture
async def start(disk: Disk) -> AsyncIterator[Callable[[Agent], Running]]:
    runs: list[Running] = []

    def run(agent: Agent) -> Running:
        runs.append(Running(agent, Calls(str(disk.server.socket_path))))
        return runs[-1]

    yield run
    for running in runs:
        if not running.task.done():
            running.task.cancel()
            await asyncio.wait({running.task})


def jobs_agent(ttr: float | None) -> Agent:
    agent = Agent("jobs", ttr=ttr, backoff=quick_backoff, stop_grace=5.0)

    @agent.action()
    async def work(n: int = 0) -> str:
        return f"did {n}"

    return agent


async def test_an_agent_started_while_the_disk_is_full_waits_for_it(
    disk: Disk, start: Callable[[Agent], Running], caplog: pytest.LogCaptureFixture
) -> None:
    await disk.fill()
    running = start(jobs_agent(ttr=None))
    calls = running.calls
    await calls.until(lambda: calls.count("ANNOUNCE", "storage_failed") >= 2, running)
    assert "so it refused the announcement" in caplog.text
    disk.fs.heal()
    await calls.until(lambda: calls.count("ANNOUNCE", None) == 1, running)
    _, (command,) = await disk.client.submit([{"resource": "jobs", "action": "work"}])
    await calls.until(lambda: calls.count("COMPLETE", None) == 1, running)
    assert (await disk.status(command)).state == "succeeded"
    await running.finish()


async def test_next_answered_storage_failed_reconnects_and_the_command_runs_after(
    disk: Disk, start: Callable[[Agent], Running], caplog: pytest.LogCaptureFixture
) -> None:
    running = start(jobs_agent(ttr=None))
    calls = running.calls
    await calls.until(lambda: calls.count("ANNOUNCE", None) == 1, running)
    disk.fs.fail("write", errno.ENOSPC)
    # The agent is blocked in NEXT (or about to be): the command is leased to it, and the
    # lease's record fails to be written with the SUBMIT's.
    with pytest.raises(StorageFailed):
        await disk.client.submit([{"resource": "jobs", "action": "work", "parameters": {"n": 1}}])
    await calls.until(lambda: calls.count("NEXT", "storage_failed") == 1, running)
    await calls.until(lambda: calls.count("ANNOUNCE", "storage_failed") >= 1, running)
    assert "so it refused NEXT" in caplog.text
    disk.fs.heal()
    await calls.until(lambda: calls.count("COMPLETE", None) == 1, running)
    status = await disk.client.stats()
    assert status["totals"]["packages"] == 1
    await running.finish()


async def test_touch_answered_storage_failed_is_retried_and_the_lease_kept(
    disk: Disk, start: Callable[[Agent], Running]
) -> None:
    agent = jobs_agent(ttr=1.5)
    lost: list[bool] = []
    release = asyncio.Event()

    @agent.action()
    async def long(ctx: CommandContext) -> str:
        await release.wait()
        lost.append(ctx.lease_lost.is_set())
        return "done"

    running = start(agent)
    calls = running.calls
    _, (command,) = await disk.client.submit([{"resource": "jobs", "action": "long"}])
    await calls.until(lambda: calls.count("TOUCH", None) >= 1, running)
    await disk.fill()
    await calls.until(lambda: calls.count("TOUCH", "storage_failed") >= 2, running)
    disk.fs.heal()
    touched = calls.count("TOUCH", None)
    await calls.until(lambda: calls.count("TOUCH", None) > touched, running)  # before: none
    release.set()
    await calls.until(lambda: calls.count("COMPLETE", None) == 1, running)
    assert lost == [False]
    status = await disk.status(command)
    assert (status.state, status.reason, status.delivery) == ("succeeded", "done", 1)
    await running.finish()


async def test_complete_answered_storage_failed_is_retried_until_acknowledged(
    disk: Disk, start: Callable[[Agent], Running]
) -> None:
    agent = jobs_agent(ttr=60.0)

    @agent.action()
    async def fill_the_disk() -> str:
        await disk.fill()  # the COMPLETE is refused: nothing of it is applied
        return "filled"

    running = start(agent)
    calls = running.calls
    _, (command,) = await disk.client.submit([{"resource": "jobs", "action": "fill_the_disk"}])
    # The NEXT sent meanwhile is refused too: the agent reconnects, and its COMPLETE waits
    # for the new connection, whose ANNOUNCE is refused until the disk has room again.
    await calls.until(
        lambda: (
            calls.count("COMPLETE", "storage_failed") >= 1
            and calls.count("ANNOUNCE", "storage_failed") >= 2
        ),
        running,
    )
    assert (await disk.status(command)).state == "leased"
    disk.fs.heal()
    await calls.until(lambda: calls.count("COMPLETE", None) == 1, running)  # before: dropped
    status = await disk.status(command)
    assert (status.state, status.reason, status.delivery) == ("succeeded", "filled", 1)
    await running.finish()
