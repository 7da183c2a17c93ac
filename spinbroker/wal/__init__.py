"""spinbroker.wal: the write-ahead log, storage for durability that never reads its records.

Record and snapshot bodies are opaque bytes. The rooms:

    log.py        Wal: open / load / append / commit / write_snapshot / close
    writer.py     group commit on the event loop, fsync modes, failure handling
    segment.py    segment files: names, durable creation, appending on the IO thread
    frame.py      the record frame and segment header: encoder and decoder (pure)
    reader.py     scanning a segment: good records, torn tail or corruption (pure)
    recovery.py   open-time scan: cut a torn tail, refuse corruption
    snapshot.py   snapshot files: format, durable write, choosing one at recovery
    repair.py     truncating at corruption, with a backup (run by a person)
    inspect.py    `spinbroker wal inspect|repair DATADIR`
    files.py      the file layer interface and its os implementation
    memfiles.py   an in-memory file layer that loses power and fails on demand (tests)
    errors.py     WalError and its kinds

Only this package touches the data directory's log files; it must never import the core,
the codec or the server.
"""

from spinbroker.wal.errors import (
    WalClosed,
    WalCorruption,
    WalError,
    WalNewerVersion,
    WalWriteError,
)
from spinbroker.wal.files import FileLayer, OsFiles
from spinbroker.wal.log import Wal
from spinbroker.wal.recovery import Recovery, TornTail
from spinbroker.wal.snapshot import Snapshot
from spinbroker.wal.writer import FsyncMode

__all__ = [
    "FileLayer",
    "FsyncMode",
    "OsFiles",
    "Recovery",
    "Snapshot",
    "TornTail",
    "Wal",
    "WalClosed",
    "WalCorruption",
    "WalError",
    "WalNewerVersion",
    "WalWriteError",
]
