"""Lean raw asyncio clients, one per protocol, all built the same way.

Each connection is an asyncio stream pair; a request is encoded to bytes and written
without awaiting drain, and the caller then reads exactly the replies it expects. No
reader task, no futures: the same shape for the three protocols, so the comparison
isolates the servers. Every connection offers:

  put(payload)           one job in one request, await its reply
  put_batch(payloads)    pipelined: one write of len(payloads) requests, then every reply
  put_package(payloads)  one atomic request holding every payload (if supports_package)
  take(timeout)          blocking take: (handle, payload) or None on timeout
  ack(handle)            acknowledge a taken job
  ping()                 the cheapest round trip (spinbroker only: the stall probe)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from typing import Any

import msgpack

QUEUE = "bench"
PAYLOAD_BYTES = 100
_HEAD = struct.Struct("<qq")  # sequence number, send time (ns, CLOCK_MONOTONIC)


def payload(seq: int, sent_ns: int = 0) -> bytes:
    return _HEAD.pack(seq, sent_ns).ljust(PAYLOAD_BYTES, b"x")


def sent_ns(data: bytes) -> int:
    return int(_HEAD.unpack_from(data)[1])


async def open_stream(addr: str | tuple[str, int]) -> tuple[Any, Any]:
    if isinstance(addr, str):
        return await asyncio.open_unix_connection(addr)
    return await asyncio.open_connection(*addr)


class Conn:
    """The shared part; subclasses add put_batch, take, ack, ping (and put_package)."""

    supports_package = False

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    async def put(self, data: bytes) -> None:
        await self.put_batch([data])  # type: ignore[attr-defined]

    async def close(self) -> None:
        self.w.close()
        with contextlib.suppress(OSError):
            await self.w.wait_closed()


class SpinConn(Conn):
    """spinbroker msgpack mode: [id, verb, args] -> [id, kind, body]."""

    supports_package = True

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.packer = msgpack.Packer()
        self.unpacker = msgpack.Unpacker(raw=False)
        self.ids = 0

    def frame(self, verb: str, args: dict[str, Any]) -> bytes:
        self.ids += 1
        return bytes(self.packer.pack([self.ids, verb, args]))

    async def replies(self, k: int) -> list[Any]:
        """The next k reply bodies (None for `empty`); an `error` reply raises."""
        out: list[Any] = []
        while True:
            for _id, kind, body in self.unpacker:
                if kind == "error":
                    raise RuntimeError(f"spinbroker error: {body}")
                out.append(body)
            if len(out) >= k:
                return out
            data = await self.r.read(1 << 16)
            if not data:
                raise ConnectionError("spinbroker closed the connection")
            self.unpacker.feed(data)

    async def request(self, verb: str, args: dict[str, Any] | None = None) -> Any:
        self.w.write(self.frame(verb, args or {}))
        return (await self.replies(1))[0]

    @staticmethod
    def command(data: bytes, resource: str = QUEUE, deps: list[int] | None = None) -> Any:
        cmd = {"resource": resource, "action": "run", "parameters": {"data": data}}
        return cmd if deps is None else cmd | {"dependencies": deps}

    async def put_batch(self, datas: list[bytes]) -> None:
        frames = [self.frame("SUBMIT", {"commands": [self.command(d)]}) for d in datas]
        self.w.write(b"".join(frames))
        await self.replies(len(datas))

    async def put_package(self, datas: list[bytes]) -> None:
        await self.request("SUBMIT", {"commands": [self.command(d) for d in datas]})

    async def take(self, timeout: float, resource: str = QUEUE) -> tuple[Any, bytes] | None:
        cmd = await self.request("NEXT", {"resource": resource, "timeout": timeout})
        return None if cmd is None else (cmd["id"], cmd["parameters"]["data"])

    async def ack(self, handle: Any) -> None:
        await self.request("COMPLETE", {"command": handle, "success": True})

    async def ack_take(
        self, handle: Any, timeout: float, resource: str = QUEUE
    ) -> tuple[Any, bytes] | None:
        """COMPLETE + NEXT in one round trip (COMPLETE with `next`)."""
        nxt = {"resource": resource, "timeout": timeout}
        cmd = await self.request("COMPLETE", {"command": handle, "success": True, "next": nxt})
        return None if cmd is None else (cmd["id"], cmd["parameters"]["data"])

    async def ping(self) -> None:
        await self.request("PING")


class BeanstalkConn(Conn):
    """beanstalkd text protocol: put / reserve-with-timeout / delete."""

    async def expect(self, prefix: bytes) -> bytes:
        line = await self.r.readline()
        if not line.startswith(prefix):
            raise RuntimeError(f"beanstalkd: expected {prefix!r}, got {line!r}")
        return line

    async def put_batch(self, datas: list[bytes]) -> None:
        self.w.write(b"".join(b"put 0 0 60 %d\r\n%b\r\n" % (len(d), d) for d in datas))
        for _ in datas:
            await self.expect(b"INSERTED")

    async def take(self, timeout: float) -> tuple[Any, bytes] | None:
        self.w.write(b"reserve-with-timeout %d\r\n" % math.ceil(timeout))
        line = await self.r.readline()
        if line.startswith(b"TIMED_OUT"):
            return None
        if not line.startswith(b"RESERVED"):
            raise RuntimeError(f"beanstalkd: reserve got {line!r}")
        _, job, size = line.split()
        return job, (await self.r.readexactly(int(size) + 2))[:-2]

    async def ack(self, handle: Any) -> None:
        self.w.write(b"delete %b\r\n" % handle)
        await self.expect(b"DELETED")


def resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts)


class RespConn(Conn):
    """Redis RESP2 as a reliable queue: RPUSH / BLMOVE to a per-connection list / LREM."""

    supports_package = True

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.processing = b"%b:processing:%d" % (QUEUE.encode(), id(self))

    async def reply(self) -> bytes | int | None:
        line = await self.r.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else (await self.r.readexactly(size + 2))[:-2]
        if kind == b"*" and int(rest) < 0:
            return None
        raise RuntimeError(f"redis: unexpected reply {line!r}")

    async def put_batch(self, datas: list[bytes]) -> None:
        self.w.write(b"".join(resp(b"RPUSH", QUEUE.encode(), d) for d in datas))
        for _ in datas:
            await self.reply()

    async def put_package(self, datas: list[bytes]) -> None:
        self.w.write(resp(b"RPUSH", QUEUE.encode(), *datas))
        await self.reply()

    async def take(self, timeout: float) -> tuple[Any, bytes] | None:
        args = (QUEUE.encode(), self.processing, b"LEFT", b"RIGHT", b"%g" % timeout)
        self.w.write(resp(b"BLMOVE", *args))
        data = await self.reply()
        return None if data is None else (data, data)  # type: ignore[return-value]

    async def ack(self, handle: Any) -> None:
        self.w.write(resp(b"LREM", self.processing, b"-1", handle))
        await self.reply()


CONNS: dict[str, type[Conn]] = {
    "spinbroker": SpinConn,
    "beanstalkd": BeanstalkConn,
    "redis": RespConn,
}


async def connect(system: str, addr: str | tuple[str, int]) -> Any:
    return CONNS[system](*await open_stream(addr))
