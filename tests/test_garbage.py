"""The live broker frees its own objects by reference counting alone.

The server freezes what is alive every FREEZE_EVERY records (gc.freeze: a full collection
would otherwise walk the whole state). A frozen object that later becomes part of an
unreachable cycle is never collected: it leaks. So no object of spinbroker's may ever need
the cyclic collector to be freed. This drives every path that drops state (completion,
failure cascade, cancel, expiry, retention, leases lost with their connection or their ttr,
NEXT and WAIT answered, timing out or abandoned, every other verb, bad input, text mode,
snapshots) through a real server, with the collector saving what it finds, and looks for
spinbroker's objects in it.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from spinbroker.config import Limits, ServerConfig
from spinbroker.server import Server

from .conftest import RawMsgpack, TextClient, open_stream


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def ours(garbage: list[Any]) -> list[str]:
    """The broker's objects among `garbage` (the client library's would be the test's)."""
    found = []
    for obj in garbage:
        module = type(obj).__module__
        if module.startswith("spinbroker") and not module.startswith("spinbroker.client"):
            found.append(type(obj).__qualname__)
    return sorted(found)


def cmd(resource: str, deps: list[int] | None = None, **params: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"resource": resource, "action": "run", "parameters": params}
    return c if deps is None else c | {"dependencies": deps}


async def workload(server: Server, clock: Clock) -> None:
    async def raw() -> RawMsgpack:
        return RawMsgpack(*await open_stream(server, tcp=False))

    producer, agent = await raw(), await raw()
    # A chain that succeeds, one whose first command fails (its dependents fail with it).
    for ok in (True, False):
        await producer.ok("SUBMIT", {"commands": [cmd("a"), cmd("b", [0]), cmd("c", [1])]})
        first = await agent.ok("NEXT", {"resource": "a", "timeout": 0})
        await agent.ok("COMPLETE", {"command": first["id"], "success": ok, "reason": "x"})
        if ok:
            for resource in ("b", "c"):
                got = await agent.ok("NEXT", {"resource": resource, "timeout": 0})
                then = {"resource": "z", "timeout": 0}
                done = {"command": got["id"], "success": True, "next": then}
                assert (await agent.call("COMPLETE", done))[1] == "empty"
    # WAIT answered, WAIT timing out, WAIT abandoned by its connection.
    pkg = (await producer.ok("SUBMIT", {"commands": [cmd("w")]}))["package"]
    waiting = producer.send("WAIT", {"package": pkg})
    got = await agent.ok("NEXT", {"resource": "w"})
    await agent.ok("COMPLETE", {"command": got["id"], "success": True})
    assert (await producer.reply())[0] == waiting
    pkg = (await producer.ok("SUBMIT", {"commands": [cmd("w2")]}))["package"]
    assert (await producer.call("WAIT", {"package": pkg, "timeout": 0.01}))[1] == "empty"
    quitter = await raw()
    quitter.send("WAIT", {"package": pkg})
    await quitter.ok("PING")
    await quitter.close()
    # Cancel; an open package that expires; one built with NEW + ADD + ENQUEUE.
    pkg = (await producer.ok("SUBMIT", {"commands": [cmd("k"), cmd("k", [0])]}))["package"]
    await producer.ok("CANCEL", {"package": pkg})
    await producer.ok("NEW")
    built = (await producer.ok("NEW"))["package"]
    await producer.ok("ADD", {"package": built, "resource": "n", "action": "run"})
    await producer.ok("ENQUEUE", {"package": built})
    # A leased command of a cancelled package, cancelled when its lease ends (the agent's
    # connection goes with EOF: answered, then closed, the half-close path).
    pkg = (await producer.ok("SUBMIT", {"commands": [cmd("lc"), cmd("lc2", [0])]}))["package"]
    canceller = await raw()
    await canceller.ok("NEXT", {"resource": "lc", "timeout": 0})
    await producer.ok("CANCEL", {"package": pkg})
    await canceller.close()
    # Leases lost: with the connection, and by their ttr running out.
    leaver = await raw()
    await leaver.ok("NEXT", {"resource": "n", "timeout": 0})
    await leaver.close()
    await producer.ok("SUBMIT", {"commands": [cmd("t")]})
    leased = await agent.ok("NEXT", {"resource": "t", "timeout": 0, "ttr": 5})
    await agent.ok("TOUCH", {"command": leased["id"], "ttr": 10})
    # Blocked NEXTs: answered once a command comes, timing out, and abandoned by their
    # connection (on a made-up name).
    parked_next = agent.send("NEXT", {"resource": "late"})
    await agent.ok("PING")  # the NEXT is parked now
    await producer.ok("SUBMIT", {"commands": [cmd("late")]})
    answered = await agent.reply()
    assert answered[0] == parked_next and answered[1] == "ok"
    await agent.ok("COMPLETE", {"command": answered[2]["id"], "success": True})
    assert (await agent.call("NEXT", {"resource": "idle", "timeout": 0.01}))[1] == "empty"
    parked = await raw()
    parked.send("NEXT", {"resource": "nobody-sends-this"})
    await parked.ok("PING")
    await parked.close()
    # The reads and the rest of the verbs: STATUS, STATS, HELP, TOUCH, ANNOUNCE, and a
    # SUBMIT the announced schema refuses.
    await producer.ok("STATUS", {"id": pkg, "commands": True})
    await producer.ok("STATUS", {"id": got["id"]})
    await producer.ok("STATS")
    await producer.ok("HELP")
    leases = await agent.ok("STATS")
    assert leases["resources"]["t"]["leased"] == 1
    schema = {"schema": 1, "actions": {"run": {"parameters": {"host": {"type": "str"}}}}}
    await agent.ok("ANNOUNCE", {"resource": "typed", "schema": schema})
    assert (await producer.call("SUBMIT", {"commands": [cmd("typed", port=1)]}))[1] == "error"
    # Bad input, and a text-mode session.
    assert (await producer.call("NOPE"))[1] == "error"
    typist = TextClient(*await open_stream(server, tcp=False))
    assert await typist.say("PING") == "PONG"
    await typist.close()
    # Time passes: the open package expires and the ttr lease runs out. The commands left
    # are done, then everything is forgotten once the retention has passed.
    clock.now += 60
    server._tick()
    for resource in ("n", "t", "w2"):
        got = await agent.ok("NEXT", {"resource": resource, "timeout": 0})
        await agent.ok("COMPLETE", {"command": got["id"], "success": True})
    clock.now += 120
    server._tick()
    await producer.ok("PING")
    await producer.close()
    await agent.close()


async def test_the_broker_leaves_no_cyclic_garbage_of_its_own(tmp_path: Path) -> None:
    clock = Clock()
    limits = Limits(package_ttl=30.0, retention=100.0)
    # Snapshots are taken along the way too (a forked child each, every 25 records).
    config = ServerConfig(data_dir=tmp_path / "data", tcp=None, limits=limits, snapshot_every=25)
    server = Server(config, clock=clock)
    await server.start()
    try:
        for _ in range(3):
            await workload(server, clock)
        stats = server.core.stats()
        # Everything was forgotten: the state is back to empty (so a leak cannot hide as
        # live state).
        assert stats["totals"]["packages"] == 0, stats
        snapshotter = server.snapshotter
        assert snapshotter is not None
        if snapshotter.running is not None:
            await snapshotter.running
        assert snapshotter.taken > 0
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            await workload(server, clock)
            await asyncio.sleep(0)  # let closed connections' callbacks run
            gc.collect()
            found = ours(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    finally:
        await server.stop()
    assert found == []
