"""Downloads from the hub through huggingface_hub: ``pull``, ``resolve`` and llama-cpp-python's
``from_pretrained``.

Asks the hub for a repository's files at a revision, chooses the model
(:mod:`nexabind._hub_names`), checks the disk has room, downloads what the cache lacks with
``hf_hub_download`` (which resumes a dropped connection with a ``Range`` request) and checks
each file against the sha256 (or git blob id) the hub lists for it. huggingface_hub's errors
become nexabind's (:func:`_hub_error`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from nexabind import cache
from nexabind._hub_cache import (
    CachedModel,
    find,
    read_used,
    remove_copy,
    repo_folder,
    repo_models,
    snapshots,
    write_ref,
)
from nexabind._hub_names import (
    REPO_PATTERN,
    ModelRef,
    choose,
    endpoint,
    hub_cache_dir,
    hub_token,
    human_size,
    match_all,
    offline,
)
from nexabind.errors import ChecksumMismatchError, DownloadError, ModelNotFoundError

__all__ = ["from_pretrained", "pull", "resolve"]

log = logging.getLogger("nexabind.hub")


# -- the hub's answers and errors ---------------------------------------------------------------


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


def _verify(path: Path, remote: _Remote, file: str, repo_id: str, repo_dir: Path | None) -> None:
    """Check a freshly downloaded file against the hub's sha256 (or git blob id); a damaged
    one is deleted (from ``repo_dir``, its repository in the hub cache; None: a plain file)."""
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
        if repo_dir is None:
            path.unlink(missing_ok=True)
        else:
            remove_copy(repo_dir, path)
        msg = (
            f"{repo_id}/{file} arrived damaged: the hub lists {want} but the file hashes to "
            f"{got}. Deleted it; run the pull again"
        )
        raise ChecksumMismatchError(msg)


# -- pulling ----------------------------------------------------------------------------------


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
    token = hub_token()
    remote = _remote(ref.repo_id, revision, token)
    parts = choose(ref.repo_id, remote.files, ref, remote.sizes)
    repo_dir = repo_folder(root, ref.repo_id)
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
        _verify(Path(path), remote, part, ref.repo_id, repo_dir)
    if revision != remote.commit:
        write_ref(repo_dir, revision, remote.commit)
    found = next((m for m in repo_models(ref.repo_id, repo_dir) if m.file == parts[0]), None)
    if found is None or found.commit != remote.commit:
        msg = f"{ref.repo_id}:{parts[0]} is not complete in {snap} after its download"
        raise DownloadError(msg)
    found.last_used = read_used().get(str(found.path))
    return found


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
    if not re.fullmatch(REPO_PATTERN, repo_id):
        msg = f"repo_id={repo_id!r} is not a repository; give OWNER/REPO"
        raise ValueError(msg)
    patterns = list(additional_files or [])
    root = hub_cache_dir(cache_dir)
    if local_dir is None:
        repo_dir = repo_folder(root, repo_id)
        for snap in snapshots(repo_dir):
            have = _tree(snap)
            try:
                wanted = match_all(repo_id, have, filename, patterns)
            except ModelNotFoundError:
                continue
            return snap / wanted[0]
    else:
        have = _tree(Path(local_dir), skip=".cache")
        try:
            wanted = match_all(repo_id, have, filename, patterns)
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
    token = hub_token()
    remote = _remote(repo_id, "main", token)
    wanted = match_all(repo_id, remote.files, filename, patterns, remote.sizes)
    repo_dir = repo_folder(root, repo_id)
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
        _verify(Path(p), remote, f, repo_id, None if local_dir else repo_dir)
        paths.append(Path(p))
    if local_dir is None:
        write_ref(repo_dir, "main", remote.commit)
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
