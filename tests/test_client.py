"""The client: addresses, result types, errors, and connections.

Connection behaviour (routing by id, pipelining, ConnectionLost) is tested first against a
scripted fake broker, so it does not depend on the real server; the tests at the end run the
same client against the real server and skip while spinbroker.server cannot be imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from spinbroker.client import (
    ERROR_TYPES,
    AlreadyCompleted,
    BadRequest,
    Client,
    ClientError,
    CommandStatus,
    ConnectionLost,
    DeliveredCommand,
    InternalError,
    InvalidCommand,
    NotFound,
    NotLeased,
    PackageStatus,
    ShuttingDown,
    StaleDelivery,
    UnknownDependency,
    error_from_wire,
    format_address,
    parse_address,
    to_json_value,
)
from spinbroker.config import Limits, ServerConfig
from spinbroker.errors import BrokerError, ErrorCode

# --------------------------------------------------------------------------- parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/sb.sock", ("unix", "/run/sb.sock")),
        ("unix:relative.sock", ("unix", "relative.sock")),
        ("/tmp/sb.sock", ("unix", "/tmp/sb.sock")),
        ("./spinbroker-data/spinbroker.sock", ("unix", "./spinbroker-data/spinbroker.sock")),
        ("spinbroker-data/spinbroker.sock", ("unix", "spinbroker-data/spinbroker.sock")),
        ("127.0.0.1:7878", ("tcp", "127.0.0.1", 7878)),
        ("localhost:1", ("tcp", "localhost", 1)),
        ("broker.example:0", ("tcp", "broker.example", 0)),
        ("[::1]:7878", ("tcp", "::1", 7878)),
        (":7878", ("tcp", "127.0.0.1", 7878)),  # no host: loopback
        (":0", ("tcp", "127.0.0.1", 0)),
    ],
)
def test_parse_address_accepts(text: str, expected: tuple[Any, ...]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "host:port"),
        ("unix:", "empty socket path"),
        ("localhost", "host:port"),
        ("spinbroker.sock", "host:port"),
        ("host:", "port must be"),
        ("host:http", "port must be"),
        ("host:65536", "port must be"),
        ("host:-1", "port must be"),
        ("::1:7878", "brackets"),
        ("[]:7878", "port must be"),
    ],
)
def test_parse_address_refuses_with_a_clear_message(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_address(text)


@pytest.mark.parametrize("text", ["unix:/a/b.sock", "127.0.0.1:7878", "[::1]:7878"])
def test_format_address_round_trips(text: str) -> None:
    assert format_address(parse_address(text)) == text


# --------------------------------------------------------------------------- errors


def test_every_error_code_has_its_own_exception_type() -> None:
    assert set(ERROR_TYPES) == set(ErrorCode)
    assert len(set(ERROR_TYPES.values())) == len(ErrorCode)
    for code, cls in ERROR_TYPES.items():
        err = cls("why")
        assert isinstance(err, ClientError)
        assert isinstance(err, BrokerError)
        assert err.code is code
        assert err.message == "why"
        assert str(err) == f"{code.value}: why"


def test_error_from_wire_picks_the_type_by_code() -> None:
    err = error_from_wire({"code": "not_found", "message": "no package x"})
    assert type(err) is NotFound
    assert err.message == "no package x"
    assert type(error_from_wire({"code": "stale_delivery", "message": ""})) is StaleDelivery


def test_error_from_wire_survives_unknown_codes_and_junk() -> None:
    unknown = error_from_wire({"code": "brand_new", "message": "m"})
    assert type(unknown) is ClientError
    assert unknown.code is ErrorCode.INTERNAL
    assert "brand_new" in unknown.message
    assert isinstance(error_from_wire("not a map"), InternalError)


def test_connection_lost_is_a_connection_error_not_a_broker_answer() -> None:
    assert issubclass(ConnectionLost, ConnectionError)
    assert not issubclass(ConnectionLost, ClientError)


# --------------------------------------------------------------------------- result types

DELIVERED = {
    "id": "c1",
    "package": "p1",
    "resource": "storage",
    "action": "create_image",
    "parameters": {"image_size": 50, "raw": b"\x00\xff", "vm": {"Name": "vm1", "cpus": [1, 2]}},
    "dependencies": ["c0"],
    "delivery": 2,
    "ttr": 300,
}


def test_delivered_command_from_wire() -> None:
    cmd = DeliveredCommand.from_wire(DELIVERED)
    assert cmd.id == "c1"
    assert cmd.package == "p1"
    assert (cmd.resource, cmd.action) == ("storage", "create_image")
    assert cmd.parameters["image_size"] == 50
    assert cmd.parameters["raw"] == b"\x00\xff"
    assert cmd.dependencies == ("c0",)
    assert cmd.delivery == 2
    assert cmd.ttr == 300.0
    assert isinstance(cmd.ttr, float)


def test_delivered_command_to_json_is_json_ready() -> None:
    out = DeliveredCommand.from_wire({**DELIVERED, "ttr": None}).to_json()
    assert out == {
        "id": "c1",
        "package": "p1",
        "resource": "storage",
        "action": "create_image",
        "parameters": {"image_size": 50, "raw": "AP8=", "vm": {"Name": "vm1", "cpus": [1, 2]}},
        "dependencies": ["c0"],
        "delivery": 2,
        "ttr": None,
    }


def test_result_types_are_frozen_and_slotted() -> None:
    cmd = DeliveredCommand.from_wire(DELIVERED)
    with pytest.raises(AttributeError):
        cmd.delivery = 3  # type: ignore[misc]
    for cls in (DeliveredCommand, PackageStatus, CommandStatus):
        assert "__slots__" in cls.__dict__
        assert not hasattr(cmd, "__dict__")


def test_from_wire_names_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="not a delivered command"):
        DeliveredCommand.from_wire({"id": "c1"})
    with pytest.raises(ValueError, match="not a package status"):
        PackageStatus.from_wire({"id": "p1", "state": "pending"})


COMMAND_STATUS = {
    "kind": "command",
    "id": "c2",
    "package": "p1",
    "resource": "emulation",
    "action": "start",
    "state": "cancelled",
    "reason": "dependency c1 failed",
    "delivery": 0,
}

PACKAGE_STATUS = {
    "kind": "package",
    "id": "p1",
    "state": "failed",
    "finished": True,
    "causer": "c1",
    "reason": "disk full",
    "counts": {"failed": 1, "cancelled": 1, "succeeded": 0},
}


def test_command_status_round_trip() -> None:
    st = CommandStatus.from_wire(COMMAND_STATUS)
    assert st.state == "cancelled"
    assert st.finished
    assert st.to_json() == {**COMMAND_STATUS, "finished": True}


def test_package_status_round_trip_without_and_with_commands() -> None:
    st = PackageStatus.from_wire(PACKAGE_STATUS)
    assert (st.state, st.finished, st.causer, st.reason) == ("failed", True, "c1", "disk full")
    assert st.commands is None
    assert st.to_json() == PACKAGE_STATUS

    with_commands = PackageStatus.from_wire({**PACKAGE_STATUS, "commands": [COMMAND_STATUS]})
    assert with_commands.commands == (CommandStatus.from_wire(COMMAND_STATUS),)
    assert with_commands.to_json()["commands"] == [{**COMMAND_STATUS, "finished": True}]


def test_to_json_value_handles_bytes_tuples_and_non_string_keys() -> None:
    assert to_json_value({1: (b"a", [b"b"])}) == {"1": ["YQ==", ["Yg=="]]}


# --------------------------------------------------------------------------- a fake broker

Reply = tuple[str, Any]
Script = Callable[[str, dict[str, Any]], Awaitable[Reply]]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: a Unix socket path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sbt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class FakeBroker:
    """Answers msgpack requests with a script; each request is answered by its own task,
    so a script that blocks holds up only its own reply, like NEXT on the real broker."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.received: list[list[Any]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.AbstractServer | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        while data := await reader.read(65536):
            unpacker.feed(data)
            for request in unpacker:
                self.received.append(request)
                task = asyncio.create_task(self.answer(writer, request))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def answer(self, writer: asyncio.StreamWriter, request: list[Any]) -> None:
        rid, verb, args = request
        try:
            kind, body = await self.script(verb, args)
        except BrokerError as err:
            kind, body = "error", err.to_wire()
        if not writer.is_closing():
            writer.write(msgpack.packb([rid, kind, body], use_bin_type=True))

    def drop_connections(self) -> None:
        for writer in self.writers:
            writer.transport.abort()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self.drop_connections()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def fake_broker(script: Script, where: Path | None) -> AsyncIterator[tuple[FakeBroker, str]]:
    fake = FakeBroker(script)
    if where is None:
        fake.server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
        addr = f"127.0.0.1:{fake.server.sockets[0].getsockname()[1]}"
    else:
        fake.server = await asyncio.start_unix_server(fake.handle, str(where))
        addr = f"unix:{where}"
    try:
        yield fake, addr
    finally:
        await fake.close()


async def echo(verb: str, args: dict[str, Any]) -> Reply:
    """A script: PING pongs, NEXT finds nothing, NOPE is not found, the rest echo their args."""
    if verb == "PING":
        return "ok", "pong"
    if verb == "NEXT":
        return "empty", None
    if verb == "NOPE":
        raise BrokerError(ErrorCode.NOT_FOUND, f"no such thing {args.get('id')!r}")
    return "ok", {"verb": verb, "args": args}


async def test_request_and_typed_errors_over_unix(short_dir: Path) -> None:
    async with fake_broker(echo, short_dir / "s") as (_, addr), await Client.connect(addr) as c:
        await c.ping()
        assert await c.request("ECHO", {"a": 1}) == ("ok", {"verb": "ECHO", "args": {"a": 1}})
        with pytest.raises(NotFound, match="no such thing 'x'") as caught:
            await c.request("NOPE", {"id": "x"})
        assert caught.value.code is ErrorCode.NOT_FOUND
        await c.ping()  # an error leaves the connection usable
    assert c.is_closed


async def test_request_over_tcp() -> None:
    async with fake_broker(echo, None) as (_, addr), await Client.connect(addr) as c:
        assert c.address[0] == "tcp"
        await c.ping()


async def test_connect_accepts_a_path_object(short_dir: Path) -> None:
    async with fake_broker(echo, short_dir / "s") as _, await Client.connect(short_dir / "s") as c:
        await c.ping()


async def test_connect_to_nothing_raises_os_error(short_dir: Path) -> None:
    with pytest.raises(OSError):
        await Client.connect(f"unix:{short_dir / 'absent'}")


async def test_requests_are_encoded_as_the_protocol_says(short_dir: Path) -> None:
    async with fake_broker(echo, short_dir / "s") as (fake, addr), await Client.connect(addr) as c:
        params = {"n": 50, "s": "test", "b": b"\x00", "m": {"k": [1, None, True, 1.5]}}
        await c.request("ADD", {"package": "p", "parameters": params})
        await c.request("PING")
        await c.next("storage")
        await c.next("storage", timeout=0, ttr=5)
    (id1, verb1, args1), (id2, verb2, args2), next1, next2 = fake.received
    assert isinstance(id1, int)
    assert id2 != id1
    assert verb1 == "ADD"
    assert args1 == {"package": "p", "parameters": params}
    assert type(args1["parameters"]["b"]) is bytes  # sent as bin, not str
    assert (verb2, args2) == ("PING", {})
    assert next1[1:] == ["NEXT", {"resource": "storage"}]  # no None arguments on the wire
    assert next2[1:] == ["NEXT", {"resource": "storage", "timeout": 0, "ttr": 5}]


async def test_replies_are_routed_by_id_not_by_order(short_dir: Path) -> None:
    release = asyncio.Event()

    async def script(verb: str, args: dict[str, Any]) -> Reply:
        if verb == "NEXT":
            await release.wait()
            return "ok", {**DELIVERED, "resource": args["resource"]}
        return await echo(verb, args)

    async with fake_broker(script, short_dir / "s") as (_, addr), await Client.connect(addr) as c:
        blocked = asyncio.create_task(c.next("storage"))
        for _ in range(10):
            await c.ping()  # answered while NEXT is still waiting
        assert not blocked.done()
        release.set()
        cmd = await blocked
        assert cmd is not None
        assert cmd.resource == "storage"


async def test_many_tasks_pipeline_on_one_connection(short_dir: Path) -> None:
    async with fake_broker(echo, short_dir / "s") as (fake, addr), await Client.connect(addr) as c:

        async def worker(w: int) -> list[Any]:
            return [(await c.request("ECHO", {"w": w, "i": i}))[1] for i in range(20)]

        results = await asyncio.gather(*(worker(w) for w in range(50)))
        big = await asyncio.gather(*(c.request("ECHO", {"i": i}) for i in range(1000)))
    for w, replies in enumerate(results):
        assert replies == [{"verb": "ECHO", "args": {"w": w, "i": i}} for i in range(20)]
    assert [body["args"]["i"] for _, body in big] == list(range(1000))
    assert len({request[0] for request in fake.received}) == 2000  # every id distinct


async def test_large_requests_respect_write_flow_control(short_dir: Path) -> None:
    blob = b"x" * (1 << 20)
    async with fake_broker(echo, short_dir / "s") as (_, addr), await Client.connect(addr) as c:
        replies = await asyncio.gather(*(c.request("ECHO", {"blob": blob}) for _ in range(8)))
    assert all(body["args"]["blob"] == blob for _, body in replies)


async def test_empty_replies_become_none(short_dir: Path) -> None:
    async def script(verb: str, args: dict[str, Any]) -> Reply:
        return "empty", None

    async with fake_broker(script, short_dir / "s") as (_, addr), await Client.connect(addr) as c:
        assert await c.next("storage", timeout=0) is None
        assert await c.wait("p", timeout=0) is None
        with pytest.raises(InternalError, match="unexpected 'empty'"):
            await c.new()


async def test_in_flight_requests_fail_with_connection_lost(short_dir: Path) -> None:
    never = asyncio.Event()

    async def script(verb: str, args: dict[str, Any]) -> Reply:
        if verb == "NEXT":
            await never.wait()
        return await echo(verb, args)

    async with fake_broker(script, short_dir / "s") as (fake, addr):
        c = await Client.connect(addr)
        await c.ping()
        waiting = [asyncio.create_task(c.next("storage")) for _ in range(3)]
        await c.ping()  # the NEXTs have reached the broker
        fake.drop_connections()
        for task in waiting:
            with pytest.raises(ConnectionLost, match="closed the connection"):
                await task
        with pytest.raises(ConnectionLost):
            await c.ping()
        assert c.is_closed
        await c.close()  # closing a lost connection is fine


async def test_close_fails_what_is_in_flight(short_dir: Path) -> None:
    never = asyncio.Event()

    async def script(verb: str, args: dict[str, Any]) -> Reply:
        await never.wait()
        return "ok", None

    async with fake_broker(script, short_dir / "s") as (_, addr):
        c = await Client.connect(addr)
        waiting = asyncio.create_task(c.wait("p"))
        await asyncio.sleep(0)  # let the task send its request
        await c.close()
        with pytest.raises(ConnectionLost, match="closed by the client"):
            await waiting
        await c.close()
        with pytest.raises(ConnectionLost):
            await c.ping()


async def test_a_cancelled_request_does_not_disturb_the_others(short_dir: Path) -> None:
    release = asyncio.Event()

    async def script(verb: str, args: dict[str, Any]) -> Reply:
        if verb == "NEXT":
            await release.wait()
            return "ok", DELIVERED
        return await echo(verb, args)

    async with fake_broker(script, short_dir / "s") as (_, addr), await Client.connect(addr) as c:
        task = asyncio.create_task(c.next("storage"))
        await c.ping()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()  # its late reply arrives and is dropped
        for _ in range(3):
            await c.ping()


async def test_garbage_from_the_broker_loses_the_connection(short_dir: Path) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"\xc1")  # never valid msgpack
        await reader.read(100)

    server = await asyncio.start_unix_server(handle, str(short_dir / "s"))
    async with server, await Client.connect(short_dir / "s") as c:
        with pytest.raises(ConnectionLost, match="not valid msgpack"):
            await c.ping()


async def test_a_text_refusal_becomes_the_reason_of_connection_lost(short_dir: Path) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ERR limit_exceeded too many connections\n")
        writer.close()

    server = await asyncio.start_unix_server(handle, str(short_dir / "s"))
    async with server, await Client.connect(short_dir / "s") as c:
        with pytest.raises(ConnectionLost, match="limit_exceeded: too many connections"):
            await c.ping()


async def _refused_before_the_first_write(path: Path) -> None:
    """The broker refuses and hangs up before our first request is written, which then
    fails with EPIPE while the refusal is still unread (audit h6: `connection lost:
    [Errno 32] Broken pipe` in about 1 run of 6 against a broker at --max-connections)."""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        c = await Client.connect(path)
        # No await from here to the write, so the loop cannot read the refusal first.
        conn, _ = listener.accept()
        conn.sendall(b"ERR limit_exceeded too many connections\n")
        conn.close()
        with pytest.raises(ConnectionLost) as caught:
            await c.ping()
        await c.close()
    assert str(caught.value) == (
        "the broker refused the connection: limit_exceeded: too many connections"
    )


async def test_a_refusal_is_reported_even_when_the_first_write_fails(short_dir: Path) -> None:
    await _refused_before_the_first_write(short_dir / "s")


def test_a_refusal_is_reported_on_the_stock_event_loop_too(short_dir: Path) -> None:
    asyncio.run(_refused_before_the_first_write(short_dir / "s"))


def test_client_runs_on_the_stock_event_loop_too(short_dir: Path) -> None:
    """conftest runs the async tests on uvloop; asyncio's own loop must work as well."""

    async def scenario() -> None:
        async with fake_broker(echo, short_dir / "s") as (_, addr), await Client.connect(addr) as c:
            await asyncio.gather(*(c.ping() for _ in range(100)))
            with pytest.raises(NotFound):
                await c.request("NOPE")

    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(scenario())


# --------------------------------------------------------------------------- the real broker


@contextlib.asynccontextmanager
async def real_broker(where: Path, **config: Any) -> AsyncIterator[Any]:
    server_module = pytest.importorskip("spinbroker.server")
    settings: dict[str, Any] = {
        "data_dir": where / "data",
        "socket": where / "sb.sock",
        "tcp": ("127.0.0.1", 0),
        **config,
    }
    server = server_module.Server(ServerConfig(**settings))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def broker(short_dir: Path) -> AsyncIterator[Any]:
    async with real_broker(short_dir) as server:
        yield server


@pytest.fixture
async def client(broker: Any) -> AsyncIterator[Client]:
    async with await Client.connect(broker.socket_path) as c:
        yield c


async def test_real_hello_and_ping(client: Client) -> None:
    hello = await client.hello()
    assert hello["server"] == "spinbroker"
    assert hello["protocol"] == 1
    assert hello["limits"]["max_deliveries"] == 5
    await client.ping()


async def test_real_over_tcp(broker: Any) -> None:
    assert broker.tcp_port
    async with await Client.connect(f"127.0.0.1:{broker.tcp_port}") as c:
        await c.ping()
        package, (command,) = await c.submit([{"resource": "r", "action": "a"}])
        delivered = await c.next("r", timeout=0)
        assert delivered is not None
        assert (delivered.id, delivered.package) == (command, package)


async def test_real_package_life(client: Client) -> None:
    package = await client.new()
    first = await client.add(package, "storage", "add_volume", {"path": "test"})
    second = await client.add(
        package,
        "storage",
        "create_image",
        {"volume_path": "test", "image_name": "test.raw", "image_size": 50},
        [first],
    )
    status = await client.status(package)
    assert isinstance(status, PackageStatus)
    assert (status.state, status.finished) == ("open", False)
    assert await client.enqueue(package) == [first, second]

    cmd = await client.next("storage", timeout=0)
    assert cmd is not None
    assert (cmd.id, cmd.action, cmd.parameters, cmd.delivery) == (
        first,
        "add_volume",
        {"path": "test"},
        1,
    )
    assert await client.next("storage", timeout=0) is None  # second waits on first
    assert await client.complete(first, True) == "succeeded"

    cmd2 = await client.next("storage", timeout=0, ttr=30)
    assert cmd2 is not None
    assert cmd2.id == second
    assert cmd2.dependencies == (first,)
    assert cmd2.ttr == 30.0
    assert await client.touch(second, ttr=60) == 60.0
    assert await client.complete(second, True, delivery=1) == "succeeded"

    done = await client.wait(package, timeout=5)
    assert done is not None
    assert (done.state, done.finished, done.causer) == ("succeeded", True, None)
    assert done.counts["succeeded"] == 2
    cstatus = await client.status(second)
    assert isinstance(cstatus, CommandStatus)
    assert (cstatus.state, cstatus.delivery, cstatus.package) == ("succeeded", 1, package)
    full = await client.status(package, commands=True)
    assert isinstance(full, PackageStatus)
    assert full.commands is not None
    assert [c.id for c in full.commands] == [first, second]


async def test_real_parameters_keep_their_types(client: Client) -> None:
    params = {
        "int": 50,
        "big": 2**62,
        "neg": -3,
        "float": 1.5,
        "bool": True,
        "nil": None,
        "str": "test",
        "bin": b"\x00\xff",
        "list": [1, "two", [3]],
        "map": {"Name": "vm1", "Memory": {"size": 512}},
    }
    await client.submit([{"resource": "types", "action": "echo", "parameters": params}])
    cmd = await client.next("types", timeout=0)
    assert cmd is not None
    assert cmd.parameters == params
    assert type(cmd.parameters["bin"]) is bytes


async def test_real_submit_with_positions_and_add_many(client: Client) -> None:
    _, ids = await client.submit(
        [
            {"resource": "r", "action": "first"},
            {"resource": "r", "action": "second", "dependencies": [0]},
        ]
    )
    assert len(ids) == 2
    status = await client.status(ids[1])
    assert isinstance(status, CommandStatus)
    assert status.state == "waiting"

    other = await client.new()
    many = await client.add_many(
        other,
        [
            {"resource": "r", "action": "x", "parameters": {"n": 1}},
            {"resource": "r", "action": "y", "dependencies": [ids[0]]},
        ],
    )
    assert await client.enqueue(other) == many


async def test_real_errors_are_typed(client: Client) -> None:
    with pytest.raises(NotFound):
        await client.status("00000000-0000-0000-0000-000000000000")
    package = await client.new()
    with pytest.raises(UnknownDependency):
        await client.add(package, "r", "a", dependencies=["00000000-0000-0000-0000-0000000000ff"])
    (command,) = (await client.submit([{"resource": "r", "action": "a"}]))[1]
    with pytest.raises(NotLeased):
        await client.complete(command, True)
    assert await client.next("r", timeout=0) is not None
    await client.complete(command, False, "broken")
    with pytest.raises(AlreadyCompleted):
        await client.complete(command, True)
    await client.ping()


async def test_real_failure_and_cancel(client: Client) -> None:
    package, (a, b) = await client.submit(
        [{"resource": "f", "action": "a"}, {"resource": "f", "action": "b", "dependencies": [0]}]
    )
    cmd = await client.next("f", timeout=0)
    assert cmd is not None
    assert await client.complete(cmd.id, False, "disk full") == "failed"
    status = await client.wait(package, timeout=5)
    assert status is not None
    assert (status.state, status.finished, status.causer, status.reason) == (
        "failed",
        True,
        a,
        "disk full",
    )
    dependent = await client.status(b)
    assert isinstance(dependent, CommandStatus)
    assert dependent.state == "cancelled"

    later, _ = await client.submit([{"resource": "g", "action": "x"}] * 3)
    assert await client.cancel(later) == 3
    assert await client.cancel(later) == 0


async def test_real_redelivery_makes_older_deliveries_stale(broker: Any, client: Client) -> None:
    _, (command,) = await client.submit([{"resource": "redo", "action": "a"}])
    async with await Client.connect(broker.socket_path) as other:
        first = await other.next("redo", timeout=0)
        assert first is not None
        assert first.delivery == 1
    # The connection lease died with `other`: the command comes back.
    again = await client.next("redo", timeout=5)
    assert again is not None
    assert (again.id, again.delivery) == (command, 2)
    with pytest.raises(StaleDelivery):
        await client.complete(command, True, delivery=1)
    assert await client.complete(command, True, delivery=2) == "succeeded"


async def test_real_blocking_next_is_served_while_others_are_answered(client: Client) -> None:
    blocked = asyncio.create_task(client.next("later", timeout=10))
    pings = await asyncio.gather(*(client.ping() for _ in range(50)))
    assert len(pings) == 50
    assert not blocked.done()
    _, (command,) = await client.submit([{"resource": "later", "action": "go"}])
    cmd = await blocked
    assert cmd is not None
    assert cmd.id == command


async def test_real_pipelining_a_thousand_concurrent_requests(client: Client) -> None:
    package = await client.new()
    adds = [client.add(package, "bulk", "a", {"i": i}) for i in range(1000)]
    ids = await asyncio.gather(*adds)
    assert len(set(ids)) == 1000
    # Non-blocking replies come in request order, so the package kept the send order.
    assert await client.enqueue(package) == ids
    taken = await asyncio.gather(*(client.next("bulk", timeout=0) for _ in range(1000)))
    assert sorted(c.parameters["i"] for c in taken if c is not None) == list(range(1000))
    states = await asyncio.gather(*(client.complete(c.id, True) for c in taken if c))
    assert set(states) == {"succeeded"}
    done = await client.wait(package, timeout=5)
    assert done is not None
    assert done.counts["succeeded"] == 1000


async def test_real_many_tasks_many_verbs_one_connection(client: Client) -> None:
    async def producer(n: int) -> str:
        package, _ = await client.submit([{"resource": "mix", "action": f"a{n}"}])
        return package

    async def consumer() -> None:
        cmd = await client.next("mix", timeout=10)
        assert cmd is not None
        await client.complete(cmd.id, True)

    results = await asyncio.gather(
        *(consumer() for _ in range(100)), *(producer(n) for n in range(100))
    )
    packages = [p for p in results if p is not None]
    statuses = await asyncio.gather(*(client.wait(p, timeout=10) for p in packages))
    assert all(s is not None and s.state == "succeeded" for s in statuses)


async def test_real_announce_makes_add_check_the_schema(client: Client) -> None:
    schema = pytest.importorskip("spinbroker.schema")
    storage = schema.ResourceSchema(
        {"add_volume": schema.ActionSpec({"path": schema.Param(schema.Kind.STR)})}
    )
    await client.announce("checked", storage.to_wire())
    package = await client.new()
    await client.add(package, "checked", "add_volume", {"path": "test"})
    with pytest.raises(InvalidCommand, match="path"):
        await client.add(package, "checked", "add_volume", {})
    with pytest.raises(InvalidCommand, match="other"):
        await client.add(package, "checked", "add_volume", {"path": "x", "other": 1})
    with pytest.raises(InvalidCommand):
        await client.add(package, "checked", "remove_volume")
    with pytest.raises(BadRequest):
        await client.announce("checked", {"not": "a schema"})


async def test_real_stats(client: Client) -> None:
    await client.submit([{"resource": "st", "action": "a"}] * 2)
    stats = await client.stats()
    assert stats["resources"]["st"]["ready"] == 2
    assert stats["totals"]["ready"] >= 2
    assert stats["connections"] >= 1


async def test_real_server_going_away(short_dir: Path) -> None:
    async with real_broker(short_dir) as server:
        c = await Client.connect(server.socket_path)
        blocked = asyncio.create_task(c.next("nothing"))
        await c.ping()  # NEXT is now blocked in the broker
        await server.stop()
        with pytest.raises((ShuttingDown, ConnectionLost)) as caught:
            await blocked
        with pytest.raises(ConnectionLost):
            await c.ping()
        await c.wait_closed()
        await c.close()
    # protocol.md: blocked NEXT and WAIT get shutting_down.
    assert isinstance(caught.value, ShuttingDown), caught.value


async def test_real_connection_limit(short_dir: Path) -> None:
    limits = Limits(max_connections=1)
    async with (
        real_broker(short_dir, limits=limits) as server,
        await Client.connect(server.socket_path) as first,
    ):
        await first.ping()
        second = await Client.connect(server.socket_path)
        await second.wait_closed()  # refused: a text ERR line, then the broker hangs up
        with pytest.raises(ConnectionLost, match="limit_exceeded: too many connections"):
            await second.ping()
        await second.close()
        await first.ping()


async def test_complete_and_next_through_the_client(server: Any) -> None:
    from spinbroker.client import Client

    async with await Client.connect(f"unix:{server.socket_path}") as c:
        pkg, (a, b) = await c.submit(
            [{"resource": "cn", "action": "one"}, {"resource": "cn", "action": "two"}]
        )
        got = await c.next("cn")
        assert got is not None and got.id == a
        nxt = await c.complete_and_next(a, True, "cn", delivery=got.delivery)
        assert nxt is not None and nxt.id == b
        assert await c.complete_and_next(b, True, "cn", timeout=0) is None
        status = await c.wait(pkg, timeout=5)
        assert status is not None and status.state == "succeeded"


async def test_touch_of_a_connection_lease_returns_none(server: Any) -> None:
    from spinbroker.client import Client

    async with await Client.connect(f"unix:{server.socket_path}") as c:
        await c.submit([{"resource": "tc", "action": "x"}])
        got = await c.next("tc")
        assert got is not None
        assert await c.touch(got.id) is None
        leased = await c.status(got.id)
        assert leased.state == "leased"
