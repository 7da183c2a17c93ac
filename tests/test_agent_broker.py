"""Agents against a real broker: announce, ADD-time refusal, the loop, restarts, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agents.host_path import build_agent
from spinbroker.agent import Agent, AgentClient
from spinbroker.client import Client, DeliveredCommand, InvalidCommand
from spinbroker.config import ServerConfig
from spinbroker.server import Server


class Watched:
    """Connects real clients for an agent and tells when each has announced."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.announced = asyncio.Event()
        self.count = 0

    async def connect(self) -> AgentClient:
        return _Announcing(await Client.connect(self.address), self)


class _Announcing:
    def __init__(self, client: Client, watch: Watched) -> None:
        self._client = client
        self._watch = watch

    @property
    def is_closed(self) -> bool:
        return self._client.is_closed

    async def close(self) -> None:
        await self._client.close()

    async def announce(self, resource: str, schema: Mapping[str, Any]) -> None:
        await self._client.announce(resource, schema)
        self._watch.count += 1
        self._watch.announced.set()

    async def next(
        self, resource: str, timeout: float | None = None, ttr: float | None = None
    ) -> DeliveredCommand | None:
        return await self._client.next(resource, timeout, ttr)

    async def touch(
        self, command: str, ttr: float | None = None, delivery: int | None = None
    ) -> float:
        return await self._client.touch(command, ttr, delivery)

    async def complete(
        self, command: str, success: bool, reason: str | None = None, delivery: int | None = None
    ) -> str:
        return await self._client.complete(command, success, reason, delivery)


class Running:
    def __init__(self, agent: Agent, watch: Watched) -> None:
        self.agent = agent
        self.watch = watch
        self.stop = asyncio.Event()
        self.task = asyncio.ensure_future(agent.run(stop=self.stop, connect=watch.connect))

    async def announced(self) -> None:
        async with asyncio.timeout(5):
            await self.watch.announced.wait()
        self.watch.announced.clear()

    async def finish(self) -> None:
        self.stop.set()
        async with asyncio.timeout(10):
            await self.task


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    c = await Client.connect(str(server.socket_path))
    yield c
    await c.close()


@pytest.fixture
async def storage_agent(server: Server, tmp_path: Path) -> AsyncIterator[Running]:
    running = Running(build_agent(tmp_path / "images", ttr=30.0), Watched(str(server.socket_path)))
    await running.announced()
    yield running
    if not running.task.done():
        await running.finish()


async def test_storage_agent_runs_a_package(
    storage_agent: Running, client: Client, tmp_path: Path
) -> None:
    package, ids = await client.submit(
        [
            {"resource": "storage", "action": "add_volume", "parameters": {"path": "test"}},
            {
                "resource": "storage",
                "action": "create_image",
                "parameters": {"volume_path": "test", "image_name": "a.raw", "image_size": 1},
                "dependencies": [0],
            },
            {
                "resource": "storage",
                "action": "copy_image",
                "parameters": {
                    "from_volume": "test",
                    "from_image": "a.raw",
                    "to_volume": "test",
                    "to_image": "b.raw",
                },
                "dependencies": [1],
            },
        ]
    )
    status = await client.wait(package, timeout=10)
    assert status is not None
    assert status.state == "succeeded", status
    image = tmp_path / "images" / "test" / "b.raw"
    assert image.stat().st_size == 1 << 30
    done = await client.status(ids[1])
    assert done.state == "succeeded"
    assert done.reason == "image test/a.raw created (1 GiB)"


async def test_a_failing_action_fails_the_command_with_its_reason(
    storage_agent: Running, client: Client
) -> None:
    package, ids = await client.submit(
        [
            {"resource": "storage", "action": "add_volume", "parameters": {"path": "dup"}},
            {
                "resource": "storage",
                "action": "add_volume",
                "parameters": {"path": "dup"},
                "dependencies": [0],
            },
            {
                "resource": "storage",
                "action": "remove_volume",
                "parameters": {"path": "dup"},
                "dependencies": [1],
            },
        ]
    )
    status = await client.wait(package, timeout=10)
    assert status is not None
    assert status.state == "failed"
    assert status.causer == ids[1]
    assert status.reason == "volume 'dup' already exists"
    assert (await client.status(ids[2])).state == "cancelled"


async def test_the_broker_refuses_at_add_what_the_schema_does_not_allow(
    storage_agent: Running, client: Client
) -> None:
    package = await client.new()
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("frob", {}, "unknown action 'frob' (known: add_volume, copy_image, create_image, "),
        ("add_volume", {}, "required parameter 'path' is missing"),
        (
            "create_image",
            {"volume_path": "v", "image_name": "i", "image_size": "50"},
            "parameter 'image_size': expected int, got str '50'",
        ),
        ("add_volume", {"path": "v", "mode": 7}, "unknown parameter 'mode' (expected: path)"),
    ]
    for action, parameters, problem in cases:
        with pytest.raises(InvalidCommand) as info:
            await client.add(package, "storage", action, parameters)
        assert problem in info.value.message, info.value.message
    # a resource nobody announced accepts anything
    await client.add(package, "elsewhere", "frob", {"x": [1, "two"]})


async def test_the_agent_comes_back_after_a_broker_restart(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path / "data", tcp=None)
    first = Server(config)
    await first.start()
    running = Running(build_agent(tmp_path / "images"), Watched(str(config.socket_path)))
    try:
        await running.announced()
        await first.stop()
        second = Server(config)
        await second.start()
        try:
            await running.announced()  # reconnected and announced again
            assert running.watch.count == 2
            async with await Client.connect(str(config.socket_path)) as c:
                package, _ = await c.submit(
                    [{"resource": "storage", "action": "add_volume", "parameters": {"path": "x"}}]
                )
                status = await c.wait(package, timeout=10)
                assert status is not None and status.state == "succeeded"
        finally:
            await running.finish()
            await second.stop()
    finally:
        if not running.task.done():
            running.task.cancel()
    assert (tmp_path / "images" / "x").is_dir()


SLOW_AGENT = """\
import sys
from spinbroker.agent import Agent, agent_main

started, release = sys.argv[1], sys.argv[2]


def build(args):
    agent = Agent("slow")

    @agent.action()
    def wait() -> str:
        with open(started, "w") as f:
            f.write("started")
        with open(release) as f:
            return "released: " + f.read()

    return agent


raise SystemExit(agent_main("slow agent", build, argv=sys.argv[3:]))
"""


async def test_sigterm_finishes_the_current_command_then_exits(
    server: Server, client: Client, tmp_path: Path
) -> None:
    script = tmp_path / "slow_agent.py"
    script.write_text(SLOW_AGENT)
    started, release = tmp_path / "started", tmp_path / "release"
    os.mkfifo(started)
    os.mkfifo(release)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(started),
        str(release),
        "--broker",
        str(server.socket_path),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, (command,) = await client.submit([{"resource": "slow", "action": "wait"}])
        loop = asyncio.get_running_loop()
        # the handler opening its fifo is our event: it is running the command now
        async with asyncio.timeout(10):
            assert await loop.run_in_executor(None, started.read_text) == "started"
        proc.send_signal(signal.SIGTERM)
        _, (queued,) = await client.submit([{"resource": "slow", "action": "wait"}])
        await loop.run_in_executor(None, release.write_text, "go")
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
        status = await client.status(command)
        assert (status.state, status.reason) == ("succeeded", "released: go")
        assert (await client.status(queued)).state == "ready"  # not taken after the SIGTERM
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert "SIGTERM: finishing the current command, then exiting" in log
        assert f"command {command}: wait succeeded in" in log
        assert "slow agent stopped" in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sigterm_while_idle_exits_at_once(server: Server, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from agents.host_path import main; raise SystemExit(main())",
        "--broker",
        str(server.socket_path),
        "--base-dir",
        str(tmp_path / "images"),
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(10):
            while True:
                line = await proc.stderr.readline()
                assert line, "the agent exited before it connected"
                if b"connected; serving storage" in line:
                    break
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_note_with_a_lone_surrogate_is_sent_escaped(server: Server, client: Client) -> None:
    """Once the COMPLETE raised UnicodeEncodeError: the agent ran the next command, then
    died with both leased."""
    agent = Agent("files", ttr=30.0)

    @agent.action()
    def made() -> str:
        return "made " + os.fsdecode(b"bad\xff.raw")

    @agent.action()
    def after() -> str:
        return "after"

    running = Running(agent, Watched(str(server.socket_path)))
    try:
        await running.announced()
        package, ids = await client.submit(
            [{"resource": "files", "action": "made"}, {"resource": "files", "action": "after"}]
        )
        status = await client.wait(package, timeout=10)
        assert status is not None and status.state == "succeeded", status
        assert (await client.status(ids[0])).reason == "made bad\\udcff.raw"
        assert (await client.status(ids[1])).reason == "after"
    finally:
        await running.finish()
