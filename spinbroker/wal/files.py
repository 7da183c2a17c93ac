"""The file layer: every byte the log reads or writes goes through `FileLayer`.

Holds the small interface (`FileLayer`, `WalFile`), the real implementation over `os`
(`OsFiles`), the compositions every durable file needs (`write_file_durably`,
`truncate_durably`, `rename_durably`), and `ReadAhead`, which reads the files recovery will
need next on a background thread. Tests swap in `memfiles.MemoryFiles` to simulate power
loss and failing disks. Must never know about records, segments or LSNs, and must never
swallow an OSError: deciding what a failure means is the caller's job.
"""

from __future__ import annotations

import fcntl
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol


class WalFile(Protocol):
    """An open file. Writes go to explicit offsets; nothing is durable until a sync."""

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """Write all of `data` at `offset` or raise OSError (a short write is retried)."""

    def datasync(self) -> None:
        """fdatasync: make the data (and the size) durable."""

    def sync(self) -> None:
        """fsync: make data and all metadata durable."""

    def truncate(self, size: int) -> None: ...

    def allocate(self, size: int) -> None:
        """Reserve zero-filled space up to `size` bytes (the file size becomes at least that)."""

    def size(self) -> int: ...

    def close(self) -> None: ...


class FileLayer(Protocol):
    """A directory tree of files. A new name, rename or removal is durable after `sync_dir`."""

    def create(self, path: Path) -> WalFile:
        """Create a new empty file open for reading and writing; fail if it exists."""

    def open(self, path: Path) -> WalFile:
        """Open an existing file for reading and writing."""

    def read(self, path: Path) -> bytes:
        """The whole content of a file as it is now (not necessarily durable)."""

    def listdir(self, directory: Path) -> list[str]: ...

    def rename(self, src: Path, dst: Path) -> None:
        """Atomically replace `dst` with `src`."""

    def remove(self, path: Path) -> None: ...

    def sync_dir(self, directory: Path) -> None:
        """fsync the directory itself, making its entries durable."""

    def makedirs(self, directory: Path) -> None:
        """Create the directory and its parents if missing, durably."""


class OsFile:
    """A file descriptor opened with `os.open`."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def datasync(self) -> None:
        os.fdatasync(self._fd)

    def sync(self) -> None:
        os.fsync(self._fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def allocate(self, size: int) -> None:
        current = self.size()
        if size > current:
            os.posix_fallocate(self._fd, current, size - current)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        os.close(self._fd)


class OsFiles:
    """The real file layer: plain POSIX calls, nothing cached."""

    def create(self, path: Path) -> WalFile:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        return OsFile(os.open(path, flags, 0o644))

    def open(self, path: Path) -> WalFile:
        return OsFile(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def read(self, path: Path) -> bytes:
        return path.read_bytes()

    def listdir(self, directory: Path) -> list[str]:
        return os.listdir(directory)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def remove(self, path: Path) -> None:
        os.unlink(path)

    def sync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def makedirs(self, directory: Path) -> None:
        missing = []
        path = directory.absolute()
        while not path.exists():
            missing.append(path)
            path = path.parent
        for new in reversed(missing):
            new.mkdir(exist_ok=True)
            self.sync_dir(new.parent)


#: The file in a data dir that a broker holds locked (flock) while it runs.
LOCK_NAME = "lock"


class DirectoryInUse(RuntimeError):
    """Another process (a running broker, a `wal repair`) holds the data dir's lock."""


def lock_directory(directory: Path, *, create: bool = True) -> int | None:
    """Take the data dir's lock (an exclusive flock on its `lock` file, which the kernel
    drops when the holder dies) and return its descriptor; closing it lets go. Raises
    DirectoryInUse if another process holds it. Without `create`, a dir with no lock file
    (no broker ever ran on it) is left as it is and None returned."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        fd = os.open(directory / LOCK_NAME, flags, 0o600)
    except FileNotFoundError:
        if create:
            raise
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DirectoryInUse(f"data dir {directory} is in use by another broker") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_file_durably(files: FileLayer, path: Path, data: bytes, sync_every: int = 0) -> None:
    """Create `path` (which must not exist) holding `data`, synced. Its name is not yet durable.

    With `sync_every`, the data goes out in pieces of that many bytes, each made durable
    before the next is written. A big file then never fills the disk's write-back queue
    for long: on ext4 (data=ordered) a journal commit first writes out the new data of
    every file in it, so the log's fdatasync, and every acknowledgement behind it, would
    otherwise wait for the whole file."""
    handle = files.create(path)
    try:
        view, size = memoryview(data), len(data)
        step = sync_every if sync_every > 0 else max(size, 1)
        for offset in range(0, size, step):
            handle.pwrite(view[offset : offset + step], offset)
            if offset + step < size:
                handle.datasync()
        handle.sync()
    finally:
        handle.close()


def truncate_durably(files: FileLayer, path: Path, size: int) -> None:
    """Cut the existing file `path` to `size` bytes, synced."""
    handle = files.open(path)
    try:
        handle.truncate(size)
        handle.sync()
    finally:
        handle.close()


def rename_durably(files: FileLayer, src: Path, dst: Path) -> None:
    """Rename within one directory, then sync that directory so the new name survives."""
    files.rename(src, dst)
    files.sync_dir(dst.parent)


class ReadAhead:
    """Whole-file reads started ahead of their use, on background threads.

    Recovery reads hundreds of megabytes (segments, the newest snapshot) and then works on
    them in Python; a read is a system call that releases the GIL, so reading the next file
    overlaps checking this one. `read(path)` returns or raises what `files.read(path)` does,
    only possibly a little earlier: use it only for files nobody writes meanwhile (the log's
    own files while it recovers, before anything is appended)."""

    def __init__(self, files: FileLayer, threads: int = 2) -> None:
        self._files = files
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[Path, Future[bytes]] = {}

    def ahead(self, path: Path) -> None:
        """Start reading `path` now, unless that has already started."""
        if path in self._pending:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="spinbroker-read")
        self._pending[path] = self._executor.submit(self._files.read, path)

    def read(self, path: Path) -> bytes:
        """The content of `path`: read ahead if it was (the read is waited for), else now."""
        pending = self._pending.pop(path, None)
        return pending.result() if pending is not None else self._files.read(path)

    def close(self) -> None:
        """Drop what was read ahead and not used; a read under way ends on its own."""
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
