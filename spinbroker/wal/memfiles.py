"""An in-memory file layer that loses power and fails on demand, for tests.

Holds `MemoryFiles`, a `FileLayer` that keeps two images of every file: what reads see now,
and what would survive a power loss (only what a sync covered, and only names a directory
sync covered). `crash()` returns the machine after the power comes back; `fail()` makes
chosen calls raise ENOSPC/EIO (optionally after a short write); `calls` counts every call.
A failed sync drops the dirty data like Linux does (a later sync will not persist it unless
it is written again). Must never be used by the broker itself: it is a test double in the
package only so that server and WAL tests share one model of a lying disk.
"""

from __future__ import annotations

import errno as errnos
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spinbroker.wal.files import WalFile

SECTOR = 512


class _Inode:
    __slots__ = ("data", "durable", "lost")

    def __init__(self, content: bytes = b"") -> None:
        self.data = bytearray(content)
        self.durable = bytearray(content)
        #: Sectors whose dirty data a failed sync dropped: a later sync skips them.
        self.lost: set[int] = set()

    def sync(self) -> None:
        merged = bytearray(self.data)
        for sector in self.lost:
            start = sector * SECTOR
            end = min(start + SECTOR, len(merged))
            if start < end:
                old = self.durable[start:end]
                merged[start:end] = old + bytes(end - start - len(old))
        self.durable = merged

    def drop_dirty(self) -> None:
        size = max(len(self.data), len(self.durable))
        for sector in range(0, (size + SECTOR - 1) // SECTOR):
            start = sector * SECTOR
            if self.data[start : start + SECTOR] != self.durable[start : start + SECTOR]:
                self.lost.add(sector)

    def after_power_loss(self, rng: random.Random | None) -> bytes:
        if rng is None:
            return bytes(self.durable)
        size = rng.choice((len(self.durable), len(self.data)))
        image = bytearray(size)
        for sector in range(0, (size + SECTOR - 1) // SECTOR):
            start = sector * SECTOR
            use_new = sector not in self.lost and rng.random() < 0.5
            chunk = (self.data if use_new else self.durable)[start : start + SECTOR]
            image[start : start + len(chunk)] = chunk[: size - start]
        return bytes(image)


@dataclass(slots=True)
class Fault:
    """Calls of `op` on paths containing `path_contains` raise OSError(errno)."""

    op: str
    errno: int
    times: int | None
    partial: int
    path_contains: str


class MemoryFile:
    __slots__ = ("_fs", "_inode", "_path")

    def __init__(self, fs: MemoryFiles, inode: _Inode, path: Path) -> None:
        self._fs = fs
        self._inode = inode
        self._path = path

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        with self._fs._call("write", self._path) as fault:
            if fault is not None:
                self._write(data[: fault.partial], offset)
                raise _error(fault, self._path)
            self._write(data, offset)

    def _write(self, data: bytes | memoryview, offset: int) -> None:
        inode = self._inode
        if offset > len(inode.data):
            inode.data.extend(bytes(offset - len(inode.data)))
        inode.data[offset : offset + len(data)] = data
        for sector in range(offset // SECTOR, (offset + len(data) + SECTOR - 1) // SECTOR):
            inode.lost.discard(sector)

    def datasync(self) -> None:
        self._sync("datasync")

    def sync(self) -> None:
        self._sync("sync")

    def _sync(self, op: str) -> None:
        with self._fs._call(op, self._path) as fault:
            if fault is not None:
                self._inode.drop_dirty()
                raise _error(fault, self._path)
            self._inode.sync()

    def truncate(self, size: int) -> None:
        with self._fs._call("truncate", self._path) as fault:
            if fault is not None:
                raise _error(fault, self._path)
            inode = self._inode
            del inode.data[size:]
            inode.data.extend(bytes(size - len(inode.data)))
            inode.lost = {s for s in inode.lost if s * SECTOR < size}

    def allocate(self, size: int) -> None:
        with self._fs._call("allocate", self._path) as fault:
            if fault is not None:
                raise _error(fault, self._path)
            if size > len(self._inode.data):
                self._inode.data.extend(bytes(size - len(self._inode.data)))

    def size(self) -> int:
        with self._fs._call("size", self._path):
            return len(self._inode.data)

    def close(self) -> None:
        with self._fs._call("close", self._path):
            pass


class MemoryFiles:
    """A simulated disk: see the module docstring. Thread-safe; every call is atomic."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: dict[Path, _Inode] = {}
        self._durable_names: dict[Path, _Inode] = {}
        self._dirs: set[Path] = set()
        self._faults: list[Fault] = []
        self._dead = False
        #: How many times each operation was called (failed calls included).
        self.calls: Counter[str] = Counter()
        #: Called (outside the lock, in the calling thread) before an operation runs.
        self.hooks: dict[str, Callable[[Path], None]] = {}

    # -- fault injection and power loss -------------------------------------------------

    def fail(
        self,
        op: str,
        errno: int = errnos.ENOSPC,
        *,
        times: int | None = None,
        partial: int = 0,
        path_contains: str = "",
    ) -> None:
        """Make the next `times` calls of `op` (all of them if None) raise OSError(errno).

        `op` is one of write, datasync, sync, truncate, allocate, create, open, read, rename,
        remove, sync_dir. A failing write first writes `partial` bytes, like a short write
        that ran out of space.
        """
        with self._lock:
            self._faults.append(Fault(op, errno, times, partial, path_contains))

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()

    def crash(self, rng: random.Random | None = None) -> MemoryFiles:
        """Cut the power: this instance dies (every call raises EIO) and the returned one
        holds what survived. With `rng`, each unsynced sector independently survives or not
        (torn writes); without, exactly the synced state survives."""
        with self._lock:
            self._dead = True
            after = MemoryFiles()
            after._dirs = set(self._dirs)
            for path, inode in self._durable_names.items():
                after._names[path] = _Inode(inode.after_power_loss(rng))
            after._durable_names = dict(after._names)
            return after

    def corrupt(self, path: Path, content: bytes) -> None:
        """Replace what the disk holds for `path`, durably (bit rot, a hand edit)."""
        with self._lock:
            inode = self._names[path]
            inode.data = bytearray(content)
            inode.durable = bytearray(content)
            inode.lost.clear()

    def durable_content(self, path: Path) -> bytes:
        with self._lock:
            return bytes(self._durable_names[path].durable)

    # -- FileLayer ------------------------------------------------------------------------

    def create(self, path: Path) -> WalFile:
        with self._call("create", path) as fault:
            if fault is not None:
                raise _error(fault, path)
            if path.parent not in self._dirs:
                raise FileNotFoundError(errnos.ENOENT, "no such directory", str(path.parent))
            if path in self._names:
                raise FileExistsError(errnos.EEXIST, "file exists", str(path))
            inode = _Inode()
            self._names[path] = inode
            return MemoryFile(self, inode, path)

    def open(self, path: Path) -> WalFile:
        with self._call("open", path) as fault:
            if fault is not None:
                raise _error(fault, path)
            return MemoryFile(self, self._inode(path), path)

    def read(self, path: Path) -> bytes:
        with self._call("read", path) as fault:
            if fault is not None:
                raise _error(fault, path)
            return bytes(self._inode(path).data)

    def listdir(self, directory: Path) -> list[str]:
        with self._call("listdir", directory):
            if directory not in self._dirs:
                raise FileNotFoundError(errnos.ENOENT, "no such directory", str(directory))
            names = [p.name for p in self._names if p.parent == directory]
            return names + [d.name for d in self._dirs if d.parent == directory]

    def rename(self, src: Path, dst: Path) -> None:
        with self._call("rename", src) as fault:
            if fault is not None:
                raise _error(fault, src)
            self._names[dst] = self._inode(src)
            del self._names[src]

    def remove(self, path: Path) -> None:
        with self._call("remove", path) as fault:
            if fault is not None:
                raise _error(fault, path)
            self._inode(path)
            del self._names[path]

    def sync_dir(self, directory: Path) -> None:
        with self._call("sync_dir", directory) as fault:
            if fault is not None:
                raise _error(fault, directory)
            for path in [p for p in self._durable_names if p.parent == directory]:
                del self._durable_names[path]
            for path, inode in self._names.items():
                if path.parent == directory:
                    self._durable_names[path] = inode

    def makedirs(self, directory: Path) -> None:
        with self._call("makedirs", directory):
            path = directory
            while path not in self._dirs and path != path.parent:
                self._dirs.add(path)
                path = path.parent

    # -- internals ------------------------------------------------------------------------

    def _inode(self, path: Path) -> _Inode:
        try:
            return self._names[path]
        except KeyError:
            raise FileNotFoundError(errnos.ENOENT, "no such file", str(path)) from None

    def _call(self, op: str, path: Path) -> _Call:
        hook = self.hooks.get(op)
        if hook is not None:
            hook(path)
        return _Call(self, op, path)

    def _take_fault(self, op: str, path: Path) -> Fault | None:
        for fault in self._faults:
            if fault.op == op and fault.path_contains in str(path):
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                return fault
        return None


class _Call:
    """Holds the lock for one call; yields the fault to inject, if any."""

    __slots__ = ("_fs", "_op", "_path")

    def __init__(self, fs: MemoryFiles, op: str, path: Path) -> None:
        self._fs = fs
        self._op = op
        self._path = path

    def __enter__(self) -> Fault | None:
        fs = self._fs
        fs._lock.acquire()
        fs.calls[self._op] += 1
        if fs._dead:
            fs._lock.release()
            raise OSError(errnos.EIO, "the machine lost power", str(self._path))
        return fs._take_fault(self._op, self._path)

    def __exit__(self, *exc: object) -> None:
        self._fs._lock.release()


def _error(fault: Fault, path: Path) -> OSError:
    return OSError(fault.errno, f"injected {errnos.errorcode[fault.errno]}", str(path))
