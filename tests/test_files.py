"""nexabind._files: writes that are whole or nothing, removals that stay inside their tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nexabind._files import atomic_writer, open_regular, remove_within, write_atomic


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_write_is_whole_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second" and _names(tmp_path) == ["f.json"]
    # A new file gets the mode any new file gets here (not mkstemp's 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    # Failing in the block: the old content stays, the temp file goes.
    with pytest.raises(RuntimeError, match="stop"), atomic_writer(target) as f:
        f.write(b"half")
        raise RuntimeError("stop")
    assert target.read_text() == "second" and _names(tmp_path) == ["f.json"]
    # Failing at the rename (the target is a folder): nothing left behind.
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="Is a directory"):
        write_atomic(tmp_path / "d", "x")
    assert _names(tmp_path) == ["d", "f.json"] and _names(tmp_path / "d") == []
    with pytest.raises(FileNotFoundError, match=f"No such file or directory: '{tmp_path}/d/x/f'"):
        write_atomic(tmp_path / "d" / "x" / "f", "x")


def test_a_link_at_the_target_is_replaced_not_written_through(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_text("keep")
    (tmp_path / "f").symlink_to(canary)
    write_atomic(tmp_path / "f", "new")
    assert canary.read_text() == "keep"
    assert not (tmp_path / "f").is_symlink() and (tmp_path / "f").read_text() == "new"


def test_remove_within_removes_links_as_links(tmp_path: Path) -> None:
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    canary = outside / "sub" / "canary"
    canary.write_text("keep")
    (tree / "folder").mkdir(parents=True)
    (tree / "folder" / "link").symlink_to(outside / "sub")
    (tree / "file").write_text("x")
    (tree / "link").symlink_to(canary)
    (tree / "dirlink").symlink_to(outside / "sub")
    real = tree.resolve()
    for name in ("file", "link", "dirlink", "folder", "missing"):
        assert remove_within(tree / name, real) is True, name
    assert _names(tree) == [] and canary.read_text() == "keep"
    # Through a folder that is a link: outside the tree, nothing touched.
    (tree / "dirlink").symlink_to(outside / "sub")
    assert remove_within(tree / "dirlink" / "canary", real) is False
    assert remove_within(tree / "..", real) is False
    assert remove_within(tree / "dirlink" / "..", real) is False  # (the tree itself)
    assert canary.read_text() == "keep" and _names(tree) == ["dirlink"]


def test_open_regular_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    f, size = open_regular(tmp_path / "f")
    with f:
        assert (f.read(), size) == (b"abc", 3)
    os.mkfifo(tmp_path / "fifo")  # opened without blocking: no writer needed
    for path, kind in [("/dev/zero", "a character device"), (tmp_path / "fifo", "a FIFO"),
                       (tmp_path, "a folder")]:  # fmt: skip
        with pytest.raises(OSError, match=f"^{path} is {kind}, not a regular file$"):
            open_regular(path)
