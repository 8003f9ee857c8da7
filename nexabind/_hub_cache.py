"""The GGUF models in the hub cache: listing, finding, removing, and when each was last used.

Reads huggingface_hub's cache layout (``models--OWNER--REPO/{refs,snapshots,blobs}``) without
huggingface_hub: a model whose files are all in a snapshot is a :class:`CachedModel`; nothing
else is listed. :func:`remove` deletes a model's snapshot files and the blobs no other snapshot
uses. When each model was last loaded is kept in nexabind's cache (``models-used.json``).
Nothing here reaches the network.

A removal stays in the repository: a snapshot file in its ``snapshots/``, a blob in its own
``blobs/``, both resolved. A folder of the cache that is a link (a repository, a snapshot) is
listed through but never removed through; a link that points elsewhere is removed as a link,
and what it points to stays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nexabind import _gguf, cache
from nexabind._files import remove_within, write_atomic
from nexabind._hub_names import (
    ModelRef,
    choose,
    hub_cache_dir,
    model_heads,
    model_parts,
    quant_of,
    split_name,
)
from nexabind.errors import CacheError, ModelLoadError, ModelNotFoundError

__all__ = [
    "CachedModel",
    "find",
    "mark_used",
    "models",
    "read_used",
    "remove",
    "remove_copy",
    "repo_folder",
    "repo_models",
    "snapshots",
    "write_ref",
]

log = logging.getLogger("nexabind.hub")

_USED = "models-used.json"


# -- cached models, in huggingface_hub's layout ------------------------------------------------


class CachedModel:
    """A complete model in the hub cache (every part of a split one).

    Attributes:
        repo_id: ``OWNER/REPO``.
        file: Its file (the first part of a split model), relative to the repository.
        files: Every part, in order.
        commit: The commit of the snapshot that holds it.
        path: The file in the snapshot: what ``Llama(model_path=...)`` takes.
        size: Bytes of all parts.
        quant: The quantization tag of its file name (``""`` when the name has none).
        name: How to name it: ``OWNER/REPO:QUANT``, or ``OWNER/REPO:FILE`` when the tag does
            not tell it apart from the repository's other models.
        last_used: When ``nexabind run`` or ``Llama.from_pretrained`` last loaded it (a Unix
            time), or None.
    """

    # (A plain class: a dataclass would compile its methods on every start-up of the CLI.)
    __slots__ = ("_summary", "commit", "file", "files", "last_used", "name", "path", "quant",
                 "repo_id", "size")  # fmt: skip

    def __init__(
        self,
        repo_id: str,
        file: str,
        files: tuple[str, ...],
        commit: str,
        path: Path,
        size: int,
        quant: str,
        name: str = "",
    ) -> None:
        self.repo_id, self.file, self.files, self.commit = repo_id, file, files, commit
        self.path, self.size, self.quant = path, size, quant
        self.name = name or f"{repo_id}:{quant or file}"
        self.last_used: float | None = None
        self._summary: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<CachedModel {self.name} @ {self.commit[:8]}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CachedModel):
            return NotImplemented
        return (self.repo_id, self.files, self.commit, self.path) == (
            other.repo_id, other.files, other.commit, other.path
        )  # fmt: skip

    def __hash__(self) -> int:
        return hash((self.repo_id, self.files, self.commit))

    @property
    def paths(self) -> list[Path]:
        """Every part's path in the snapshot."""
        root = self.path.parents[len(Path(self.file).parts) - 1]
        return [root / f for f in self.files]

    def header(self) -> dict[str, Any]:
        """``architecture``, ``parameters``, ``context_length``, ``title`` and ``file_type``
        from the GGUF header (read once; a split model's parameters are summed over parts).

        Raises:
            ModelLoadError: A part is not a readable GGUF file.
        """
        if self._summary is None:
            first = _gguf.summarize(self.path)
            meta = first.metadata
            params = first.n_params + sum(_gguf.summarize(p).n_params for p in self.paths[1:])
            arch = meta.get("general.architecture")
            self._summary = {
                "architecture": arch,
                "parameters": params,
                "context_length": meta.get(f"{arch}.context_length"),
                "title": meta.get("general.name"),
                "file_type": _file_type(meta.get("general.file_type")),
            }
        return dict(self._summary)

    def to_dict(self, header: bool = True) -> dict[str, Any]:
        """The model as JSON-ready values (with its header's, unless ``header`` is False)."""
        out: dict[str, Any] = {
            "name": self.name,
            "repo": self.repo_id,
            "file": self.file,
            "files": list(self.files),
            "quant": self.quant or None,
            "size": self.size,
            "commit": self.commit,
            "path": str(self.path),
            "last_used": _iso(self.last_used),
        }
        if header:
            try:
                out.update(self.header())
            except ModelLoadError as e:
                out["error"] = str(e)
        return out


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _file_type(value: Any) -> str | None:
    """``general.file_type`` as llama.cpp names it (``Q4_K_M``), or None."""
    if not isinstance(value, int):
        return None
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(value).name
    except ValueError:
        return str(value)
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def repo_folder(root: Path, repo_id: str) -> Path:
    return root / ("models--" + repo_id.replace("/", "--"))


def _repo_of(folder: str) -> str | None:
    if not folder.startswith("models--"):
        return None
    return folder[len("models--") :].replace("--", "/")


def snapshots(repo_dir: Path) -> list[Path]:
    """The repository's snapshots, the one ``refs/main`` names first, then newest first."""
    snaps = repo_dir / "snapshots"
    try:
        found = [p for p in snaps.iterdir() if p.is_dir()]
    except OSError:
        return []
    main = _read_ref(repo_dir, "main")
    found.sort(key=lambda p: (p.name != main, -_mtime(p)))
    return found


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _read_ref(repo_dir: Path, revision: str) -> str | None:
    try:
        return (repo_dir / "refs" / revision).read_text().strip() or None
    except OSError:
        return None


def write_ref(repo_dir: Path, revision: str, commit: str) -> None:
    """Record ``revision -> commit`` the way huggingface_hub does (``refs/<revision>``)."""
    ref = repo_dir / "refs" / revision
    if _read_ref(repo_dir, revision) == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(ref, commit)


def _snapshot_files(snap: Path) -> dict[str, Path]:
    """The ``.gguf`` files of a snapshot whose content is there (no dangling links)."""
    out = {}
    for dirpath, _dirs, names in os.walk(snap):
        for name in names:
            if name.endswith(".gguf"):
                p = Path(dirpath) / name
                if p.exists():
                    out[p.relative_to(snap).as_posix()] = p
    return out


def repo_models(repo_id: str, repo_dir: Path) -> list[CachedModel]:
    """The complete models of one cached repository, each from its preferred snapshot."""
    seen: dict[str, CachedModel] = {}
    for snap in snapshots(repo_dir):
        files = _snapshot_files(snap)
        for head in model_heads(files):
            if head in seen:
                continue
            parts = model_parts(files, head)
            if len(parts) != split_name(head)[3]:
                continue  # a split model not yet whole
            size = sum(files[p].stat().st_size for p in parts)
            seen[head] = CachedModel(
                repo_id, head, tuple(parts), snap.name, files[head], size, quant_of(head)
            )
    found = sorted(seen.values(), key=lambda m: m.file)
    for m in found:
        unique = sum(o.quant == m.quant for o in found) == 1
        m.name = f"{repo_id}:{m.quant}" if m.quant and unique else f"{repo_id}:{m.file}"
    return found


def models(cache_dir: str | os.PathLike[str] | None = None) -> list[CachedModel]:
    """Every complete GGUF model in the hub cache, by repository and file.

    A model is listed once (from the snapshot ``refs/main`` names, else the newest that has
    it); a split model only when all its parts are there. Nothing is downloaded.

    Args:
        cache_dir: The hub cache (None: :func:`hub_cache_dir`).
    """
    root = hub_cache_dir(cache_dir)
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []
    used = read_used()
    out = []
    for folder in folders:
        repo_id = _repo_of(folder.name)
        if repo_id is not None:
            for m in repo_models(repo_id, folder):
                m.last_used = used.get(str(m.path))
                out.append(m)
    return out


def find(
    ref: ModelRef | str, cache_dir: str | os.PathLike[str] | None = None
) -> CachedModel | None:
    """The cached model ``ref`` names, or None; reads the cache only, never the network.

    A bare repository name (no owner) matches a cached repository of that name when only one
    does. Without a quantization or file, the choice is :func:`choose`'s among the cached
    models.

    Raises:
        ValueError: ``ref`` is not a model name.
        ModelNotFoundError: A bare name matches several cached repositories.
    """
    ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
    root = hub_cache_dir(cache_dir)
    if "/" not in ref.repo_id:
        try:
            names = [_repo_of(p.name) for p in root.iterdir()]
        except OSError:
            names = []
        hits = sorted(n for n in names if n and n.split("/")[-1].lower() == ref.repo_id.lower())
        if len(hits) > 1:
            msg = f"{ref.repo_id!r} names several cached repositories: {', '.join(hits)}; give one"
            raise ModelNotFoundError(msg)
        if not hits:
            return None
        ref = ModelRef(hits[0], ref.quant, ref.file)
    cached = {m.file: m for m in repo_models(ref.repo_id, repo_folder(root, ref.repo_id))}
    if not cached:
        return None
    files = [p for m in cached.values() for p in m.files]
    try:
        chosen = choose(ref.repo_id, files, ref)
    except ModelNotFoundError:
        return None
    model = cached.get(chosen[0])
    if model is not None:
        model.last_used = read_used().get(str(model.path))
    return model


# -- removing -------------------------------------------------------------------------------


def remove(ref: ModelRef | str, cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Delete cached models: ``OWNER/REPO`` all its GGUF models, ``...:QUANT`` or ``...:FILE``
    one; return the snapshot paths removed.

    Blobs no other snapshot file uses are deleted with them; a repository left with nothing
    goes entirely. Files other tools put there (not GGUF models) stay, and so do copies reached
    through a linked folder (a warning names each).

    Raises:
        ValueError: ``ref`` is not a model name.
        ModelNotFoundError: Nothing in the cache matches ``ref`` (the message lists what is).
        CacheError: Every copy of it lies outside the repository's folder (its repository or
            snapshot is a link): nothing was removed.
    """
    ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
    root = hub_cache_dir(cache_dir)
    if "/" not in ref.repo_id:
        found = find(ModelRef(ref.repo_id), cache_dir)
        ref = ModelRef(found.repo_id if found else ref.repo_id, ref.quant, ref.file)
    repo_dir = repo_folder(root, ref.repo_id)
    cached = repo_models(ref.repo_id, repo_dir)
    if ref.quant or ref.file:
        targets = [m for m in cached if m.name == str(ref) or _matches(m, ref)]
    else:
        targets = cached
    if not targets:
        have = ", ".join(m.name for m in models(cache_dir)) or "nothing"
        msg = f"{ref} is not in the hub cache ({root}); it holds: {have}"
        raise ModelNotFoundError(msg)
    removed = []
    for m in targets:
        removed += [p for p in _all_copies(repo_dir, m.files) if remove_copy(repo_dir, p)]
    if not removed:
        msg = (
            f"{ref}: nothing removed; its files lie outside {_real(repo_dir) / 'snapshots'}, "
            "through a linked folder, and nexabind never deletes through a link: remove the "
            "link (or what it points to) by hand"
        )
        raise CacheError(msg)
    _prune(repo_dir)
    used = read_used()
    if any(str(p) in used for p in removed):
        _write_used({k: v for k, v in used.items() if k not in {str(p) for p in removed}})
    return removed


def _matches(m: CachedModel, ref: ModelRef) -> bool:
    if ref.file is not None:
        return ref.file in (m.file, m.file.rsplit("/", 1)[-1]) or ref.file in m.files
    return m.quant == ref.quant


def _all_copies(repo_dir: Path, files: Iterable[str]) -> list[Path]:
    """The files in every snapshot (a model pulled at two commits is removed from both)."""
    out = []
    for snap in snapshots(repo_dir):
        out += [snap / f for f in files if (snap / f).is_symlink() or (snap / f).exists()]
    return out


def _real(repo_dir: Path) -> Path:
    """The repository's folder, its hub cache resolved (the cache may be a link; nothing in it
    may)."""
    return Path(os.path.realpath(repo_dir.parent)) / repo_dir.name


def _blob_of(p: Path) -> Path | None:
    """The path the snapshot link ``p`` names (one step, not resolved further), or None."""
    try:
        target = os.readlink(p)
    except OSError:
        return None  # not a link: a copy, its own content
    return Path(os.path.normpath(os.path.join(os.path.realpath(p.parent), target)))


def remove_copy(repo_dir: Path, path: Path) -> bool:
    """Delete one snapshot file of ``repo_dir``, and its blob when no other snapshot links it.

    The file must lie in the repository's ``snapshots/`` and the blob in its ``blobs/`` (both
    resolved); a link is removed as a link. A blob elsewhere (outside the cache, in another
    repository) stays, and a warning says so (:func:`nexabind._files.removable`).

    Returns:
        Whether the file was removed (False: it lies outside the repository's snapshots).

    Raises:
        OSError: It could not be removed.
    """
    real = _real(repo_dir)
    blob = _blob_of(path)
    if not remove_within(path, real / "snapshots"):
        return False
    if blob is not None and not _linked(repo_dir, blob):
        remove_within(blob, real / "blobs")
    return True


def _linked(repo_dir: Path, blob: Path) -> bool:
    for dirpath, _dirs, names in os.walk(repo_dir / "snapshots"):
        for name in names:
            if _blob_of(Path(dirpath) / name) == blob:
                return True
    return False


def _prune(repo_dir: Path) -> None:
    """Remove empty snapshot folders, refs to them, and the repository when nothing is left.

    Nothing is removed through a link: a linked folder stays (and keeps its repository).
    """
    real = _real(repo_dir)

    def inside(p: Path) -> bool:  # a folder of the repository, neither of them a link
        return p.is_dir() and Path(os.path.realpath(p)) == real / p.name

    snaps = repo_dir / "snapshots"
    if inside(snaps):
        for dirpath, _dirs, _names in sorted(os.walk(snaps), key=lambda t: -len(t[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)  # only when empty
    left = {p.name for p in snaps.iterdir()} if snaps.is_dir() else set()
    refs = repo_dir / "refs"
    if inside(refs):
        for ref in [p for p in refs.rglob("*") if p.is_file()]:
            if ref.read_text().strip() not in left:
                remove_within(ref, real / "refs")
    blobs = repo_dir / "blobs"
    busy = blobs.is_dir() and any(p.name.endswith(".incomplete") for p in blobs.iterdir())
    if not left and not busy:  # (a download in progress keeps the repository)
        remove_within(repo_dir, real.parent)
        remove_within(repo_dir.parent / ".locks" / repo_dir.name, real.parent / ".locks")


# -- last used --------------------------------------------------------------------------------


def _used_path() -> Path:
    return cache.cache_root() / _USED


def read_used() -> dict[str, float]:
    try:
        data = json.loads(_used_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}


def _write_used(used: dict[str, float]) -> None:
    path = _used_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(used, indent=0, sort_keys=True))


def mark_used(model: CachedModel | str | os.PathLike[str]) -> None:
    """Record that a model was loaded now (``nexabind models`` shows it as last used).

    Best effort: a cache that cannot be written is logged, not raised.
    """
    path = str(model.path if isinstance(model, CachedModel) else Path(model).absolute())
    from filelock import FileLock

    try:
        cache.cache_root().mkdir(parents=True, exist_ok=True)
        with FileLock(str(_used_path()) + ".lock", timeout=5):
            used = read_used()
            used[path] = time.time()
            _write_used(used)
    except (OSError, TimeoutError) as e:
        log.warning("could not record the use of %s: %s", path, e)
