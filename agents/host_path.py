"""sa-host-path: the `storage` agent, keeping volumes and raw images under one base dir.

A volume is a directory under the base dir (``volume_path`` may be nested, ``a/b``); an
image is a sparse raw file inside a volume. `HostPathStorage` does the file work and knows
nothing of the broker; `build_agent` puts its methods in an agent's action table.

Every path stays under the base dir. A name is refused when it is empty, absolute, or has
an empty, ``.`` or ``..`` part (an image name is one part: no ``/``); a path whose existing
part resolves (through symlinks) outside the base dir is refused too. An existing volume or
image is an error, never overwritten: a copy is written to a hidden temporary file and
hard-linked into place, which fails if the name was taken meanwhile.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from spinbroker.agent import ActionError, Agent, agent_main
from spinbroker.schema import Int, Str

RESOURCE = "storage"
DEFAULT_BASE_DIR = Path("~/.config/spin/images")
GIB = 1 << 30
#: Copy granularity; also the size of the zero blocks skipped where SEEK_DATA is missing.
CHUNK = 1 << 20
_MAX_NAME = 255


class HostPathStorage:
    """Volumes and images under `base_dir`; every method raises `ActionError` on refusal."""

    def __init__(self, base_dir: Path, qemu_img: str | None = None) -> None:
        self.base_dir = base_dir.expanduser().absolute()
        #: The qemu-img program; None looks it up on PATH at each use.
        self.qemu_img = qemu_img

    def ensure_base_dir(self) -> None:
        self.base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- the actions ---------------------------------------------------------------------------

    def add_volume(self, path: str) -> str:
        volume = self._volume(path)
        if os.path.lexists(volume):
            raise ActionError(f"volume {path!r} already exists")
        volume.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._inside(volume.parent, path, base_ok=True)  # made through a symlink meanwhile?
        try:
            volume.mkdir(mode=0o700)
        except FileExistsError:
            raise ActionError(f"volume {path!r} already exists") from None
        return f"volume {path} added"

    def remove_volume(self, path: str) -> str:
        volume = self._volume(path)
        _must_be_volume(volume, path)
        shutil.rmtree(volume)
        return f"volume {path} removed"

    def create_image(self, volume_path: str, image_name: str, image_size: int) -> str:
        if image_size < 1:
            raise ActionError(f"image_size must be at least 1 GiB, got {image_size}")
        volume = self._volume(volume_path)
        image = self._image(volume, volume_path, image_name)
        _must_be_volume(volume, volume_path)
        _claim(image, f"image {image_name!r} already exists in volume {volume_path!r}")
        try:
            self._make_sparse(image, image_size * GIB)
        except BaseException:
            image.unlink(missing_ok=True)
            raise
        return f"image {volume_path}/{image_name} created ({image_size} GiB)"

    def delete_image(self, volume_path: str, image_name: str) -> str:
        volume = self._volume(volume_path)
        image = self._image(volume, volume_path, image_name)
        _must_be_volume(volume, volume_path)
        _must_be_image(image, volume_path, image_name)
        image.unlink()
        return f"image {volume_path}/{image_name} deleted"

    def copy_image(self, from_volume: str, from_image: str, to_volume: str, to_image: str) -> str:
        source_volume = self._volume(from_volume)
        source = self._image(source_volume, from_volume, from_image)
        target_volume = self._volume(to_volume)
        target = self._image(target_volume, to_volume, to_image)
        _must_be_volume(source_volume, from_volume)
        _must_be_image(source, from_volume, from_image)
        _must_be_volume(target_volume, to_volume)
        taken = f"image {to_image!r} already exists in volume {to_volume!r}"
        if os.path.lexists(target):
            raise ActionError(taken)
        # A short name of fixed length whatever `to_image` is (it may take all 255 bytes),
        # in the target's directory so that the link into place stays on one filesystem.
        fd, partial = tempfile.mkstemp(prefix=".copy_image.", suffix=".partial", dir=target_volume)
        try:
            with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
                sparse_copy(src.fileno(), dst.fileno())
                os.fsync(dst.fileno())
            try:
                os.link(partial, target)
            except FileExistsError:
                raise ActionError(taken) from None
        finally:
            os.unlink(partial)
        return f"image {from_volume}/{from_image} copied to {to_volume}/{to_image}"

    # -- paths -----------------------------------------------------------------------------

    def _volume(self, path: str) -> Path:
        parts = _parts(path, "volume path")
        volume = self.base_dir.joinpath(*parts)
        self._inside(volume, path)
        return volume

    def _image(self, volume: Path, volume_path: str, name: str) -> Path:
        parts = _parts(name, "image name")
        if len(parts) != 1:
            raise ActionError(f"image name {name!r} must not contain '/'")
        image = volume / parts[0]
        self._inside(image, f"{volume_path}/{name}")
        return image

    def _inside(self, path: Path, shown: str, base_ok: bool = False) -> None:
        """Refuses `path` if what exists of it resolves outside the base dir (or to it)."""
        base = self.base_dir.resolve()
        real = path.resolve()
        if (real == base and not base_ok) or not real.is_relative_to(base):
            raise ActionError(f"{shown!r} leads outside the base dir")

    # -- images ------------------------------------------------------------------------------

    def _make_sparse(self, image: Path, size: int) -> None:
        qemu_img = self.qemu_img or shutil.which("qemu-img")
        if qemu_img is None:
            os.truncate(image, size)
            return
        argv = [qemu_img, "create", "-q", "-f", "raw", str(image), str(size)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
            raise ActionError(f"qemu-img create failed: {detail}")


def _parts(path: str, what: str) -> list[str]:
    if not path:
        raise ActionError(f"{what} must not be empty")
    if "\0" in path:
        raise ActionError(f"{what} {path!r} must not contain NUL")
    if path.startswith("/"):
        raise ActionError(f"{what} {path!r} must be relative to the base dir")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ActionError(f"{what} {path!r} must not have an empty, '.' or '..' part")
        if len(part.encode()) > _MAX_NAME:
            raise ActionError(f"{what} {path!r} has a part longer than {_MAX_NAME} bytes")
    return parts


def _must_be_volume(volume: Path, shown: str) -> None:
    if volume.is_symlink() or not volume.is_dir():
        what = "is not a directory" if os.path.lexists(volume) else "does not exist"
        raise ActionError(f"volume {shown!r} {what}")


def _must_be_image(image: Path, volume_shown: str, name: str) -> None:
    if not os.path.lexists(image):
        raise ActionError(f"image {name!r} does not exist in volume {volume_shown!r}")
    if not image.is_file():
        raise ActionError(f"image {name!r} in volume {volume_shown!r} is not a regular file")


def _claim(path: Path, taken: str) -> None:
    """Creates `path` empty, failing if anything (even a dangling symlink) has the name."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ActionError(taken) from None
    os.close(fd)


def sparse_copy(src: int, dst: int) -> None:
    """Copies file `src` to `dst` (both fds at offset 0, `dst` empty) keeping holes as holes.

    Walks the data extents with SEEK_DATA/SEEK_HOLE where the filesystem has them; elsewhere
    copies block by block and seeks over blocks of zeros. The size is set last, so a hole
    at the end survives.
    """
    size = os.fstat(src).st_size
    try:
        extents = _data_extents(src, size)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        _copy_range(src, dst, 0, size, skip_zeros=True)
    else:
        for start, end in extents:
            _copy_range(src, dst, start, end, skip_zeros=False)
    os.ftruncate(dst, size)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    extents: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past offset: the rest is a hole
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end))
        offset = end
    return extents


def _copy_range(src: int, dst: int, start: int, end: int, skip_zeros: bool) -> None:
    offset = start
    zeros = bytes(CHUNK)
    while offset < end:
        block = os.pread(src, min(CHUNK, end - offset), offset)
        if not block:
            break
        if not (skip_zeros and block == zeros[: len(block)]):
            _write_all(dst, block, offset)
        offset += len(block)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# -- the agent -------------------------------------------------------------------------------


def build_agent(base_dir: Path = DEFAULT_BASE_DIR, ttr: float | None = 60.0) -> Agent:
    storage = HostPathStorage(base_dir)
    storage.ensure_base_dir()
    agent = Agent(RESOURCE, ttr=ttr)
    name = Str(min_length=1, max_length=4096)
    agent.add_action("add_volume", storage.add_volume, params={"path": name})
    agent.add_action("remove_volume", storage.remove_volume, params={"path": name})
    agent.add_action(
        "create_image",
        storage.create_image,
        params={"volume_path": name, "image_name": name, "image_size": Int(minimum=1)},
    )
    agent.add_action(
        "delete_image", storage.delete_image, params={"volume_path": name, "image_name": name}
    )
    agent.add_action(
        "copy_image",
        storage.copy_image,
        params={"from_volume": name, "from_image": name, "to_volume": name, "to_image": name},
    )
    return agent


def main(argv: Sequence[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--base-dir",
            type=Path,
            default=DEFAULT_BASE_DIR,
            help="directory that holds every volume (default: %(default)s)",
        )

    def build(args: argparse.Namespace) -> Agent:
        return build_agent(args.base_dir)

    return agent_main(
        "sa-host-path: the storage agent (volumes and sparse raw images in a directory)",
        build,
        add_arguments,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
