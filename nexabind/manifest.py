"""Release manifests: parse and validate them, and read the one shipped in the package.

A manifest (schema 1, written by ``nexabind build --out`` and ``build_scripts/make_manifest.py``)
names the llama.cpp commit, the ABI fingerprint of the generated declarations and, per artifact,
its target, requirements, relative URL, size and sha256::

    {"schema": 1, "release": "llama-0c1e57098-r2", "llama_commit": "0c1e57098",
     "llama_build": null, "abi_fingerprint": "<64 hex>",
     "artifacts": [{"name": "...tar.gz", "os": "linux", "arch": "x86_64", "variant": "cuda",
                    "min_glibc": "2.35", "min_macos": null, "requires": {"cuda_driver": ">=12.4"},
                    "url": "...tar.gz", "size": 123, "sha256": "<64 hex>"}]}

The package ships the manifest of its release (:func:`packaged`): its digests are *pinned*, and
a mirror is trusted for availability only. A manifest read from a mirror is *unpinned*.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from nexabind import _cdef, pin, targets
from nexabind._version import __version__
from nexabind.errors import ManifestError
from nexabind.targets import OSES, VARIANTS

__all__ = [
    "MAX_ARTIFACTS",
    "MAX_BYTES",
    "SCHEMA",
    "VERSION_SPEC",
    "Artifact",
    "Manifest",
    "check_compatible",
    "packaged",
]

#: The manifest schema this module reads and writes.
SCHEMA = 1
#: Largest manifest read from a mirror, in bytes (one takes a few KiB).
MAX_BYTES = 4 << 20
#: Most artifacts one release may list.
MAX_ARTIFACTS = 1000
#: Most problems one error message lists.
_MAX_LISTED = 20

# Patterns, compiled on first use (by re's cache), so that importing this module stays cheap.
_HEX64 = r"[0-9a-fA-F]{64}"
_COMMIT = r"[0-9a-f]{7,40}"
_TOKEN = r"[a-z0-9_]+"
_VERSION = r"\d+(\.\d+)*"
VERSION_SPEC = r"(>=|<=|==|>|<)?\s*(\d+(?:\.\d+)*)"
_TOP_FIELDS = ("schema", "release", "llama_commit", "llama_build", "abi_fingerprint", "artifacts")
_ARTIFACT_REQUIRED = ("name", "os", "arch", "variant", "url", "size", "sha256")
_ARTIFACT_OPTIONAL = ("min_glibc", "min_macos", "requires", "libc")


@dataclass(frozen=True)
class Artifact:
    """One prebuilt library archive of a release.

    Attributes:
        name: File name of the archive.
        os: ``linux``, ``macos`` or ``windows``.
        arch: ``x86_64`` or ``arm64``.
        variant: One of :data:`nexabind.targets.VARIANTS`.
        url: Location relative to ``<base>/<release>/``.
        size: Size in bytes.
        sha256: Lowercase hex digest of the archive.
        min_glibc: Oldest glibc the libraries run on (Linux), e.g. ``"2.35"``.
        min_macos: Oldest macOS the libraries run on, e.g. ``"13.3"``.
        requires: Runtime requirements, e.g. ``{"cuda_driver": ">=12.4"}``.
        libc: ``glibc`` or ``musl`` for Linux artifacts; None means glibc.
    """

    name: str
    os: str
    arch: str
    variant: str
    url: str
    size: int
    sha256: str
    min_glibc: str | None = None
    min_macos: str | None = None
    requires: dict[str, str] = field(default_factory=dict, hash=False)
    libc: str | None = None

    @property
    def key(self) -> str:
        """``<os>-<arch>-<variant>``: the cache folder name of this artifact."""
        return targets.key(self.os, self.arch, self.variant)

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest entry of this artifact."""
        data: dict[str, Any] = {
            "name": self.name,
            "os": self.os,
            "arch": self.arch,
            "variant": self.variant,
            "min_glibc": self.min_glibc,
            "min_macos": self.min_macos,
            "requires": dict(self.requires),
            "url": self.url,
            "size": self.size,
            "sha256": self.sha256,
        }
        if self.libc is not None:
            data["libc"] = self.libc
        return data


@dataclass(frozen=True)
class Manifest:
    """A release manifest.

    Attributes:
        release: Release tag, e.g. ``llama-0c1e57098-r2``.
        llama_commit: llama.cpp commit the libraries were built from.
        llama_build: llama.cpp build number, or None.
        abi_fingerprint: sha256 of the generated cdef the libraries match.
        artifacts: Every artifact of the release.
        pinned: True when shipped in the package (digests trusted); False when read elsewhere.
        source: Where it was read from (a path or URL), for messages.
    """

    release: str
    llama_commit: str
    llama_build: int | None
    abi_fingerprint: str
    artifacts: tuple[Artifact, ...]
    pinned: bool
    source: str

    @classmethod
    def from_json(
        cls, data: bytes | str | dict[str, Any], *, pinned: bool, source: str
    ) -> Manifest:
        """Parse and validate a schema-1 manifest.

        Args:
            data: The JSON text (or bytes), or the already-parsed dict.
            pinned: Whether it comes from the package itself.
            source: Where it was read from, named in every error.

        Returns:
            The manifest.

        Raises:
            ManifestError: Not JSON, another schema, or any field missing, of the wrong type or
                out of range; the message names every bad field and ``source``.
        """
        if isinstance(data, (bytes, str)):
            try:
                data = json.loads(data)
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                msg = f"manifest {source} is not valid JSON: {e}"
                raise ManifestError(msg) from e
        if not isinstance(data, dict):
            msg = f"manifest {source} must be a JSON object, got {type(data).__name__}"
            raise ManifestError(msg)
        schema = data.get("schema")
        if schema != SCHEMA:
            if isinstance(schema, int) and not isinstance(schema, bool) and schema > SCHEMA:
                msg = (
                    f"manifest {source} has schema {schema}, newer than this nexabind reads"
                    f" ({SCHEMA}); upgrade nexabind (pip install -U nexabind)"
                )
            else:
                msg = f"manifest {source}: schema must be {SCHEMA}, got {schema!r}"
            raise ManifestError(msg)
        errors: list[str] = []
        for key in sorted(set(data) - set(_TOP_FIELDS)):
            errors.append(f"unknown field {key!r}")
        release = _string(data, "release", errors)
        if release is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", release):
            errors.append(
                f"release must be a tag of letters, digits, '.', '_', '-', got {release!r}"
            )
        commit = _string(data, "llama_commit", errors)
        if commit is not None and not re.fullmatch(_COMMIT, commit):
            errors.append(f"llama_commit must be a lowercase hex commit hash, got {commit!r}")
        build = data.get("llama_build")
        if "llama_build" not in data:
            errors.append("llama_build is missing (use null when unknown)")
        elif build is not None and (not isinstance(build, int) or isinstance(build, bool)):
            errors.append(f"llama_build must be an integer or null, got {build!r}")
        fingerprint = _string(data, "abi_fingerprint", errors)
        if fingerprint is not None and not re.fullmatch(_HEX64, fingerprint):
            errors.append(f"abi_fingerprint must be 64 hex digits, got {fingerprint!r}")
        raw = data.get("artifacts")
        artifacts: list[Artifact] = []
        if not isinstance(raw, list) or not raw:
            errors.append(f"artifacts must be a non-empty list, got {raw!r:.200}")
        elif len(raw) > MAX_ARTIFACTS:
            errors.append(f"artifacts lists {len(raw)} entries, over the {MAX_ARTIFACTS} limit")
        else:
            seen: dict[tuple[str, str, str], int] = {}
            names: dict[str, int] = {}
            for i, entry in enumerate(raw):
                art = _artifact(entry, f"artifacts[{i}]", errors)
                if art is None:
                    continue
                target = (art.os, art.arch, art.variant)
                if target in seen:
                    errors.append(
                        f"artifacts[{i}] ({art.key}) duplicates artifacts[{seen[target]}]:"
                        " one artifact per os, arch and variant"
                    )
                elif art.name in names:
                    errors.append(
                        f"artifacts[{i}].name {art.name!r} duplicates artifacts[{names[art.name]}]"
                    )
                seen.setdefault(target, i)
                names.setdefault(art.name, i)
                artifacts.append(art)
        if errors:
            more = len(errors) - _MAX_LISTED
            if more > 0:
                errors[_MAX_LISTED:] = [f"... and {more} more"]
            msg = (
                f"manifest {source} is invalid:\n  "
                + "\n  ".join(errors)
                + "\nwrite it with `nexabind build --out DIR` (or build_scripts/make_manifest.py),"
                " or point --base-url / NEXABIND_BASE_URL at a mirror with a valid one"
            )
            raise ManifestError(msg)
        return cls(
            release=str(release),
            llama_commit=str(commit),
            llama_build=build if isinstance(build, int) else None,
            abi_fingerprint=str(fingerprint).lower(),
            artifacts=tuple(artifacts),
            pinned=pinned,
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the schema-1 JSON form (``pinned`` and ``source`` are not part of it)."""
        return {
            "schema": SCHEMA,
            "release": self.release,
            "llama_commit": self.llama_commit,
            "llama_build": self.llama_build,
            "abi_fingerprint": self.abi_fingerprint,
            "artifacts": [a.to_dict() for a in self.artifacts],
        }


def _string(data: dict[str, Any], key: str, errors: list[str], where: str = "") -> str | None:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        state = "is missing" if key not in data else f"must be a non-empty string, got {value!r}"
        errors.append(f"{where}{key} {state}")
        return None
    return value


def _optional_version(entry: dict[str, Any], key: str, errors: list[str], where: str) -> str | None:
    value = entry.get(key)
    if value is not None and (not isinstance(value, str) or not re.fullmatch(_VERSION, value)):
        errors.append(f"{where}{key} must be a version like '2.35' or null, got {value!r}")
        return None
    return value


def _relative_url(url: str) -> str | None:
    """Why ``url`` is not a safe relative URL, or None when it is.

    The URL is checked as written and with its %-escapes decoded, as a server or a file://
    mirror reads it: ``%2e%2e`` is ``..``, ``%2f`` a ``/``.
    """
    decoded = unquote(url)
    if decoded != url:
        return _relative_path(url) or _relative_path(decoded)
    return _relative_path(url)


def _relative_path(url: str) -> str | None:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url):
        return "must be relative to the release (no scheme or drive)"
    if url.startswith(("/", "\\")) or "\\" in url:
        return "must be a relative path with '/' separators"
    if any(part in ("..", ".") for part in url.split("/")) or "//" in url:
        return "must not contain '.', '..' or empty path segments"
    if any(c in url for c in "?#") or any(ord(c) < 0x20 for c in url):
        return "must be a plain path (no query, fragment or control characters)"
    return None


def _artifact(entry: Any, where: str, errors: list[str]) -> Artifact | None:
    if not isinstance(entry, dict):
        errors.append(f"{where} must be an object, got {entry!r}")
        return None
    before = len(errors)
    label = where
    if isinstance(entry.get("os"), str) and isinstance(entry.get("arch"), str):
        label = f"{where} ({entry['os']}-{entry['arch']}-{entry.get('variant')})"
    where = f"{label}."
    for key in sorted(set(entry) - set(_ARTIFACT_REQUIRED) - set(_ARTIFACT_OPTIONAL)):
        errors.append(f"{where}{key}: unknown field")
    name = _string(entry, "name", errors, where)
    if name is not None and (name in (".", "..") or any(c in name for c in "/\\")):
        errors.append(f"{where}name must be a plain file name, got {name!r}")
    os_name = _string(entry, "os", errors, where)
    if os_name is not None and os_name not in OSES:
        errors.append(f"{where}os must be one of {', '.join(OSES)}, got {os_name!r}")
    arch = _string(entry, "arch", errors, where)
    if arch is not None and not re.fullmatch(_TOKEN, arch):
        errors.append(f"{where}arch must be a lowercase name like x86_64 or arm64, got {arch!r}")
    variant = _string(entry, "variant", errors, where)
    if variant is not None and variant not in VARIANTS:
        errors.append(f"{where}variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    url = _string(entry, "url", errors, where)
    if url is not None and (why := _relative_url(url)):
        errors.append(f"{where}url {why}, got {url!r}")
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        errors.append(f"{where}size must be a positive integer (bytes), got {size!r}")
    sha256 = _string(entry, "sha256", errors, where)
    if sha256 is not None and not re.fullmatch(_HEX64, sha256):
        errors.append(f"{where}sha256 must be 64 hex digits, got {sha256!r}")
    min_glibc = _optional_version(entry, "min_glibc", errors, where)
    min_macos = _optional_version(entry, "min_macos", errors, where)
    requires = entry.get("requires", {})
    if requires is None:
        requires = {}
    if not isinstance(requires, dict):
        errors.append(f"{where}requires must be an object, got {requires!r}")
        requires = {}
    for key, spec in requires.items():
        if not isinstance(spec, str) or not re.fullmatch(VERSION_SPEC, spec.strip()):
            errors.append(
                f"{where}requires.{key} must be a version spec like '>=12.4', got {spec!r}"
            )
    libc = entry.get("libc")
    if libc is not None and libc not in ("glibc", "musl"):
        errors.append(f"{where}libc must be 'glibc', 'musl' or absent, got {libc!r}")
    if len(errors) > before:
        return None
    return Artifact(
        name=str(name),
        os=str(os_name),
        arch=str(arch),
        variant=str(variant),
        url=str(url),
        size=int(size),  # type: ignore[arg-type]
        sha256=str(sha256).lower(),
        min_glibc=min_glibc,
        min_macos=min_macos,
        requires={str(k): str(v).strip() for k, v in requires.items()},
        libc=libc,
    )


def packaged(release: str | None = None) -> Manifest | None:
    """Return the manifest shipped in the package for ``release``, if any.

    Args:
        release: Release tag; default: :data:`nexabind.pin.RELEASE`.

    Returns:
        The pinned manifest (``nexabind/manifests/<release>.json``), or None when the package
        ships none for that release (not published yet).

    Raises:
        ValueError: ``release`` is not a plain tag.
        ManifestError: The shipped file is invalid or is for another release.
    """
    release = release or pin.RELEASE
    if not re.fullmatch(r"[A-Za-z0-9._-]+", release) or release.startswith("."):
        msg = f"release must be a tag like {pin.RELEASE!r}, got {release!r}"
        raise ValueError(msg)
    # A file beside this module (pip installs packages unpacked; importlib.resources would
    # add ~5 ms of imports to every cold fetch).
    res = Path(__file__).with_name("manifests") / f"{release}.json"
    if not res.is_file():
        return None
    source = f"nexabind/manifests/{release}.json (packaged)"
    manifest = Manifest.from_json(res.read_bytes(), pinned=True, source=source)
    if manifest.release != release:
        msg = f"manifest {source} describes release {manifest.release!r}, not {release!r}"
        raise ManifestError(msg)
    return manifest


def check_compatible(manifest: Manifest) -> None:
    """Check that ``manifest``'s libraries match this nexabind's binding.

    Args:
        manifest: The manifest about to be used.

    Raises:
        ManifestError: Its llama.cpp commit or ABI fingerprint differs from the ones this
            nexabind was generated from; says which release to use instead.
    """
    ours, theirs = pin.LLAMA_COMMIT, manifest.llama_commit
    same_commit = ours.startswith(theirs) or theirs.startswith(ours)
    if not same_commit or manifest.abi_fingerprint != _cdef.CDEF_SHA256:
        what = (
            f"llama.cpp {theirs}"
            if not same_commit
            else f"ABI fingerprint {manifest.abi_fingerprint[:12]}..."
        )
        mine = f"llama.cpp {ours}" if not same_commit else f"{_cdef.CDEF_SHA256[:12]}..."
        msg = (
            f"manifest {manifest.source} (release {manifest.release}) is built for {what}, but"
            f" nexabind {__version__} binds {mine}; use --release {pin.RELEASE} (this"
            f" nexabind's release), or install the nexabind version made for {manifest.release}"
        )
        raise ManifestError(msg)
