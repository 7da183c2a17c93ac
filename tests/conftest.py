"""Shared fixtures: a real broker server on a Unix socket and TCP, in the test's event loop,
and small raw clients that speak the two wire modes byte for byte; `as_newer_version`, a log
file as a newer spinbroker would write it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from crc32c import crc32c

from spinbroker.config import Limits, ServerConfig
from spinbroker.server import Server
from spinbroker.wal import frame, snapshot


def as_newer_version(data: bytes, version: int = 2) -> bytes:
    """`data`, a segment or snapshot file of this version, as a newer spinbroker could have
    written it: the version in its magic raised, and the header checksum made over that
    magic, as a writer of that version would (a version raised alone, with this version's
    checksum still fitting, is a damaged file of this version)."""
    if data.startswith(frame.SEGMENT_MAGIC_PREFIX):
        magic = frame.SEGMENT_MAGIC_PREFIX + version.to_bytes(2, "big")
        checked = frame.SEGMENT_HEADER_SIZE - 8  # magic and first LSN, then the crc
    else:
        assert data.startswith(snapshot.MAGIC_PREFIX)
        magic = snapshot.MAGIC_PREFIX + bytes((version,))
        checked = snapshot.HEADER_SIZE - 4  # magic, LSN, length, body crc, then the crc
    head = magic + data[len(magic) : checked]
    return head + crc32c(head).to_bytes(4, "little") + data[checked + 4 :]


class _Stream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class TextClient(_Stream):
    """A person with nc: writes lines, reads reply lines."""

    async def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode() + b"\n"
        self.writer.write(data)
        await self.writer.drain()

    async def line(self, timeout: float = 5.0) -> str:
        raw = await asyncio.wait_for(self.reader.readline(), timeout)
        assert raw.endswith(b"\n"), f"connection closed, got {raw!r}"
        return raw.decode().rstrip("\n")

    async def say(self, line: str) -> str:
        await self.send(line)
        return await self.line()

    async def ok(self, line: str) -> str:
        """Send a line, expect `OK <value>`, return the value."""
        reply = await self.say(line)
        assert reply.startswith("OK"), f"{line!r} -> {reply!r}"
        return reply[3:]

    async def ok_json(self, line: str) -> Any:
        return json.loads(await self.ok(line))


class RawMsgpack(_Stream):
    """A msgpack-mode client with no library help: frames out, replies in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.next_id = 0

    def send(self, verb: str, args: dict[str, Any] | None = None) -> int:
        self.next_id += 1
        frame: list[Any] = [self.next_id, verb] if args is None else [self.next_id, verb, args]
        self.writer.write(msgpack.packb(frame, use_bin_type=True))
        return self.next_id

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def reply(self, timeout: float = 5.0) -> list[Any]:
        while True:
            for msg in self.unpacker:
                assert isinstance(msg, list)
                return msg
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise ConnectionError("closed")
            self.unpacker.feed(data)

    async def call(self, verb: str, args: dict[str, Any] | None = None) -> list[Any]:
        req_id = self.send(verb, args)
        msg = await self.reply()
        assert msg[0] == req_id, msg
        return msg

    async def ok(self, verb: str, args: dict[str, Any] | None = None) -> Any:
        msg = await self.call(verb, args)
        assert msg[1] == "ok", msg
        return msg[2]

    async def closed(self, timeout: float = 5.0) -> bool:
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        return data == b""


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """The broker runs on uvloop in production; the tests run on it too."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def make_server(tmp_path: Path) -> Callable[..., Any]:
    servers: list[Server] = []

    async def start(limits: Limits | None = None, **kw: Any) -> Server:
        config = ServerConfig(
            data_dir=tmp_path / f"data{len(servers)}",
            tcp=("127.0.0.1", 0),
            limits=limits or Limits(),
            **kw,
        )
        server = Server(config)
        await server.start()
        servers.append(server)
        return server

    start.servers = servers  # type: ignore[attr-defined]
    return start


@pytest.fixture
async def server(make_server: Callable[..., Any]) -> AsyncIterator[Server]:
    srv: Server = await make_server()
    yield srv
    await srv.stop()


async def open_stream(
    server: Server, tcp: bool
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if tcp:
        assert server.tcp_port is not None
        return await asyncio.open_connection("127.0.0.1", server.tcp_port)
    return await asyncio.open_unix_connection(str(server.socket_path))


@pytest.fixture
def text(server: Server) -> Callable[..., Any]:
    async def connect(tcp: bool = False) -> TextClient:
        return TextClient(*await open_stream(server, tcp))

    return connect


@pytest.fixture
def raw(server: Server) -> Callable[..., Any]:
    async def connect(tcp: bool = False) -> RawMsgpack:
        return RawMsgpack(*await open_stream(server, tcp))

    return connect
