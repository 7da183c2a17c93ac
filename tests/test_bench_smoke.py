"""The benchmark harness runs end to end in smoke mode, so it cannot rot.

`python -m bench --smoke` starts a real broker and real client processes with tiny counts.
No timed assertions: only that every spinbroker scenario produced figures (or, for the ones
the broker cannot run yet, an explicit "not available"), and that installed peers ran too.
"""

from __future__ import annotations

import importlib.util
import json
import pstats
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("spinbroker.server") is None, reason="no spinbroker server yet"
)


def test_smoke_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    doc = json.loads(out.read_text())
    rows = {(r["scenario"], r["case"], r["system"]): r["median"] for r in doc["results"]}

    for scenario, case in [
        ("produce", "unpipelined x1"),
        ("produce", "unpipelined x16"),
        ("produce", "pipelined 100"),
        ("produce", "package 10"),
        ("consume", "agents 4"),
        ("e2e", "chain of 3"),
        ("wake", "blocked agent"),
        ("connections", "put with idle"),
    ]:
        figures = rows[scenario, case, "spinbroker"]
        assert figures.get("n", 0) > 0 and figures["ops_s"] > 0, (scenario, case, figures)
        assert figures["syncs"] >= 0, (scenario, case, figures)  # read from STATS
    for scenario, case in [("memory", "queued"), ("recovery", "from log"), ("snapshot", "stall")]:
        figures = rows[scenario, case, "spinbroker"]
        assert "skipped" in figures or figures["commands"] > 0, (scenario, case, figures)

    idle = rows["connections", "idle rss", "spinbroker"]
    assert idle["conns"] == 50 and "bytes_per_conn" in idle, idle  # --smoke holds 50 open

    for peer, program in [("beanstalkd", "beanstalkd"), ("redis", "redis-server")]:
        if shutil.which(program):
            assert rows["produce", "pipelined 100", peer]["n"] > 0
            assert "syncs" not in rows["produce", "pipelined 100", peer]
            assert rows["connections", "idle rss", peer]["conns"] == 50
            assert rows["connections", "put with idle", peer]["n"] > 0
    assert doc["meta"]["payload_bytes"] == 100
    assert {t["target"] for t in doc["targets"]}, "the targets table is empty"
    assert "| case | system |" in out.with_suffix(".md").read_text()


def test_profile_writes_one_cprofile_per_broker_start(tmp_path: Path) -> None:
    """`--profile DIR` runs spinbroker under cProfile; each start leaves a profile of the
    broker's own code, named after its case."""
    profiles = tmp_path / "profiles"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "bench", "--smoke", "--only", "produce"),
            *("--systems", "spinbroker", "--filter", "unpipelined x1 "),
            *("--out", str(tmp_path / "r.json"), "--profile", str(profiles)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    written = sorted(p.name for p in profiles.iterdir())
    assert written == ["produce-unpipelined-x1-spinbroker-none-unix-run-1-1.prof"], written
    stats = pstats.Stats(str(profiles / written[0]))
    functions = {name for _, _, name in stats.stats}  # type: ignore[attr-defined]
    assert {"after_batch", "data_received", "submit"} <= functions


def test_group_commit_figures_are_the_window_s_deltas() -> None:
    from bench.scenarios import group_commit

    before = {"syncs": 5, "synced_records": 40, "sync_seconds": 0.5}
    assert group_commit(before, {"syncs": 9, "synced_records": 240, "sync_seconds": 0.502}) == {
        "syncs": 4,
        "records_per_sync": 50.0,
        "sync_us": pytest.approx(500.0),
    }
    assert group_commit(before, before) == {"syncs": 0}  # `--fsync off`: no sync in the window
    assert group_commit(None, None) == {}  # a peer
