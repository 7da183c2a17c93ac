"""A small asyncio QMP client: the greeting, ``qmp_capabilities``, then commands.

QMP speaks JSON objects, one per line, over the VM's monitor socket. The server greets
with ``{"QMP": ...}``; nothing but ``qmp_capabilities`` is accepted until it is sent.
Replies carry the ``id`` of their command; ``{"event": ...}`` messages may come between
them and are kept in `events`. Every wait is bounded by `timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from pathlib import Path
from types import TracebackType
from typing import Any

#: A QMP reply can be large (query-qmp-schema); lines are read up to this size.
LINE_LIMIT = 1 << 24


class QMPError(Exception):
    """QMP answered an error, or the monitor could not be reached or spoke nonsense."""


class QMP:
    """One QMP session on a monitor socket; use `connect`, then `execute`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self.timeout = timeout
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: Path | str, timeout: float = 5.0) -> QMP:
        """Connects, reads the greeting and leaves capabilities negotiation mode."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(str(path), limit=LINE_LIMIT)
        except (OSError, TimeoutError) as exc:
            raise QMPError(f"cannot reach the QMP monitor at {path}: {exc}") from exc
        session = cls(reader, writer, timeout)
        try:
            greeting = await session._receive()
            if "QMP" not in greeting:
                raise QMPError(f"not a QMP greeting: {greeting}")
            session.greeting = greeting["QMP"]
            await session.execute("qmp_capabilities")
        except BaseException:
            await session.close()
            raise
        return session

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Runs `command`; returns its ``return`` value or raises `QMPError` with its error."""
        request_id = next(self._ids)
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        self._writer.write(json.dumps(request).encode() + b"\n")
        try:
            await self._writer.drain()
        except OSError as exc:
            raise QMPError(f"{command}: the monitor went away: {exc}") from exc
        while True:
            message = await self._receive()
            if "event" in message:
                self.events.append(message)
                continue
            if message.get("id") != request_id:
                continue
            if "error" in message:
                error = message["error"]
                raise QMPError(f"{command}: {error.get('class')}: {error.get('desc')}")
            return message.get("return")

    async def _receive(self) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.timeout):
                line = await self._reader.readline()
        except TimeoutError:
            raise QMPError(f"no answer from the monitor within {self.timeout:g}s") from None
        except (OSError, ValueError) as exc:
            raise QMPError(f"reading from the monitor: {exc}") from exc
        if not line:
            raise QMPError("the monitor closed the connection")
        try:
            message = json.loads(line)
        except ValueError:
            raise QMPError(f"the monitor sent something that is not JSON: {line[:80]!r}") from None
        if not isinstance(message, dict):
            raise QMPError(f"the monitor sent a JSON {type(message).__name__}, not an object")
        return message

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> QMP:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def run_command(
    path: Path | str, command: str, arguments: dict[str, Any] | None = None, timeout: float = 5.0
) -> Any:
    """Connects, runs one command, disconnects."""
    async with await QMP.connect(path, timeout) as qmp:
        return await qmp.execute(command, arguments)
