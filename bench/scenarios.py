"""The scenarios of issue 5, as harness-side functions: start a fresh server, start the
client processes, give the start signal, and turn what comes back into figures.

Every function returns {(scenario, case): figures}; a scenario the broker cannot run yet
raises `Unavailable`, which the report shows as "not available: <why>".
"""

from __future__ import annotations

import asyncio
import functools
import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import uvloop

from bench.clients import connect, payload
from bench.report import summarize
from bench.servers import SYSTEMS, Server, busy_cpu_seconds, cpu_seconds, rss_bytes
from bench.workloads import Clients, Spec, layout, now

Figures = dict[tuple[str, str], dict[str, Any]]
WAKE_TIMEOUT_S = 2.0
DURABLE_ROWS = (
    ("memory", "queued"),
    ("recovery", "from log"),
    ("snapshot", "stall"),
    ("recovery", "from snapshot"),
)
CONNECTION_ROWS = (("connections", "idle rss"), ("connections", "put with idle"))
FD_MARGIN = 100  # descriptors a server or client process needs besides the connections
#: Open connections a system accepts by default, and the flag that raises the cap.
CONN_CAPS = {"spinbroker": (10_000, "--max-connections"), "redis": (10_000, "--maxclients")}


class Unavailable(Exception):
    """The broker cannot run this scenario yet (say, no log or no snapshots)."""


def opt(default: float, about: str) -> Any:
    return field(default=default, metadata={"help": about})


@dataclass
class Opts:
    n: int = opt(20_000, "jobs per produce / consume case")
    wake_n: int = opt(2_000, "wake ticks, one per ms")
    e2e_n: int = opt(2_000, "e2e packages")
    big: int = opt(1_000_000, "commands for memory, recovery and snapshot")
    max_s: float = opt(15.0, "time bound of every timed loop, seconds")
    procs: int = opt(2, "client processes a group of connections is spread over")
    drain_s: float = opt(1.0, "a take that waits this long means the queue is drained")
    idle_n: int = opt(5_000, "idle connections held open in the connections scenario")
    idle_settle_s: float = opt(
        20.0, "seconds the idle connections stay silent before the server's RSS is read"
    )


def timed(srv: Server, clients: Clients) -> dict[str, Any]:
    """Start the clients, wait for them, and attach CPU use as fractions of one core:
    the server's (~100% on one thread: server-bound) and the clients' over the timed
    window, and the rest of the machine's while this case ran (other work skews it).
    For spinbroker, also how many log records each fdatasync made durable meanwhile
    (`group_commit`)."""
    log0 = log_stats(srv)
    s0, m0, w0 = cpu_seconds(srv.pid), busy_cpu_seconds(), now()
    t0 = clients.go()
    lat, ops, last, cli_s = clients.collect()
    srv_s, wall_s = cpu_seconds(srv.pid) - s0, max(last - t0, 1) / 1e9
    other = (busy_cpu_seconds() - m0 - srv_s - cli_s) / ((now() - w0) / 1e9)
    cpu = {"srv_cpu": srv_s / wall_s, "cli_cpu": cli_s / wall_s, "oth_cpu": max(0.0, other)}
    return summarize(lat, ops, int(wall_s * 1e9)) | cpu | group_commit(log0, log_stats(srv))


def log_stats(srv: Server) -> dict[str, Any] | None:
    """spinbroker's group-commit counters (STATS `log`), read between timed windows; None
    for the peers, which have no such figure."""
    if srv.system.name != "spinbroker":
        return None

    async def read() -> dict[str, Any]:
        c = await connect("spinbroker", srv.addr)
        try:
            return dict((await c.request("STATS"))["log"])
        finally:
            await c.close()

    return uvloop.run(read())


def group_commit(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """fdatasyncs over a window and, if there were any, the records each made durable and
    its mean time from the flush's start to its end settled on the event loop."""
    if before is None or after is None:
        return {}
    syncs = after["syncs"] - before["syncs"]
    if not syncs:
        return {"syncs": 0}
    records = after["synced_records"] - before["synced_records"]
    seconds = after["sync_seconds"] - before["sync_seconds"]
    return {"syncs": syncs, "records_per_sync": records / syncs, "sync_us": seconds / syncs * 1e6}


def group(
    srv: Server, o: Opts, role: str, conns: int = 1, procs: int = 1, **params: Any
) -> Clients:
    """`conns` connections running `role`, spread over at most `procs` processes."""
    return Clients(srv, [Spec(role, k, dict(params)) for k in layout(conns, procs)], o.max_s)


def produce(system: str, level: str, transport: str, case: str, o: Opts) -> Figures:
    """Unpipelined from 1 or 16 clients, pipelined 100 deep, or packages of 10 / 100."""
    kind, _, arg = case.partition(" ")
    conns = int(arg[1:]) if kind == "unpipelined" else 1
    mode = {"unpipelined": "serial", "pipelined": "batch", "package": "package"}[kind]
    size = 1 if kind == "unpipelined" else int(arg)
    with Server(SYSTEMS[system], level, transport) as srv:
        clients = group(srv, o, "produce", conns, o.procs, mode=mode, n=o.n // conns, size=size)
        return {("produce", case): timed(srv, clients)}


async def fill(system: str, addr: Any, n: int, max_s: float, conns: int = 2) -> int:
    """Put up to n jobs, 100 requests in flight per connection, for at most max_s seconds
    (untimed set-up); returns how many were put."""
    end = now() + int(max_s * 1e9)

    async def one(k: int) -> int:
        c, done = await connect(system, addr), 0
        for start in range(k * 100, n, conns * 100):
            if now() > end:
                break
            await c.put_batch([payload(i) for i in range(start, min(n, start + 100))])
            done += min(n, start + 100) - start
        await c.close()
        return done

    return sum(await asyncio.gather(*(one(k) for k in range(conns))))


def consume(system: str, level: str, transport: str, agents: int, o: Opts) -> Figures:
    """A queue pre-filled with o.n jobs drained by `agents` connections doing take + ack."""
    with Server(SYSTEMS[system], level, transport) as srv:
        n = uvloop.run(fill(system, srv.addr, o.n, o.max_s))
        fig = timed(srv, group(srv, o, "agent", agents, o.procs, n=n, timeout=o.drain_s))
        if fig["n"] != n and fig["ops_s"] * o.max_s > n:
            raise RuntimeError(f"consume drained {fig['n']} of {n} jobs")
        return {("consume", f"agents {agents}"): fig}


def wake(system: str, level: str, transport: str, o: Opts) -> Figures:
    """An agent blocked in take; one put every ~1 ms; latency = put sent -> agent has it."""
    with Server(SYSTEMS[system], level, transport) as srv:
        with group(srv, o, "agent", n=o.wake_n, timeout=WAKE_TIMEOUT_S, wake=True) as agent:
            producer = group(srv, o, "ticker", n=o.wake_n, interval_ms=1.0)
            agent.go()
            time.sleep(0.2)  # let the agent block in take
            fig = timed(srv, producer)  # ops_s: the achieved send rate
            lat, got, _, _ = agent.collect()
        return {("wake", "blocked agent"): fig | summarize(lat, got, 1) | {"ops_s": fig["ops_s"]}}


def e2e(level: str, transport: str, o: Opts, agents: int = 2, inflight: int = 16) -> Figures:
    """Packages of 3 commands chained by dependencies over resources bench-0..2, `agents`
    per resource; packages/s and SUBMIT sent -> WAIT returned."""
    with Server(SYSTEMS["spinbroker"], level, transport) as srv:
        params = {"n": o.e2e_n, "timeout": o.drain_s}
        workers = [Spec("agent", agents, params | {"resource": f"bench-{r}"}) for r in range(3)]
        with Clients(srv, workers, o.max_s) as pool:
            producer = group(srv, o, "chain", inflight, n=o.e2e_n // inflight, timeout=30)
            pool.go()
            fig = timed(srv, producer)
            pool.collect()
        return {("e2e", "chain of 3"): fig}


def connections(system: str, level: str, transport: str, o: Opts) -> Figures:
    """o.idle_n connections spread over the client processes, each making one PING (or
    the protocol's cheapest request) and then staying open and silent: the server's RSS
    growth per connection. Then, with all of them still open, one connection's unpipelined
    puts (produce "unpipelined x1" with o.n // 4 jobs): does a request cost more when many
    clients are connected but idle? At the end every idle connection PINGs once more."""
    # hold: > the settling, the put group's start and its bounded run
    n, hold_s = o.idle_n, o.idle_settle_s + 2 * o.max_s + 60
    with Server(SYSTEMS[system], level, transport, extra=room_for(system, n)) as srv:
        uvloop.run(ping(system, srv.addr))  # a first request's one-time costs: not per conn
        rss0 = rss_bytes(srv.pid)
        with group(srv, o, "idle", n, o.procs, hold_s=hold_s) as idle:
            # Every connection has answered its PING; what an idle one keeps shows once the
            # server has let go of what it held for that request. Redis 7 frees a
            # connection's working buffers only after it idles a few seconds: read at once,
            # 9.8 KB per idle connection; from ~15 s on, 2.0 KB (audit h8). spinbroker and
            # beanstalkd do not move.
            time.sleep(o.idle_settle_s)
            rss = rss_bytes(srv.pid)
            idle.go()
            puts = group(srv, o, "produce", mode="serial", n=max(1, o.n // 4), size=1)
            fig, puts_end = timed(srv, puts), now()
            idle.stop.set()
            _, held, last, _ = idle.collect()
        if last < puts_end:
            raise RuntimeError(
                f"the idle connections let go (at {hold_s:g} s) before the puts ended"
            )
    per_conn = {"bytes_per_conn": (rss - rss0) / n, "rss_mib": rss / 2**20, "conns": held}
    return {CONNECTION_ROWS[0]: per_conn, CONNECTION_ROWS[1]: fig | {"conns": held}}


def room_for(system: str, n: int) -> list[str]:
    """Flags that let `system` hold n connections (none below its default cap). Each idle
    connection also holds a descriptor in the server and in a client process, which both
    inherit this process's `ulimit -n`: too few would fail half-way, so say so first."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if n + FD_MARGIN > soft:
        raise Unavailable(
            f"--idle-n {n:,} needs ~{n + FD_MARGIN:,} descriptors: ulimit -n {soft:,}"
        )
    cap, flag = CONN_CAPS.get(system, (soft, ""))
    return [flag, str(n + FD_MARGIN)] if n + FD_MARGIN > cap else []


async def ping(system: str, addr: Any) -> None:
    """One round trip on a fresh connection (set-up, never timed)."""
    c = await connect(system, addr)
    try:
        await asyncio.wait_for(c.ping(), 60)
    finally:
        await c.close()


def start_up(srv: Server) -> float:
    """Seconds from spawning the broker to its first answered PING (recovery included)."""
    t0 = time.perf_counter()
    srv.start()
    ask(srv.addr, "PING")
    return time.perf_counter() - t0


def ask(addr: Any, verb: str, args: dict[str, Any] | None = None, timeout: float = 60) -> Any:
    """One spinbroker request on a fresh connection: set-up and checks, never timed."""

    async def one() -> Any:
        c = await connect("spinbroker", addr)
        try:
            return await asyncio.wait_for(c.request(verb, args), timeout)
        finally:
            await c.close()

    return uvloop.run(one())


def queued(srv: Server) -> int:
    return int(ask(srv.addr, "STATS")["totals"]["ready"])


@functools.cache
def serve_help() -> str:
    cmd = [*SYSTEMS["spinbroker"].version_argv[:-1], "serve", "--help"]
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout


class Lost(Exception):
    """The broker came back without its commands: nothing after this can be measured."""


def durable_state(transport: str, o: Opts) -> Figures:
    """One fill of o.big commands (100-byte parameters, one command per SUBMIT, fsync
    always) gives four figures: RSS per queued command, start-up from the log alone after a
    crash (SIGKILL), the stall while a snapshot is taken under probe traffic, and start-up
    from that snapshot. `--snapshot-every` keeps snapshots out of the way, then forces one."""
    out: Figures = {}
    flag = "--snapshot-every" in serve_help()
    never = ["--snapshot-every", str(10**12)] if flag else []
    srv = Server(SYSTEMS["spinbroker"], "always", transport, extra=never)

    try:
        empty_s = start_up(srv)
        rss0, t0 = rss_bytes(srv.pid), now()
        n = uvloop.run(fill("spinbroker", srv.addr, o.big, o.max_s * 20))
        fill_rate = n / ((now() - t0) / 1e9)
        if queued(srv) != n:
            raise RuntimeError(f"STATS shows {queued(srv)} ready commands after putting {n}")
        rss = rss_bytes(srv.pid)
        base = {"commands": n, "empty_startup_s": empty_s}
        per_cmd = {"bytes_per_command": (rss - rss0) / n, "rss_mib": rss / 2**20}
        out["memory", "queued"] = base | per_cmd | {"fill_ops_s": fill_rate}
        out.update(recover(srv, n, base))  # from the log, unless the broker snapshotted
        if not flag:
            raise Unavailable(
                "spinbroker serve has no --snapshot-every to hold off or force a snapshot"
            )
        srv.extra = ["--snapshot-every", str(n + 50)]  # the 50th probe SUBMIT starts one
        out["snapshot", "stall"] = stall = snapshot_stall(srv, n, o)
        srv.extra = never
        out.update(recover(srv, n + stall["probe_submits"], base))
    except (Unavailable, Lost) as e:
        for key in DURABLE_ROWS:
            out.setdefault(key, {"skipped": str(e)})
    finally:
        srv.remove()
    return out


def recover(srv: Server, expect: int, base: dict[str, Any]) -> Figures:
    """Crash the broker (SIGKILL) and time its start-up; it must find every command. The
    row is "from snapshot" when the data dir holds one, else "from log"."""
    srv.stop(signal.SIGKILL)
    files, snapshot = sorted(os.listdir(srv.data)), bool(snapshots(srv))
    secs = start_up(srv)
    if (got := queued(srv)) != expect:
        raise Lost(f"a restart recovered {got:,} of {expect:,} commands (data dir: {files})")
    row = ("recovery", "from snapshot" if snapshot else "from log")
    return {row: base | {"commands": expect, "startup_s": secs, "files": files}}


def snapshots(srv: Server) -> set[str]:
    return {f for f in os.listdir(srv.data) if f.startswith("snap-") and f.endswith(".snap")}


def snapshot_stall(srv: Server, n: int, o: Opts) -> dict[str, Any]:
    """Restart (not timed) so that the 50th record starts a snapshot, then send a PING and
    a SUBMIT every 1 ms until the snapshot file is there: the slowest PING is the longest
    stall of the event loop, the SUBMITs give the request latency meanwhile."""
    srv.stop(signal.SIGKILL)
    start_up(srv)
    before = snapshots(srv)
    ops = ["ping", "put"]
    with group(srv, o, "ticker", 2, n=int(o.max_s * 1000), interval_ms=1.0, ops=ops) as probes:
        t0 = time.perf_counter()
        probes.go()
        while snapshots(srv) <= before and time.perf_counter() - t0 < o.max_s:
            time.sleep(0.001)
        took = time.perf_counter() - t0
        time.sleep(0.2)
        probes.stop.set()
        (pings, _, _), (puts, submits, _) = probes.collect_each()
    if snapshots(srv) <= before:
        raise Unavailable(f"no snapshot file appeared within {o.max_s:g} s")
    fig = summarize(puts, submits, 1)
    stall = {
        "commands": n,
        "snapshot_s": took,
        "stall_ms": max(pings) / 1e6,
        "probe_submits": submits,
    }
    return stall | {"p99_us": fig["p99_us"], "max_us": fig["max_us"]}
