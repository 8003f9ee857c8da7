"""GGUF models from the Hugging Face hub, in huggingface_hub's shared cache.

A model is named ``OWNER/REPO[:QUANT|:FILE]``: ``Qwen/Qwen3-0.6B-GGUF``,
``unsloth/Qwen3-0.6B-GGUF:Q8_0``, ``ggml-org/gemma-3-270m-GGUF:gemma-3-270m-Q8_0.gguf``. The
file is chosen the way llama.cpp's ``-hf`` chooses it: Q4_K_M by default, else Q8_0, else the
first model file; a split model (``...-00001-of-00003.gguf``) comes whole.

Files go through ``huggingface_hub`` into its cache, so a model pulled here is one other tools
see, and the other way round. The hub's variables are read when a function runs, not at
import: ``HF_HUB_CACHE`` (else ``HF_HOME/hub``), ``HF_ENDPOINT``, ``HF_TOKEN`` (gated and
private repos) and ``HF_HUB_OFFLINE`` (only the cache is used). ::

    <HF_HUB_CACHE>/models--OWNER--REPO/
      refs/main                     the commit the last pull resolved
      snapshots/<commit>/<file>     links to blobs/, created once a blob is complete
      blobs/<sha256>                the files' contents

A model whose files are all in a snapshot is complete; nothing else is listed, so a pull that
was cut short never shows. Resolving a model that is in the cache asks the hub nothing: a pull
is what looks for a newer commit. Downloads resume within a pull after a dropped connection
(huggingface_hub retries with a ``Range`` request), and each file downloaded is checked
against the sha256 the hub lists for it.

Which models were used when is recorded in nexabind's cache (``models-used.json``).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from nexabind import _gguf, cache
from nexabind.errors import (
    ChecksumMismatchError,
    DownloadError,
    ModelLoadError,
    ModelNotFoundError,
)

__all__ = [
    "DEFAULT_QUANTS",
    "CachedModel",
    "ModelRef",
    "choose",
    "endpoint",
    "find",
    "from_pretrained",
    "hub_cache_dir",
    "human_size",
    "mark_used",
    "models",
    "offline",
    "pull",
    "remove",
    "resolve",
]

log = logging.getLogger(__name__)

#: The quantizations chosen when none is named, in order (as llama.cpp's ``-hf``).
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")

_DEFAULT_ENDPOINT = "https://huggingface.co"
_ON = ("1", "ON", "YES", "TRUE")  # huggingface_hub's true values
# Patterns as text: re compiles (and caches) them on first use, not at import.
_SPLIT = r"^(.+)-([0-9]{5})-of-([0-9]{5})$"
_TAG = r"[-.]([A-Z0-9_]+)$"
# Files next to a model that are not one (llama.cpp's gguf_filename_is_model).
_NOT_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
_REPO = r"[\w.-]{1,96}/[\w.-]{1,96}"
_USED = "models-used.json"


# -- settings, read when used ---------------------------------------------------------------


def hub_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The hub cache folder: ``cache_dir``, else as huggingface_hub finds it now.

    ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    env = os.environ
    found = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not found:
        xdg = env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        home = env.get("HF_HOME") or os.path.join(xdg, "huggingface")
        found = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(found))).absolute()


def endpoint() -> str:
    """The hub's URL: ``HF_ENDPOINT``, else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) keeps the hub out of reach."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _ON


def _token() -> str | None:
    """``HF_TOKEN``, else the token file huggingface_hub's login wrote, else None."""
    env = os.environ
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    path = Path(os.path.expanduser(env.get("HF_TOKEN_PATH") or os.path.join(home, "token")))
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


# -- names ----------------------------------------------------------------------------------


class ModelRef(NamedTuple):
    """A model's name: a repository and, optionally, a quantization or a file in it.

    Attributes:
        repo_id: ``OWNER/REPO`` (or a bare ``REPO``, which only the cache can resolve).
        quant: A quantization such as ``Q4_K_M`` (compared without case), or None.
        file: A ``.gguf`` path in the repository, or None.
    """

    repo_id: str
    quant: str | None = None
    file: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``OWNER/REPO[:QUANT|:FILE]``; a ``hf.co/`` or hub URL prefix is dropped.

        Raises:
            ValueError: Not a model name (the message shows the form expected).
        """
        name = text.strip()
        for prefix in (endpoint() + "/", _DEFAULT_ENDPOINT + "/", "huggingface.co/", "hf.co/"):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        repo, _, sel = name.partition(":")
        bare = "/" not in repo and re.fullmatch(r"[\w.-]{1,96}", repo) is not None
        if not (re.fullmatch(_REPO, repo) or bare) or "--" in repo or ".." in repo:
            msg = (
                f"{text!r} is not a model name; give OWNER/REPO, OWNER/REPO:QUANT or "
                "OWNER/REPO:FILE.gguf (e.g. Qwen/Qwen3-0.6B-GGUF:Q4_K_M)"
            )
            raise ValueError(msg)
        if not sel:
            return cls(repo)
        if sel.lower().endswith(".gguf"):
            return cls(repo, file=sel)
        return cls(repo, quant=sel.upper())

    def __str__(self) -> str:
        sel = self.file or self.quant
        return f"{self.repo_id}:{sel}" if sel else self.repo_id


# -- choosing the file ----------------------------------------------------------------------


def _split(path: str) -> tuple[str, str, int, int]:
    """``(prefix, quant tag, part, parts)`` of a ``.gguf`` path, as llama.cpp reads it."""
    prefix = path[: -len(".gguf")]
    index = count = 1
    m = re.match(_SPLIT, prefix, re.IGNORECASE)
    if m:
        prefix, index, count = m.group(1), int(m.group(2)), int(m.group(3))
    t = re.search(_TAG, prefix, re.IGNORECASE)
    return prefix, (t.group(1).upper() if t else ""), index, count


def _is_gguf(path: str) -> bool:
    return path.endswith(".gguf")


def _is_model(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return _is_gguf(path) and not any(word in name for word in _NOT_MODEL)


def quant_of(path: str) -> str:
    """The quantization tag of a file name (``model-Q4_K_M.gguf`` -> ``Q4_K_M``), or ``""``."""
    return _split(path)[1] if _is_gguf(path) else ""


def _parts(files: Iterable[str], first: str) -> list[str]:
    """Every part of the model ``first`` belongs to, in order (itself when not split)."""
    prefix, _, _, count = _split(first)
    if count <= 1:
        return [first]
    found = {}
    for f in files:
        if _is_gguf(f):
            p, _, index, n = _split(f)
            if p == prefix and n == count:
                found[index] = f
    return [found[i] for i in sorted(found)]


def _heads(files: Iterable[str]) -> list[str]:
    """The model files that start a model (part 1 of a split one), sorted."""
    return sorted(f for f in files if _is_model(f) and _split(f)[2] == 1)


def human_size(n: int) -> str:
    """Bytes as people read them: ``253.1 MB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _what_exists(repo: str, files: list[str], sizes: Mapping[str, int]) -> str:
    """``Q4_K_M (253.1 MB), Q8_0 (...)``: the models of a repository, for an error message."""
    items = []
    for head in _heads(files):
        size = sum(sizes.get(p, 0) for p in _parts(files, head))
        tag = quant_of(head)
        unique = sum(quant_of(h) == tag for h in _heads(files)) == 1
        label = tag if tag and unique else head
        items.append(f"{label} ({human_size(size)})" if size else label)
    return ", ".join(items)


def choose(
    repo_id: str,
    files: Iterable[str],
    ref: ModelRef,
    sizes: Mapping[str, int] | None = None,
) -> list[str]:
    """Pick the file(s) of ``ref`` among a repository's files; return every part, in order.

    A named file is taken as is (a split model's other parts come along). A quantization
    matches the file whose tag is that quantization, else, as in llama.cpp, a file whose
    path holds it followed by ``.`` or ``-`` (so ``UD-Q4_K_XL`` works too). With neither,
    Q4_K_M, then Q8_0, then the first model file. Projectors (``mmproj``), importance
    matrices and draft models are never chosen as the model.

    Raises:
        ModelNotFoundError: No such file or quantization (the message lists what exists), or
            the repository holds no GGUF model.
    """
    files = sorted(set(files))
    sizes = sizes or {}
    heads = _heads(files)
    if not heads:
        shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
        msg = (
            f"{repo_id} holds no GGUF model ({shown or 'no files'}); llama.cpp runs .gguf "
            f"files: look for a GGUF version of it (often {repo_id}-GGUF or a quantizer's "
            "copy), or convert it with llama.cpp's convert_hf_to_gguf.py"
        )
        raise ModelNotFoundError(msg)
    if ref.file is not None:
        hits = [f for f in files if f == ref.file] or [
            f for f in files if _is_gguf(f) and f.rsplit("/", 1)[-1] == ref.file
        ]
        if len(hits) != 1:
            what = "several files named" if hits else "no file"
            msg = (
                f"{repo_id} has {what} {ref.file!r}; its models: "
                f"{_what_exists(repo_id, files, sizes)}"
            )
            raise ModelNotFoundError(msg)
        first = next((h for h in _parts(files, hits[0]) if _split(h)[2] == 1), hits[0])
        return _complete(repo_id, files, first)
    for quant in [ref.quant] if ref.quant else list(DEFAULT_QUANTS):
        exact = [h for h in heads if quant_of(h) == quant.upper()]
        near = re.compile(re.escape(quant) + r"[.-]", re.IGNORECASE)
        hits = exact or [h for h in heads if near.search(h)]
        if hits:
            return _complete(repo_id, files, hits[0])
    if ref.quant is None:
        return _complete(repo_id, files, heads[0])
    first = quant_of(heads[0]) or heads[0]
    msg = (
        f"{repo_id} has no {ref.quant} model; it has: {_what_exists(repo_id, files, sizes)}. "
        f"Name one, e.g. {repo_id}:{first}"
    )
    raise ModelNotFoundError(msg)


def _complete(repo_id: str, files: list[str], first: str) -> list[str]:
    parts = _parts(files, first)
    count = _split(first)[3]
    if len(parts) != count:
        msg = (
            f"{repo_id} lists {len(parts)} of the {count} parts of {first}; the repository "
            "is incomplete, choose another model in it"
        )
        raise ModelNotFoundError(msg)
    return parts


# -- the cache ------------------------------------------------------------------------------


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


def _repo_dir(root: Path, repo_id: str) -> Path:
    return root / ("models--" + repo_id.replace("/", "--"))


def _repo_of(folder: str) -> str | None:
    if not folder.startswith("models--"):
        return None
    return folder[len("models--") :].replace("--", "/")


def _snapshots(repo_dir: Path) -> list[Path]:
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


def _repo_models(repo_id: str, repo_dir: Path) -> list[CachedModel]:
    """The complete models of one cached repository, each from its preferred snapshot."""
    seen: dict[str, CachedModel] = {}
    for snap in _snapshots(repo_dir):
        files = _snapshot_files(snap)
        for head in _heads(files):
            if head in seen:
                continue
            parts = _parts(files, head)
            if len(parts) != _split(head)[3]:
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
    used = _read_used()
    out = []
    for folder in folders:
        repo_id = _repo_of(folder.name)
        if repo_id is not None:
            for m in _repo_models(repo_id, folder):
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
    cached = {m.file: m for m in _repo_models(ref.repo_id, _repo_dir(root, ref.repo_id))}
    if not cached:
        return None
    files = [p for m in cached.values() for p in m.files]
    try:
        chosen = choose(ref.repo_id, files, ref)
    except ModelNotFoundError:
        return None
    model = cached.get(chosen[0])
    if model is not None:
        model.last_used = _read_used().get(str(model.path))
    return model


# -- pulling ----------------------------------------------------------------------------------


def _net_errors() -> tuple[type[BaseException], ...]:
    """OSError (huggingface_hub's own errors, requests') and the HTTP library's base error."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        mod = sys.modules.get(name)
        if mod is not None and isinstance(getattr(mod, "HTTPError", None), type):
            errors.append(mod.HTTPError)
    return tuple(errors)


def _hub_error(e: BaseException, repo_id: str, what: str) -> Exception:
    """One of our errors for what huggingface_hub raised while doing ``what``."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ep = endpoint()
    if isinstance(e, GatedRepoError):
        return DownloadError(
            f"{repo_id} is gated: accept its conditions at {ep}/{repo_id}, then set HF_TOKEN to "
            "a token of that account (or log in with `hf auth login`)"
        )
    if isinstance(e, RepositoryNotFoundError):
        return ModelNotFoundError(
            f"no repository {repo_id} on {ep} (or it is private and HF_TOKEN gives no access "
            "to it); check the name"
        )
    if isinstance(e, RevisionNotFoundError):
        return ModelNotFoundError(f"{repo_id} has no such revision on {ep}: {e}")
    if isinstance(e, OfflineModeIsEnabled):
        return DownloadError(
            f"huggingface_hub is in offline mode (HF_HUB_OFFLINE was set when it was imported); "
            f"cannot {what}"
        )
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DownloadError(
            f"no room left to {what}: {e.strerror or e}; free some space, or set HF_HUB_CACHE "
            f"to a folder on a larger disk (now {hub_cache_dir()})"
        )
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return DownloadError(f"{ep} answered HTTP {status} when asked to {what}: {first}")
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DownloadError(
        f"could not {what} from {ep}: {reason}. Check the connection (or HF_ENDPOINT); "
        "a pull run again starts that file over"
    )


class _Remote:
    """What the hub lists for a repository: its commit, its files and their digests."""

    def __init__(self, commit: str) -> None:
        self.commit = commit
        self.files: list[str] = []
        self.sizes: dict[str, int] = {}
        self.sha256: dict[str, str] = {}  # LFS files
        self.git_sha1: dict[str, str] = {}  # the others


def _remote(repo_id: str, revision: str, token: str | None) -> _Remote:
    """What the hub lists for a repository at ``revision``: its commit and its files."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint(), token=token).model_info(
            repo_id, revision=revision, files_metadata=True
        )
    except _net_errors() as e:
        raise _hub_error(e, repo_id, f"list the files of {repo_id}") from e
    if not info.sha:
        msg = f"{endpoint()} gave no commit for {repo_id}@{revision}; is HF_ENDPOINT a hub?"
        raise DownloadError(msg)
    remote = _Remote(info.sha)
    for s in info.siblings or []:
        remote.files.append(s.rfilename)
        if s.size is not None:
            remote.sizes[s.rfilename] = s.size
        if s.lfs is not None:
            remote.sha256[s.rfilename] = s.lfs.sha256
            remote.sizes[s.rfilename] = s.lfs.size
        elif s.blob_id:
            remote.git_sha1[s.rfilename] = s.blob_id
    return remote


def _progress_class(progress: bool | None, label: str) -> type:
    """A tqdm class for huggingface_hub: bars labelled ``label``, shown when ``progress`` (None:
    when stderr is a terminal)."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress

    class Bar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)  # huggingface_hub names its bars
            kwargs["disable"] = not show
            kwargs["desc"] = label
            super().__init__(*args, **kwargs)

    return Bar


def _check_room(root: Path, need: int, what: str) -> None:
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        msg = (
            f"not enough space to {what}: it needs {human_size(need)} and {probe} has "
            f"{human_size(free)} free; free some space, or set HF_HUB_CACHE to a folder on a "
            "larger disk"
        )
        raise DownloadError(msg)


def _verify(path: Path, remote: _Remote, file: str, repo_id: str) -> None:
    """Check a freshly downloaded file against the hub's sha256 (or git blob id)."""
    import hashlib

    want = remote.sha256.get(file)
    if want:
        got = cache.sha256_file(path)
    else:
        want = remote.git_sha1.get(file)
        if not want:
            return
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size, usedforsecurity=False)
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        got = digest.hexdigest()
    if got != want:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        msg = (
            f"{repo_id}/{file} arrived damaged: the hub lists {want} but the file hashes to "
            f"{got}. Deleted it; run the pull again"
        )
        raise ChecksumMismatchError(msg)


def pull(
    ref: ModelRef | str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str = "main",
    progress: bool | None = None,
) -> CachedModel:
    """Download a model into the hub cache (or find it up to date there); return it.

    Asks the hub for the repository's files at ``revision``, chooses the model (see
    :func:`choose`) and downloads what the cache lacks, every part from the same commit.
    Each file downloaded is checked against the hub's sha256.

    Args:
        ref: ``OWNER/REPO[:QUANT|:FILE]``.
        cache_dir: The hub cache (None: :func:`hub_cache_dir`).
        revision: Branch, tag or commit.
        progress: Show a progress bar per file on stderr (None: when it is a terminal).

    Raises:
        ValueError: ``ref`` is not a model name.
        ModelNotFoundError: No such repository, no GGUF model in it, no such quantization or
            file; or, offline, the model is not in the cache.
        DownloadError: The hub could not be reached, refused (a gated repository without
            access), the download failed, or the disk is too small.
        ChecksumMismatchError: A file arrived damaged (it is deleted).
    """
    ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
    if offline():
        found = find(ref, cache_dir)
        if found is None:
            msg = (
                f"{ref} is not in the hub cache ({hub_cache_dir(cache_dir)}) and HF_HUB_OFFLINE "
                "is set; pull it with the network on, or unset HF_HUB_OFFLINE"
            )
            raise ModelNotFoundError(msg)
        return found
    if "/" not in ref.repo_id:
        msg = f"give the repository with its owner, as OWNER/{ref.repo_id}, to pull it"
        raise ValueError(msg)
    root = hub_cache_dir(cache_dir)
    token = _token()
    remote = _remote(ref.repo_id, revision, token)
    parts = choose(ref.repo_id, remote.files, ref, remote.sizes)
    repo_dir = _repo_dir(root, ref.repo_id)
    snap = repo_dir / "snapshots" / remote.commit
    todo = [p for p in parts if not (snap / p).exists()]
    blobs = repo_dir / "blobs"
    need = sum(
        remote.sizes.get(p, 0) for p in todo if not (blobs / remote.sha256.get(p, "-")).exists()
    )
    _check_room(root, need, f"pull {ref.repo_id}:{parts[0]}")
    from huggingface_hub import hf_hub_download

    for part in todo:
        log.info("downloading %s/%s (%s)", ref.repo_id, part, human_size(remote.sizes.get(part, 0)))
        what = f"download {ref.repo_id}/{part}"
        try:
            path = hf_hub_download(
                ref.repo_id,
                part,
                revision=remote.commit,
                cache_dir=root,
                endpoint=endpoint(),
                token=token,
                tqdm_class=_progress_class(progress, part.rsplit("/", 1)[-1]),
            )
        except _net_errors() as e:
            raise _hub_error(e, ref.repo_id, what) from e
        _verify(Path(path), remote, part, ref.repo_id)
    if revision != remote.commit:
        _write_ref(repo_dir, revision, remote.commit)
    found = next((m for m in _repo_models(ref.repo_id, repo_dir) if m.file == parts[0]), None)
    if found is None or found.commit != remote.commit:
        msg = f"{ref.repo_id}:{parts[0]} is not complete in {snap} after its download"
        raise DownloadError(msg)
    found.last_used = _read_used().get(str(found.path))
    return found


def _write_ref(repo_dir: Path, revision: str, commit: str) -> None:
    """Record ``revision -> commit`` the way huggingface_hub does (``refs/<revision>``)."""
    ref = repo_dir / "refs" / revision
    if _read_ref(repo_dir, revision) == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def resolve(
    ref: ModelRef | str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool | None = None,
) -> CachedModel:
    """The model ``ref`` names: from the cache without a network call, else pulled.

    Raises:
        ModelNotFoundError: Not cached and ``download`` is False, or as :func:`pull`.
        DownloadError: As :func:`pull`.
    """
    found = find(ref, cache_dir)
    if found is not None:
        return found
    if not download:
        msg = f"{ref} is not in the hub cache ({hub_cache_dir(cache_dir)}); pull it first"
        raise ModelNotFoundError(msg)
    return pull(ref, cache_dir=cache_dir, progress=progress)


# -- removing -------------------------------------------------------------------------------


def remove(ref: ModelRef | str, cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Delete cached models: ``OWNER/REPO`` all its GGUF models, ``...:QUANT`` or ``...:FILE``
    one; return the snapshot paths removed.

    Blobs no other snapshot file uses are deleted with them; a repository left with nothing
    goes entirely. Files other tools put there (not GGUF models) stay.

    Raises:
        ValueError: ``ref`` is not a model name.
        ModelNotFoundError: Nothing in the cache matches ``ref`` (the message lists what is).
    """
    ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
    root = hub_cache_dir(cache_dir)
    if "/" not in ref.repo_id:
        found = find(ModelRef(ref.repo_id), cache_dir)
        ref = ModelRef(found.repo_id if found else ref.repo_id, ref.quant, ref.file)
    repo_dir = _repo_dir(root, ref.repo_id)
    cached = _repo_models(ref.repo_id, repo_dir)
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
        for p in _all_copies(repo_dir, m.files):
            blob = p.resolve() if p.is_symlink() else None
            p.unlink(missing_ok=True)
            removed.append(p)
            if blob is not None and not _linked(repo_dir, blob):
                blob.unlink(missing_ok=True)
    _prune(repo_dir)
    used = _read_used()
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
    for snap in _snapshots(repo_dir):
        out += [snap / f for f in files if (snap / f).is_symlink() or (snap / f).exists()]
    return out


def _linked(repo_dir: Path, blob: Path) -> bool:
    for dirpath, _dirs, names in os.walk(repo_dir / "snapshots"):
        for name in names:
            p = Path(dirpath) / name
            if p.is_symlink() and p.resolve() == blob:
                return True
    return False


def _prune(repo_dir: Path) -> None:
    """Remove empty snapshot folders, refs to them, and the repository when nothing is left."""
    snaps = repo_dir / "snapshots"
    for dirpath, _dirs, _names in sorted(os.walk(snaps), key=lambda t: -len(t[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)  # only when empty
    left = {p.name for p in snaps.iterdir()} if snaps.is_dir() else set()
    refs = repo_dir / "refs"
    if refs.is_dir():
        for ref in [p for p in refs.rglob("*") if p.is_file()]:
            if ref.read_text().strip() not in left:
                ref.unlink()
    blobs = repo_dir / "blobs"
    busy = blobs.is_dir() and any(p.name.endswith(".incomplete") for p in blobs.iterdir())
    if not left and not busy:  # (a download in progress keeps the repository)
        shutil.rmtree(repo_dir, ignore_errors=True)
        locks = repo_dir.parent / ".locks" / repo_dir.name
        shutil.rmtree(locks, ignore_errors=True)


# -- last used --------------------------------------------------------------------------------


def _used_path() -> Path:
    return cache.cache_root() / _USED


def _read_used() -> dict[str, float]:
    try:
        data = json.loads(_used_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}


def _write_used(used: dict[str, float]) -> None:
    path = _used_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(used, indent=0, sort_keys=True))
    os.replace(tmp, path)


def mark_used(model: CachedModel | str | os.PathLike[str]) -> None:
    """Record that a model was loaded now (``nexabind models`` shows it as last used).

    Best effort: a cache that cannot be written is logged, not raised.
    """
    path = str(model.path if isinstance(model, CachedModel) else Path(model).absolute())
    from filelock import FileLock

    try:
        cache.cache_root().mkdir(parents=True, exist_ok=True)
        with FileLock(str(_used_path()) + ".lock", timeout=5):
            used = _read_used()
            used[path] = time.time()
            _write_used(used)
    except (OSError, TimeoutError) as e:
        log.warning("could not record the use of %s: %s", path, e)


# -- llama-cpp-python's from_pretrained -------------------------------------------------------


def from_pretrained(
    repo_id: str,
    filename: str | None = None,
    additional_files: list[str] | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool | None = None,
) -> Path:
    """The model file ``Llama.from_pretrained`` loads, from the cache or downloaded.

    ``filename`` and each of ``additional_files`` is a file name or a glob matched against
    the repository's paths and must match exactly one file (llama-cpp-python's rule); a split
    model's other parts come along. ``filename=None`` chooses by quantization as
    :func:`choose`. When every file is already in the cache (or in ``local_dir``) nothing is
    asked of the hub; otherwise the files are downloaded as :func:`pull` does.

    Returns:
        The path of the model file (its first part).

    Raises:
        ModelNotFoundError: No file or several match a pattern (the message lists them), or
            offline and not cached.
        DownloadError, ChecksumMismatchError: As :func:`pull`.
    """
    if not re.fullmatch(_REPO, repo_id):
        msg = f"repo_id={repo_id!r} is not a repository; give OWNER/REPO"
        raise ValueError(msg)
    patterns = list(additional_files or [])
    root = hub_cache_dir(cache_dir)
    if local_dir is None:
        repo_dir = _repo_dir(root, repo_id)
        for snap in _snapshots(repo_dir):
            have = _tree(snap)
            try:
                wanted = _match_all(repo_id, have, filename, patterns)
            except ModelNotFoundError:
                continue
            return snap / wanted[0]
    else:
        have = _tree(Path(local_dir), skip=".cache")
        try:
            wanted = _match_all(repo_id, have, filename, patterns)
        except ModelNotFoundError:
            pass
        else:
            if all(_local_done(Path(local_dir), f) for f in wanted):
                return Path(local_dir) / wanted[0]
    if offline():
        msg = (
            f"{repo_id} ({filename or 'default quant'}) is not in "
            f"{local_dir or root} and HF_HUB_OFFLINE is set; download it with the network on"
        )
        raise ModelNotFoundError(msg)
    token = _token()
    remote = _remote(repo_id, "main", token)
    wanted = _match_all(repo_id, remote.files, filename, patterns, remote.sizes)
    repo_dir = _repo_dir(root, repo_id)
    _check_room(Path(local_dir) if local_dir else root, sum(remote.sizes.get(f, 0) for f in wanted),
                f"download {repo_id}/{wanted[0]}")  # fmt: skip
    from huggingface_hub import hf_hub_download

    paths = []
    for f in wanted:
        try:
            p = hf_hub_download(
                repo_id,
                f,
                revision=remote.commit,
                cache_dir=root,
                local_dir=None if local_dir is None else Path(local_dir),
                endpoint=endpoint(),
                token=token,
                tqdm_class=_progress_class(progress, f.rsplit("/", 1)[-1]),
            )
        except _net_errors() as e:
            raise _hub_error(e, repo_id, f"download {repo_id}/{f}") from e
        _verify(Path(p), remote, f, repo_id)
        paths.append(Path(p))
    if local_dir is None:
        _write_ref(repo_dir, "main", remote.commit)
    return paths[0]


def _tree(folder: Path, skip: str | None = None) -> list[str]:
    out = []
    for dirpath, dirs, names in os.walk(folder):
        if skip in dirs:
            dirs.remove(skip)
        for name in names:
            p = Path(dirpath) / name
            if p.exists():
                out.append(p.relative_to(folder).as_posix())
    return out


def _local_done(local_dir: Path, file: str) -> bool:
    """Whether huggingface_hub finished ``file`` in ``local_dir`` (it writes metadata then)."""
    meta = local_dir / ".cache" / "huggingface" / "download" / (file + ".metadata")
    return (local_dir / file).is_file() and meta.is_file()


def _match_all(
    repo_id: str,
    files: list[str],
    filename: str | None,
    patterns: list[str],
    sizes: Mapping[str, int] | None = None,
) -> list[str]:
    """The files of ``filename`` (with a split model's parts) and of every pattern."""
    if filename is None:
        wanted = choose(repo_id, files, ModelRef(repo_id), sizes)
    else:
        wanted = _parts_of_match(repo_id, files, filename)
    for pattern in patterns:
        wanted += [f for f in _parts_of_match(repo_id, files, pattern) if f not in wanted]
    return wanted


def _parts_of_match(repo_id: str, files: list[str], pattern: str) -> list[str]:
    hits = [f for f in sorted(files) if fnmatch.fnmatch(f, pattern)]
    if len(hits) != 1:
        listed = json.dumps(sorted(files))
        what = "No file" if not hits else f"{len(hits)} files ({', '.join(hits)})"
        msg = f"{what} in {repo_id} match {pattern!r}; give a name that matches one of {listed}"
        raise ModelNotFoundError(msg)
    if not _is_gguf(hits[0]):
        return hits
    parts = _parts(files, hits[0])
    count = _split(hits[0])[3]
    if len(parts) != count:
        msg = f"{repo_id} has {len(parts)} of the {count} parts of {hits[0]}"
        raise ModelNotFoundError(msg)
    return parts
