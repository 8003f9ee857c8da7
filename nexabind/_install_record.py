"""The install record of an installed entry: the sha256 of every file and the target of every
link, written once the entry is staged (:func:`write_record`), compared with the tree later
(:func:`compare`) to tell whether anything changed since."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nexabind._files import write_atomic

__all__ = [
    "INSTALL_RECORD",
    "compare",
    "read_build_info",
    "read_record",
    "sha256_file",
    "update_record",
    "write_record",
]

#: Name of the install record inside each installed entry.
INSTALL_RECORD = ".nexabind-install.json"


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _walk(tree: Path) -> Iterator[tuple[str, Path]]:
    """Every file and link of ``tree`` but the record, sorted, with its ``/``-separated path."""
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]):
            p = Path(dirpath, name)
            rel = p.relative_to(tree).as_posix()
            if rel != INSTALL_RECORD:
                yield rel, p


def write_record(
    tree: Path, info: dict[str, Any], hashes: dict[str, str] | None = None
) -> dict[str, Any]:
    """Hash every file of a staged tree and write its install record there.

    Args:
        tree: The staged entry folder.
        info: What to record besides the files (release, key, artifact, sha256, source).
        hashes: sha256 already known (taken while extracting), by ``/``-separated path;
            files not in it are read and hashed.

    Returns:
        The record written.
    """
    files: dict[str, str] = {}
    links: dict[str, str] = {}
    for rel, p in _walk(tree):
        if p.is_symlink():
            links[rel] = os.readlink(p)
        else:
            files[rel] = (hashes or {}).get(rel) or sha256_file(p)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record = {**info, "installed": now, "files": files, "links": links}
    write_atomic(tree / INSTALL_RECORD, json.dumps(record, indent=1) + "\n")
    return record


def read_record(tree: Path) -> dict[str, Any] | None:
    """The install record of the entry ``tree``, or None when it has none (a local build
    folder) or it is unreadable."""
    try:
        record = json.loads((tree / INSTALL_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_build_info(tree: Path) -> dict[str, Any]:
    """The ``build-info.json`` of an entry or artifact folder ``tree``; empty when it has none
    or it does not read as a JSON object (an artifact that did not write it well says nothing)."""
    try:
        info = json.loads((tree / "build-info.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def update_record(tree: Path, fields: dict[str, Any]) -> bool:
    """Set ``fields`` in the install record of the entry ``tree`` (replaced in one step).

    Returns:
        False when ``tree`` holds no install record (a local build folder): nothing written.
    """
    path = tree / INSTALL_RECORD
    record = read_record(tree)
    if record is None:
        return False
    record.update(fields)
    write_atomic(path, json.dumps(record, indent=1) + "\n")
    return True


def compare(tree: Path, record: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """Re-hash ``tree`` and compare it with its ``record``.

    Returns:
        The paths changed (a sha256 or a link target differs), missing (recorded, gone) and
        added (not recorded).
    """
    files: dict[str, str] = record.get("files", {})
    links: dict[str, str] = record.get("links", {})
    changed: list[str] = []
    added: list[str] = []
    seen = set()
    for rel, p in _walk(tree):
        seen.add(rel)
        if p.is_symlink():
            if links.get(rel) != os.readlink(p):
                (changed if rel in links else added).append(rel)
        elif rel not in files:
            added.append(rel)
        elif sha256_file(p) != files[rel]:
            changed.append(rel)
    return changed, sorted((set(files) | set(links)) - seen), added
