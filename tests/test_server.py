"""A real server on real sockets: what only integration can show.

Text sessions are typed as a person would with nc; msgpack sessions are raw frames. Every
bad-input test also checks that the broker still serves another client afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from spinbroker import persist, records
from spinbroker.config import Limits
from spinbroker.schema import MAX_NESTING
from spinbroker.server import EXIT_CANNOT_LOG, NOT_PAUSED, Server
from spinbroker.wal import Wal

from .conftest import RawMsgpack, TextClient, open_stream

Connect = Callable[..., Any]


async def still_serving(raw: Connect) -> None:
    other: RawMsgpack = await raw()
    assert await other.ok("PING") == "pong"
    await other.close()


# --------------------------------------------------------------------------- text mode


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_text_session_walkthrough(text: Connect, tcp: bool) -> None:
    """The original example typed into nc: build, enqueue, take in dependency order."""
    c: TextClient = await text(tcp)
    pkg = await c.ok("NEW")
    vol = await c.ok(f"ADD {pkg} storage add_volume path=test")
    img = await c.ok(
        f"ADD {pkg} storage create_image volume_path=test image_name=test.raw "
        f"image_size=50 --dep {vol}"
    )
    cfg = await c.ok(
        f'ADD {pkg} emulation write_config id=1 vm={{"Name": "vm1", "Cpus": 2, '
        f'"Images": [{{"Path": "test/test.raw", "Cdrom": false}}]}} --dep {img}'
    )
    start = await c.ok(f"ADD {pkg} emulation start id=1 --dep {cfg}")
    assert await c.ok_json(f"ENQUEUE {pkg}") == [vol, img, cfg, start]

    assert await c.say("NEXT emulation 0") == "EMPTY"  # write_config waits on storage
    got = await c.ok_json("NEXT storage 0")
    assert (got["id"], got["action"], got["parameters"]) == (vol, "add_volume", {"path": "test"})
    assert await c.say("NEXT storage 0") == "EMPTY"  # create_image waits on add_volume
    await c.ok(f"COMPLETE {vol} true")
    got = await c.ok_json("NEXT storage 0")
    assert got["id"] == img
    assert got["parameters"]["image_size"] == 50  # an int, typed from text
    await c.ok(f"COMPLETE {img} true")
    got = await c.ok_json("NEXT emulation 0")
    assert got["parameters"]["vm"]["Images"][0]["Cdrom"] is False
    await c.ok(f"COMPLETE {cfg} true")
    got = await c.ok_json("NEXT emulation 0")
    assert got["id"] == start
    done = await c.ok_json(f"COMPLETE {start} true")
    assert done == {"command": start, "state": "succeeded"}
    status = await c.ok_json(f"STATUS {pkg}")
    assert (status["state"], status["finished"]) == ("succeeded", True)
    assert await c.say("QUIT") == "OK bye"
    assert await c.reader.read() == b""


async def test_text_errors_keep_the_connection(text: Connect) -> None:
    c: TextClient = await text()
    assert (await c.say("FROB")).startswith("ERR unknown_verb ")
    assert (await c.say("ENQUEUE")).startswith("ERR bad_request ")
    assert (await c.say("ENQUEUE nope")).startswith("ERR not_found ")
    assert (await c.say("STATUS nope")).startswith("ERR not_found ")
    assert (await c.say("COMPLETE nope true")).startswith("ERR not_found ")
    assert (await c.say("COMPLETE x maybe")).startswith("ERR bad_request ")
    pkg = await c.ok("NEW")
    assert (await c.say(f"ADD {pkg} storage add_volume --dep nope")).startswith(
        "ERR unknown_dependency "
    )
    assert (await c.say(f"ADD {pkg} 'bad name' x")).startswith("ERR bad_request ")
    assert (await c.say(f"ENQUEUE {pkg}")).startswith("ERR empty_package ")
    cmd = await c.ok(f"ADD {pkg} storage add_volume path=a")
    await c.ok(f"ENQUEUE {pkg}")
    assert (await c.say(f"ENQUEUE {pkg}")).startswith("ERR not_open ")
    assert (await c.say(f"COMPLETE {cmd} true")).startswith("ERR not_leased ")
    await c.ok("NEXT storage 0")
    assert (await c.say(f"COMPLETE {cmd} true --delivery 7")).startswith("ERR stale_delivery ")
    await c.ok(f"COMPLETE {cmd} true")
    assert (await c.say(f"COMPLETE {cmd} true")).startswith("ERR already_completed ")
    assert await c.say("PING") == "PONG"


@pytest.mark.parametrize(
    "line",
    [
        "SUBMIT " + "[" * 5000 + "]" * 5000,
        "ADD x r a p=" + "[" * 5000 + "]" * 5000,
        'ANNOUNCE r {"a":' + "[" * 5000 + "]" * 5000 + "}",
        "NEXT r " + "9" * 400,
        "WAIT nope " + "9" * 400,
        "TOUCH nope " + "9" * 400,
        'SUBMIT [{"resource":"r","action":"a","parameters":{"x":"\\ud800"}}]',
    ],
    ids=["deep_submit", "deep_param", "deep_announce", "next", "wait", "touch", "surrogate"],
)
async def test_text_values_msgpack_cannot_carry_are_bad_requests(
    text: Connect, raw: Connect, line: str
) -> None:
    """Audit h1 (t04): deep JSON raised RecursionError out of the codec and closed the
    connection without a reply; a 400-digit timeout or ttr answered `internal`."""
    c: TextClient = await text()
    reply = await c.say(line)
    assert reply.startswith("ERR bad_request "), reply
    assert await c.say("PING") == "PONG"
    await still_serving(raw)


async def test_text_oversize_line_is_skipped(make_server: Connect) -> None:
    server: Server = await make_server(Limits(max_frame=1024))
    r, w = await asyncio.open_unix_connection(str(server.socket_path))
    c = TextClient(r, w)
    await c.send(b"PING " + b"x" * 5000 + b"\n")
    assert (await c.line()).startswith("ERR too_large ")
    assert await c.say("PING") == "PONG"
    await c.close()
    await server.stop()


async def test_text_blocked_next_holds_later_lines(text: Connect) -> None:
    agent: TextClient = await text()
    await agent.send("NEXT storage")
    await agent.send("PING")
    producer: TextClient = await text()
    reply = await producer.ok_json('SUBMIT [{"resource":"storage","action":"add_volume"}]')
    got = await agent.ok_json("")  # the NEXT reply comes first, then PING's
    assert got["id"] == reply["commands"][0]
    assert await agent.line() == "PONG"


async def test_a_record_the_log_cannot_hold_stops_the_broker_at_once(
    server: Server, raw: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests are checked so that every record they make can be logged; if one still
    cannot be (a bug), the broker must not carry on with a change the log will never
    hold: it stops at once, after logging the records before it exactly once."""
    stopped = asyncio.Event()
    codes: list[int] = []

    def exit_now(code: int) -> None:
        codes.append(code)
        stopped.set()

    server.exit_now = exit_now  # type: ignore[method-assign]
    real = records.to_wire

    def to_wire(rec: records.Record) -> list[Any]:
        wire = real(rec)
        return [*wire, object()] if isinstance(rec, records.SchemaAnnounced) else wire

    monkeypatch.setattr(records, "to_wire", to_wire)
    c: RawMsgpack = await raw()
    first = server.appended_lsn
    c.send("SUBMIT", {"commands": [{"resource": "r", "action": "a"}]})
    c.send("ANNOUNCE", {"resource": "r", "schema": {"schema": 1, "actions": {"a": {}}}})
    await asyncio.wait_for(stopped.wait(), 5)
    assert codes == [EXIT_CANNOT_LOG]
    assert server.appended_lsn == first + 1  # the SUBMIT's record, once
    assert len(server.core.outbox) == 1  # the record that cannot be logged, only


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_a_client_that_half_closes_still_gets_every_reply(server: Server, tcp: bool) -> None:
    """`printf 'NEW\\n' | nc -N host port`: the client shuts down its sending side at once.
    Everything it sent is answered (a durable NEW; NEXT and WAIT, which no longer wait),
    then the connection is closed."""
    reader, writer = await open_stream(server, tcp)
    writer.write(b"NEW\nNEXT idle 0.05\nPING\n")
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)  # until the server closes
    lines = data.decode().splitlines()
    assert len(lines) == 3 and lines[0].startswith("OK ") and lines[1:] == ["EMPTY", "PONG"]
    writer.close()
    raw = RawMsgpack(*await open_stream(server, tcp))
    package = (await raw.ok("SUBMIT", {"commands": [{"resource": "busy", "action": "a"}]}))[
        "package"
    ]
    waiting = [raw.send("NEXT", {"resource": "idle"}), raw.send("WAIT", {"package": package})]
    raw.writer.write_eof()
    assert sorted([await raw.reply(), await raw.reply()]) == [[n, "empty", None] for n in waiting]
    assert await raw.closed()


async def test_unix_socket_is_private(server: Server) -> None:
    mode = stat.S_IMODE(os.stat(server.socket_path).st_mode)
    assert mode == 0o600


# --------------------------------------------------------------------------- msgpack mode


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_msgpack_submit_next_complete_wait(raw: Connect, tcp: bool) -> None:
    producer: RawMsgpack = await raw(tcp)
    agent: RawMsgpack = await raw(tcp)
    params = {"n": 1, "f": 1.5, "b": b"\x00\xff", "l": [1, "x"], "m": {"k": None}, "t": True}
    body = await producer.ok(
        "SUBMIT",
        {
            "commands": [
                {"resource": "r", "action": "first", "parameters": params},
                {"resource": "r", "action": "second", "dependencies": [0]},
            ]
        },
    )
    pkg, (first, second) = body["package"], body["commands"]
    wait_id = producer.send("WAIT", {"package": pkg})
    got = await agent.ok("NEXT", {"resource": "r"})
    assert got["id"] == first
    assert got["parameters"] == params  # every type survives the trip
    await agent.ok("COMPLETE", {"command": first, "success": True})
    got = await agent.ok("NEXT", {"resource": "r"})
    assert got["id"] == second and got["dependencies"] == [first]
    await agent.ok("COMPLETE", {"command": second, "success": False, "reason": "boom"})
    msg = await producer.reply()
    assert msg[0] == wait_id and msg[1] == "ok"
    assert msg[2]["state"] == "failed"
    assert (msg[2]["causer"], msg[2]["reason"]) == (second, "boom")


async def test_msgpack_replies_match_ids_when_pipelined(raw: Connect) -> None:
    c: RawMsgpack = await raw()
    blocked = c.send("NEXT", {"resource": "idle", "timeout": 0.05})
    ids = [c.send("PING") for _ in range(200)]
    replies = [await c.reply() for _ in range(201)]
    assert [m[0] for m in replies[:200]] == ids  # non-blocking replies in request order
    assert replies[200] == [blocked, "empty", None]  # the blocked one comes last


async def test_requests_past_the_inflight_limit_are_served_once_replies_leave(
    make_server: Connect,
) -> None:
    """Past `max_inflight` unanswered requests the server stops reading; the requests it
    had already read wait in the backlog. Once replies leave it must carry on with them by
    itself, not only when the client sends more (which a client waiting for them never
    does)."""
    server: Server = await make_server(Limits(max_inflight=2))
    c = RawMsgpack(*await asyncio.open_unix_connection(str(server.socket_path)))
    nexts = [c.send("NEXT", {"resource": "idle", "timeout": 0.05}) for _ in range(3)]
    ping = c.send("PING")
    replies = [await c.reply(timeout=3.0) for _ in range(4)]
    assert sorted(m[0] for m in replies) == sorted([*nexts, ping])
    assert all(m[1:] == ["empty", None] for m in replies if m[0] in nexts)
    # Reading paused and resumed: the connection is back to sharing the empty reasons.
    (conn,) = server.connections.values()
    assert conn._read_paused_by is NOT_PAUSED
    await c.close()
    await server.stop()


async def test_a_client_that_does_not_read_holds_a_bounded_amount_of_replies(
    server: Server, raw: Connect
) -> None:
    """Requests are handled only while the client reads their replies: one that pipelines
    requests with big replies and never reads must not make the broker buffer them all
    (an audit grew the broker by over 1 GiB that way). When it reads, it gets them all."""
    c: RawMsgpack = await raw()
    package = (await c.ok("SUBMIT", {"commands": [{"resource": "r", "action": "a"}] * 500}))[
        "package"
    ]
    ids = [c.send("STATUS", {"id": package, "commands": True}) for _ in range(300)]
    reply_size = len(msgpack.packb(server.core.status(package, True)))
    (conn,) = server.connections.values()
    for _ in range(500):  # bounded: the broker pauses this client within a few loop passes
        if conn.write_paused and conn.backlog:
            break
        await asyncio.sleep(0.01)
    assert conn.write_paused and conn.backlog
    assert conn.transport is not None
    buffered = conn.transport.get_write_buffer_size() + conn.out_bytes
    assert buffered < 2 * reply_size + (1 << 20) < 300 * reply_size
    assert all(m[1] == "ok" for m in [await c.reply() for _ in ids])
    assert await c.ok("PING") == "pong"


async def test_next_timeout_is_empty_not_error(raw: Connect) -> None:
    c: RawMsgpack = await raw()
    assert await c.call("NEXT", {"resource": "r", "timeout": 0}) == [1, "empty", None]
    msg = await c.call("NEXT", {"resource": "r", "timeout": 0.01})
    assert msg[1:] == ["empty", None]
    assert await c.ok("PING") == "pong"


async def test_blocked_agents_are_served_first_come_first_served(raw: Connect) -> None:
    agents: list[RawMsgpack] = [await raw() for _ in range(3)]
    for a in agents:
        a.send("NEXT", {"resource": "fifo"})
        assert await a.ok("PING") == "pong"  # the NEXT is parked before the next agent's
    producer: RawMsgpack = await raw()
    body = await producer.ok(
        "SUBMIT", {"commands": [{"resource": "fifo", "action": f"a{i}"} for i in range(3)]}
    )
    for a, cmd in zip(agents, body["commands"], strict=True):
        msg = await a.reply()
        assert msg[2]["id"] == cmd


async def test_connection_lease_redelivered_when_agent_vanishes(raw: Connect) -> None:
    producer: RawMsgpack = await raw()
    body = await producer.ok("SUBMIT", {"commands": [{"resource": "r", "action": "x"}]})
    agent: RawMsgpack = await raw()
    got = await agent.ok("NEXT", {"resource": "r"})
    assert got["delivery"] == 1
    await agent.close()  # dies mid-command
    second: RawMsgpack = await raw()
    got = await second.ok("NEXT", {"resource": "r", "timeout": 5})
    assert (got["id"], got["delivery"]) == (body["commands"][0], 2)


async def test_ttr_lease_outlives_connection_and_complete_from_elsewhere(raw: Connect) -> None:
    producer: RawMsgpack = await raw()
    body = await producer.ok("SUBMIT", {"commands": [{"resource": "r", "action": "x"}]})
    agent: RawMsgpack = await raw()
    got = await agent.ok("NEXT", {"resource": "r", "ttr": 300})
    await agent.close()
    assert (await producer.call("NEXT", {"resource": "r", "timeout": 0}))[1] == "empty"
    done = await producer.ok("COMPLETE", {"command": got["id"], "success": True})
    assert done["state"] == "succeeded"
    status = await producer.ok("STATUS", {"id": body["package"]})
    assert status["state"] == "succeeded"


async def test_ttr_lease_expires_and_is_redelivered(raw: Connect) -> None:
    producer: RawMsgpack = await raw()
    await producer.ok("SUBMIT", {"commands": [{"resource": "r", "action": "x"}]})
    agent: RawMsgpack = await raw()
    first = await agent.ok("NEXT", {"resource": "r", "ttr": 0.05})
    again = await agent.ok("NEXT", {"resource": "r", "timeout": 5})  # woken by the expiry
    assert again["id"] == first["id"] and again["delivery"] == 2
    msg = await agent.call("COMPLETE", {"command": first["id"], "success": True, "delivery": 1})
    assert msg[1] == "error" and msg[2]["code"] == "stale_delivery"


async def test_agent_vanishing_while_blocked(raw: Connect) -> None:
    gone: RawMsgpack = await raw()
    gone.send("NEXT", {"resource": "r"})
    assert await gone.ok("PING") == "pong"
    await gone.close()
    producer: RawMsgpack = await raw()
    body = await producer.ok("SUBMIT", {"commands": [{"resource": "r", "action": "x"}]})
    stats = await producer.ok("STATS")
    assert stats["resources"]["r"]["ready"] == 1  # not leased to the dead agent
    agent: RawMsgpack = await raw()
    got = await agent.ok("NEXT", {"resource": "r", "timeout": 0})
    assert got["id"] == body["commands"][0] and got["delivery"] == 1


async def test_stats_show_what_the_log_did(raw: Connect) -> None:
    """STATS' log section: an acknowledged SUBMIT is durable, and with fsync always it
    took one more fdatasync covering its record."""
    c: RawMsgpack = await raw()
    before = (await c.ok("STATS"))["log"]
    assert before["fsync"] == "always" and before["durable_lsn"] == before["appended_lsn"]
    await c.ok("SUBMIT", {"commands": [{"resource": "r", "action": "a"}]})
    after = (await c.ok("STATS"))["log"]
    assert after["appended_lsn"] == after["durable_lsn"] == before["appended_lsn"] + 1
    assert after["syncs"] == before["syncs"] + 1
    assert after["synced_records"] == before["synced_records"] + 1
    assert after["sync_seconds"] >= before["sync_seconds"]
    assert {"snapshots", "snapshot_lsn", "snapshot_fork_ms", "max_sync_ms"} <= set(after)
    # A STATS read in the same pass as a change (one write) counts it as appended, not
    # yet durable.
    submit = [90, "SUBMIT", {"commands": [{"resource": "r", "action": "a"}]}]
    c.send_raw(msgpack.packb(submit) + msgpack.packb([91, "STATS"]))
    replies = {msg[0]: msg for msg in [await c.reply(), await c.reply()]}
    assert replies[90][1] == "ok"
    same = replies[91][2]["log"]
    assert same["appended_lsn"] == after["appended_lsn"] + 1
    assert same["durable_lsn"] == after["durable_lsn"]


async def test_cancel_and_wait(raw: Connect) -> None:
    c: RawMsgpack = await raw()
    body = await c.ok(
        "SUBMIT",
        {
            "commands": [
                {"resource": "r", "action": "a"},
                {"resource": "r", "action": "b", "dependencies": [0]},
            ]
        },
    )
    wait_id = c.send("WAIT", {"package": body["package"], "timeout": 5})
    assert await c.ok("CANCEL", {"package": body["package"]}) == {
        "package": body["package"],
        "cancelled": 2,
    }
    msg = await c.reply()
    assert msg[0] == wait_id and msg[2]["state"] == "cancelled" and msg[2]["finished"]


async def test_stop_answers_blocked_requests(make_server: Connect) -> None:
    server: Server = await make_server()
    r, w = await asyncio.open_unix_connection(str(server.socket_path))
    c = RawMsgpack(r, w)
    nxt = c.send("NEXT", {"resource": "r"})
    assert await c.ok("PING") == "pong"
    await server.stop()
    msg = await c.reply()
    assert msg[0] == nxt and msg[1] == "error" and msg[2]["code"] == "shutting_down"
    assert await c.closed()


# --------------------------------------------------------------------------- bad input


def nest(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


async def test_parameters_nested_too_deep_are_refused(raw: Connect, text: Connect) -> None:
    """Audit h1 (t07): parameters 600 deep were accepted, then a text-mode agent's NEXT
    failed with RecursionError rendering them and the command stayed leased to it."""
    prod: RawMsgpack = await raw()
    deep = {"resource": "deep", "action": "a", "parameters": {"x": nest(600)}}
    bad = await prod.call("SUBMIT", {"commands": [deep]})
    assert bad[1] == "error" and bad[2]["code"] == "bad_request", bad
    fine = nest(MAX_NESTING - 4)  # the args, commands, command and parameters levels
    ok = {"resource": "deep", "action": "a", "parameters": {"x": fine}}
    [cid] = (await prod.ok("SUBMIT", {"commands": [ok]}))["commands"]
    agent: TextClient = await text()
    got = await agent.ok_json("NEXT deep 0")
    assert (got["id"], got["parameters"]) == (cid, {"x": fine})
    assert await agent.say("NEXT deep 0") == "EMPTY"
    assert (await prod.ok("STATS"))["totals"]["commands"] == 1


async def test_a_one_command_add_nests_as_deep_as_its_args_allow(raw: Connect) -> None:
    """Audit h5: a one-command ADD's parameters sit at level 2 of its args, not 4 as in a
    list of commands; the limit counts from the args map in both."""
    prod: RawMsgpack = await raw()
    pkg = (await prod.ok("NEW"))["package"]
    base = {"package": pkg, "resource": "r", "action": "a"}
    fine = nest(MAX_NESTING - 2)  # the args and parameters levels
    assert "command" in await prod.ok("ADD", {**base, "parameters": {"x": fine}})
    deep = await prod.call("ADD", {**base, "parameters": {"x": [fine]}})
    assert deep[1] == "error" and deep[2]["code"] == "bad_request", deep
    listed = {
        "package": pkg,
        "commands": [{"resource": "r", "action": "a", "parameters": {"x": fine}}],
    }
    too_deep = await prod.call("ADD", listed)
    assert too_deep[1] == "error" and too_deep[2]["code"] == "bad_request", too_deep


async def test_malformed_msgpack_closes_only_that_connection(raw: Connect) -> None:
    c: RawMsgpack = await raw()
    c.send_raw(b"\x91\xc1")  # a one-element array holding a never-used byte
    msg = await c.reply()
    assert msg[1] == "error" and msg[2]["code"] == "malformed"
    assert await c.closed()
    await still_serving(raw)


async def test_wrong_shapes_and_types_keep_the_connection(raw: Connect) -> None:
    c: RawMsgpack = await raw()
    c.send_raw(msgpack.packb(["not-an-id", "PING"]))
    assert (await c.reply())[2]["code"] == "bad_request"
    for verb, args in [
        ("FROB", {}),
        ("ENQUEUE", {}),
        ("ENQUEUE", {"package": 5}),
        ("NEXT", {"resource": "r", "timeout": "soon"}),
        ("NEXT", {"resource": "r", "ttr": -1}),
        ("COMPLETE", {"command": "x", "success": "yes"}),
        ("SUBMIT", {"commands": []}),
        ("SUBMIT", {"commands": [{"resource": "r"}]}),
        ("SUBMIT", {"commands": [{"resource": "r", "action": "a", "parameters": [1]}]}),
        ("SUBMIT", {"commands": [{"resource": "r", "action": "a", "dependencies": [0]}]}),
    ]:
        msg = await c.call(verb, args)
        assert msg[1] == "error", (verb, args, msg)
        expected = {"FROB": "unknown_verb"}.get(verb, "bad_request")
        if verb == "SUBMIT" and args["commands"] and "dependencies" in args["commands"][0]:
            expected = "unknown_dependency"
        assert msg[2]["code"] == expected, (verb, args, msg)
    assert await c.ok("PING") == "pong"


async def test_oversize_frame_closes_connection(make_server: Connect) -> None:
    server: Server = await make_server(Limits(max_frame=4096))
    r, w = await asyncio.open_unix_connection(str(server.socket_path))
    c = RawMsgpack(r, w)
    c.send(
        "SUBMIT", {"commands": [{"resource": "r", "action": "a", "parameters": {"x": "y" * 10000}}]}
    )
    msg = await c.reply()
    assert msg[1] == "error" and msg[2]["code"] == "too_large"
    assert await c.closed()
    r2, w2 = await asyncio.open_unix_connection(str(server.socket_path))
    assert await RawMsgpack(r2, w2).ok("PING") == "pong"
    w2.close()
    await server.stop()


async def test_client_vanishing_mid_frame(raw: Connect) -> None:
    c: RawMsgpack = await raw()
    frame = msgpack.packb([1, "SUBMIT", {"commands": [{"resource": "r", "action": "a"}]}])
    c.send_raw(frame[: len(frame) // 2])
    await c.writer.drain()
    await c.close()
    other: RawMsgpack = await raw()
    stats = await other.ok("STATS")
    assert stats["totals"]["commands"] == 0  # half a request did nothing


async def test_connection_limit(make_server: Connect) -> None:
    server: Server = await make_server(Limits(max_connections=2))
    conns = [await asyncio.open_unix_connection(str(server.socket_path)) for _ in range(2)]
    for r, w in conns:
        assert await RawMsgpack(r, w).ok("PING") == "pong"
    r, w = await asyncio.open_unix_connection(str(server.socket_path))
    line = await asyncio.wait_for(r.readline(), 5)
    assert line.startswith(b"ERR limit_exceeded")
    assert await r.read() == b""
    for _, w in conns:
        w.close()
    await server.stop()


async def test_an_idle_connection_costs_little_of_the_brokers_memory(raw: Connect) -> None:
    """Parked agents are many and mostly idle: what the broker keeps for a connection that
    has been served and waits (its Python objects; bench's `connections` scenario measures
    the whole process) stays small: 880 bytes when this was written. Three empty deques
    alone used to be 2,280 bytes, and two empty sets 432."""
    here = str(Path(__file__).resolve().parent.parent / "spinbroker" / "*")
    broker_only = [tracemalloc.Filter(True, here)]
    warm = await raw()  # the first connection also fills the codec's Unpacker pool
    await warm.ok("PING")
    n = 50
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(broker_only)
        clients = [await raw() for _ in range(n)]
        for client in clients:
            await client.ok("PING")
        after = tracemalloc.take_snapshot().filter_traces(broker_only)
    finally:
        tracemalloc.stop()
    per_connection = sum(d.size_diff for d in after.compare_to(before, "filename")) / n
    assert 0 < per_connection < 1_024, per_connection


@pytest.mark.parametrize(
    ("soft", "hard", "settable", "expected_soft", "expected_max"),
    [
        (1024, 4096, True, 1064, 1000),  # raised to what is needed
        (128, 128, True, 128, 64),  # the hard limit caps it: fewer connections
        (128, 4096, False, 128, 64),  # raising refused: fewer connections
        (100_000, 200_000, True, 100_000, 1000),  # enough already: untouched
    ],
)
def test_the_open_file_limit_is_raised_or_the_connections_fit_it(
    monkeypatch: pytest.MonkeyPatch,
    soft: int,
    hard: int,
    settable: bool,
    expected_soft: int,
    expected_max: int,
) -> None:
    import resource

    from spinbroker import server as server_module

    limits = {"soft": soft}

    def setrlimit(kind: int, values: tuple[int, int]) -> None:
        if not settable:
            raise ValueError("not allowed")
        limits["soft"] = values[0]

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (limits["soft"], hard))
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert server_module.fit_connections(1000) == expected_max
    assert limits["soft"] == expected_soft


async def test_a_broker_admits_only_the_connections_its_file_limit_fits(
    make_server: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spinbroker import server as server_module

    monkeypatch.setattr(server_module, "fit_connections", lambda wanted: 2)
    server: Server = await make_server(Limits(max_connections=10_000))
    assert server.max_connections == 2
    kept = [RawMsgpack(*await asyncio.open_unix_connection(str(server.socket_path))) for _ in "ab"]
    for c in kept:
        assert await c.ok("PING") == "pong"
    r, w = await asyncio.open_unix_connection(str(server.socket_path))
    assert (await r.readline()).startswith(b"ERR limit_exceeded ")
    w.close()
    for c in kept:
        await c.close()
    await server.stop()


async def test_an_idle_broker_snapshots_its_changes_after_the_interval(
    make_server: Connect,
) -> None:
    """--snapshot-interval S: a snapshot S seconds after a change, even if no request
    comes after it to notice the time has come."""
    server: Server = await make_server(snapshot_interval=0.2, snapshot_every=1 << 30)
    snapshots = server.config.data_dir.glob
    c = RawMsgpack(*await asyncio.open_unix_connection(str(server.socket_path)))
    await c.ok("SUBMIT", {"commands": [{"resource": "r", "action": "a"}]})
    assert not list(snapshots("snap-*"))
    for _ in range(500):  # bounded: 5 s for a 0.2 s interval
        if list(snapshots("snap-*")):
            break
        await asyncio.sleep(0.01)
    assert list(snapshots("snap-*")), "no snapshot of the idle broker's change"
    await c.close()
    await server.stop()


async def test_data_dir_is_locked(make_server: Connect, server: Server) -> None:
    from spinbroker.config import ServerConfig

    twin = Server(ServerConfig(data_dir=server.config.data_dir, tcp=None))
    with pytest.raises(RuntimeError, match="in use"):
        await twin.start()
    await server.stop()


async def test_a_socket_path_another_broker_listens_on_is_refused(
    server: Server, raw: Connect, tmp_path: Path
) -> None:
    """--socket need not be inside the data dir: a second broker (another data dir, same
    socket path) must not take the first one's socket away; a stale one it replaces."""
    from spinbroker.config import ServerConfig

    shared = server.socket_path
    twin = Server(ServerConfig(data_dir=tmp_path / "twin", socket=shared, tcp=None))
    with pytest.raises(RuntimeError, match="in use by another process"):
        await twin.start()
    await still_serving(raw)  # the first broker's socket is still there

    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()  # a socket file nobody listens on, as a killed broker leaves
    revived = Server(ServerConfig(data_dir=tmp_path / "revived", socket=stale, tcp=None))
    await revived.start()
    c = RawMsgpack(*await asyncio.open_unix_connection(str(stale)))
    assert await c.ok("PING") == "pong"
    await c.close()
    await revived.stop()

    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("mine")
    third = Server(ServerConfig(data_dir=tmp_path / "third", socket=not_a_socket, tcp=None))
    with pytest.raises(RuntimeError, match="not a socket"):
        await third.start()
    assert not_a_socket.read_text() == "mine"
    # a broker that could not listen let go of its data dir (lock and log)
    again = Server(ServerConfig(data_dir=tmp_path / "third", socket=tmp_path / "ok", tcp=None))
    await again.start()
    await again.stop()


async def test_announced_schema_refuses_bad_commands_at_add(raw: Connect) -> None:
    from spinbroker.schema import ActionSpec, Int, ResourceSchema, Str

    storage = ResourceSchema(
        {
            "create_image": ActionSpec(
                {"volume_path": Str(), "image_name": Str(), "image_size": Int(minimum=1)}
            )
        }
    )
    agent: RawMsgpack = await raw()
    assert await agent.ok("ANNOUNCE", {"resource": "storage", "schema": storage.to_wire()})
    c: RawMsgpack = await raw()
    pkg = (await c.ok("NEW"))["package"]
    good = {"volume_path": "v", "image_name": "i.raw", "image_size": 50}
    for action, params, problem in [
        ("frobnicate", {}, "unknown action"),
        ("create_image", {"volume_path": "v", "image_name": "i"}, "image_size"),
        ("create_image", {**good, "image_size": "big"}, "image_size"),
        ("create_image", {**good, "colour": "red"}, "colour"),
    ]:
        args = {"package": pkg, "resource": "storage", "action": action, "parameters": params}
        msg = await c.call("ADD", args)
        assert msg[1] == "error" and msg[2]["code"] == "invalid_command", msg
        assert problem in msg[2]["message"]
    args = {"package": pkg, "resource": "storage", "action": "create_image", "parameters": good}
    assert "command" in await c.ok("ADD", args)
    # A resource without a schema accepts anything.
    assert "command" in await c.ok(
        "ADD", {"package": pkg, "resource": "network", "action": "anything"}
    )
    bad = await c.call("ANNOUNCE", {"resource": "x", "schema": {"schema": 99}})
    assert bad[1] == "error" and bad[2]["code"] == "bad_request"


async def test_a_person_announces_a_schema_in_text_mode(text: Connect) -> None:
    """ANNOUNCE is a text-mode verb too: the schema is one JSON map on the line, and it
    holds for commands added in either mode."""
    c: TextClient = await text()
    schema = '{"schema": 1, "actions": {"ping": {"parameters": {"host": {"type": "str"}}}}}'
    assert await c.ok_json(f"ANNOUNCE net {schema}") == {"resource": "net"}
    assert (await c.say('SUBMIT [{"resource": "net", "action": "reboot"}]')).startswith(
        "ERR invalid_command "
    )
    body = await c.ok_json(
        'SUBMIT [{"resource": "net", "action": "ping", "parameters": {"host": "h"}}]'
    )
    assert len(body["commands"]) == 1
    assert (await c.say('ANNOUNCE net {"schema": 99}')).startswith("ERR bad_request ")


@pytest.mark.parametrize(
    "schema",
    [
        '{"schema":1,"actions":{"a":{"description":"\\ud800"}}}',
        '{"schema":1,"actions":{"a":{"parameters":{"\\ud800":{"type":"any"}}}}}',
        '{"schema":1,"actions":{"a":{"parameters":{"p":{"type":"int",'
        '"minimum":99999999999999999999999}}}}}',
        '{"schema":1,"actions":{"a":{"parameters":{"p":{"type":"any","required":false,'
        '"default":' + "[" * 150 + "]" * 150 + "}}}}}",
    ],
    ids=["surrogate_description", "surrogate_name", "huge_minimum", "deep_default"],
)
async def test_a_schema_the_log_cannot_carry_is_refused(
    text: Connect, raw: Connect, schema: str
) -> None:
    """Audit h1 (t05, t06, t21): such an ANNOUNCE passed the schema check, then the broker
    could not pack its record, and every later change of every client failed with it."""
    c: TextClient = await text()
    reply = await c.say(f"ANNOUNCE sur {schema}")
    assert reply.startswith("ERR bad_request "), reply
    assert await c.say("PING") == "PONG"
    other: RawMsgpack = await raw()
    body = await other.ok("SUBMIT", {"commands": [{"resource": "r", "action": "a"}]})
    assert (await other.ok("NEXT", {"resource": "r", "timeout": 0}))["id"] == body["commands"][0]
    await other.close()


async def test_complete_with_next_is_one_round_trip(raw: Connect) -> None:
    producer: RawMsgpack = await raw()
    body = await producer.ok(
        "SUBMIT", {"commands": [{"resource": "r", "action": f"a{i}"} for i in range(2)]}
    )
    first, second = body["commands"]
    agent: RawMsgpack = await raw()
    got = await agent.ok("NEXT", {"resource": "r"})
    assert got["id"] == first
    got = await agent.ok("COMPLETE", {"command": first, "success": True, "next": {"resource": "r"}})
    assert got["id"] == second  # the reply is the next command
    assert (await producer.ok("STATUS", {"id": first}))["state"] == "succeeded"
    msg = await agent.call(
        "COMPLETE", {"command": second, "success": True, "next": {"resource": "r", "timeout": 0}}
    )
    assert msg[1:] == ["empty", None]
    assert (await producer.ok("STATUS", {"id": body["package"]}))["state"] == "succeeded"
    # A bad `next` leaves the command uncompleted.
    await producer.ok("SUBMIT", {"commands": [{"resource": "r", "action": "x"}]})
    got = await agent.ok("NEXT", {"resource": "r"})
    msg = await agent.call("COMPLETE", {"command": got["id"], "success": True, "next": 5})
    assert msg[1] == "error" and msg[2]["code"] == "bad_request"
    assert (await producer.ok("STATUS", {"id": got["id"]}))["state"] == "leased"


async def test_stop_acknowledges_a_complete_whose_next_was_waiting(make_server: Connect) -> None:
    """Audit h4: a COMPLETE with `next` parked on its NEXT part got `shutting_down` when the
    broker stopped, though its completion was made and durable. Its reply acknowledges the
    completion, so it is `empty`, as when the NEXT part times out."""
    server: Server = await make_server()
    agent = RawMsgpack(*await open_stream(server, False))
    await agent.ok("SUBMIT", {"commands": [{"resource": "r", "action": "a"}]})
    got = await agent.ok("NEXT", {"resource": "r", "timeout": 0})
    done = agent.send(
        "COMPLETE", {"command": got["id"], "success": True, "next": {"resource": "r"}}
    )
    assert await agent.ok("PING") == "pong"  # the COMPLETE is read, its NEXT part parked
    await server.stop()
    assert (await agent.reply())[:3] == [done, "empty", None]
    wal, _ = Wal.open(server.config.data_dir, fsync="off", preallocate=False)
    broker, _ = persist.recover(wal, Limits(), None, 1e10)
    await wal.close()
    assert broker.status(got["id"])["state"] == "succeeded"


async def test_stop_sends_the_last_acknowledgements_then_closes(make_server: Connect) -> None:
    server: Server = await make_server()
    r, w = await asyncio.open_unix_connection(str(server.socket_path))
    c = RawMsgpack(r, w)
    ids = [
        c.send("SUBMIT", {"commands": [{"resource": "r", "action": f"a{i}"}]}) for i in range(50)
    ]
    await c.writer.drain()
    first = await c.reply()  # the server has read the batch
    await server.stop()
    replies = [first] + [await c.reply() for _ in range(len(ids) - 1)]
    assert [m[0] for m in replies] == ids
    assert all(m[1] == "ok" for m in replies)
    assert await c.closed()


async def test_stop_changes_nothing_the_log_does_not_hold(
    make_server: Connect, tmp_path: Path
) -> None:
    """Agents' connections close while the broker stops (it closes them itself). Ending
    their leases then would change the core after its last record, and the final snapshot
    would hold changes the log never got: a replay of the log alone would disagree with it.
    Their leases end at the next start instead, as after a crash."""
    limits = Limits(max_deliveries=1)  # an ended connection lease fails its command
    server: Server = await make_server(limits)
    producer = RawMsgpack(*await open_stream(server, False))
    agent = RawMsgpack(*await open_stream(server, False))
    first = await producer.ok(
        "SUBMIT", {"commands": [{"resource": "r", "action": "a"}, {"resource": "r", "action": "b"}]}
    )
    a, b = first["commands"]
    later = await producer.ok(
        "SUBMIT", {"commands": [{"resource": "s", "action": "d", "dependencies": [a, b]}]}
    )
    assert (await agent.ok("NEXT", {"resource": "r", "timeout": 0}))["id"] == a
    await server.stop()
    assert server.core.outbox == []
    assert server.core.status(a)["state"] == "leased"

    data_dir = server.config.data_dir
    log_only = tmp_path / "log-only"
    shutil.copytree(data_dir, log_only, ignore=shutil.ignore_patterns("lock", "*.snap"))
    assert any(data_dir.glob("*.snap")) and not any(log_only.glob("*.snap"))
    states = []
    for directory in (data_dir, log_only):
        wal, _ = Wal.open(directory, fsync="off", preallocate=False)
        broker, _ = persist.recover(wal, limits, None, 1e10)
        await wal.close()
        states.append((broker.status(later["package"], True), broker.status(a)))
    assert states[0] == states[1]
    assert states[0][1]["state"] == "failed"  # its one delivery ended with the broker
