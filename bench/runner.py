"""The command line: which cases run, in what order, how often; progress, tables, JSON.

Repetitions are the outer loop and peers run right next to spinbroker's matching case, so
machine noise spreads over every system alike.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from importlib.metadata import version
from typing import Any

from bench import report, servers
from bench import scenarios as sc
from bench.clients import CONNS, PAYLOAD_BYTES
from bench.report import Runs, median, ratio_table, ratios, tables, targets
from bench.servers import LEVELS, SYSTEMS, wait_quiet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = ("produce", "consume", "e2e", "wake", "recovery", "memory", "snapshot", "connections")
PRODUCE = ("unpipelined x1", "unpipelined x16", "pipelined 100", "package 10", "package 100")
ERR: dict[str, Any] = {"file": sys.stderr, "flush": True}
CAPTURE: dict[str, Any] = {"capture_output": True, "text": True, "check": False, "cwd": ROOT}
QUIET_HELP = "before each case, wait up to S s for the machine to go idle (shared VMs)"
SMOKE = {
    "n": 400,
    "wake_n": 100,
    "e2e_n": 64,
    "big": 5_000,
    "max_s": 5.0,
    "drain_s": 0.25,
    "idle_settle_s": 0.0,
    "idle_n": 50,
}


@dataclass
class Case:
    scenario: str
    case: str
    system: str
    level: str
    transport: str
    run: Callable[[], sc.Figures]
    rows: tuple[tuple[str, str], ...] = ()  # (scenario, case) rows it fills; default its own

    def __post_init__(self) -> None:
        self.rows = self.rows or ((self.scenario, self.case),)
        self.label = f"{self.scenario} {self.case} {self.system} {self.level} {self.transport}"


def build(a: argparse.Namespace, o: sc.Opts) -> list[Case]:
    only, out = set(a.only.split(",")), []
    systems = [s for s in a.systems.split(",") if s == "spinbroker" or SYSTEMS[s].available()]
    for lv, t in itertools.product(a.levels.split(","), a.transports.split(",")):
        for s in systems:
            if "produce" in only:
                for c in PRODUCE:
                    if not c.startswith("package") or CONNS[s].supports_package:
                        run = partial(sc.produce, s, lv, t, c, o)
                        out.append(Case("produce", c, s, lv, t, run))
            if "consume" in only:
                for k in (1, 4, 16):
                    run = partial(sc.consume, s, lv, t, k, o)
                    out.append(Case("consume", f"agents {k}", s, lv, t, run))
            if "wake" in only:
                out.append(Case("wake", "blocked agent", s, lv, t, partial(sc.wake, s, lv, t, o)))
            if "connections" in only:  # one case, two rows: the puts run beside the idle ones
                run = partial(sc.connections, s, lv, t, o)
                case = "idle rss, put with idle"
                out.append(Case("connections", case, s, lv, t, run, sc.CONNECTION_ROWS))
        if "e2e" in only:
            out.append(Case("e2e", "chain of 3", "spinbroker", lv, t, partial(sc.e2e, lv, t, o)))
    if only & {"recovery", "memory", "snapshot"}:
        t = a.transports.split(",")[0]
        run = partial(sc.durable_state, t, o)
        out.append(Case("memory", "queued", "spinbroker", "always", t, run, sc.DURABLE_ROWS))
    out.sort(key=lambda c: SCENARIOS.index(c.scenario))  # stable: peers stay next to their case
    return [c for c in out if re.search(a.filter, c.label)]


def headline(scenario: str, case: str, fig: dict[str, Any]) -> str:
    if "skipped" in fig:
        return f"not available: {fig['skipped']}"
    cols = report.columns(scenario, case)
    return ", ".join(f"{report.METRICS[k][0]} {report.fmt(k, fig.get(k))}" for k in cols)


def run_case(c: Case, strict: bool) -> sc.Figures:
    try:
        return c.run()
    except sc.Unavailable as e:
        return {row: {"skipped": str(e)} for row in c.rows}
    except Exception as e:
        if strict:
            raise
        traceback.print_exc()
        return {row: {"skipped": f"failed: {e!r}"} for row in c.rows}


def source_digest() -> str:
    """What broker code ran: other people may change the work tree during a long run."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "spinbroker", "**", "*.py"), recursive=True)):
        with open(path, "rb") as f:
            digest.update(path.encode() + f.read())
    return digest.hexdigest()[:16]


def machine() -> dict[str, Any]:
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    dirty = subprocess.run(["git", "status", "--porcelain", "spinbroker"], **CAPTURE)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **CAPTURE)
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {p: version(p) for p in ("msgpack", "uvloop")},
        "git": git.stdout.strip() + ("-dirty" if dirty.stdout.strip() else ""),
        "spinbroker_source_sha256": source_digest(),
        "loadavg": os.getloadavg(),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    about = "spinbroker's benchmark harness, with beanstalkd and Redis as peers (bench/README.md)"
    p = argparse.ArgumentParser(prog="python -m bench", description=about)
    p.add_argument("--only", default=",".join(SCENARIOS), help="scenarios, comma-separated")
    p.add_argument(
        "--systems", default="spinbroker,beanstalkd,redis", help="peers run when installed"
    )
    p.add_argument("--levels", default=",".join(LEVELS), help="durability: none,periodic,always")
    p.add_argument("--transports", default="unix,tcp")
    p.add_argument("--filter", default="", help="regex on 'scenario case system level transport'")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="S", help=QUIET_HELP)
    for f in fields(sc.Opts):
        flag, show = (
            f"--{f.name.replace('_', '-')}",
            f"{f.metadata['help']} (default {f.default:,})",
        )
        p.add_argument(flag, type=type(f.default), default=f.default, help=show)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="~15 s: tiny counts, durability none, one run, errors raise",
    )
    p.add_argument(
        "--out", help="JSON file (default bench/out/results-<time>.json); tables go to <out>.md"
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="run spinbroker under cProfile: one DIR/<case>-<n>.prof per broker start "
        "(its figures are then slower than the broker's)",
    )
    a = p.parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else argv
    if a.smoke:
        a.reps, a.levels, a.transports = 1, "none", "unix"
        vars(a).update(SMOKE)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    a.out = a.out or os.path.join(os.path.dirname(__file__), "out", f"results-{stamp}.json")
    return a


def main(argv: list[str] | None = None) -> Runs:
    a = parse(argv)
    o = sc.Opts(**{f.name: getattr(a, f.name) for f in fields(sc.Opts)})
    cases, results, load0, source = build(a, o), {}, os.getloadavg(), source_digest()
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
        servers.PROFILING = servers.Profiling(os.path.abspath(a.profile))
    missing = [s for s in a.systems.split(",") if not SYSTEMS[s].available()]
    if missing:
        print(f"not installed, skipped: {', '.join(missing)}", file=sys.stderr)
    try:
        for rep, (i, c) in itertools.product(range(a.reps), enumerate(cases, 1)):
            print(f"[run {rep + 1}/{a.reps} case {i}/{len(cases)}] {c.label} ... ", end="", **ERR)
            if a.quiet_wait:
                wait_quiet(a.quiet_wait)
            if servers.PROFILING is not None:
                servers.PROFILING.label = f"{c.label} run {rep + 1}"
            t0 = time.monotonic()
            figs = run_case(c, a.smoke)
            for (scenario, case), fig in figs.items():
                results.setdefault((scenario, case, c.system, c.level, c.transport), []).append(fig)
            lines = dict.fromkeys(headline(s, k, f) for (s, k), f in figs.items())
            print("; ".join(lines), f"({time.monotonic() - t0:.1f}s)", **ERR)
    except KeyboardInterrupt:
        print("\ninterrupted: writing the figures so far", **ERR)
    if source_digest() != source:
        print("warning: spinbroker's source changed during this run: figures mix versions", **ERR)
    write(a, o, results, load0)
    if servers.PROFILING is not None:
        print(f"profiles: {a.profile} (python -m pstats FILE; sort tottime, stats 30)", **ERR)
        servers.PROFILING = None
    return results


def write(a: argparse.Namespace, o: sc.Opts, results: Runs, load0: tuple[float, ...]) -> None:
    installed = [s for s in a.systems.split(",") if SYSTEMS[s].available()]
    meta = {
        "command": " ".join(["python -m bench", *a.argv]),
        "machine": machine() | {"loadavg_at_start": load0},
        "servers": {s: SYSTEMS[s].version() for s in installed},
        "durability_flags": {s: SYSTEMS[s].flags for s in installed},
        "payload_bytes": PAYLOAD_BYTES,
        "reps": a.reps,
        "opts": vars(o),
    }
    rows = [
        dict(zip(("scenario", "case", "system", "level", "transport"), k, strict=True))
        | {"flags": SYSTEMS[k[2]].flags[k[3]], "median": median(runs), "runs": runs}
        for k, runs in results.items()
    ]
    doc = {"meta": meta, "results": rows, "ratios": ratios(results), "targets": targets(results)}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    parts = [
        f"`{meta['command']}`\n",
        json.dumps(meta["machine"]),
        tables(results),
        ratio_table(results),
    ]
    text = "\n".join(parts)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"figures: {a.out}", file=sys.stderr)
