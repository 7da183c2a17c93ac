"""The servers under test: how to start each on loopback, and what to read from its process.

A `System` knows one broker's command line for each durability level. `Server.start`
gives it a fresh data dir and free addresses, waits until it accepts, and `stop` ends
exactly that process. Nothing here speaks a protocol beyond "the socket accepts".
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

#: Durability levels, weakest first. Each system maps them to its own flags so that the
#: same level means the same promise: nothing / fsync in the background / fsync before reply.
LEVELS = ("none", "periodic", "always")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """CPU time of another process, all threads: its POSIX process CPU clock
    (Linux encodes it as ((~pid) << 3) | CPUCLOCK_SCHED)."""
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        return float("nan")


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy since boot (all cores; from /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def wait_quiet(max_s: float, busy: float = 0.25, window_s: float = 0.5) -> float:
    """Wait (at most max_s) until the machine's busy CPU over window_s is below `busy`
    cores, so that other people's work does not land in a case; returns the last figure."""
    deadline = time.monotonic() + max_s
    while True:
        b0 = busy_cpu_seconds()
        time.sleep(window_s)
        used = (busy_cpu_seconds() - b0) / window_s
        if used < busy or time.monotonic() > deadline:
            return used


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class System:
    """A broker: its command line ({data}, {sock}, {port}, {listen} filled in per server)
    and the flags that give it each durability level."""

    name: str
    argv: list[str]
    flags: dict[str, list[str]]
    version_argv: list[str]

    def command(self, level: str, srv: Server) -> list[str]:
        listen = f"unix:{srv.sock}" if srv.transport == "unix" else "127.0.0.1"
        fill = {"data": srv.data, "sock": srv.sock, "port": srv.port, "listen": listen}
        return [a.format(**fill) for a in self.argv + self.flags[level]]

    def available(self) -> bool:
        return shutil.which(self.argv[0]) is not None

    def version(self) -> str:
        out = subprocess.run(self.version_argv, capture_output=True, text=True, check=False)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "?"


SPIN = [sys.executable, "-m", "spinbroker"]
SYSTEMS = {
    s.name: s
    for s in [
        System(
            "spinbroker",
            [
                *SPIN,
                "serve",
                "--data-dir",
                "{data}",
                "--socket",
                "{sock}",
                "--addr",
                "127.0.0.1:{port}",
            ],
            {
                "none": ["--fsync", "off"],
                "periodic": ["--fsync", "batch"],
                "always": ["--fsync", "always"],
            },
            [*SPIN, "--version"],
        ),
        System(  # beanstalkd listens on one address only: {listen} is the transport's
            "beanstalkd",
            ["beanstalkd", "-l", "{listen}", "-p", "{port}"],
            {"none": [], "periodic": ["-b", "{data}"], "always": ["-b", "{data}", "-f", "0"]},
            ["beanstalkd", "-v"],
        ),
        System(
            "redis",
            [
                *("redis-server", "--bind", "127.0.0.1", "--port", "{port}", "--unixsocket"),
                *("{sock}", "--daemonize", "no", "--save", "", "--dir", "{data}"),
            ],
            {
                "none": ["--appendonly", "no"],
                "periodic": ["--appendonly", "yes", "--appendfsync", "everysec"],
                "always": ["--appendonly", "yes", "--appendfsync", "always"],
            },
            ["redis-server", "--version"],
        ),
    ]
}


@dataclass
class Profiling:
    """`python -m bench --profile DIR`: every spinbroker start runs under cProfile and
    writes DIR/<label>-<n>.prof when it stops cleanly (SIGTERM); the runner sets `label`
    to the case running. A start ended by SIGKILL (the recovery scenario's crash) writes
    nothing. Figures measured this way are slower than the broker's: read the profiles,
    not the tables."""

    directory: str
    label: str = "server"
    starts: int = 0

    def wrap(self, argv: list[str]) -> list[str]:
        """spinbroker's command line, run under cProfile."""
        assert argv[: len(SPIN)] == SPIN, argv
        self.starts += 1
        name = re.sub(r"[^A-Za-z0-9]+", "-", self.label).strip("-")
        path = os.path.join(self.directory, f"{name}-{self.starts}.prof")
        return [sys.executable, "-m", "cProfile", "-o", path, *SPIN[1:], *argv[len(SPIN) :]]


#: Set by the runner's --profile (see `Profiling`).
PROFILING: Profiling | None = None


@dataclass
class Server:
    """One running server with a fresh data dir; `addr` is what clients connect to."""

    system: System
    level: str
    transport: str
    root: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="sbench-"))
    port: int = field(default_factory=free_port)
    extra: list[str] = field(default_factory=list)  # more flags, for the next start
    proc: subprocess.Popen[bytes] | None = None
    #: Running under cProfile (see `Profiling`): it must end with SIGTERM to write it.
    profiled: bool = False

    @property
    def data(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def sock(self) -> str:
        return os.path.join(self.root, "s.sock")

    @property
    def addr(self) -> str | tuple[str, int]:
        return self.sock if self.transport == "unix" else ("127.0.0.1", self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Server:
        """Start (or restart on the same data dir) and wait until the socket accepts."""
        os.makedirs(self.data, exist_ok=True)
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        argv = self.system.command(self.level, self) + self.extra
        profiling = PROFILING if self.system.name == "spinbroker" else None
        self.profiled = profiling is not None
        if profiling is not None:
            argv = profiling.wrap(argv)
        log = os.path.join(self.root, "server.log")
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.accepts():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                with open(log, errors="replace") as f:
                    raise RuntimeError(
                        f"{self.system.name} did not start: {argv}\n{f.read()[-2000:]}"
                    )
            time.sleep(0.005)
        return self

    def accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX if self.transport == "unix" else socket.AF_INET) as s:
            return s.connect_ex(self.addr) == 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End exactly our process (SIGKILL models a crash); keep the data dir."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            # A profiled broker writes its profile after its final snapshot.
            self.proc.wait(STOP_TIMEOUT_S * (6 if self.profiled else 1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def remove(self) -> None:
        # The data is thrown away: no clean shutdown to wait for, unless a profile is due.
        self.stop(signal.SIGTERM if self.profiled else signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()
