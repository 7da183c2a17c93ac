"""The agent framework without a broker: dispatch, checking, outcomes, and the loop driven
through a scripted client (reconnects, heartbeats, stop)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

import pytest

from spinbroker.agent import (
    MAX_REASON,
    ActionError,
    Agent,
    AgentError,
    Backoff,
    CommandContext,
    Outcome,
    agent_main,
)
from spinbroker.client import (
    BadRequest,
    ClientError,
    ConnectionLost,
    DeliveredCommand,
    NotLeased,
    StaleDelivery,
    UnknownVerb,
)
from spinbroker.schema import ActionSpec, Int, SchemaError, Str

# -- dispatch and checking ----------------------------------------------------------------------


def storage_agent() -> Agent:
    agent = Agent("storage")

    @agent.action(image_size=Int(minimum=1))
    def create_image(
        volume_path: str, image_name: str, image_size: int, sparse: bool = True
    ) -> str:
        return f"{volume_path}/{image_name} {image_size} {sparse}"

    @agent.action()
    def explode(message: str = "") -> None:
        raise ValueError(message) if message else RuntimeError()

    @agent.action()
    def refuse(why: str) -> None:
        raise ActionError(why)

    @agent.action()
    async def where(ctx: CommandContext) -> str:
        return f"{ctx.id} {ctx.action} {ctx.delivery}"

    @agent.action()
    def thread() -> str:
        return str(threading.get_ident())

    @agent.action()
    def chatty() -> str:
        return "x" * (MAX_REASON + 100)

    return agent


async def test_success_carries_the_handler_note() -> None:
    agent = storage_agent()
    params = {"volume_path": "v", "image_name": 7, "image_size": 2}
    assert await agent.execute("create_image", params) == Outcome(True, "v/7 2 True")


@pytest.mark.parametrize(
    ("action", "params", "reason"),
    [
        ("frob", {}, "unknown action 'frob' for storage (known: chatty, create_image, explode, "),
        ("create_image", {"volume_path": "v", "image_name": "i"}, "create_image: required "),
        (
            "create_image",
            {"volume_path": "v", "image_name": "i", "image_size": "50"},
            "create_image: parameter 'image_size': expected int, got str '50'",
        ),
        (
            "create_image",
            {"volume_path": "v", "image_name": "i", "image_size": 0},
            "create_image: parameter 'image_size': 0 is less than the minimum 1",
        ),
        (
            "create_image",
            {"volume_path": "v", "image_name": "i", "image_size": 1, "colour": "red"},
            "create_image: unknown parameter 'colour' (expected: image_name, image_size, ",
        ),
        ("where", {"ctx": 1}, "where: unknown parameter 'ctx' (expected: none)"),
        ("explode", {"message": "boom"}, "ValueError: boom"),
        ("explode", {}, "RuntimeError"),
        ("refuse", {"why": "volume 'v' already exists"}, "volume 'v' already exists"),
    ],
)
async def test_failures_have_readable_reasons(
    action: str, params: dict[str, Any], reason: str
) -> None:
    outcome = await storage_agent().execute(action, params)
    assert not outcome.success
    assert outcome.reason is not None
    assert outcome.reason.startswith(reason), outcome.reason
    assert "Traceback" not in outcome.reason


async def test_a_handler_exception_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await storage_agent().execute("explode", {"message": "boom"})
    assert "explode: the handler raised" in caplog.text
    assert "Traceback" in caplog.text


async def test_lone_surrogates_in_notes_and_reasons_are_escaped() -> None:
    """A name from `os.fsdecode` that is not UTF-8 holds a lone surrogate, which cannot be
    sent: it goes out as a backslash escape (once: COMPLETE raised UnicodeEncodeError)."""
    agent = Agent("files")
    name = os.fsdecode(b"bad\xff.raw")

    @agent.action()
    def made() -> str:
        return f"made {name}"

    @agent.action()
    def refused() -> None:
        raise ActionError(f"cannot open {name}")

    @agent.action()
    def broke() -> None:
        raise OSError(f"no {name}")

    assert await agent.execute("made", {}) == Outcome(True, "made bad\\udcff.raw")
    assert await agent.execute("refused", {}) == Outcome(False, "cannot open bad\\udcff.raw")
    assert await agent.execute("broke", {}) == Outcome(False, "OSError: no bad\\udcff.raw")


def exiting_agent() -> Agent:
    agent = Agent("jobs")

    @agent.action()
    def sysexit(code: int = 3) -> None:
        sys.exit(code)

    @agent.action()
    def usage() -> None:
        argparse.ArgumentParser(prog="tool").parse_args(["--nope"])

    @agent.action()
    def interrupt() -> None:
        raise KeyboardInterrupt

    @agent.action()
    async def awaited_cancelled() -> None:
        inner = asyncio.ensure_future(asyncio.sleep(10))
        inner.cancel()
        await inner

    return agent


async def test_base_exceptions_from_handlers_fail_the_command(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SystemExit, KeyboardInterrupt and a CancelledError that is not the agent's own fail
    the command like any exception (once they went through and killed the agent)."""
    agent = exiting_agent()
    assert await agent.execute("sysexit", {}) == Outcome(False, "SystemExit: 3")
    assert await agent.execute("usage", {}) == Outcome(False, "SystemExit: 2")
    assert await agent.execute("interrupt", {}) == Outcome(False, "KeyboardInterrupt")
    assert await agent.execute("awaited_cancelled", {}) == Outcome(False, "CancelledError")
    assert "sysexit: the handler raised" in caplog.text

    # The agent's own cancellation is no failure of the command: it goes through.
    running = asyncio.Event()

    @agent.action()
    async def forever() -> None:
        running.set()
        await asyncio.Event().wait()

    task = asyncio.ensure_future(agent.execute("forever", {}))
    await running.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_sync_handlers_run_in_a_worker_thread() -> None:
    outcome = await storage_agent().execute("thread", {})
    assert outcome.reason != str(threading.get_ident())


async def test_handlers_may_ask_for_their_context() -> None:
    ctx = CommandContext("c-1", "where", delivery=3)
    assert await storage_agent().execute("where", {}, ctx) == Outcome(True, "c-1 where 3")


async def test_long_reasons_are_cut() -> None:
    outcome = await storage_agent().execute("chatty", {})
    assert outcome.reason is not None
    assert len(outcome.reason) == MAX_REASON
    assert outcome.reason.endswith("...")


def test_specs_come_from_signatures_with_overrides() -> None:
    wire = storage_agent().schema.to_wire()["actions"]
    assert wire["create_image"]["parameters"] == {
        "volume_path": {"type": "str", "required": True},
        "image_name": {"type": "str", "required": True},
        "image_size": {"type": "int", "required": True, "minimum": 1},
        "sparse": {"type": "bool", "required": False, "default": True},
    }
    assert wire["where"]["parameters"] == {}


def test_declaring_actions_wrongly() -> None:
    agent = storage_agent()

    def handler(path: str) -> None:
        pass

    with pytest.raises(ValueError, match="declared twice"):
        agent.add_action("refuse", handler)
    with pytest.raises(SchemaError, match="size not parameters of the handler"):
        agent.add_action("a", handler, params={"size": Int()})
    with pytest.raises(ValueError, match="either a spec or single parameters"):
        agent.add_action("b", handler, ActionSpec({"path": Str()}), params={"path": Str()})
    with pytest.raises(SchemaError, match="action name 'bad name'"):
        agent.add_action("bad name", handler)
    with pytest.raises(ValueError, match="ttr must be positive"):
        Agent("r", ttr=0)
    with pytest.raises(ValueError, match="resource 'a b' must be"):
        Agent("a b")
    agent.add_action("explicit", handler, ActionSpec({"path": Str(min_length=2)}))
    assert "explicit" in agent.actions


# -- backoff ------------------------------------------------------------------------------------


def test_backoff_grows_to_its_cap_and_resets() -> None:
    backoff = Backoff(initial=0.1, cap=1.0, factor=2.0, jitter=0.5, rng=lambda: 0.0)
    assert [round(backoff.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next() == 0.1
    jittered = Backoff(initial=1.0, cap=1.0, jitter=0.5, rng=lambda: 1.0)
    assert jittered.next() == 0.5
    for bad in ({"initial": 0}, {"cap": 0.01}, {"factor": 0.5}, {"jitter": 1.0}):
        with pytest.raises(ValueError):
            Backoff(**bad)


# -- the loop, against a scripted client ---------------------------------------------------------


def command(
    number: int, action: str = "work", ttr: float | None = None, **params: Any
) -> DeliveredCommand:
    return DeliveredCommand(
        id=f"c{number}",
        package="p",
        resource="jobs",
        action=action,
        parameters=params,
        dependencies=(),
        delivery=1,
        ttr=ttr,
    )


class FakeBroker:
    """Hands out commands and records what agents do; its faults are scripted."""

    def __init__(self) -> None:
        self.commands: asyncio.Queue[DeliveredCommand] = asyncio.Queue()
        self.connects = 0
        self.refuse_connects = 0
        self.announce_error: ClientError | None = None
        self.clients: list[FakeClient] = []
        self.announced: list[tuple[str, Mapping[str, Any]]] = []
        self.nexts: list[tuple[str, float | None]] = []
        self.touches: list[tuple[str, float | None, int | None]] = []
        self.touch_error: ClientError | None = None
        self.completions: list[tuple[str, bool, str | None, int | None]] = []
        self.lose_completions = 0
        self.refuse_completions: ClientError | None = None
        #: Raised by every COMPLETE: a bug in sending it (it never reaches the broker).
        self.break_completions: Exception | None = None
        #: While cleared, COMPLETE does not answer (a broker still syncing it).
        self.completions_answer = asyncio.Event()
        self.completions_answer.set()
        self.changed = asyncio.Condition()

    async def connect(self) -> FakeClient:
        async with self.changed:
            self.connects += 1
            self.changed.notify_all()
        if self.refuse_connects:
            self.refuse_connects -= 1
            raise ConnectionRefusedError(111, "Connection refused")
        client = FakeClient(self)
        self.clients.append(client)
        return client

    async def record(self, log: list[Any], entry: Any) -> None:
        async with self.changed:
            log.append(entry)
            self.changed.notify_all()

    async def until(self, predicate: Any) -> None:
        async with asyncio.timeout(5):
            async with self.changed:
                await self.changed.wait_for(predicate)

    def drop_all(self) -> None:
        for client in self.clients:
            client.drop()


class FakeClient:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.closed = False
        self._lost = asyncio.Event()

    @property
    def is_closed(self) -> bool:
        return self.closed

    def drop(self) -> None:
        self.closed = True
        self._lost.set()

    def _check(self) -> None:
        if self.closed:
            raise ConnectionLost("the broker closed the connection")

    async def close(self) -> None:
        self.drop()

    async def announce(self, resource: str, schema: Mapping[str, Any]) -> None:
        self._check()
        if self.broker.announce_error is not None:
            raise self.broker.announce_error
        await self.broker.record(self.broker.announced, (resource, schema))

    async def next(
        self, resource: str, timeout: float | None = None, ttr: float | None = None
    ) -> DeliveredCommand | None:
        self._check()
        await self.broker.record(self.broker.nexts, (resource, ttr))
        getting = asyncio.ensure_future(self.broker.commands.get())
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({getting, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not getting.done():
                getting.cancel()
        if getting.done() and not getting.cancelled():
            return getting.result()
        raise ConnectionLost("the broker closed the connection")

    async def touch(
        self, command: str, ttr: float | None = None, delivery: int | None = None
    ) -> float:
        self._check()
        if self.broker.touch_error is not None:
            raise self.broker.touch_error
        await self.broker.record(self.broker.touches, (command, ttr, delivery))
        return ttr or 0.0

    async def complete(
        self,
        command: str,
        success: bool,
        reason: str | None = None,
        delivery: int | None = None,
    ) -> str:
        self._check()
        if self.broker.break_completions is not None:
            raise self.broker.break_completions
        if self.broker.lose_completions:
            self.broker.lose_completions -= 1
            self.drop()
            raise ConnectionLost("connection reset")
        if self.broker.refuse_completions is not None:
            error, self.broker.refuse_completions = self.broker.refuse_completions, None
            raise error
        await self.broker.record(self.broker.completions, (command, success, reason, delivery))
        await self.broker.completions_answer.wait()
        return "succeeded" if success else "failed"


class RecordingBackoff(Backoff):
    delays: list[float] = []

    def __init__(self) -> None:
        super().__init__(initial=0.001, cap=0.004, jitter=0.0)
        self.delays = RecordingBackoff.delays = []

    def next(self) -> float:
        delay = super().next()
        self.delays.append(delay)
        return delay


class Harness:
    """An agent running against a FakeBroker in a task."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.broker = FakeBroker()
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(
            self.agent.run(stop=self.stop, connect=self.broker.connect)
        )

    async def finish(self) -> None:
        self.stop.set()
        assert self.task is not None
        async with asyncio.timeout(5):
            await self.task

    async def idle_in_next(self, count: int) -> None:
        await self.broker.until(lambda: len(self.broker.nexts) >= count)


def work_agent(ttr: float | None = None) -> Agent:
    agent = Agent("jobs", ttr=ttr, backoff=RecordingBackoff, stop_grace=0.05)

    @agent.action()
    async def work(n: int = 0) -> str:
        return f"did {n}"

    @agent.action()
    def fail() -> None:
        raise ActionError("could not")

    return agent


async def test_the_loop_announces_takes_runs_and_completes() -> None:
    h = Harness(work_agent())
    h.start()
    await h.broker.commands.put(command(1, n=5))
    await h.broker.commands.put(command(2, "fail"))
    await h.broker.commands.put(command(3, "nope"))
    await h.broker.until(lambda: len(h.broker.completions) == 3)
    await h.finish()
    assert h.broker.announced == [("jobs", h.agent.schema.to_wire())]
    assert h.broker.completions == [
        ("c1", True, "did 5", 1),
        ("c2", False, "could not", 1),
        ("c3", False, "unknown action 'nope' for jobs (known: fail, work)", 1),
    ]
    assert h.broker.nexts[0] == ("jobs", None)
    assert h.broker.clients[0].closed  # closed on the way out


async def test_stop_while_idle_returns_at_once() -> None:
    h = Harness(work_agent())
    h.start()
    await h.idle_in_next(1)
    await h.finish()
    assert h.broker.completions == []


async def test_stop_lets_the_current_command_finish_and_complete() -> None:
    agent = work_agent()
    release = asyncio.Event()
    running = asyncio.Event()

    @agent.action()
    async def slow() -> str:
        running.set()
        await release.wait()
        return "finished"

    h = Harness(agent)
    h.start()
    await h.broker.commands.put(command(1, "slow"))
    await h.broker.commands.put(command(2))  # must not be taken after the stop
    await running.wait()
    h.stop.set()
    await asyncio.sleep(0)
    assert h.task is not None and not h.task.done()
    release.set()
    await h.finish()
    assert h.broker.completions == [("c1", True, "finished", 1)]
    assert h.broker.commands.qsize() == 1


async def test_it_reconnects_with_growing_backoff() -> None:
    h = Harness(work_agent())
    h.broker.refuse_connects = 4
    h.start()
    await h.idle_in_next(1)
    assert h.broker.connects == 5
    assert RecordingBackoff.delays == [0.001, 0.002, 0.004, 0.004]
    await h.finish()


async def test_a_lost_connection_is_made_again_and_the_schema_announced_again() -> None:
    h = Harness(work_agent())
    h.start()
    await h.idle_in_next(1)
    h.broker.drop_all()
    await h.idle_in_next(2)
    assert len(h.broker.clients) == 2
    assert len(h.broker.announced) == 2
    await h.broker.commands.put(command(1))
    await h.broker.until(lambda: len(h.broker.completions) == 1)
    await h.finish()


async def test_a_completion_lost_with_the_connection_is_delivered_after_reconnecting() -> None:
    h = Harness(work_agent())
    h.broker.lose_completions = 2
    h.start()
    await h.broker.commands.put(command(1, n=1))
    await h.broker.until(lambda: len(h.broker.completions) == 1)
    assert h.broker.completions == [("c1", True, "did 1", 1)]
    assert len(h.broker.clients) == 3
    await h.finish()


async def test_a_refused_completion_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness(work_agent())
    h.broker.refuse_completions = StaleDelivery("delivery 1 is stale; current is 2")
    h.start()
    await h.broker.commands.put(command(1))
    await h.broker.commands.put(command(2))
    await h.broker.until(lambda: len(h.broker.completions) == 1)
    await h.finish()
    assert h.broker.completions[0][0] == "c2"
    assert "the broker refused the completion" in caplog.text


async def test_a_report_that_fails_ends_the_run_before_another_command() -> None:
    """A COMPLETE that cannot be sent (a bug) ends `run` while it waits in NEXT, not after
    it has taken and run another command."""
    h = Harness(work_agent())
    h.broker.break_completions = RuntimeError("cannot encode")
    h.start()
    await h.broker.commands.put(command(1))
    assert h.task is not None
    with pytest.raises(RuntimeError, match="cannot encode"):
        async with asyncio.timeout(5):
            await h.task  # before: waited in NEXT, ran the next command, then raised
    assert len(h.broker.nexts) == 2
    assert h.broker.clients[-1].closed


async def test_sys_exit_in_a_handler_fails_the_command_and_the_loop_goes_on() -> None:
    agent = exiting_agent()
    h = Harness(agent)
    h.start()
    await h.broker.commands.put(command(1, "sysexit"))
    await h.broker.commands.put(command(2, "awaited_cancelled"))
    await h.broker.until(lambda: len(h.broker.completions) == 2)
    await h.finish()
    assert h.broker.completions == [
        ("c1", False, "SystemExit: 3", 1),
        ("c2", False, "CancelledError", 1),
    ]


async def test_keyboard_interrupt_in_a_handler_fails_it_then_stops_as_sigint() -> None:
    h = Harness(exiting_agent())
    h.start()
    await h.broker.commands.put(command(1, "interrupt"))
    await h.broker.commands.put(command(2, "sysexit"))  # not taken after the interrupt
    assert h.task is not None
    async with asyncio.timeout(5):
        await h.task  # returns without the stop event being set by anyone else
    assert h.broker.completions == [("c1", False, "KeyboardInterrupt", 1)]
    assert h.broker.commands.qsize() == 1
    assert h.stop.is_set()


async def test_completion_after_stop_gives_up_after_the_grace() -> None:
    agent = work_agent()

    @agent.action()
    async def last(ctx: CommandContext) -> None:
        h.broker.refuse_connects = 10**6
        h.broker.drop_all()
        h.stop.set()

    h = Harness(agent)
    h.start()
    await h.broker.commands.put(command(1, "last"))
    async with asyncio.timeout(5):
        assert h.task is not None
        await h.task
    assert h.broker.completions == []


async def test_long_commands_touch_their_lease() -> None:
    agent = work_agent(ttr=0.03)

    @agent.action()
    async def long() -> None:
        await h.broker.until(lambda: len(h.broker.touches) >= 3)

    @agent.action(ttr=5.0)
    async def longer() -> None:
        await h.broker.until(lambda: len(h.broker.touches) >= 1)

    h = Harness(agent)
    h.start()
    await h.broker.commands.put(command(1, "long", ttr=0.03))
    await h.broker.until(lambda: len(h.broker.completions) == 1)
    assert h.broker.nexts[0] == ("jobs", 0.03)
    assert h.broker.touches[:3] == [("c1", 0.03, 1)] * 3
    h.broker.touches.clear()
    await h.broker.commands.put(command(2, "longer", ttr=0.03))
    await h.broker.until(lambda: len(h.broker.completions) == 2)
    assert h.broker.touches[0] == ("c2", 5.0, 1)  # at once: the action wants a longer lease
    await h.finish()
    assert [c[1] for c in h.broker.completions] == [True, True]


async def test_a_lost_lease_is_told_to_the_handler() -> None:
    agent = work_agent(ttr=0.01)

    @agent.action()
    async def watch(ctx: CommandContext) -> str:
        await ctx.lease_lost.wait()
        return "noticed"

    h = Harness(agent)
    h.broker.touch_error = NotLeased("command c1 is not leased")
    h.start()
    await h.broker.commands.put(command(1, "watch", ttr=0.01))
    await h.broker.until(lambda: len(h.broker.completions) == 1)
    await h.finish()
    assert h.broker.completions == [("c1", True, "noticed", 1)]


async def test_a_broker_without_announce_is_served_anyway(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness(work_agent())
    h.broker.announce_error = UnknownVerb("unknown verb 'ANNOUNCE'")
    h.start()
    await h.idle_in_next(1)
    await h.finish()
    assert "does not know ANNOUNCE" in caplog.text


async def test_a_refused_schema_stops_the_agent() -> None:
    h = Harness(work_agent())
    h.broker.announce_error = BadRequest("schema: version must be 1")
    h.start()
    assert h.task is not None
    with pytest.raises(AgentError, match="refused the schema of jobs: bad_request: schema"):
        async with asyncio.timeout(5):
            await h.task


async def test_stop_while_the_broker_is_unreachable() -> None:
    agent = Agent("jobs", backoff=lambda: Backoff(initial=30.0, cap=30.0))
    h = Harness(agent)
    h.broker.refuse_connects = 10**6
    h.start()
    await h.broker.until(lambda: h.broker.connects >= 1)
    await h.finish()  # does not sit out the 30 s backoff


async def test_run_needs_an_address_or_a_connect_function() -> None:
    with pytest.raises(ValueError, match="address"):
        await work_agent().run()


async def test_the_next_command_is_asked_for_while_a_completion_is_unanswered() -> None:
    """COMPLETE goes out and the agent asks for (and runs) the next command before the
    broker answers it; but it never has two completions unanswered, and it does not return
    before the last one is answered."""
    h = Harness(work_agent())
    h.broker.completions_answer.clear()
    h.start()
    for i in (1, 2, 3):
        await h.broker.commands.put(command(i, n=i))
    await h.broker.until(lambda: len(h.broker.completions) == 1 and len(h.broker.nexts) == 2)
    await asyncio.sleep(0.01)  # c2 runs and is done; nothing more may happen meanwhile
    assert h.broker.commands.qsize() == 1  # c2 was taken while c1 was unanswered
    assert [c[0] for c in h.broker.completions] == ["c1"]  # c2's waits for c1's answer
    assert len(h.broker.nexts) == 2
    h.stop.set()
    await asyncio.sleep(0.01)
    assert h.task is not None and not h.task.done()  # waits for the answers
    h.broker.completions_answer.set()
    await h.finish()
    assert [c[0] for c in h.broker.completions] == ["c1", "c2"]


# -- agent_main ----------------------------------------------------------------------------------


def test_agent_main_takes_a_ttr_that_is_finite_and_not_negative(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Once --ttr went straight to the agent: inf failed at the first NEXT, a negative or
    nan one became a connection lease. Now they are usage errors (exit 2)."""
    seen: list[float] = []

    def build(args: argparse.Namespace) -> Agent:
        seen.append(args.ttr)
        raise AgentError("built")  # stops agent_main before it connects

    for bad in ["inf", "-inf", "nan", "-5", "-0.5"]:
        with pytest.raises(SystemExit) as info:
            agent_main("test agent", build, argv=[f"--ttr={bad}"])
        assert info.value.code == 2, bad
        assert "--ttr" in capsys.readouterr().err
    assert seen == []
    for good in ["0", "2.5", "60"]:
        assert agent_main("test agent", build, argv=["--ttr", good]) == 1
    assert seen == [0.0, 2.5, 60.0]
