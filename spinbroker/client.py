"""The asyncio client: msgpack mode over a Unix socket or TCP.

One `Client` is one connection. It is safe to share between tasks: every request gets its
own id, replies are routed back to their caller by id by one protocol object, so any number
of requests may be in flight at once (pipelining), and a blocked NEXT never holds up the
replies to later requests. When the connection drops, every request in flight fails with
`ConnectionLost`, and so does every later one: a client is never reconnected behind its
user's back, because a connection lease dies with the connection.

Errors the broker answers become one exception type per protocol error code (`NotFound`,
`NotLeased`, ...), all subclasses of `ClientError`. `ConnectionLost` is not a broker answer
but a transport failure, so it is a `ConnectionError` instead.

This module knows the wire shapes of protocol.md and nothing of the broker's insides.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, TypeAlias, cast

import msgpack

from spinbroker.errors import BrokerError, ErrorCode

log = logging.getLogger(__name__)

__all__ = [
    "ERROR_TYPES",
    "Address",
    "AlreadyCompleted",
    "BadRequest",
    "Client",
    "ClientError",
    "CommandStatus",
    "ConnectionLost",
    "DeliveredCommand",
    "EmptyPackage",
    "InternalError",
    "InvalidCommand",
    "LimitExceeded",
    "Malformed",
    "NotFound",
    "NotLeased",
    "NotOpen",
    "PackageStatus",
    "ShuttingDown",
    "StaleDelivery",
    "StorageFailed",
    "TooLarge",
    "UnknownDependency",
    "UnknownVerb",
    "error_from_wire",
    "format_address",
    "parse_address",
    "status_from_wire",
    "to_json_value",
]

# --------------------------------------------------------------------------- addresses

Address: TypeAlias = tuple[Literal["unix"], str] | tuple[Literal["tcp"], str, int]

_ADDRESS_HELP = "expected 'unix:/path', a path containing '/', or 'host:port'"


def parse_address(addr: str) -> Address:
    """`unix:/path` or a path containing `/` is a Unix socket; `host:port` is TCP.

    Returns `("unix", path)` or `("tcp", host, port)`. IPv6 hosts go in brackets:
    `[::1]:7878`; `:PORT` is `127.0.0.1:PORT`. Raises ValueError with the accepted forms
    otherwise.
    """
    if addr.startswith("unix:"):
        path = addr[len("unix:") :]
        if not path:
            raise ValueError(f"address {addr!r}: empty socket path; {_ADDRESS_HELP}")
        return ("unix", path)
    if "/" in addr:
        return ("unix", addr)
    host, sep, port_text = addr.rpartition(":")
    if not sep:
        raise ValueError(f"address {addr!r}: {_ADDRESS_HELP}")
    if not host:
        host = "127.0.0.1"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"address {addr!r}: put an IPv6 host in brackets, e.g. '[::1]:7878'")
    if not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"address {addr!r}: port must be a number from 0 to 65535")
    return ("tcp", host, int(port_text))


def format_address(address: Address) -> str:
    if address[0] == "unix":
        return f"unix:{address[1]}"
    host = f"[{address[1]}]" if ":" in address[1] else address[1]
    return f"{host}:{address[2]}"


# --------------------------------------------------------------------------- errors


class ClientError(BrokerError):
    """A request the broker refused; one subclass per protocol error code."""


class _CodedError(ClientError):
    CODE: ClassVar[ErrorCode]

    def __init__(self, message: str) -> None:
        super().__init__(self.CODE, message)


class BadRequest(_CodedError):
    CODE = ErrorCode.BAD_REQUEST


class UnknownVerb(_CodedError):
    CODE = ErrorCode.UNKNOWN_VERB


class Malformed(_CodedError):
    CODE = ErrorCode.MALFORMED


class TooLarge(_CodedError):
    CODE = ErrorCode.TOO_LARGE


class LimitExceeded(_CodedError):
    CODE = ErrorCode.LIMIT_EXCEEDED


class NotFound(_CodedError):
    CODE = ErrorCode.NOT_FOUND


class UnknownDependency(_CodedError):
    CODE = ErrorCode.UNKNOWN_DEPENDENCY


class NotOpen(_CodedError):
    CODE = ErrorCode.NOT_OPEN


class EmptyPackage(_CodedError):
    CODE = ErrorCode.EMPTY_PACKAGE


class NotLeased(_CodedError):
    CODE = ErrorCode.NOT_LEASED


class AlreadyCompleted(_CodedError):
    CODE = ErrorCode.ALREADY_COMPLETED


class StaleDelivery(_CodedError):
    CODE = ErrorCode.STALE_DELIVERY


class InvalidCommand(_CodedError):
    CODE = ErrorCode.INVALID_COMMAND


class ShuttingDown(_CodedError):
    CODE = ErrorCode.SHUTTING_DOWN


class StorageFailed(_CodedError):
    CODE = ErrorCode.STORAGE_FAILED


class InternalError(_CodedError):
    CODE = ErrorCode.INTERNAL


ERROR_TYPES: Final[Mapping[ErrorCode, type[_CodedError]]] = {
    cls.CODE: cls for cls in _CodedError.__subclasses__()
}


class ConnectionLost(ConnectionError):
    """The connection is gone: every request in flight, and every later one, fails with it."""


def error_from_wire(body: Any) -> ClientError:
    """The exception for an `error` reply body `{"code": str, "message": str}`."""
    if not isinstance(body, Mapping):
        return InternalError(f"error reply with a malformed body: {body!r}")
    code, message = str(body.get("code")), str(body.get("message", ""))
    try:
        return ERROR_TYPES[ErrorCode(code)](message)
    except ValueError:
        return ClientError(ErrorCode.INTERNAL, f"unknown error code {code!r}: {message}")


# --------------------------------------------------------------------------- results


def to_json_value(value: Any) -> Any:
    """`value` made fit for `json.dumps`: bytes become base64 text, tuples lists."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Mapping):
        return {
            k if isinstance(k, str) else str(to_json_value(k)): to_json_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    return value


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _malformed(what: str, body: Any, exc: Exception) -> ValueError:
    return ValueError(f"not a {what}: {body!r} ({type(exc).__name__}: {exc})")


@dataclass(slots=True, frozen=True)
class DeliveredCommand:
    """A command returned by NEXT, leased to its taker."""

    id: str
    package: str
    resource: str
    action: str
    parameters: dict[str, Any]
    dependencies: tuple[str, ...]
    delivery: int
    #: Seconds of a ttr lease; None when the lease belongs to the connection.
    ttr: float | None

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> DeliveredCommand:
        try:
            ttr = body.get("ttr")
            return cls(
                id=str(body["id"]),
                package=str(body["package"]),
                resource=str(body["resource"]),
                action=str(body["action"]),
                parameters=dict(body.get("parameters") or {}),
                dependencies=tuple(str(d) for d in body.get("dependencies") or ()),
                delivery=int(body["delivery"]),
                ttr=None if ttr is None else float(ttr),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _malformed("delivered command", body, exc) from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "package": self.package,
            "resource": self.resource,
            "action": self.action,
            "parameters": to_json_value(self.parameters),
            "dependencies": list(self.dependencies),
            "delivery": self.delivery,
            "ttr": self.ttr,
        }


_FINISHED_COMMAND_STATES: Final = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(slots=True, frozen=True)
class CommandStatus:
    """STATUS of one command."""

    id: str
    package: str
    resource: str
    action: str
    state: str
    reason: str | None
    delivery: int

    @property
    def finished(self) -> bool:
        return self.state in _FINISHED_COMMAND_STATES

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> CommandStatus:
        try:
            return cls(
                id=str(body["id"]),
                package=str(body["package"]),
                resource=str(body["resource"]),
                action=str(body["action"]),
                state=str(body["state"]),
                reason=_optional_str(body.get("reason")),
                delivery=int(body.get("delivery") or 0),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _malformed("command status", body, exc) from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "command",
            "id": self.id,
            "package": self.package,
            "resource": self.resource,
            "action": self.action,
            "state": self.state,
            "finished": self.finished,
            "reason": self.reason,
            "delivery": self.delivery,
        }


@dataclass(slots=True, frozen=True)
class PackageStatus:
    """STATUS (or WAIT) of a package; `commands` only when asked for."""

    id: str
    state: str
    finished: bool
    causer: str | None
    reason: str | None
    counts: dict[str, int]
    commands: tuple[CommandStatus, ...] | None = None

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> PackageStatus:
        try:
            commands = body.get("commands")
            return cls(
                id=str(body["id"]),
                state=str(body["state"]),
                finished=bool(body["finished"]),
                causer=_optional_str(body.get("causer")),
                reason=_optional_str(body.get("reason")),
                counts={str(k): int(v) for k, v in (body.get("counts") or {}).items()},
                commands=None
                if commands is None
                else tuple(CommandStatus.from_wire(c) for c in commands),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _malformed("package status", body, exc) from exc

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "package",
            "id": self.id,
            "state": self.state,
            "finished": self.finished,
            "causer": self.causer,
            "reason": self.reason,
            "counts": dict(self.counts),
        }
        if self.commands is not None:
            out["commands"] = [c.to_json() for c in self.commands]
        return out


def status_from_wire(body: Mapping[str, Any]) -> PackageStatus | CommandStatus:
    if body.get("kind") == "command":
        return CommandStatus.from_wire(body)
    return PackageStatus.from_wire(body)


# --------------------------------------------------------------------------- connection

_Reply: TypeAlias = tuple[str, Any]
#: More than any refusal line the broker sends before it hangs up (server.py, admit).
_REFUSAL_MAX = 4096


class _Protocol(asyncio.Protocol):
    """Frames requests out and routes replies back to their waiting futures by id."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._packer = msgpack.Packer(use_bin_type=True)
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[_Reply]] = {}
        self._transport: asyncio.Transport | None = None
        self._lost: str | None = None
        #: An error the broker sent without an id (malformed / too_large): why it then hung up.
        self._last_unrouted_error: str | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._replied = False

    # ----- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._replied and data.startswith(b"ERR "):
            # Refused before the broker knew our mode (too many connections, stopping):
            # it answers with a text line and hangs up.
            self._refused(data)
            return
        self._replied = True
        self._unpacker.feed(data)
        try:
            for reply in self._unpacker:
                self._route(reply)
        except (ValueError, msgpack.UnpackException) as exc:
            self._abort(f"the broker sent bytes that are not valid msgpack ({exc})")

    def eof_received(self) -> bool:
        return False  # close our side too: the broker will not read what we send

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost is None and exc is not None and not self._replied:
            # A broker over its connection limit writes its refusal and hangs up at once; a
            # request written after that fails (EPIPE) and ends the connection before the
            # loop has read the refusal, which still waits in the socket: report it.
            refusal = self._unread_refusal()
            if refusal is not None:
                self._lost = self._refusal(refusal)
        if self._lost is None:
            reason = "the broker closed the connection"
            if exc is not None:
                reason = f"connection lost: {exc}"
            if self._last_unrouted_error is not None:
                reason = f"{reason} after: {self._last_unrouted_error}"
            self._lost = reason
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(self._lost))
        self._wake_writers()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writers()

    # ----- requests

    async def request(self, verb: str, args: Mapping[str, Any] | None) -> _Reply:
        if self._lost is not None:
            raise ConnectionLost(self._lost)
        assert self._transport is not None
        rid = next(self._ids)
        frame = self._packer.pack([rid, verb, {} if args is None else args])
        fut: asyncio.Future[_Reply] = self._loop.create_future()
        self._pending[rid] = fut
        self._transport.write(frame)
        try:
            if self._paused:
                await self._drain()
            return await fut
        except asyncio.CancelledError:
            # A late reply finds no future and is dropped (see _unrouted).
            self._pending.pop(rid, None)
            raise

    def close(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    @property
    def is_closed(self) -> bool:
        return self._lost is not None

    # ----- internals

    def _route(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) != 3:
            log.warning("ignoring a reply not shaped [id, kind, body]: %r", reply)
            return
        rid, kind, body = reply
        fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if fut is None:
            self._unrouted(rid, kind, body)
        elif fut.done():
            pass  # its caller was cancelled
        elif kind == "error":
            fut.set_exception(error_from_wire(body))
        else:
            fut.set_result((kind, body))

    def _unrouted(self, rid: Any, kind: Any, body: Any) -> None:
        if kind == "error":
            error = error_from_wire(body)
            self._last_unrouted_error = str(error)
            log.warning("broker error for request id %r: %s", rid, error)
        elif kind == "ok" and isinstance(body, Mapping) and "delivery" in body:
            # A NEXT whose caller gave up before the broker answered: the command stays
            # leased to this connection (or until its ttr) and is then delivered again.
            log.warning(
                "dropped command %s delivered to a cancelled NEXT; it is redelivered when "
                "this connection closes or its ttr runs out",
                body.get("id"),
            )
        else:
            log.debug("dropped reply %r for a request no longer waiting", rid)

    def _refused(self, data: bytes) -> None:
        self._abort(self._refusal(data))

    @staticmethod
    def _refusal(data: bytes) -> str:
        code, _, message = data.partition(b"\n")[0][4:].decode("ascii", "replace").partition(" ")
        error = error_from_wire({"code": code, "message": message.strip()})
        return f"the broker refused the connection: {error}"

    def _unread_refusal(self) -> bytes | None:
        """The `ERR ...` line still unread in the socket, if there is one.

        Called from connection_lost, before the transport closes its socket (asyncio and
        uvloop both close it after the callback). Reads from a duplicate of the descriptor
        with MSG_DONTWAIT, so it never blocks and never touches the transport's object.
        """
        sock = None if self._transport is None else self._transport.get_extra_info("socket")
        try:
            fd = -1 if sock is None else sock.fileno()
            if fd < 0:
                return None
            with socket.socket(fileno=os.dup(fd)) as dup:
                data = dup.recv(_REFUSAL_MAX, socket.MSG_DONTWAIT)
        except OSError:  # nothing buffered (EAGAIN), reset, or already closed
            return None
        return data if data.startswith(b"ERR ") else None

    def _abort(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
        if self._transport is not None:
            self._transport.abort()

    async def _drain(self) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _wake_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _put(args: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        args[key] = value


def _command_spec(command: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in command.items() if v is not None}


class Client:
    """One msgpack-mode connection to a broker; share it freely between tasks."""

    __slots__ = ("_protocol", "address")

    def __init__(self, protocol: _Protocol, address: Address) -> None:
        self._protocol = protocol
        self.address = address

    @classmethod
    async def connect(cls, addr: str | os.PathLike[str], *, timeout: float = 10.0) -> Client:
        """Connect to `unix:/path`, a socket path, or `host:port` (see `parse_address`)."""
        address = parse_address(addr) if isinstance(addr, str) else ("unix", os.fspath(addr))
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            if address[0] == "unix":
                _, protocol = await loop.create_unix_connection(_Protocol, address[1])
            else:
                _, protocol = await loop.create_connection(_Protocol, address[1], address[2])
        return cls(protocol, address)

    async def close(self) -> None:
        """Close the connection; requests still in flight fail with ConnectionLost."""
        self._protocol.close("the connection was closed by the client")
        await self._protocol.wait_closed()

    async def wait_closed(self) -> None:
        """Return once the connection is gone, whoever closed it."""
        await self._protocol.wait_closed()

    @property
    def is_closed(self) -> bool:
        return self._protocol.is_closed

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Client {format_address(self.address)}{' closed' if self.is_closed else ''}>"

    # ----- the protocol, verb by verb

    async def request(self, verb: str, args: Mapping[str, Any] | None = None) -> tuple[str, Any]:
        """Send one request; return `("ok" | "empty", body)` or raise its ClientError."""
        kind, body = await self._protocol.request(verb, args)
        if kind not in ("ok", "empty"):
            raise InternalError(f"{verb}: reply of unknown kind {kind!r}")
        return kind, body

    async def _ok(self, verb: str, args: Mapping[str, Any] | None = None) -> Any:
        kind, body = await self.request(verb, args)
        if kind != "ok":
            raise InternalError(f"{verb}: unexpected {kind!r} reply")
        return body

    async def hello(self) -> dict[str, Any]:
        return dict(await self._ok("HELLO"))

    async def ping(self) -> None:
        body = await self._ok("PING")
        if body != "pong":
            raise InternalError(f"PING answered {body!r}")

    async def new(self) -> str:
        return str((await self._ok("NEW"))["package"])

    async def add(
        self,
        package: str,
        resource: str,
        action: str,
        parameters: Mapping[str, Any] | None = None,
        dependencies: list[str] | tuple[str, ...] | None = None,
    ) -> str:
        args: dict[str, Any] = {"package": package, "resource": resource, "action": action}
        _put(args, "parameters", parameters)
        _put(args, "dependencies", None if dependencies is None else list(dependencies))
        return str((await self._ok("ADD", args))["command"])

    async def add_many(self, package: str, commands: Sequence[Mapping[str, Any]]) -> list[str]:
        """ADD several commands at once, all or nothing."""
        args = {"package": package, "commands": [_command_spec(c) for c in commands]}
        return [str(c) for c in (await self._ok("ADD", args))["commands"]]

    async def enqueue(self, package: str) -> list[str]:
        return [str(c) for c in (await self._ok("ENQUEUE", {"package": package}))["commands"]]

    async def submit(self, commands: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
        """NEW + ADD + ENQUEUE in one request; a dependency may be an int (earlier position)."""
        body = await self._ok("SUBMIT", {"commands": [_command_spec(c) for c in commands]})
        return str(body["package"]), [str(c) for c in body["commands"]]

    async def status(self, id: str, commands: bool = False) -> PackageStatus | CommandStatus:
        args: dict[str, Any] = {"id": id}
        if commands:
            args["commands"] = True
        return status_from_wire(await self._ok("STATUS", args))

    async def wait(self, package: str, timeout: float | None = None) -> PackageStatus | None:
        """The package's status once it is finished; None if `timeout` ran out first."""
        args: dict[str, Any] = {"package": package}
        _put(args, "timeout", timeout)
        kind, body = await self.request("WAIT", args)
        return None if kind == "empty" else PackageStatus.from_wire(body)

    async def next(
        self, resource: str, timeout: float | None = None, ttr: float | None = None
    ) -> DeliveredCommand | None:
        """Take the next ready command; None if `timeout` ran out first.

        Without `ttr` the lease belongs to this connection. Prefer `timeout` to cancelling
        the call: the broker may deliver to a NEXT whose caller is gone, and that command
        then stays leased until the connection closes or the ttr runs out.
        """
        kind, body = await self.request("NEXT", _next_args(resource, timeout, ttr))
        return None if kind == "empty" else DeliveredCommand.from_wire(body)

    async def touch(
        self, command: str, ttr: float | None = None, delivery: int | None = None
    ) -> float | None:
        """Extend a lease; returns its ttr in seconds (None: a connection lease, which
        TOUCH only checks is still held)."""
        args: dict[str, Any] = {"command": command}
        _put(args, "ttr", ttr)
        _put(args, "delivery", delivery)
        in_force = (await self._ok("TOUCH", args))["ttr"]
        return None if in_force is None else float(in_force)

    async def complete(
        self,
        command: str,
        success: bool,
        reason: str | None = None,
        delivery: int | None = None,
    ) -> str:
        """Finish a leased command; returns its new state, "succeeded" or "failed"."""
        args: dict[str, Any] = {"command": command, "success": bool(success)}
        _put(args, "reason", reason)
        _put(args, "delivery", delivery)
        return str((await self._ok("COMPLETE", args))["state"])

    async def complete_and_next(
        self,
        command: str,
        success: bool,
        resource: str,
        *,
        reason: str | None = None,
        delivery: int | None = None,
        timeout: float | None = None,
        ttr: float | None = None,
    ) -> DeliveredCommand | None:
        """COMPLETE `command`, then take the next command of `resource`, in one round trip.
        Returns what NEXT would (None on timeout); the completion is durable by then."""
        args: dict[str, Any] = {"command": command, "success": bool(success)}
        _put(args, "reason", reason)
        _put(args, "delivery", delivery)
        args["next"] = _next_args(resource, timeout, ttr)
        kind, body = await self.request("COMPLETE", args)
        return None if kind == "empty" else DeliveredCommand.from_wire(body)

    async def cancel(self, package: str) -> int:
        """Cancel what has not been delivered yet; returns how many commands it cancelled."""
        return int((await self._ok("CANCEL", {"package": package}))["cancelled"])

    async def stats(self) -> dict[str, Any]:
        return dict(await self._ok("STATS"))

    async def announce(self, resource: str, schema: Mapping[str, Any]) -> None:
        """Declare the schema commands for `resource` must fit (an agent does this)."""
        await self._ok("ANNOUNCE", {"resource": resource, "schema": schema})


def _next_args(resource: str, timeout: float | None, ttr: float | None) -> dict[str, Any]:
    args: dict[str, Any] = {"resource": resource}
    _put(args, "timeout", timeout)
    _put(args, "ttr", ttr)
    return args
