"""Kill a real broker with SIGKILL at random moments while clients work; check its promises.

`tests/test_crash.py` runs it (20 kills, more with SPINBROKER_CRASH_KILLS); by hand:

    .venv/bin/python tools/crashtest.py --kills 200 [--seed N] [--fsync always|batch] [--keep]

One `spinbroker serve` process at a time on one data dir, in its own process group (a kill
takes any snapshot child with it, as a machine crash would). Producers SUBMIT packages (some
built with NEW, ADD, ENQUEUE, resumed across restarts), with dependencies inside the package
and on earlier commands; consumers take and complete them, some with COMPLETE + NEXT in one
request, some with COMPLETE and NEXT pipelined; a killer SIGKILLs the broker after a random
delay and starts it again on the same data dir. Small --snapshot-every/--snapshot-interval
make recovery load a snapshot and replay the log after it. Then the clients drain
everything, and the history they recorded is checked:

* every acknowledged SUBMIT / ENQUEUE is there with its commands, and finishes;
* every acknowledged COMPLETE kept its outcome, and its command was never delivered again;
* no command was delivered before its dependencies succeeded (the NEXT reply waits for the
  record that made its command ready: a delivered command's dependencies succeeded
  durably, even when the completion that readied it was pipelined with that NEXT);
* delivery numbers: +1 per delivery within one broker life; across a crash the next
  delivery has a number above the last one seen, never the same (the lease record is not
  synced before the NEXT reply, so a crash may lose it: the restarted broker skips a
  number for commands that were ready);
* order: the single consumer of resource "ordered" gets each producer's commands in enqueue
  order: every command of that producer ahead of it was delivered earlier in this broker
  life, or had finished for good in an earlier one;
* a clean SIGTERM exits 0 and the restart shows the same state with nothing to replay.

Time is counted in epochs (one per broker start) and ticks (one per reply the clients saw,
in the order they saw them). Every wait has a deadline; the seed reproduces the choices (not
the exact interleaving, which the kernel decides).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from spinbroker.client import (
    Client,
    ClientError,
    DeliveredCommand,
    NotFound,
    NotOpen,
    PackageStatus,
)

#: How a consumer completes: COMPLETE then NEXT, COMPLETE with `next` (one request), or
#: COMPLETE and NEXT written together (two requests, replies in either order).
STYLES = ("serial", "combined", "pipelined")
ORDERED = "ordered"
WORK = ("work-a", "work-b")
#: Seconds between the broker being ready and the SIGKILL (the test's random input).
KILL_DELAY = (0.1, 0.5)
READY_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0
FINISHED = ("succeeded", "failed", "cancelled")


class CrashTestError(AssertionError):
    pass


# --------------------------------------------------------------------------- the broker


class Broker:
    """The broker process under test; `start` again after every `kill`."""

    def __init__(
        self, work: Path, fsync: str, log: IO[str], options: dict[str, str] | None = None
    ) -> None:
        self.data_dir = work / "data"
        self.socket = work / "broker.sock"
        self.fsync = fsync
        self.log = log
        #: `serve` flags; snapshots are frequent so recovery loads one and replays the rest.
        self.options = {
            "--snapshot-every": "50",
            "--snapshot-interval": "0.5",
            "--segment-size": "65536",
            "--max-deliveries": "1000000",
            **(options or {}),
        }
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "spinbroker", "serve", "--data-dir", str(self.data_dir)]
        argv += ["--socket", str(self.socket), "--no-tcp", "--fsync", self.fsync]
        for flag, value in self.options.items():
            argv += [flag, value]
        return argv

    async def start(self) -> None:
        """Start the broker and return once it logged that it is ready."""
        self.starts += 1
        self._note(f"==== start {self.starts}")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(self.proc, ready))
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await ready
        except TimeoutError:
            await self.kill()
            raise CrashTestError(
                f"broker not ready after {READY_TIMEOUT}s:\n{self.tail()}"
            ) from None

    async def _read(self, proc: asyncio.subprocess.Process, ready: asyncio.Future[None]) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self._note(line)
            if " ready (data dir " in line and not ready.done():
                ready.set_result(None)
        if not ready.done():
            code = await proc.wait()
            ready.set_exception(CrashTestError(f"broker exited {code}:\n{self.tail()}"))

    def _note(self, line: str) -> None:
        self.lines.append(line)
        self.log.write(line + "\n")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])

    async def kill(self) -> None:
        """SIGKILL the broker's whole process group and reap it."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await self._reap()

    async def terminate(self) -> int:
        """SIGTERM (a clean stop); the exit code."""
        assert self.proc is not None
        pid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        code = await self._reap()
        with contextlib.suppress(ProcessLookupError):  # a snapshot child, if one was left
            os.killpg(pid, signal.SIGKILL)
        return code

    async def _reap(self) -> int:
        proc, reader = self.proc, self._reader
        assert proc is not None
        async with asyncio.timeout(20):
            code = await proc.wait()
            if reader is not None:
                await reader
        self.proc = self._reader = None
        self._note(f"==== exit {code}")
        return code


# --------------------------------------------------------------------------- the history


@dataclass(slots=True)
class Delivery:
    command: str
    package: str
    resource: str
    parameters: dict[str, Any] = field(repr=False)
    dependencies: tuple[str, ...]
    number: int
    epoch: int
    tick: int
    #: A later reply proved the lease record durable.
    durable: bool = False


@dataclass(slots=True)
class Completion:
    state: str
    number: int
    epoch: int
    tick: int


@dataclass
class History:
    """What the clients were told, in the order they were told it."""

    ticks: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    #: Acknowledged enqueued package -> its command ids.
    packages: dict[str, list[str]] = field(default_factory=dict)
    #: Every package id seen (acknowledged, or met in a delivery).
    known: set[str] = field(default_factory=set)
    deliveries: list[Delivery] = field(default_factory=list)
    completions: dict[str, Completion] = field(default_factory=dict)
    dependable: list[str] = field(default_factory=list)
    #: Command -> the tick a successful COMPLETE for it was first sent (acknowledged or not).
    success_sent: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    def tick(self) -> int:
        return next(self.ticks)

    def enqueued(self, package: str, ids: list[str]) -> None:
        self.tick()
        self.packages[package] = ids
        self.known.add(package)
        self.dependable.extend(ids)

    def delivered(self, got: DeliveredCommand, epoch: int) -> Delivery:
        d = Delivery(
            got.id,
            got.package,
            got.resource,
            got.parameters,
            got.dependencies,
            got.delivery,
            epoch,
            self.tick(),
        )
        self.deliveries.append(d)
        self.known.add(got.package)
        self.progress.set()
        return d

    def completed(self, d: Delivery, state: str, epoch: int) -> None:
        self.completions[d.command] = Completion(state, d.number, epoch, self.tick())
        self.progress.set()

    def violation(self, text: str) -> None:
        self.violations.append(text)


# --------------------------------------------------------------------------- the run


@dataclass
class Report:
    seed: int
    kills: int
    fsync: str
    seconds: float = 0.0
    packages: int = 0
    orphans: int = 0
    deliveries: int = 0
    completions: int = 0
    ordered: int = 0
    #: Commands leased (lease proven durable) when the broker died, delivered again later.
    leases_survived: int = 0
    #: Deliveries that repeated a number after a crash (the lease record was lost).
    numbers_skipped: int = 0
    snapshots: int = 0
    #: Restarts that loaded a snapshot and replayed records after it.
    snapshot_recoveries: int = 0
    torn_tails: int = 0
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"crashtest seed={self.seed} fsync={self.fsync} kills={self.kills} "
            f"in {self.seconds:.1f}s: {self.packages} packages acknowledged "
            f"(+{self.orphans} unacknowledged that landed), {self.deliveries} deliveries "
            f"({self.ordered} ordered), {self.completions} completions acknowledged; "
            f"{self.leases_survived} durable leases outlived a kill, "
            f"{self.numbers_skipped} delivery numbers skipped after one; "
            f"{self.snapshots} snapshots, {self.snapshot_recoveries} recoveries from "
            f"snapshot + log, {self.torn_tails} torn tails cut; "
            f"{len(self.violations)} violations"
        )


class Run:
    def __init__(self, work: Path, kills: int, seed: int, fsync: str, log: IO[str]) -> None:
        self.rng = random.Random(seed)
        self.report = Report(seed, kills, fsync)
        self.broker = Broker(work, fsync, log)
        self.h = History()
        self.epoch = 0
        self.up = False
        self.changed = asyncio.Condition()
        self.stopping = False  # producers finish their package and stop
        self.done = False  # consumers stop

    # ----- broker lives

    async def _set_up(self, up: bool) -> None:
        async with self.changed:
            if up:
                self.epoch += 1
            self.up = up
            self.changed.notify_all()

    def _is_up(self, min_epoch: int) -> bool:
        return self.up and self.epoch >= min_epoch

    async def connect(self, min_epoch: int) -> tuple[Client, int]:
        """A connection to the broker life `min_epoch` or a later one."""
        while True:
            async with self.changed:
                await self.changed.wait_for(functools.partial(self._is_up, min_epoch))
                epoch = self.epoch
            try:
                return await Client.connect(self.broker.socket, timeout=5), epoch
            except (OSError, TimeoutError):
                min_epoch = epoch + 1  # it died between: wait for the next life

    async def killer(self) -> None:
        for _ in range(self.report.kills):
            await asyncio.sleep(self.rng.uniform(*KILL_DELAY))
            await self._set_up(False)
            await self.broker.kill()
            await self.broker.start()
            await self._set_up(True)

    # ----- producers

    def make_package(self, rng: random.Random, pid: int, seq: int) -> list[dict[str, Any]]:
        commands: list[dict[str, Any]] = []
        for pos in range(rng.randint(0, 2)):
            params = {"p": pid, "seq": seq, "pos": pos}
            commands.append({"resource": ORDERED, "action": "step", "parameters": params})
        for _ in range(rng.randint(0 if commands else 1, 3)):
            pos = len(commands)
            deps: list[str | int] = []
            if pos and rng.random() < 0.5:
                deps.append(rng.randrange(pos))
            if self.h.dependable and rng.random() < 0.4:
                # A recent command: likely still ready, leased or waiting itself.
                deps.append(rng.choice(self.h.dependable[-12:]))
            commands.append(
                {
                    "resource": rng.choice(WORK),
                    "action": "work",
                    "parameters": {"p": pid, "seq": seq, "pos": pos, "pad": "x" * 40},
                    "dependencies": deps,
                }
            )
        return commands

    async def producer(self, pid: int) -> None:
        rng = random.Random(self.rng.random())
        client, epoch = await self.connect(1)
        seq = 0
        try:
            while not self.stopping:
                seq += 1
                commands = self.make_package(rng, pid, seq)
                if rng.random() < 0.15:
                    client, epoch = await self.build(client, epoch, commands)
                    continue
                try:
                    package, ids = await client.submit(commands)
                except ConnectionError:  # unacknowledged: it may or may not have landed
                    await client.close()
                    client, epoch = await self.connect(epoch + 1)
                    continue
                except ClientError as exc:
                    self.h.violation(f"SUBMIT {commands}: {exc!r}")
                    continue
                self.h.enqueued(package, ids)
                await asyncio.sleep(rng.uniform(0, 0.01))  # pacing, not synchronisation
        finally:
            await client.close()

    async def build(
        self, client: Client, epoch: int, commands: list[dict[str, Any]]
    ) -> tuple[Client, int]:
        """NEW, ADD, ENQUEUE, each step resumed after a restart from what the broker holds."""
        for c in commands:  # ADD takes ids only: drop the positional dependencies
            c["dependencies"] = [d for d in c.get("dependencies", []) if isinstance(d, str)]
        package: str | None = None
        ids: list[str] | None = None
        resumed = False
        while True:
            try:
                if package is None:
                    package = await client.new()
                if ids is None and resumed:
                    status = await client.status(package, commands=True)
                    assert isinstance(status, PackageStatus) and status.commands is not None
                    if status.commands:  # the ADD from before the crash landed
                        ids = [c.id for c in status.commands]
                if ids is None:
                    ids = await client.add_many(package, commands)
                try:
                    await client.enqueue(package)
                except NotOpen:
                    if not resumed:
                        raise
                    # the ENQUEUE from before the crash landed
                self.h.enqueued(package, ids)
                return client, epoch
            except ConnectionError:  # resume after the restart from what was acknowledged
                await client.close()
                client, epoch = await self.connect(epoch + 1)
                resumed = True
            except ClientError as exc:
                self.h.violation(f"building package {package}: {exc}")
                return client, epoch

    # ----- consumers

    async def consumer(self, resource: str, ttr: float | None, style: str) -> None:
        rng = random.Random(self.rng.random())
        epoch = 0
        while not self.done:
            client, epoch = await self.connect(epoch + 1)
            try:
                await self.consume(client, epoch, resource, ttr, style, rng)
            except ConnectionError:
                pass
            except ClientError as exc:
                self.h.violation(f"{resource} consumer: {exc!r}")
            finally:
                await client.close()

    async def consume(
        self,
        client: Client,
        epoch: int,
        resource: str,
        ttr: float | None,
        style: str,
        rng: random.Random,
    ) -> None:
        """Take, work, complete; `style` (STYLES) says how the completion and the next take
        go out."""
        h = self.h
        got: DeliveredCommand | None = None
        while not self.done:
            if got is None:
                got = await client.next(resource, timeout=0.3, ttr=ttr)
                if got is None:
                    continue
            d = h.delivered(got, epoch)
            try:
                if rng.random() < 0.5:
                    # The reply to a later request waited for the lease record: it is durable.
                    status = await client.status(got.id)
                    if (status.state, getattr(status, "delivery", None)) != ("leased", d.number):
                        h.violation(f"delivered {d}, STATUS says {status}")
                    d.durable = True
                await asyncio.sleep(rng.random() * 0.004)  # the work
                success = rng.random() >= 0.05
                reason = None if success else "failed on purpose"
                if success:
                    h.success_sent.setdefault(d.command, h.tick())
                if style == "pipelined" and not self.done:
                    # COMPLETE and NEXT written together: the NEXT may answer first (it does
                    # not wait for the completion's fsync unless its command depends on it).
                    state, got = await asyncio.gather(
                        client.complete(d.command, success, reason, d.number),
                        client.next(resource, timeout=0.3, ttr=ttr),
                    )
                    h.completed(d, state, epoch)
                    continue
                if style == "combined" and not self.done:
                    got = await client.complete_and_next(
                        d.command,
                        success,
                        resource,
                        reason=reason,
                        delivery=d.number,
                        timeout=0.3,
                        ttr=ttr,
                    )
                    h.completed(d, "succeeded" if success else "failed", epoch)
                    continue
                got = None
                state = await client.complete(d.command, success, reason, d.number)
                h.completed(d, state, epoch)
            except ClientError as exc:
                h.violation(f"{resource} consumer, {d}: {exc!r}")
                got = None

    # ----- the end

    async def settle(self) -> Client:
        """Wait (WAIT, with deadlines) until every package anyone knows of is finished and
        the broker holds no ready, waiting or leased command."""
        client, _ = await self.connect(self.epoch)
        finished: set[str] = set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_TIMEOUT
        while True:
            for package in sorted(self.h.known - finished):
                left = deadline - loop.time()
                status = await client.wait(package, timeout=max(0.0, left))
                if status is None:
                    raise CrashTestError(f"package {package} never finished")
                finished.add(package)
            totals = (await client.stats())["totals"]
            if not (totals["ready"] or totals["waiting"] or totals["leased"]):
                if self.h.known <= finished:
                    return client
                continue
            # Packages nobody was told about (their SUBMIT reply was lost) are being worked
            # on: wait for the next delivery or completion, then look again.
            self.h.progress.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self.h.progress.wait()
            except TimeoutError:
                raise CrashTestError(
                    f"nothing finishes any more: {totals}; violations so far: "
                    f"{self.h.violations[:5]}"
                ) from None

    async def final_state(self, client: Client) -> dict[str, PackageStatus]:
        """STATUS of every known package; one the broker lost is a violation."""
        states = {}
        for package in sorted(self.h.known):
            try:
                status = await client.status(package, commands=True)
            except NotFound:
                self.h.violation(f"package {package} lost")
                continue
            assert isinstance(status, PackageStatus)
            states[package] = status
        return states

    async def run(self) -> Report:
        started = time.monotonic()
        await self.broker.start()
        await self._set_up(True)
        producers = [asyncio.create_task(self.producer(p)) for p in range(3)]
        # One consumer on ORDERED (so its deliveries are in the broker's order), two with
        # different lease kinds and completion styles on each WORK resource.
        style = self.rng.choice(STYLES)
        consumers = [asyncio.create_task(self.consumer(ORDERED, None, style))]
        for resource in WORK:
            consumers.append(asyncio.create_task(self.consumer(resource, 60.0, "serial")))
            consumers.append(asyncio.create_task(self.consumer(resource, None, "combined")))
            consumers.append(asyncio.create_task(self.consumer(resource, None, "pipelined")))
        try:
            await self.killer()
            self.stopping = True
            async with asyncio.timeout(30):
                await asyncio.gather(*producers)
            client = await self.settle()
            self.done = True
            async with asyncio.timeout(30):
                await asyncio.gather(*consumers)
            states = await self.final_state(client)
            await client.close()
            self.check(states)
            await self.check_clean_restart(states)
        finally:
            for task in (*producers, *consumers):
                task.cancel()
            await asyncio.gather(*producers, *consumers, return_exceptions=True)
            await self.broker.kill()
        self.count_logs()
        self.report.seconds = time.monotonic() - started
        self.report.violations = self.h.violations
        return self.report

    async def check_clean_restart(self, states: dict[str, PackageStatus]) -> None:
        await self._set_up(False)
        code = await self.broker.terminate()
        if code != 0:
            self.h.violation(f"SIGTERM: the broker exited {code}")
        await self.broker.start()
        await self._set_up(True)
        marker = self.broker.lines.index(f"==== start {self.broker.starts}")
        recovered = [line for line in self.broker.lines[marker:] if "recovered:" in line]
        if not (recovered and "replayed 0 records" in recovered[0]):
            self.h.violation(f"after a clean stop the log still had records: {recovered}")
        client, _ = await self.connect(self.epoch)
        again = await self.final_state(client)
        await client.close()
        for package, status in states.items():
            if again.get(package) != status:
                self.h.violation(f"clean restart changed {package}: {status} -> {again[package]}")
        await self._set_up(False)
        if await self.broker.terminate() != 0:
            self.h.violation("SIGTERM after the clean restart: nonzero exit")

    def count_logs(self) -> None:
        r = self.report
        recovered = re.compile(r"recovered: snapshot at lsn (\d+) .* replayed (\d+) records")
        taken = re.compile(r"spinbroker\.persist: snapshot at lsn \d+ in ")
        for line in self.broker.lines:
            if taken.search(line):
                r.snapshots += 1
            elif "torn tail cut" in line:
                r.torn_tails += 1
            elif m := recovered.search(line):
                r.snapshot_recoveries += int(m[1]) > 0 and int(m[2]) > 0

    # ----- the checks

    def check(self, states: dict[str, PackageStatus]) -> None:
        h, r = self.h, self.report
        commands = {c.id: c for s in states.values() for c in s.commands or ()}
        r.packages = len(h.packages)
        r.orphans = len(h.known - h.packages.keys())
        r.deliveries = len(h.deliveries)
        r.completions = len(h.completions)
        for package, ids in h.packages.items():
            status = states.get(package)
            if status is None:
                continue  # reported by final_state
            held = [c.id for c in status.commands or ()]
            if held != ids:
                h.violation(f"acknowledged package {package} holds {held}, not {ids}")
            if not status.finished:
                h.violation(f"acknowledged package {package} never finished: {status}")
        for command, done in h.completions.items():
            got = commands.get(command)
            if got is None or got.state != done.state:
                h.violation(f"acknowledged COMPLETE {command} {done} lost: now {got}")
        for c in commands.values():
            if c.state not in FINISHED and states[c.package].state != "open":
                h.violation(f"command {c.id} left {c.state}")
        by_command: dict[str, list[Delivery]] = defaultdict(list)
        for d in h.deliveries:
            by_command[d.command].append(d)
        for command, ds in by_command.items():
            self.check_deliveries(command, ds, by_command, commands)
        self.check_order(by_command, commands)

    def check_deliveries(
        self,
        command: str,
        ds: list[Delivery],
        by_command: dict[str, list[Delivery]],
        commands: dict[str, Any],
    ) -> None:
        h, r = self.h, self.report
        done = h.completions.get(command)
        for d in ds:
            if done is not None and (d.epoch, d.number) > (done.epoch, done.number):
                h.violation(f"{d} delivered after its acknowledged completion {done}")
            for dep in d.dependencies:
                dep_state = commands[dep].state if dep in commands else None
                if dep_state != "succeeded":
                    h.violation(f"{d} delivered, its dependency {dep} is {dep_state}")
                if h.success_sent.get(dep, d.tick) >= d.tick:
                    h.violation(f"{d} delivered before anyone completed its dependency {dep}")
                later = [x for x in by_command.get(dep, ()) if x.tick > d.tick]
                if later:
                    h.violation(f"dependency {dep} of {d} delivered again after it: {later}")
        for prev, d in itertools.pairwise(ds):
            if d.epoch == prev.epoch:
                if d.number != prev.number + 1:
                    h.violation(f"delivery count jumped within one life: {prev} -> {d}")
                continue
            if d.number <= prev.number:
                h.violation(f"delivery number given again across a crash: {prev} -> {d}")
            r.leases_survived += prev.durable
            r.numbers_skipped += d.number > prev.number + 1

    def check_order(self, by_command: dict[str, list[Delivery]], commands: dict[str, Any]) -> None:
        """Per producer, on the one-consumer resource: every command ahead of a delivered
        one was delivered earlier in the same life, or had finished in an earlier one."""
        h = self.h
        ordered = [d for d in h.deliveries if d.resource == ORDERED]
        self.report.ordered = len(ordered)
        key = {
            d.command: (d.parameters["p"], d.parameters["seq"], d.parameters["pos"])
            for d in ordered
        }
        lines: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
        for command, (p, seq, pos) in key.items():
            lines[p].append((seq, pos, command))
        for line in lines.values():
            line.sort()
        for c in commands.values():
            if c.resource == ORDERED and c.id not in key and c.state != "staged":
                h.violation(f"ordered command {c.id} ({c.state}) was never delivered")
        for d in ordered:
            p, seq, pos = key[d.command]
            for b_seq, b_pos, b in lines[p]:
                if (b_seq, b_pos) >= (seq, pos):
                    break
                seen = by_command[b]
                earlier_here = any(x.epoch == d.epoch and x.tick < d.tick for x in seen)
                finished_before = commands[b].state in FINISHED and all(
                    x.epoch < d.epoch for x in seen
                )
                if not (earlier_here or finished_before):
                    h.violation(f"{d} delivered ahead of {b} ({b_seq}, {b_pos}): {seen}")


# --------------------------------------------------------------------------- entry points


async def crashtest(work: Path, kills: int, seed: int, fsync: str = "always") -> Report:
    """Run one crash test in `work` (the data dir and broker.log go there)."""
    with open(work / "broker.log", "w") as log:
        return await Run(work, kills, seed, fsync, log).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--fsync", choices=("always", "batch"), default="always")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    work = Path(tempfile.mkdtemp(prefix="spinbroker-crash-"))
    report = asyncio.run(crashtest(work, args.kills, seed, args.fsync))
    print(report.summary())
    for v in report.violations[:50]:
        print("  VIOLATION", v)
    if report.violations or args.keep:
        print(f"work dir kept: {work} (broker.log holds every broker life)")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
