"""The agent framework: declare a resource and its actions, and the loop does the rest.

An `Agent` holds a table of actions, each a handler plus the `ActionSpec` its parameters
must fit (written out, or derived from the handler's type hints)::

    agent = Agent("storage")

    @agent.action(image_size=Int(minimum=1))
    def create_image(volume_path: str, image_name: str, image_size: int) -> str:
        ...
        return f"created {image_name}"          # an optional note sent with COMPLETE

`Agent.execute` runs one command: unknown action, a parameter that does not fit, and an
exception from the handler each become a failed `Outcome` with a reason a person can read
(`ActionError` carries its message as the reason; any other exception reads
``"TypeName: message"``, with the traceback going to the agent's log, never to the broker).
That holds for SystemExit (sys.exit, argparse) and for a CancelledError from a task the
handler awaited; only the agent's own cancellation goes through. KeyboardInterrupt fails the
command too, then the loop stops as on SIGINT.
Sync handlers run in a worker thread, async ones on the loop. A handler that takes a
parameter named ``ctx`` receives a `CommandContext`.

`Agent.run` is the loop: connect, ANNOUNCE the schema, block on NEXT, run one command at a
time, COMPLETE it with its outcome. A lost connection (or a broker that stops or restarts)
is retried with capped exponential backoff; a completion that could not be delivered is
delivered after reconnecting. `storage_failed` (the broker cannot write its log) is retried
too, with backoff: ANNOUNCE and NEXT over a new connection, TOUCH and COMPLETE as they are,
a completion until the broker acknowledges or refuses it. With a ttr (the default), a
running command's lease is TOUCHed every third of its ttr, so a long action keeps its lease
and survives its connection dropping (not a broker restart: no lease does, and the command
is delivered again; its first completion is then refused as stale). Setting the stop event
(SIGTERM and SIGINT do, under `serve`) lets the current command finish and be completed,
then `run` returns.

One race is left to the broker's leases: a command delivered in the instant the agent is
told to stop while idle in NEXT is dropped with the connection and delivered again when its
lease ends (at once for a connection lease, after the ttr otherwise).

Arrows: this module uses the client (IO) and the schema (pure); nothing in the broker
imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import inspect
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar

from spinbroker.client import (
    Client,
    ClientError,
    ConnectionLost,
    DeliveredCommand,
    ShuttingDown,
    StorageFailed,
    UnknownVerb,
)
from spinbroker.config import DEFAULT_DATA_DIR, SOCKET_NAME
from spinbroker.schema import (
    ACTION_NAME,
    ActionSpec,
    Param,
    ResourceSchema,
    SchemaError,
    optional,
    params_from_signature,
)

log = logging.getLogger(__name__)

__all__ = [
    "Action",
    "ActionError",
    "Agent",
    "AgentClient",
    "Backoff",
    "CommandContext",
    "Outcome",
    "agent_main",
    "serve",
]

#: The name of the handler parameter that receives the `CommandContext`.
CONTEXT_PARAMETER: Final = "ctx"
#: Longest reason sent with COMPLETE; longer ones are cut (the full text is logged).
MAX_REASON: Final = 2000
#: The same default as the CLI's: the Unix socket of `make serve`'s data dir.
DEFAULT_ADDRESS: Final = f"unix:{DEFAULT_DATA_DIR / SOCKET_NAME}"

F = TypeVar("F", bound=Callable[..., Any])


class ActionError(Exception):
    """A failure a handler reports on purpose: the command fails with this message."""


class AgentError(Exception):
    """The agent cannot go on (its schema was refused): `run` raises it."""


class AgentClient(Protocol):
    """What the loop needs of a connection; `spinbroker.client.Client` is the real one."""

    @property
    def is_closed(self) -> bool: ...

    async def close(self) -> None: ...

    async def announce(self, resource: str, schema: Mapping[str, Any]) -> None: ...

    async def next(
        self, resource: str, timeout: float | None = None, ttr: float | None = None
    ) -> DeliveredCommand | None: ...

    async def touch(
        self, command: str, ttr: float | None = None, delivery: int | None = None
    ) -> float | None: ...

    async def complete(
        self,
        command: str,
        success: bool,
        reason: str | None = None,
        delivery: int | None = None,
    ) -> str: ...


Connector = Callable[[], Awaitable[AgentClient]]

#: Errors that mean "the broker is not there right now": reconnect and try again.
_GONE: Final = (OSError, ConnectionLost, ShuttingDown, TimeoutError)
# `StorageFailed` (the broker cannot write its log) is no refusal either: the broker takes
# changes again as soon as a write succeeds. ANNOUNCE and NEXT are tried again over a new
# connection after the reconnect backoff (a NEXT answered storage_failed may have leased a
# command to this connection: closing it ends a connection lease); TOUCH and COMPLETE are
# tried again, with their own backoff, keeping their delivery number.


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a command ended: what COMPLETE reports."""

    success: bool
    reason: str | None = None


@dataclass(slots=True)
class CommandContext:
    """What a handler may know about the command it runs (ask for it with ``ctx``)."""

    id: str
    action: str
    delivery: int = 1
    package: str = ""
    #: Set when a TOUCH found the lease gone: the command may run again elsewhere.
    lease_lost: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        return logging.LoggerAdapter(log, {"command": self.id})


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    handler: Callable[..., Any]
    spec: ActionSpec
    #: The lease this action keeps while it runs (TOUCHed); None: the agent's ttr.
    ttr: float | None = None

    @property
    def wants_context(self) -> bool:
        return CONTEXT_PARAMETER in inspect.signature(self.handler).parameters

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)


class Backoff:
    """Capped exponential backoff with jitter: `initial`, x`factor` per failure, up to `cap`."""

    def __init__(
        self,
        initial: float = 0.1,
        cap: float = 10.0,
        factor: float = 2.0,
        jitter: float = 0.2,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or cap < initial or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("backoff needs 0 < initial <= cap, factor >= 1, 0 <= jitter < 1")
        self.initial, self.cap, self.factor, self.jitter = initial, cap, factor, jitter
        self._rng = rng
        self._failures = 0

    def next(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        base = min(self.cap, self.initial * self.factor ** min(self._failures, 64))
        self._failures += 1
        return base * (1 - self.jitter * self._rng())

    def reset(self) -> None:
        self._failures = 0


@dataclass(frozen=True, slots=True)
class _Report:
    """A finished command whose COMPLETE has not reached the broker yet."""

    command: str
    delivery: int
    action: str
    outcome: Outcome


class Agent:
    """One resource's agent: its action table and the loop that serves it."""

    def __init__(
        self,
        resource: str,
        *,
        ttr: float | None = 60.0,
        backoff: Callable[[], Backoff] = Backoff,
        stop_grace: float = 30.0,
    ) -> None:
        if ttr is not None and ttr <= 0:
            raise ValueError("ttr must be positive (or None for a connection lease)")
        if not ACTION_NAME.fullmatch(resource):
            raise ValueError(f"resource {resource!r} must be 1 to 128 letters, digits or _.:@/-")
        self.resource = resource
        #: Lease of every NEXT; None makes the lease belong to the connection.
        self.ttr = ttr
        #: After a stop, how long the loop keeps trying to deliver the last completion.
        self.stop_grace = stop_grace
        self._backoff = backoff
        self._actions: dict[str, Action] = {}
        self._schema: ResourceSchema | None = None
        self._link: _Link | None = None
        #: Set when a handler raised KeyboardInterrupt: `run` stops after completing it.
        self._interrupted = False

    # -- the action table --------------------------------------------------------------------

    def add_action(
        self,
        name: str,
        handler: Callable[..., Any],
        spec: ActionSpec | None = None,
        *,
        ttr: float | None = None,
        params: Mapping[str, Param] | None = None,
    ) -> Action:
        """Adds an action. Without `spec`, its parameters come from the handler's type
        hints, and `params` replace single ones (``{"image_size": Int(minimum=1)}``)."""
        if name in self._actions:
            raise ValueError(f"action {name!r} is declared twice")
        if spec is None:
            derived = params_from_signature(handler, skip=[CONTEXT_PARAMETER])
            given = dict(params or {})
            unknown = sorted(set(given) - set(derived))
            if unknown:
                raise SchemaError(f"{name}: {', '.join(unknown)} not parameters of the handler")
            for key, given_spec in given.items():
                # A spec given without a default keeps the handler's default, if it has one.
                if given_spec.required and not derived[key].required:
                    given[key] = optional(given_spec, derived[key].default)
            spec = ActionSpec({**derived, **given}, description=inspect.getdoc(handler) or "")
        elif params:
            raise ValueError("give either a spec or single parameters, not both")
        schema = ResourceSchema({**self.schema.actions, name: spec})  # checks the name
        action = Action(name, handler, spec, ttr)
        self._actions[name] = action
        self._schema = schema
        return action

    def action(
        self,
        name: str | None = None,
        *,
        ttr: float | None = None,
        spec: ActionSpec | None = None,
        **params: Param,
    ) -> Callable[[F], F]:
        """Decorator form of `add_action`; the action's name defaults to the function's.

        Keyword arguments replace single parameter specs: ``@agent.action(size=Int(minimum=1))``.
        """

        def register(handler: F) -> F:
            self.add_action(name or handler.__name__, handler, spec, ttr=ttr, params=params)
            return handler

        return register

    @property
    def actions(self) -> Mapping[str, Action]:
        return dict(self._actions)

    @property
    def schema(self) -> ResourceSchema:
        """What the agent announces: every action's parameter spec."""
        if self._schema is None:
            self._schema = ResourceSchema({name: a.spec for name, a in self._actions.items()})
        return self._schema

    # -- one command -------------------------------------------------------------------------

    async def execute(
        self,
        action: str,
        parameters: Mapping[str, Any] | None,
        ctx: CommandContext | None = None,
    ) -> Outcome:
        """Checks the parameters and runs the handler; every failure is an `Outcome`."""
        entry = self._actions.get(action)
        if entry is None:
            known = ", ".join(sorted(self._actions)) or "none"
            return Outcome(False, f"unknown action {action!r} for {self.resource} (known: {known})")
        try:
            kwargs = self.schema.validate(action, parameters)
        except SchemaError as exc:
            return Outcome(False, exc.message)
        if entry.wants_context:
            kwargs[CONTEXT_PARAMETER] = ctx or CommandContext(id="", action=action)
        try:
            if entry.is_async:
                result = await entry.handler(**kwargs)
            else:
                result = await asyncio.to_thread(functools.partial(entry.handler, **kwargs))
        except ActionError as exc:
            return Outcome(False, _cut(str(exc) or "failed"))
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the agent itself is cancelled, not the handler failing
            return _raised(action, exc)  # from a task the handler awaited
        except KeyboardInterrupt as exc:
            # Under `serve` SIGINT never raises it (the stop event does that), so the handler
            # (or what it ran) raised it: the command fails, and the agent stops as on SIGINT.
            self._interrupted = True
            return _raised(action, exc)
        except BaseException as exc:  # Exception, and SystemExit from sys.exit or argparse
            return _raised(action, exc)
        return Outcome(True, _cut(result) if isinstance(result, str) and result else None)

    # -- the loop ----------------------------------------------------------------------------

    async def run(
        self,
        address: str | None = None,
        *,
        stop: asyncio.Event | None = None,
        connect: Connector | None = None,
    ) -> None:
        """Serves commands until `stop` is set, then returns once the current one is done
        and its completion delivered.

        A command's COMPLETE goes out while the agent already asks for the next one (NEXT
        does not wait for the completion's fsync at the broker), so the agent's work and the
        broker's fsyncs overlap. At most one completion is in flight: the next one waits
        for it, and so does the return.

        `connect` makes a connection (tests pass a fake); by default `Client.connect(address)`.
        """
        if connect is None:
            if address is None:
                raise ValueError("give the broker's address or a connect function")
            connect = functools.partial(_connect_client, address)
        stopping = stop or asyncio.Event()
        self._link = _Link(connect, self._backoff())
        self._interrupted = False
        reporting: asyncio.Future[None] | None = None
        try:
            while not stopping.is_set():
                client = await self._connected(stopping)
                if client is None:
                    break
                command = await self._take(client, stopping, reporting)
                if command is None:
                    continue
                report = await self._run_command(command)
                if self._interrupted:
                    log.warning("a handler raised KeyboardInterrupt: stopping, as on SIGINT")
                    stopping.set()
                if reporting is not None:
                    await reporting
                reporting = asyncio.ensure_future(self._report(report, stopping))
        finally:
            if reporting is not None:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    reporting.cancel()  # cancelled: no more waiting for the broker
                await asyncio.wait({reporting})  # _report bounds itself after a stop
            await self._drop()
        if reporting is not None:
            reporting.result()  # a report that failed fails the run, as when it was awaited
        log.info("%s agent stopped", self.resource)

    async def _connected(self, stop: asyncio.Event | None) -> AgentClient | None:
        """The live connection, made (and announced) anew if needed, with backoff between
        attempts. Returns None only when `stop` is set while it waits."""
        link = self._link
        if link is None:
            raise RuntimeError("the agent is not running")
        async with link.lock:
            while link.client is None or link.client.is_closed:
                if stop is not None and stop.is_set():
                    return None
                await _wait(stop, link.retry_at - time.monotonic())
                if stop is not None and stop.is_set():
                    return None
                try:
                    client = await link.connect()
                except _GONE as exc:
                    delay = link.failed()
                    log.warning("cannot reach the broker (%s); retrying in %.2fs", exc, delay)
                    continue
                try:
                    await self._announce(client)
                except BaseException as exc:
                    await _close_quietly(client)
                    if isinstance(exc, StorageFailed):
                        delay = link.failed()
                        log.warning(
                            "the broker cannot write its log, so it refused the announcement "
                            "(%s); retrying in %.2fs",
                            exc,
                            delay,
                        )
                        continue
                    if not isinstance(exc, _GONE):
                        raise
                    delay = link.failed()
                    log.warning(
                        "lost the broker while announcing (%s); retrying in %.2fs", exc, delay
                    )
                    continue
                link.connected(client)
                log.info("connected; serving %s", self.resource)
            return link.client

    async def _announce(self, client: AgentClient) -> None:
        try:
            await client.announce(self.resource, self.schema.to_wire())
        except UnknownVerb:
            log.warning("the broker does not know ANNOUNCE: commands are not checked at ADD")
        except StorageFailed:
            raise  # not a refusal of the schema: `_connected` tries again
        except ClientError as exc:
            raise AgentError(f"the broker refused the schema of {self.resource}: {exc}") from exc

    async def _take(
        self,
        client: AgentClient,
        stop: asyncio.Event,
        reporting: asyncio.Future[None] | None = None,
    ) -> DeliveredCommand | None:
        """Blocks in NEXT until a command comes or `stop` is set. If the previous command's
        report (`reporting`) fails meanwhile, its error is raised at once: no other command
        is run first."""
        taking = asyncio.ensure_future(client.next(self.resource, ttr=self.ttr))
        stopped = asyncio.ensure_future(stop.wait())
        watched: set[asyncio.Future[Any]] = {taking, stopped}
        if reporting is not None:
            watched.add(reporting)
        try:
            while not (taking.done() or stopped.done()):
                await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                if reporting is not None and reporting.done():
                    if not reporting.cancelled() and reporting.exception() is not None:
                        break
                    watched.discard(reporting)
        finally:
            stopped.cancel()
            if not taking.done():
                taking.cancel()
                await asyncio.wait({taking})  # let it unwind; a command that won the race stays
        if reporting is not None and reporting.done() and not reporting.cancelled():
            reporting.result()  # raises what failed the report, even if a command came too
        if taking.cancelled():
            return None
        problem = taking.exception()
        if problem is None:
            return taking.result()
        if isinstance(problem, StorageFailed):
            log.warning(
                "the broker cannot write its log, so it refused NEXT (%s); reconnecting", problem
            )
        elif isinstance(problem, _GONE):
            log.warning("lost the broker while waiting for a command (%s)", problem)
        else:
            raise problem
        await self._drop(client)  # the reconnect waits for the backoff
        return None

    async def _run_command(self, command: DeliveredCommand) -> _Report:
        action = self._actions.get(command.action)
        ttr = action.ttr if action is not None and action.ttr is not None else command.ttr
        ctx = CommandContext(command.id, command.action, command.delivery, command.package)
        log.info(
            "command %s: %s (delivery %d) started", command.id, command.action, command.delivery
        )
        started = time.monotonic()
        heartbeat = None
        if command.ttr is not None and ttr is not None:
            heartbeat = asyncio.ensure_future(self._heartbeat(command, ttr, ctx))
        try:
            outcome = await self.execute(command.action, command.parameters, ctx)
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
        elapsed = time.monotonic() - started
        state = "succeeded" if outcome.success else "failed"
        note = f": {outcome.reason}" if outcome.reason else ""
        level = logging.INFO if outcome.success else logging.WARNING
        log.log(
            level, "command %s: %s %s in %.3fs%s", command.id, command.action, state, elapsed, note
        )
        return _Report(command.id, command.delivery, command.action, outcome)

    async def _heartbeat(self, command: DeliveredCommand, ttr: float, ctx: CommandContext) -> None:
        """TOUCHes the lease every third of `ttr` until cancelled or the lease is gone."""
        # An action that asks for another lease than NEXT gave gets it at once.
        delay = 0.0 if ttr != command.ttr else ttr / 3
        retry: Backoff | None = None
        while True:
            await asyncio.sleep(delay)
            delay = ttr / 3
            client = await self._connected(None)
            assert client is not None
            try:
                await client.touch(command.id, ttr=ttr, delivery=command.delivery)
                retry = None
            except _GONE as exc:
                log.warning("command %s: lost the broker while touching (%s)", command.id, exc)
                await self._drop(client)
                delay = 0.0
            except StorageFailed as exc:
                retry = retry or self._backoff()
                delay = min(retry.next(), ttr / 3)
                log.warning(
                    "command %s: the broker cannot write its log, so it refused TOUCH (%s); "
                    "retrying in %.2fs",
                    command.id,
                    exc,
                    delay,
                )
            except ClientError as exc:
                log.warning(
                    "command %s: lease lost (%s); it may run again elsewhere", command.id, exc
                )
                ctx.lease_lost.set()
                return

    async def _report(self, report: _Report, stop: asyncio.Event) -> None:
        """COMPLETEs a finished command across reconnects; after a stop, for `stop_grace`."""
        delivering = asyncio.ensure_future(self._deliver(report))
        grace = asyncio.ensure_future(_after(stop, self.stop_grace))
        try:
            await asyncio.wait({delivering, grace}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            grace.cancel()
            if not delivering.done():
                delivering.cancel()
                log.error(
                    "command %s: stopping without delivering its completion (%s)",
                    report.command,
                    "succeeded" if report.outcome.success else "failed",
                )
        with contextlib.suppress(asyncio.CancelledError):
            await delivering

    async def _deliver(self, report: _Report) -> None:
        """COMPLETEs `report` until the broker acknowledges or refuses it (stale_delivery,
        not_leased, already_completed, ...); a lost broker and storage_failed are retried."""
        retry: Backoff | None = None
        while True:
            client = await self._connected(None)
            assert client is not None
            try:
                await client.complete(
                    report.command,
                    report.outcome.success,
                    report.outcome.reason,
                    delivery=report.delivery,
                )
                return
            except _GONE as exc:
                log.warning(
                    "command %s: lost the broker while completing (%s); retrying",
                    report.command,
                    exc,
                )
                await self._drop(client)
            except StorageFailed as exc:
                retry = retry or self._backoff()
                delay = retry.next()
                log.warning(
                    "command %s: the broker cannot write its log, so the completion is not "
                    "acknowledged (%s); retrying in %.2fs",
                    report.command,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
            except ClientError as exc:
                # After a storage_failed, already_completed may mean that attempt was applied.
                unsure = " (an attempt answered storage_failed may have been applied)"
                log.warning(
                    "command %s: the broker refused the completion: %s%s",
                    report.command,
                    exc,
                    unsure if retry is not None else "",
                )
                return

    async def _drop(self, client: AgentClient | None = None) -> None:
        """Forgets the connection (`client`, or whichever is live) and closes it."""
        link = self._link
        if link is None:
            return
        current = link.client
        if client is None or client is current:
            link.lost()
        if client is None:
            client = current
        if client is not None:
            await _close_quietly(client)


class _Link:
    """The agent's one connection and the backoff between attempts to make it.

    The backoff restarts from its first step when a connection had lived longer than the
    backoff's cap; a broker that accepts and drops at once is retried ever more slowly.
    """

    def __init__(self, connect: Connector, backoff: Backoff) -> None:
        self.connect = connect
        self.backoff = backoff
        self.lock = asyncio.Lock()
        self.client: AgentClient | None = None
        self.retry_at = 0.0
        self._since = 0.0

    def connected(self, client: AgentClient) -> None:
        self.client = client
        self._since = time.monotonic()

    def failed(self) -> float:
        delay = self.backoff.next()
        self.retry_at = time.monotonic() + delay
        return delay

    def lost(self) -> None:
        if self.client is None:
            return
        self.client = None
        if time.monotonic() - self._since >= self.backoff.cap:
            self.backoff.reset()
        self.failed()


# -- helpers ---------------------------------------------------------------------------------


def _raised(action: str, exc: BaseException) -> Outcome:
    """The failure of a handler that raised `exc`: ``"TypeName: message"``."""
    log.error("%s: the handler raised", action, exc_info=exc)
    message = str(exc)
    return Outcome(
        False, _cut(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)
    )


def _cut(reason: str) -> str:
    """`reason` made fit to send: a lone surrogate (from `os.fsdecode` of a name that is not
    UTF-8, say) cannot be encoded, so it is written as a backslash escape (``\\udcff``);
    then cut to MAX_REASON."""
    reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."


async def _wait(stop: asyncio.Event | None, delay: float) -> None:
    """Sleeps `delay` seconds (if positive), or less if `stop` is set meanwhile."""
    if delay <= 0:
        return
    if stop is None:
        await asyncio.sleep(delay)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)


async def _after(stop: asyncio.Event, grace: float) -> None:
    """Returns `grace` seconds after `stop` is set."""
    await stop.wait()
    await asyncio.sleep(grace)


async def _close_quietly(client: AgentClient) -> None:
    with contextlib.suppress(Exception):
        await client.close()


async def _connect_client(address: str) -> AgentClient:
    return await Client.connect(address)


# -- running an agent as a program -----------------------------------------------------------


def _ttr_flag(text: str) -> float:
    """--ttr: seconds, finite and >= 0 (0: the lease belongs to the connection)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a finite number of seconds >= 0 (0: a connection lease)"
        )
    return value


async def serve(agent: Agent, address: str) -> None:
    """Runs `agent` until SIGTERM or SIGINT, which let the current command finish first."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if stop.is_set():
            log.warning("%s again: still finishing the current command", name)
            return
        log.info("%s: finishing the current command, then exiting", name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        await agent.run(address, stop=stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def agent_main(
    description: str,
    build: Callable[[argparse.Namespace], Agent],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """The body of an agent's console script: common flags, logging, `serve`, exit code."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--broker",
        default=os.environ.get("SPINBROKER_ADDR", DEFAULT_ADDRESS),
        help="broker address: unix:/path, a socket path, or host:port "
        "(default: $SPINBROKER_ADDR or %(default)s)",
    )
    parser.add_argument(
        "--ttr",
        type=_ttr_flag,
        default=60.0,
        help="lease of each command in seconds, TOUCHed while it runs "
        "(0: the lease belongs to the connection; default %(default)s)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        agent = build(args)
        agent.ttr = args.ttr or None
        asyncio.run(serve(agent, args.broker))
    except (AgentError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    return 0
