"""sa-host-path: every storage action against a temporary base dir, escapes included."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from agents import host_path
from agents.host_path import GIB, HostPathStorage, build_agent, sparse_copy
from spinbroker.agent import ActionError

HAS_QEMU_IMG = shutil.which("qemu-img") is not None


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.raw").write_bytes(b"secret")
    return path


@pytest.fixture
def storage(base: Path) -> HostPathStorage:
    return HostPathStorage(base)


def refused(call: object, *args: object) -> str:
    assert callable(call)
    with pytest.raises(ActionError) as info:
        call(*args)
    return str(info.value)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# -- add_volume / remove_volume ----------------------------------------------------------------


def test_add_volume_creates_a_directory(storage: HostPathStorage, base: Path) -> None:
    assert storage.add_volume("test") == "volume test added"
    assert (base / "test").is_dir()
    storage.add_volume("a/b/c")
    assert (base / "a" / "b" / "c").is_dir()


def test_add_volume_refuses_an_existing_one(storage: HostPathStorage, base: Path) -> None:
    storage.add_volume("test")
    (base / "test" / "keep").write_text("x")
    assert refused(storage.add_volume, "test") == "volume 'test' already exists"
    assert (base / "test" / "keep").read_text() == "x"
    (base / "file").write_text("x")
    assert refused(storage.add_volume, "file") == "volume 'file' already exists"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "volume path must not be empty"),
        ("/", "must be relative to the base dir"),
        ("/tmp/x", "must be relative to the base dir"),
        ("..", "must not have an empty, '.' or '..' part"),
        ("../x", "must not have an empty, '.' or '..' part"),
        ("a/../../x", "must not have an empty, '.' or '..' part"),
        (".", "must not have an empty, '.' or '..' part"),
        ("a//b", "must not have an empty, '.' or '..' part"),
        ("a/", "must not have an empty, '.' or '..' part"),
        ("a\0b", "must not contain NUL"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_volume_paths_that_are_refused(storage: HostPathStorage, path: str, message: str) -> None:
    assert message in refused(storage.add_volume, path)
    assert message in refused(storage.remove_volume, path)
    assert message in refused(storage.create_image, path, "i.raw", 1)


def test_symlinks_leading_out_are_refused(
    storage: HostPathStorage, base: Path, outside: Path
) -> None:
    (base / "link").symlink_to(outside)
    assert refused(storage.add_volume, "link") == "'link' leads outside the base dir"
    assert refused(storage.add_volume, "link/x") == "'link/x' leads outside the base dir"
    assert refused(storage.remove_volume, "link") == "'link' leads outside the base dir"
    assert "leads outside" in refused(storage.create_image, "link", "new.raw", 1)
    assert "leads outside" in refused(storage.delete_image, "link", "secret.raw")
    assert (outside / "secret.raw").exists()
    assert not (outside / "x").exists()
    assert not (outside / "new.raw").exists()


def test_a_symlink_to_the_base_dir_itself_is_refused(storage: HostPathStorage, base: Path) -> None:
    (base / "self").symlink_to(base)
    assert refused(storage.remove_volume, "self") == "'self' leads outside the base dir"
    assert base.is_dir()


def test_remove_volume_removes_it_and_its_images(storage: HostPathStorage, base: Path) -> None:
    storage.add_volume("v")
    storage.create_image("v", "i.raw", 1)
    assert storage.remove_volume("v") == "volume v removed"
    assert not (base / "v").exists()
    assert refused(storage.remove_volume, "v") == "volume 'v' does not exist"


def test_remove_volume_refuses_what_is_not_a_directory(
    storage: HostPathStorage, base: Path
) -> None:
    (base / "file").write_text("x")
    assert refused(storage.remove_volume, "file") == "volume 'file' is not a directory"
    storage.add_volume("real")
    (base / "alias").symlink_to(base / "real")
    assert refused(storage.remove_volume, "alias") == "volume 'alias' is not a directory"
    assert (base / "real").is_dir()


def test_remove_volume_does_not_follow_symlinks_inside(
    storage: HostPathStorage, base: Path, outside: Path
) -> None:
    storage.add_volume("v")
    (base / "v" / "escape").symlink_to(outside)
    storage.remove_volume("v")
    assert (outside / "secret.raw").read_bytes() == b"secret"


# -- create_image ------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_QEMU_IMG, reason="qemu-img is not installed")
def test_create_image_with_qemu_img_is_sparse_raw(storage: HostPathStorage, base: Path) -> None:
    storage.add_volume("v")
    assert storage.create_image("v", "i.raw", 2) == "image v/i.raw created (2 GiB)"
    image = base / "v" / "i.raw"
    assert image.stat().st_size == 2 * GIB
    assert allocated(image) < 1 << 20


def test_create_image_without_qemu_img_is_a_sparse_file(
    storage: HostPathStorage, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agents.host_path.shutil.which", lambda name: None)
    storage.add_volume("v")
    storage.create_image("v", "i.raw", 50)
    image = base / "v" / "i.raw"
    assert image.stat().st_size == 50 * GIB
    assert allocated(image) < 1 << 20


def test_create_image_refuses_an_existing_image(storage: HostPathStorage, base: Path) -> None:
    storage.add_volume("v")
    (base / "v" / "i.raw").write_bytes(b"data")
    message = refused(storage.create_image, "v", "i.raw", 1)
    assert message == "image 'i.raw' already exists in volume 'v'"
    assert (base / "v" / "i.raw").read_bytes() == b"data"
    (base / "v" / "dangling").symlink_to(base / "nowhere")
    assert "already exists" in refused(storage.create_image, "v", "dangling", 1)
    assert not (base / "nowhere").exists()


def test_create_image_needs_an_existing_volume(storage: HostPathStorage) -> None:
    assert refused(storage.create_image, "nope", "i.raw", 1) == "volume 'nope' does not exist"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "image name must not be empty"),
        ("a/b", "must not contain '/'"),
        ("..", "'..' part"),
        ("../escape.raw", "'..' part"),
        ("/etc/passwd", "must be relative"),
    ],
)
def test_image_names_that_are_refused(storage: HostPathStorage, name: str, message: str) -> None:
    storage.add_volume("v")
    assert message in refused(storage.create_image, "v", name, 1)
    assert message in refused(storage.delete_image, "v", name)
    assert message in refused(storage.copy_image, "v", name, "v", "x")
    assert message in refused(storage.copy_image, "v", "x", "v", name)


def test_an_image_symlink_leading_out_is_refused(
    storage: HostPathStorage, base: Path, outside: Path
) -> None:
    storage.add_volume("v")
    (base / "v" / "evil.raw").symlink_to(outside / "secret.raw")
    assert "leads outside" in refused(storage.create_image, "v", "evil.raw", 1)
    assert "leads outside" in refused(storage.delete_image, "v", "evil.raw")
    assert "leads outside" in refused(storage.copy_image, "v", "evil.raw", "v", "copy.raw")
    assert (outside / "secret.raw").read_bytes() == b"secret"


def test_a_failing_qemu_img_leaves_nothing_behind(base: Path, tmp_path: Path) -> None:
    fake = tmp_path / "qemu-img"
    fake.write_text("#!/bin/sh\necho 'qemu-img: no space left' >&2\nexit 1\n")
    fake.chmod(0o755)
    storage = HostPathStorage(base, qemu_img=str(fake))
    storage.add_volume("v")
    message = refused(storage.create_image, "v", "i.raw", 1)
    assert message == "qemu-img create failed: qemu-img: no space left"
    assert list((base / "v").iterdir()) == []


# -- delete_image ------------------------------------------------------------------------------


def test_delete_image(storage: HostPathStorage, base: Path) -> None:
    storage.add_volume("v")
    storage.create_image("v", "i.raw", 1)
    assert storage.delete_image("v", "i.raw") == "image v/i.raw deleted"
    assert not (base / "v" / "i.raw").exists()
    assert refused(storage.delete_image, "v", "i.raw") == (
        "image 'i.raw' does not exist in volume 'v'"
    )
    assert refused(storage.delete_image, "w", "i.raw") == "volume 'w' does not exist"


def test_delete_image_refuses_a_directory(storage: HostPathStorage) -> None:
    storage.add_volume("v/sub")
    assert refused(storage.delete_image, "v", "sub") == (
        "image 'sub' in volume 'v' is not a regular file"
    )


# -- copy_image --------------------------------------------------------------------------------


def _sparse_source(path: Path, size: int) -> dict[int, bytes]:
    pieces = {0: b"boot sector", size // 2: b"middle" * 1000, size - 4: b"tail"}
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
    return pieces


def test_copy_image_keeps_data_and_holes(storage: HostPathStorage, base: Path) -> None:
    storage.add_volume("a")
    storage.add_volume("b")
    pieces = _sparse_source(base / "a" / "src.raw", GIB)
    message = storage.copy_image("a", "src.raw", "b", "dst.raw")
    assert message == "image a/src.raw copied to b/dst.raw"
    copy = base / "b" / "dst.raw"
    assert copy.stat().st_size == GIB
    assert allocated(copy) < 4 << 20
    with open(copy, "rb") as f:
        for offset, data in pieces.items():
            f.seek(offset)
            assert f.read(len(data)) == data
    assert sorted(p.name for p in (base / "b").iterdir()) == ["dst.raw"]


def test_copy_image_keeps_a_trailing_hole(storage: HostPathStorage, base: Path) -> None:
    storage.add_volume("v")
    with open(base / "v" / "src.raw", "wb") as f:
        f.write(b"x" * 10)
        f.truncate(8 << 20)
    storage.copy_image("v", "src.raw", "v", "dst.raw")
    assert (base / "v" / "dst.raw").stat().st_size == 8 << 20


def test_copy_image_refuses_an_existing_target(storage: HostPathStorage, base: Path) -> None:
    storage.add_volume("v")
    storage.create_image("v", "src.raw", 1)
    (base / "v" / "dst.raw").write_bytes(b"keep")
    message = refused(storage.copy_image, "v", "src.raw", "v", "dst.raw")
    assert message == "image 'dst.raw' already exists in volume 'v'"
    assert (base / "v" / "dst.raw").read_bytes() == b"keep"
    assert "already exists" in refused(storage.copy_image, "v", "src.raw", "v", "src.raw")
    assert sorted(p.name for p in (base / "v").iterdir()) == ["dst.raw", "src.raw"]


@pytest.mark.parametrize("name", ["c" * 255, "é" * 127, "c" * 238])
def test_copy_image_to_the_longest_names(
    storage: HostPathStorage, base: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit h6: the temporary file was named '.' + to_image + '.XXXXXXXX.partial', past
    the 255-byte limit for a target name of some 238 bytes or more (ENAMETOOLONG)."""
    storage.add_volume("v")
    (base / "v" / "src.raw").write_bytes(b"data")
    storage.copy_image("v", "src.raw", "v", name)
    assert (base / "v" / name).read_bytes() == b"data"
    assert sorted(p.name for p in (base / "v").iterdir()) == sorted([name, "src.raw"])

    def broken(src: int, dst: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(host_path, "sparse_copy", broken)
    with pytest.raises(OSError, match="No space left"):
        storage.copy_image("v", "src.raw", "v", name[:-1])
    assert sorted(p.name for p in (base / "v").iterdir()) == sorted([name, "src.raw"])


def test_copy_image_needs_its_source_and_volumes(storage: HostPathStorage) -> None:
    storage.add_volume("v")
    assert refused(storage.copy_image, "v", "nope", "v", "x") == (
        "image 'nope' does not exist in volume 'v'"
    )
    storage.create_image("v", "i.raw", 1)
    assert refused(storage.copy_image, "v", "i.raw", "w", "x") == "volume 'w' does not exist"
    assert refused(storage.copy_image, "w", "i.raw", "v", "x") == "volume 'w' does not exist"


def test_sparse_copy_without_seek_data_skips_zero_blocks(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    size = 16 << 20
    pieces = _sparse_source(src, size)
    with open(src, "rb") as s, open(dst, "wb") as d:
        host_path._copy_range(s.fileno(), d.fileno(), 0, size, skip_zeros=True)
        os.ftruncate(d.fileno(), size)
    assert dst.stat().st_size == size
    assert allocated(dst) < 4 << 20
    data = dst.read_bytes()
    for offset, piece in pieces.items():
        assert data[offset : offset + len(piece)] == piece


def test_sparse_copy_of_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"")
    with open(tmp_path / "src", "rb") as s, open(tmp_path / "dst", "wb") as d:
        sparse_copy(s.fileno(), d.fileno())
    assert (tmp_path / "dst").read_bytes() == b""


# -- through the agent -------------------------------------------------------------------------


async def test_agent_runs_the_actions(base: Path) -> None:
    agent = build_agent(base)
    assert sorted(agent.actions) == [
        "add_volume",
        "copy_image",
        "create_image",
        "delete_image",
        "remove_volume",
    ]
    outcome = await agent.execute("add_volume", {"path": "test"})
    assert outcome.success, outcome
    outcome = await agent.execute(
        "create_image", {"volume_path": "test", "image_name": 2024, "image_size": 1}
    )
    assert outcome.success, outcome
    assert (base / "test" / "2024").stat().st_size == GIB
    outcome = await agent.execute("add_volume", {"path": "test"})
    assert not outcome.success
    assert outcome.reason == "volume 'test' already exists"
    outcome = await agent.execute("add_volume", {"path": "../x"})
    assert outcome.reason == "volume path '../x' must not have an empty, '.' or '..' part"


async def test_agent_refuses_bad_parameters_before_touching_disk(base: Path) -> None:
    agent = build_agent(base)
    outcome = await agent.execute(
        "create_image", {"volume_path": "v", "image_name": "i", "image_size": "50"}
    )
    assert outcome.reason == "create_image: parameter 'image_size': expected int, got str '50'"
    outcome = await agent.execute(
        "create_image", {"volume_path": "v", "image_name": "i", "image_size": 0}
    )
    assert outcome.reason == "create_image: parameter 'image_size': 0 is less than the minimum 1"
    outcome = await agent.execute("add_volume", {"path": ""})
    assert outcome.reason == "add_volume: parameter 'path': length 0 is less than the minimum 1"
    assert list(base.iterdir()) == []


def test_agent_schema_is_what_the_issue_names(base: Path) -> None:
    wire = build_agent(base).schema.to_wire()
    params = {name: sorted(a["parameters"]) for name, a in wire["actions"].items()}
    assert params == {
        "add_volume": ["path"],
        "remove_volume": ["path"],
        "create_image": ["image_name", "image_size", "volume_path"],
        "delete_image": ["image_name", "volume_path"],
        "copy_image": ["from_image", "from_volume", "to_image", "to_volume"],
    }
    assert wire["actions"]["create_image"]["parameters"]["image_size"] == {
        "type": "int",
        "required": True,
        "minimum": 1,
    }


def test_build_agent_creates_the_base_dir(tmp_path: Path) -> None:
    build_agent(tmp_path / "deep" / "images")
    assert (tmp_path / "deep" / "images").is_dir()


def test_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        host_path.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--base-dir" in out
    assert "--broker" in out
