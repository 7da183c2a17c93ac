"""What the client processes run, and how the harness starts them.

Each client process opens its connections (and makes its role's set-up request on each,
if the role has one), reports ready, waits for the common start signal, runs one role on
all its connections as asyncio tasks, and sends back its latencies, its op count, the time
its last op finished and its own CPU time. Times are `perf_counter_ns` (CLOCK_MONOTONIC),
so they compare across processes. Every loop stops at its count or at the deadline,
whichever comes first.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvloop

from bench.clients import QUEUE, SpinConn, connect, payload, sent_ns
from bench.servers import Server

now = time.perf_counter_ns
IDLE_POLL_S = 0.02  # how often an idle process looks at the stop event
Result = tuple[list[int], int, int]  # latencies (ns), ops done, time the last op finished


@dataclass
class Spec:
    """One client process: `role` on `conns` connections with `params`."""

    role: str
    conns: int
    params: dict[str, Any] = field(default_factory=dict)


async def produce(c: Any, k: int, p: dict[str, Any], end: int) -> Result:
    """p: mode serial|batch|package, n jobs for this connection, size per batch/package."""
    size = 1 if p["mode"] == "serial" else p["size"]
    op = c.put_package if p["mode"] == "package" else c.put_batch
    datas = p["datas"]  # built before the clock started (`prepared`)
    lat, i, last = [], 0, now()
    while i < p["n"] and last < end:
        t = now()
        await op(datas[i : i + size])
        last = now()
        lat.append(last - t)
        i += size
    return lat, min(i, p["n"]), last


async def agent(c: Any, k: int, p: dict[str, Any], end: int) -> Result:
    """take + ack until p["n"] jobs or a take times out (the queue is drained). Each ack is
    pipelined with the next take (one write, one round trip per job, on every system).
    Latency is the cycle from one job in hand to the next, or with p["wake"] the payload's
    send time -> received. The ops end when the last acknowledgement is read, so a final
    take that waits out the timeout on a drained queue is not counted."""
    extra = () if p.get("resource") is None else (p["resource"],)
    lat: list[int] = []
    t = now()
    job = await c.take(p["timeout"], *extra) if t < end else None
    while job is not None:
        got = now()
        lat.append(got - sent_ns(job[1]) if p.get("wake") else got - t)
        t = got
        if len(lat) < p["n"] and got < end:
            job = await c.ack_then_take(job[0], p["timeout"], *extra)
        else:
            await c.ack(job[0])
            job = None
    await c.settle()
    return lat, len(lat), c.acked_at or now()


async def ticker(c: Any, k: int, p: dict[str, Any], end: int) -> Result:
    """Every p["interval_ms"], serially, one put stamped with its send time, or a ping
    when p["ops"][k] says so: the wake producer and the snapshot-stall probes."""
    ping = p.get("ops", ["put"] * (k + 1))[k] == "ping"
    lat, t0, i, last = [], now(), 0, now()
    while i < p["n"] and last < end and not p["stop"].is_set():
        t = now()
        await (c.ping() if ping else c.put(payload(i, t)))
        last = now()
        lat.append(last - t)
        i += 1
        await asyncio.sleep(max(0.0, (t0 + i * p["interval_ms"] * 1e6 - now()) / 1e9))
    return lat, i, last


async def chain(c: SpinConn, k: int, p: dict[str, Any], end: int) -> Result:
    """End to end: SUBMIT a package of 3 commands on resources bench-0, -1, -2, each
    depending on the one before, then WAIT; latency is SUBMIT sent -> WAIT returned."""
    lat, last = [], now()
    while len(lat) < p["n"] and last < end:
        t = now()
        cmds = [c.command(payload(i), f"{QUEUE}-{i}", [i - 1] if i else None) for i in range(3)]
        pkg = await c.request("SUBMIT", {"commands": cmds})
        status = await c.request("WAIT", {"package": pkg["package"], "timeout": p["timeout"]})
        if status is None or status["state"] != "succeeded":
            raise RuntimeError(f"e2e package did not succeed: {status}")
        last = now()
        lat.append(last - t)
    return lat, len(lat), last


async def idle(c: Any, k: int, p: dict[str, Any], end: int) -> Result:
    """Keep the connection open and silent (its one request was the set-up PING) until the
    harness sets p["stop"], or p["hold_s"] after the start at the latest (other clients
    are timed meanwhile, so this outlives the usual deadline); then PING once more, which
    shows the server kept the connection all along. Only connection 0 polls the stop
    event; the others wait on an asyncio event it sets (one per process, in p), so
    thousands of idle connections cost their process nothing. One op per connection."""
    released = p.setdefault("released", asyncio.Event())
    if k == 0:
        hold_end = now() + int(p["hold_s"] * 1e9)
        while not p["stop"].is_set() and now() < hold_end:
            await asyncio.sleep(IDLE_POLL_S)
        released.set()
    await released.wait()
    await c.ping()
    return [], 1, now()


def prepared(role: str, k: int, p: dict[str, Any]) -> dict[str, Any]:
    """Connection k's parameters with what its role needs before the clock starts: the
    produce payloads (building 20,000 of them takes ~6 ms, 7-18% of a fast Redis case's
    window when it was timed: audit h8)."""
    if role == "produce":
        return {**p, "datas": [payload(k * p["n"] + i) for i in range(p["n"])]}
    return p


ROLES: dict[str, Callable[[Any, int, dict[str, Any], int], Awaitable[Result]]] = {
    "produce": produce,
    "agent": agent,
    "ticker": ticker,
    "chain": chain,
    "idle": idle,
}
#: A request a role makes on each connection before its process reports ready: when the
#: harness hears "ready", the server has set up every connection's state.
SETUP: dict[str, Callable[[Any], Awaitable[None]]] = {"idle": lambda c: c.ping()}


async def open_conns(system: str, addr: Any, spec: Spec, max_s: float) -> list[Any]:
    """spec.conns connections, each making the role's set-up request (if any) before the
    next one opens: that paces the connects to the server's accept loop, whose listen
    backlog would overflow otherwise (a Unix socket then refuses, TCP retries after 1 s).
    Everything within max_s, or RuntimeError saying how far it got."""
    conns: list[Any] = []
    setup = SETUP.get(spec.role)
    try:
        async with asyncio.timeout(max_s):
            while len(conns) < spec.conns:
                conns.append(await connect(system, addr))
                if setup is not None:
                    await setup(conns[-1])
    except TimeoutError:
        got = f"{len(conns):,} of {spec.conns:,} connections"
        raise RuntimeError(f"{spec.role}: {got} opened and set up in {max_s:g} s") from None
    return conns


def client_main(
    system: str, addr: Any, spec: Spec, max_s: float, ready: Any, go: Any, out: Any
) -> None:
    """A client process: connect, say ready, wait for go, run the role on every connection."""

    async def run() -> None:
        try:
            conns = await open_conns(system, addr, spec, max_s)
        except Exception as e:  # the harness raises it instead of waiting for "ready"
            ready.put(f"client set-up failed: {e!r}")
            return
        params = [prepared(spec.role, k, spec.params) for k in range(len(conns))]
        ready.put(os.getpid())
        if not go.wait(60):  # blocking is fine: nothing else runs on this loop yet
            return
        cpu0, end, role = time.process_time(), now() + int(max_s * 1e9), ROLES[spec.role]
        try:
            results = await asyncio.gather(
                *(role(c, k, params[k], end) for k, c in enumerate(conns))
            )
            out.put((time.process_time() - cpu0, results))
        except Exception as e:
            out.put((0.0, f"{spec.role} failed: {e!r}"))
        for c in conns:
            await c.close()

    uvloop.run(run())


class Clients:
    """Client processes started and connected to `srv`; `go()` starts them all at once."""

    def __init__(self, srv: Server, specs: list[Spec], max_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.max_s, self.ready, self.out = max_s, ctx.Queue(), ctx.Queue()
        self.go_event, self.stop = ctx.Event(), ctx.Event()
        args = (srv.system.name, srv.addr)
        self.procs = [
            ctx.Process(
                target=client_main,
                args=(*args, s, max_s, self.ready, self.go_event, self.out),
                daemon=True,
            )
            for s in specs
        ]
        for s in specs:
            s.params["stop"] = self.stop
        try:
            for proc in self.procs:
                proc.start()
            for _ in self.procs:
                if isinstance(got := self.ready.get(timeout=60), str):
                    raise RuntimeError(got)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def go(self) -> int:
        t = now()
        self.go_event.set()
        return t

    def collect_each(self) -> list[Result]:
        """Every connection's result; sets self.cpu_s to the client processes' CPU time."""
        each: list[Result] = []
        self.cpu_s = 0.0
        try:
            for _ in self.procs:
                cpu, results = self.out.get(timeout=self.max_s + 60)
                if isinstance(results, str):
                    raise RuntimeError(results)
                self.cpu_s += cpu
                each += results
        finally:
            self.close()
        return each

    def collect(self) -> tuple[list[int], int, int, float]:
        """(every latency, ops, time the last op finished, client CPU seconds)."""
        each = self.collect_each()
        lat = [x for r in each for x in r[0]]
        return lat, sum(r[1] for r in each), max(r[2] for r in each), self.cpu_s

    def close(self) -> None:
        self.stop.set()
        for proc in (p for p in self.procs if p.pid is not None):  # the ones started
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()


def layout(clients: int, procs: int) -> list[int]:
    """Spread `clients` connections over at most `procs` processes, as evenly as possible."""
    n = max(1, min(clients, procs))
    return [clients // n + (1 if i < clients % n else 0) for i in range(n)]
