"""A Hugging Face hub on 127.0.0.1: the endpoints huggingface_hub uses, over real files.

Point ``HF_ENDPOINT`` at :attr:`Hub.url`. It answers:

- ``GET /api/models/OWNER/REPO[/revision/REV]`` (``?blobs=true`` adds sizes and LFS sha256):
  model info with ``sha`` and ``siblings``;
- ``GET /api/models/OWNER/REPO/tree/REV[/PATH]`` (``?recursive=true``): the file tree;
- ``HEAD`` / ``GET /OWNER/REPO/resolve/REV/PATH``: the file, with ``ETag`` (the sha256 of an
  LFS file, quoted), ``X-Linked-Etag``, ``X-Linked-Size``, ``X-Repo-Commit`` and ``Range``;

and, as the hub does, ``404`` with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` /
``EntryNotFound``, and ``403`` ``GatedRepo`` for a gated repository asked without its token.
``.gguf`` files are LFS files (the hub lists their sha256); others are plain git blobs.

Misbehaviour comes from tests/_server.py: ``plan(path, action...)`` on a resolve path
(``truncate:N``, ``500``, ``tamper``, ...) and the request log, with each request's method.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from _server import Request, Server, _Handler

from nexabind import hub


@dataclass
class _File:
    path: Path
    size: int
    sha256: str
    git_sha1: str
    lfs: bool


@dataclass
class _Repo:
    commit: str
    files: dict[str, _File] = field(default_factory=dict)
    token: str | None = None  # gated: only this bearer token may download
    sizes: dict[str, int] = field(default_factory=dict)  # sizes to claim instead of the real ones


_DIGESTS: dict[tuple[str, int, int], tuple[str, str]] = {}


def _digests(path: Path) -> tuple[str, str]:
    """sha256 and git blob sha1 of a file (remembered: a hub is made per test)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _hash(path, st.st_size)
    return _DIGESTS[key]


def _hash(path: Path, size: int) -> tuple[str, str]:
    sha, git = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            git.update(chunk)
    return sha.hexdigest(), git.hexdigest()


def _on(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, [""])[0].lower() == "true"


_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _HubHandler(_Handler):
    hub: Hub

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.do_GET()

    def _error(self, req: Request, code: int, error: str, commit: str | None = None) -> None:
        body = json.dumps({"error": error}).encode()
        headers = {"X-Error-Code": error, "Content-Length": str(len(body))}
        headers["Content-Type"] = "application/json"
        if commit:
            headers["X-Repo-Commit"] = commit
        self._status(req, code, headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, req: Request, value: object, commit: str) -> None:
        body = json.dumps(value).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        self._status(req, 200, {**headers, "X-Repo-Commit": commit})
        self.wfile.write(body)

    def _answer(self, req: Request, action: str | None) -> None:
        kind, _, arg = (action or "").partition(":")
        if self._refuse(req, kind, arg):
            return
        path = urllib.parse.unquote(req.path)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if m := _API.match(path):
            repo = self._repo(req, m.group(1), m.group(3) or "main")
            if repo is None:
                return
            if m.group(2) == "tree":
                self._tree(req, repo, m.group(4) or "", _on(query, "recursive"))
            else:
                self._info(req, m.group(1), repo, _on(query, "blobs"))
            return
        if m := _RESOLVE.match(path):
            repo = self._repo(req, m.group(1), m.group(2))
            if repo is None:
                return
            if repo.token and req.headers.get("Authorization") != f"Bearer {repo.token}":
                self._error(req, 403, "GatedRepo")
                return
            f = repo.files.get(m.group(3))
            if f is None:
                self._error(req, 404, "EntryNotFound", repo.commit)
                return
            self._file(req, action, repo, f)
            return
        self._error(req, 404, "NotFound")

    def _repo(self, req: Request, repo_id: str, revision: str) -> _Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(req, 404, "RepoNotFound")
        elif revision not in ("main", repo.commit):
            self._error(req, 404, "RevisionNotFound")
            return None
        return repo

    def _entry(self, name: str, repo: _Repo, f: _File) -> dict[str, object]:
        size = repo.sizes.get(name, f.size)
        entry: dict[str, object] = {"type": "file", "path": name, "size": size, "oid": f.git_sha1}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": size, "pointerSize": 134}
        return entry

    def _info(self, req: Request, repo_id: str, repo: _Repo, blobs: bool) -> None:
        siblings = []
        for name, f in sorted(repo.files.items()):
            sib: dict[str, object] = {"rfilename": name}
            if blobs:
                e = self._entry(name, repo, f)
                sib.update(size=e["size"], blobId=f.git_sha1)
                if "lfs" in e:
                    lfs = dict(e["lfs"])  # type: ignore[call-overload]
                    sib["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": 134}
            siblings.append(sib)
        info = {
            "_id": repo.commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.commit,
            "private": False,
            "gated": "manual" if repo.token else False,
            "disabled": False,
            "tags": ["gguf"],
            "siblings": siblings,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
        }
        self._json(req, info, repo.commit)

    def _tree(self, req: Request, repo: _Repo, under: str, recursive: bool) -> None:
        prefix = under.rstrip("/") + "/" if under else ""
        entries: list[dict[str, object]] = []
        folders = set()
        for name, f in sorted(repo.files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append(self._entry(name, repo, f))
        entries += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in folders]
        self._json(req, entries, repo.commit)

    def _file(self, req: Request, action: str | None, repo: _Repo, f: _File) -> None:
        kind = (action or "").partition(":")[0]
        etag = f'"{f.sha256 if f.lfs else f.git_sha1}"'
        headers = {"X-Repo-Commit": repo.commit, "Content-Type": "application/octet-stream"}
        if f.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(f.size)})
        with f.path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            mid = f.size // 2

            def read(start: int, n: int) -> bytes:
                chunk = buf[start : start + n]
                if kind == "tamper" and start <= mid < start + n:
                    i = mid - start
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                return chunk

            self._send(req, action, f.size, read, etag, headers)


class Hub(Server):
    """The hub on 127.0.0.1; add repositories with :meth:`add`, then use as a context manager."""

    def __init__(self) -> None:
        super().__init__(Path("."))
        self.repos: dict[str, _Repo] = {}
        handler = type("Handler", (_HubHandler,), {"state": self.state, "hub": self})
        self.httpd.RequestHandlerClass = handler
        self._n = 0

    def add(self, repo_id: str, files: dict[str, Path], *, token: str | None = None) -> str:
        """Serve ``files`` (path in the repository -> file here) as ``repo_id`` at a new commit
        (replacing what it served); return the commit. ``token``: a gated repository."""
        self._n += 1
        commit = hashlib.sha1(f"{repo_id}@{self._n}".encode()).hexdigest()
        repo = _Repo(commit, token=token)
        for name, path in files.items():
            sha, git = _digests(path)
            repo.files[name] = _File(path, path.stat().st_size, sha, git, name.endswith(".gguf"))
        self.repos[repo_id] = repo
        return commit

    def resolve_path(self, repo_id: str, file: str, revision: str | None = None) -> str:
        """The path a download of ``file`` asks for (for :meth:`plan` and the log)."""
        return f"/{repo_id}/resolve/{revision or self.repos[repo_id].commit}/{file}"

    def downloads(self) -> list[Request]:
        """The GET requests for file contents."""
        return [r for r in self.log if "/resolve/" in r.path and r.method == "GET"]


def cached_blobs(repo_id: str) -> list[str]:
    """The blobs of ``repo_id`` in the hub cache (the client's side), by name."""
    folder = hub.hub_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "blobs"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
