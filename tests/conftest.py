"""Shared fixtures: a real broker server on a Unix socket and TCP, in the test's event loop,
and small raw clients that speak the two wire modes byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from spinbroker.config import Limits, ServerConfig
from spinbroker.server import Server


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
