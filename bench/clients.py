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
  ack_then_take(handle, timeout)
                         acknowledge and take the next job, pipelined: both requests in one
                         write, so a cycle costs one round trip on every system. The
                         acknowledgement's reply is read when it comes (spinbroker may answer
                         the take first: its acknowledgement waits for an fsync, its take
                         does not); `settle()` waits for the ones still due
  ping()                 the cheapest harmless round trip (spinbroker PING, beanstalkd
                         list-tube-used, Redis PING): the stall probe, and the one request
                         each idle connection makes so that the server sets it up

`acked_at` is the time the last acknowledgement's reply was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
import time
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
        self.acked_at = 0

    async def put(self, data: bytes) -> None:
        await self.put_batch([data])  # type: ignore[attr-defined]

    async def settle(self) -> None:
        """Wait for the replies of pipelined acknowledgements (in-order protocols have
        read them already)."""

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
        #: Pipelined requests whose reply has not been read yet (COMPLETEs sent with a
        #: NEXT, a batch of SUBMITs).
        self.unacked: set[int] = set()

    def frame(self, verb: str, args: dict[str, Any]) -> bytes:
        self.ids += 1
        return bytes(self.packer.pack([self.ids, verb, args]))

    async def reply_to(self, rid: int | None) -> Any:
        """The body of the reply to request `rid` (None: until none is unacked). Replies
        to the unacked requests read meanwhile are checked off; an error raises."""
        while rid is not None or self.unacked:
            for got, kind, body in self.unpacker:
                if kind == "error":
                    raise RuntimeError(f"spinbroker error: {body}")
                if got == rid:
                    return body
                if got not in self.unacked:
                    raise RuntimeError(f"spinbroker: a reply to no request: {got}")
                self.unacked.discard(got)
                self.acked_at = time.perf_counter_ns()
                if rid is None and not self.unacked:
                    return None
            data = await self.r.read(1 << 16)
            if not data:
                raise ConnectionError("spinbroker closed the connection")
            self.unpacker.feed(data)
        return None

    async def request(self, verb: str, args: dict[str, Any] | None = None) -> Any:
        self.w.write(self.frame(verb, args or {}))
        return await self.reply_to(self.ids)

    @staticmethod
    def command(data: bytes, resource: str = QUEUE, deps: list[int] | None = None) -> Any:
        cmd = {"resource": resource, "action": "run", "parameters": {"data": data}}
        return cmd if deps is None else cmd | {"dependencies": deps}

    async def put_batch(self, datas: list[bytes]) -> None:
        first = self.ids + 1
        frames = [self.frame("SUBMIT", {"commands": [self.command(d)]}) for d in datas]
        self.unacked.update(range(first, self.ids + 1))
        self.w.write(b"".join(frames))
        await self.reply_to(None)

    async def put_package(self, datas: list[bytes]) -> None:
        await self.request("SUBMIT", {"commands": [self.command(d) for d in datas]})

    async def take(self, timeout: float, resource: str = QUEUE) -> tuple[Any, bytes] | None:
        cmd = await self.request("NEXT", {"resource": resource, "timeout": timeout})
        return None if cmd is None else (cmd["id"], cmd["parameters"]["data"])

    async def ack(self, handle: Any) -> None:
        await self.request("COMPLETE", {"command": handle, "success": True})
        self.acked_at = time.perf_counter_ns()

    async def ack_then_take(
        self, handle: Any, timeout: float, resource: str = QUEUE
    ) -> tuple[Any, bytes] | None:
        complete = self.frame("COMPLETE", {"command": handle, "success": True})
        self.unacked.add(self.ids)
        self.w.write(complete + self.frame("NEXT", {"resource": resource, "timeout": timeout}))
        cmd = await self.reply_to(self.ids)
        return None if cmd is None else (cmd["id"], cmd["parameters"]["data"])

    async def settle(self) -> None:
        await self.reply_to(None)

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

    @staticmethod
    def reserve(timeout: float) -> bytes:
        return b"reserve-with-timeout %d\r\n" % math.ceil(timeout)

    async def take(self, timeout: float) -> tuple[Any, bytes] | None:
        self.w.write(self.reserve(timeout))
        return await self.taken()

    async def taken(self) -> tuple[Any, bytes] | None:
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
        self.acked_at = time.perf_counter_ns()

    async def ack_then_take(self, handle: Any, timeout: float) -> tuple[Any, bytes] | None:
        self.w.write(b"delete %b\r\n%b" % (handle, self.reserve(timeout)))
        await self.expect(b"DELETED")
        self.acked_at = time.perf_counter_ns()
        return await self.taken()

    async def ping(self) -> None:
        """beanstalkd has no PING: `list-tube-used` reads the connection's own state only."""
        self.w.write(b"list-tube-used\r\n")
        await self.expect(b"USING")


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

    def blmove(self, timeout: float) -> bytes:
        return resp(b"BLMOVE", QUEUE.encode(), self.processing, b"LEFT", b"RIGHT", b"%g" % timeout)

    def lrem(self, handle: bytes) -> bytes:
        return resp(b"LREM", self.processing, b"-1", handle)

    async def take(self, timeout: float) -> tuple[Any, bytes] | None:
        self.w.write(self.blmove(timeout))
        data = await self.reply()
        return None if data is None else (data, data)  # type: ignore[return-value]

    async def ack(self, handle: Any) -> None:
        self.w.write(self.lrem(handle))
        await self.reply()
        self.acked_at = time.perf_counter_ns()

    async def ack_then_take(self, handle: Any, timeout: float) -> tuple[Any, bytes] | None:
        self.w.write(self.lrem(handle) + self.blmove(timeout))
        await self.reply()
        self.acked_at = time.perf_counter_ns()
        data = await self.reply()
        return None if data is None else (data, data)  # type: ignore[return-value]

    async def ping(self) -> None:
        self.w.write(resp(b"PING"))
        if (got := await self.reply()) != b"PONG":
            raise RuntimeError(f"redis: PING answered {got!r}")


CONNS: dict[str, type[Conn]] = {
    "spinbroker": SpinConn,
    "beanstalkd": BeanstalkConn,
    "redis": RespConn,
}


async def connect(system: str, addr: str | tuple[str, int]) -> Any:
    return CONNS[system](*await open_stream(addr))
