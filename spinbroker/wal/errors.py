"""The exceptions of the write-ahead log.

Holds one exception type per way the log can fail a caller. They name files and offsets so a
person can act on them; they must never carry protocol codes (the server maps them to
`storage_failed` and friends), so the log stays independent of what its records mean.
"""

from __future__ import annotations

from pathlib import Path


class WalError(Exception):
    """Base of every error the log raises."""


class WalCorruption(WalError):
    """Stored bytes fail a check somewhere a torn write cannot explain.

    The log refuses to open: the data before `offset` in `file` is intact, what follows is
    not. `spinbroker wal repair DATADIR` keeps a backup and truncates there.
    """

    def __init__(self, file: Path, offset: int, detail: str) -> None:
        super().__init__(f"{file}: offset {offset}: {detail}")
        self.file = file
        self.offset = offset
        self.detail = detail


class WalNewerVersion(WalError):
    """A file of the log (a segment or a snapshot) is of a format version newer than this
    spinbroker reads: most likely a newer spinbroker wrote it. Not damage, so never cut,
    skipped or set aside: `Wal.open` refuses such a segment before it changes anything,
    `Wal.load` such a snapshot, and `spinbroker wal repair` leaves a log holding either as
    it is. The version that wrote it reads it."""

    def __init__(self, file: Path, detail: str) -> None:
        super().__init__(f"{file}: {detail}")
        self.file = file
        self.detail = detail


class WalWriteError(WalError):
    """A write or sync failed (disk full, I/O error): the records are not known durable.

    Raised by `Wal.commit()` to every caller waiting when a flush fails. The records stay
    buffered in order and the next successful flush writes them, so this means "not
    acknowledged", never "rejected".
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class WalClosed(WalError):
    """The log was closed; it takes no more appends or commits."""
