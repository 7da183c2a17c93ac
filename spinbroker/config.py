"""Settings of a broker: limits the core enforces and what the server listens on.

Plain values only; the CLI builds them from flags, tests build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 7878
DEFAULT_DATA_DIR = Path("spinbroker-data")
SOCKET_NAME = "spinbroker.sock"


@dataclass(slots=True, frozen=True)
class Limits:
    max_frame: int = 1 << 20
    max_commands_per_package: int = 10_000
    max_parameter_bytes: int = 64 << 10
    max_connections: int = 10_000
    max_inflight: int = 10_000
    package_ttl: float = 3600.0
    retention: float = 86400.0
    max_deliveries: int = 5

    def to_wire(self) -> dict[str, int | float]:
        return {
            "max_frame": self.max_frame,
            "max_commands_per_package": self.max_commands_per_package,
            "max_parameter_bytes": self.max_parameter_bytes,
            "max_connections": self.max_connections,
            "max_inflight": self.max_inflight,
            "package_ttl": self.package_ttl,
            "retention": self.retention,
            "max_deliveries": self.max_deliveries,
        }


@dataclass(slots=True)
class ServerConfig:
    data_dir: Path = DEFAULT_DATA_DIR
    #: Unix socket path; None means `data_dir / SOCKET_NAME`.
    socket: Path | None = None
    #: TCP listen address; None disables TCP. Port 0 picks a free port (logged).
    tcp: tuple[str, int] | None = ("127.0.0.1", DEFAULT_PORT)
    limits: Limits = field(default_factory=Limits)
    #: "always" (group commit, fsync before every acknowledgement), "batch", or "off".
    fsync: str = "always"
    #: With fsync "batch": the longest time between two flushes, in milliseconds.
    fsync_interval_ms: float = 10.0
    #: Roll to a new log segment past this size (bytes).
    segment_size: int = 64 << 20
    #: Snapshot after this many records since the last one...
    snapshot_every: int = 500_000
    #: ... or after this many seconds, if anything changed.
    snapshot_interval: float = 900.0
    log_level: str = "info"

    @property
    def socket_path(self) -> Path:
        return self.socket if self.socket is not None else self.data_dir / SOCKET_NAME
