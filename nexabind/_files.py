"""Files on disk, read, written and removed safely: :func:`open_regular`, :func:`write_atomic`
and :func:`remove_within`.

A file read whole is a regular file (not a device or a FIFO), opened without blocking.

A file is written whole or not at all: through a temp file of a random name, created where
nothing was (``O_EXCL``; a link planted there is never followed), in the target's own folder,
then renamed over the target. Nothing is left behind when the write or the rename fails.

A removal stays inside the folder it belongs to: the folder of what is removed is resolved and
must lie inside that tree; a link is removed as a link, never through, and a folder is removed
without following the links it holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_writer", "open_regular", "removable", "remove_within", "write_atomic"]

log = logging.getLogger(__name__)

# O_NOFOLLOW is redundant beside O_EXCL (which already refuses a link at the name) but says it;
# O_BINARY: no newline translation on Windows.
_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)  # fmt: skip


_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}  # fmt: skip


def open_regular(path: str | os.PathLike[str]) -> tuple[IO[bytes], int]:
    """Open ``path`` to read, when it is a regular file; return the file and its size.

    It is opened with ``O_NONBLOCK``, so a FIFO never hangs, and checked on the open file
    (``fstat``), so what is read is what was checked.

    Raises:
        OSError: It cannot be opened, or it is not a regular file (a device such as
            ``/dev/zero``, a FIFO, a folder): the message says which.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "a special file")
            msg = f"{os.fspath(path)} is {kind}, not a regular file"
            raise OSError(msg)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new content to; renamed over ``path`` when the block
    ends, deleted when it raises (or the rename fails).

    The temp file is ``.<name>.<random>.tmp`` in ``path``'s folder, created with ``O_EXCL``
    (and ``O_NOFOLLOW``), with the mode a new file gets (``0o666`` less the umask).

    Raises:
        OSError: The temp file cannot be created or written, or the rename failed (``path`` is
            a folder, say); nothing is left behind.
    """
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, _FLAGS, 0o666)
        except FileExistsError:  # (a name taken by chance, or planted: another one)
            continue
        except OSError as e:  # said of the file asked for, not of the temp name
            raise type(e)(e.errno, e.strerror, os.fspath(path)) from e
        break
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` (a str as UTF-8) to ``path`` through :func:`atomic_writer`.

    Raises:
        OSError: As :func:`atomic_writer`; ``path`` is then as it was.
    """
    with atomic_writer(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def removable(path: str | os.PathLike[str], tree: Path) -> Path | None:
    """What to remove for ``path``: the path with its folder resolved, when that folder is
    ``tree`` or lies inside it; else None, and a warning says what was left in place.

    ``path`` itself is not resolved (a link stays the link). ``tree`` is taken as it is: build
    it from a resolved root (``root.resolve() / "blobs"``) so that a link on the way counts as
    leaving it.
    """
    path = Path(os.path.abspath(path))  # (no "..": what is removed is what is checked)
    real = Path(os.path.realpath(path.parent)) / path.name
    if path.name and real.parent.is_relative_to(tree):
        return real
    log.warning("left %s in place: it lies outside %s", real, tree)
    return None


def remove_within(path: str | os.PathLike[str], tree: Path) -> bool:
    """Remove ``path`` (a file, a link or a folder and all it holds) when it lies in ``tree``.

    See :func:`removable` for what lies in ``tree``. A link is removed as a link; a folder's links
    are removed, never followed. A ``path`` that is not there counts as removed.

    Returns:
        False when ``path`` lies outside ``tree`` (nothing was touched), else True.

    Raises:
        OSError: It could not be removed.
    """
    real = removable(path, tree)
    if real is None:
        return False
    try:
        mode = os.lstat(real).st_mode
    except FileNotFoundError:
        return True
    if stat.S_ISDIR(mode):
        shutil.rmtree(real)  # (removes links inside as links)
    else:
        real.unlink(missing_ok=True)
    return True
