"""Figures: one run's summary, the median over runs, the tables, the ratios to the peers
and the targets of issue 5. Pure functions over plain dicts; no processes, no sockets."""

from __future__ import annotations

import math
import statistics
from typing import Any

Key = tuple[str, str, str, str, str]  # scenario, case, system, level, transport
Runs = dict[Key, list[dict[str, Any]]]

# metric -> (column header, format)
METRICS = {
    "ops_s": ("ops/s", "{:,.0f}"),
    "p50_us": ("p50 µs", "{:,.0f}"),
    "p99_us": ("p99 µs", "{:,.0f}"),
    "max_us": ("max µs", "{:,.0f}"),
    "srv_cpu": ("server CPU", "{:.0%}"),
    "cli_cpu": ("client CPU", "{:.0%}"),
    "oth_cpu": ("other CPU", "{:.0%}"),
    "records_per_sync": ("records/fsync", "{:,.1f}"),
    "startup_s": ("start-up s", "{:.2f}"),
    "empty_startup_s": ("empty start-up s", "{:.2f}"),
    "commands": ("commands", "{:,.0f}"),
    "bytes_per_command": ("RSS B/command", "{:,.0f}"),
    "rss_mib": ("RSS MiB", "{:,.0f}"),
    "stall_ms": ("longest stall ms", "{:,.1f}"),
    "snapshot_s": ("snapshot s", "{:.2f}"),
    "bytes_per_conn": ("RSS B/idle connection", "{:,.0f}"),
    "conns": ("idle connections", "{:,.0f}"),
}
THROUGHPUT = [
    *("ops_s", "p50_us", "p99_us", "max_us"),
    *("srv_cpu", "cli_cpu", "oth_cpu", "records_per_sync"),
]
#: Columns per scenario; the first is shown as median (min-max) over the runs.
COLUMNS = {
    "produce": THROUGHPUT,
    "consume": THROUGHPUT,
    "e2e": THROUGHPUT,
    "wake": ["p99_us", "p50_us", "max_us", "ops_s", "srv_cpu", "oth_cpu", "records_per_sync"],
    "recovery": ["startup_s", "empty_startup_s", "commands"],
    "memory": ["bytes_per_command", "rss_mib", "commands"],
    "snapshot": ["stall_ms", "p99_us", "max_us", "snapshot_s", "commands"],
    "connections": [*THROUGHPUT, "conns"],  # put with idle
}
#: Cases whose figures differ from the rest of their scenario's (each gets its own table).
CASE_COLUMNS = {("connections", "idle rss"): ["bytes_per_conn", "rss_mib", "conns"]}
#: The figure a ratio compares, and whether higher is better; CASE_RATIO_METRIC overrides
#: it for the cases of a scenario that measure different things.
RATIO_METRIC = {"produce": ("ops_s", True), "consume": ("ops_s", True), "wake": ("p99_us", False)}
CASE_RATIO_METRIC = {
    ("connections", "idle rss"): ("bytes_per_conn", False),
    ("connections", "put with idle"): ("ops_s", True),
}
#: Issue 5: spinbroker with fsync always, divided by a peer at a durability level, >= want.
PEER_TARGETS = [  # scenario, case, peer, peer level, want
    ("produce", "pipelined 100", "redis", "always", 1.0),
    ("produce", "pipelined 100", "beanstalkd", "always", 10.0),
    ("produce", "unpipelined x16", "beanstalkd", "always", 5.0),
    ("consume", "agents 4", "beanstalkd", "periodic", 1.0),
    ("consume", "agents 16", "beanstalkd", "none", 1.0),
    ("wake", "blocked agent", "beanstalkd", "always", 1.0),  # p99, inverted
]
ABSOLUTE_TARGETS = [  # scenario, case, metric, upper bound
    ("recovery", "from log", "startup_s", 5.0),
    ("memory", "queued", "bytes_per_command", 1024.0),
    ("snapshot", "stall", "stall_ms", 100.0),
]


def summarize(lat_ns: list[int], ops: int, elapsed_ns: int) -> dict[str, Any]:
    lat = sorted(lat_ns)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1e3 if lat else math.nan

    return {
        "n": ops,
        "ops_s": ops / (elapsed_ns / 1e9) if elapsed_ns > 0 else 0.0,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "max_us": lat[-1] / 1e3 if lat else math.nan,
    }


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric figure over the runs that were not skipped."""
    done = [r for r in runs if "skipped" not in r]
    if not done:
        return {"skipped": runs[-1]["skipped"]} if runs else {}
    keys = [k for k, v in done[0].items() if isinstance(v, int | float)]
    out = {k: statistics.median(r.get(k, math.nan) for r in done) for k in keys}
    return out | {f"{k}_range": [min(r[k] for r in done), max(r[k] for r in done)] for k in keys}


def columns(scenario: str, case: str) -> list[str]:
    return CASE_COLUMNS.get((scenario, case), COLUMNS[scenario])


def ratio_metric(scenario: str, case: str) -> tuple[str, bool] | None:
    return CASE_RATIO_METRIC.get((scenario, case), RATIO_METRIC.get(scenario))


def fmt(metric: str, value: Any) -> str:
    if not isinstance(value, int | float) or math.isnan(value):
        return "-"
    return METRICS[metric][1].format(value)


def tables(results: Runs) -> str:
    """One table per scenario, in COLUMNS order; a scenario whose cases have different
    columns gets one table per set of columns, titled "scenario: case"."""
    out: list[str] = []
    for scenario in COLUMNS:
        keys = [k for k in results if k[0] == scenario]
        sets = list(dict.fromkeys(tuple(columns(*k[:2])) for k in keys))
        for cols in map(list, sets):
            mine = [k for k in keys if columns(*k[:2]) == cols]
            cases = ", ".join(dict.fromkeys(k[1] for k in mine))
            title = scenario if len(sets) == 1 else f"{scenario}: {cases}"
            out += table(title, cols, [(k, median(results[k])) for k in mine])
    return "\n".join(out)


def table(title: str, cols: list[str], rows: list[tuple[Key, dict[str, Any]]]) -> list[str]:
    """Markdown lines: the first column is the median (min-max) over the runs."""
    head = [f"{METRICS[cols[0]][0]} median (min-max)", *(METRICS[c][0] for c in cols[1:])]
    out = [
        f"\n### {title}\n",
        "| case | system | durability | transport | " + " | ".join(head) + " |",
    ]
    out.append("|---|---|---|---|" + "---:|" * len(cols))
    for (_, case, system, level, transport), m in rows:
        label = f"| {case} | {system} | {level} | {transport} | "
        if "skipped" in m:
            out.append(label + f"not available: {m['skipped']} |" + " |" * (len(cols) - 1))
            continue
        lo, hi = m[f"{cols[0]}_range"]
        first = f"{fmt(cols[0], m[cols[0]])} ({fmt(cols[0], lo)}-{fmt(cols[0], hi)})"
        out.append(label + " | ".join([first, *(fmt(c, m.get(c)) for c in cols[1:])]) + " |")
    return out


def ratio(results: Runs, key: Key, peer: str, peer_level: str) -> float:
    """spinbroker's figure / the peer's, inverted where lower is better (latency, bytes),
    so > 1 always means spinbroker did better. NaN unless both figures are above zero."""
    metric, higher = ratio_metric(key[0], key[1]) or ("", True)
    spin, other = median(results.get(key, [])).get(metric), None
    peer_runs = results.get((key[0], key[1], peer, peer_level, key[4]))
    if peer_runs:
        other = median(peer_runs).get(metric)
    if not isinstance(spin, float) or not isinstance(other, float) or spin <= 0 or other <= 0:
        return math.nan
    return spin / other if higher else other / spin


def ratios(results: Runs) -> list[dict[str, Any]]:
    rows = []
    for key in results:
        scenario, case, system, level, transport = key
        if system != "spinbroker" or ratio_metric(scenario, case) is None:
            continue
        peers = {p: ratio(results, key, p, level) for p in ("beanstalkd", "redis")}
        if any(not math.isnan(v) for v in peers.values()):
            rows.append(
                {"scenario": scenario, "case": case, "level": level, "transport": transport}
            )
            rows[-1] |= peers
    return rows


def targets(results: Runs) -> list[dict[str, Any]]:
    def row(label: str, transport: str, want: str, got: float, ok: bool) -> dict[str, Any]:
        ok_or_unknown = None if math.isnan(got) else ok
        return {
            "target": label,
            "transport": transport,
            "want": want,
            "got": got,
            "ok": ok_or_unknown,
        }

    out = []
    for t in sorted({k[4] for k in results}):
        for scenario, case, peer, level, want in PEER_TARGETS:
            got = ratio(results, (scenario, case, "spinbroker", "always", t), peer, level)
            label = f"{scenario} {case}: spinbroker always / {peer} {level}"
            out.append(row(label, t, f">= {want:g}x", got, got >= want))
    for (scenario, case, _, _, t), runs in results.items():
        m = median(runs)
        for s, c, metric, bound in ABSOLUTE_TARGETS:
            if (s, c) != (scenario, case):
                continue
            got, label = m.get(metric, math.nan), f"{scenario} {case}: {METRICS[metric][0]}"
            label += f" ({m['commands']:,.0f} commands)" if "commands" in m else ""
            out.append(row(label, t, f"<= {bound:g}", got, got <= bound))
    return out


def ratio_table(results: Runs) -> str:
    lines = ["\n### spinbroker / peer (same durability; > 1 means spinbroker is better)\n",
             "| scenario | case | durability | transport | / beanstalkd | / redis |",
             "|---|---|---|---|---:|---:|"]  # fmt: skip
    for r in ratios(results):
        cells = ["-" if math.isnan(r[p]) else f"{r[p]:.2f}x" for p in ("beanstalkd", "redis")]
        row = [r["scenario"], r["case"], r["level"], r["transport"], *cells]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "\n### targets (issue 5)\n",
        "| target | transport | want | got | met |",
        "|---|---|---|---:|---|",
    ]
    for t in targets(results):
        got = "-" if math.isnan(t["got"]) else f"{t['got']:,.2f}"
        met = {True: "yes", False: "**no**", None: "not measured"}[t["ok"]]
        lines.append(f"| {t['target']} | {t['transport']} | {t['want']} | {got} | {met} |")
    return "\n".join(lines)
