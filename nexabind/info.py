"""What ``nexabind info`` reports: platform, manifest, chosen artifact, settings, installs.

:func:`gather` collects it as a JSON-ready dict and :func:`render` turns that into text; nothing
here downloads or loads a library.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nexabind import manifest as _manifest
from nexabind import pin, settings, targets
from nexabind._install_record import read_build_info, read_record
from nexabind._source import build_cache_dir
from nexabind._version import __version__
from nexabind.cache import cache_root, installed, library_dir
from nexabind.choice import choose, no_artifact_message
from nexabind.errors import ManifestError, NexabindError
from nexabind.platform import detect

__all__ = ["gather", "render"]

_NO_MANIFEST = "none packaged yet: a mirror's manifest would be unpinned"


def _yes_no(value: bool, yes: str = "yes", no: str = "no") -> str:
    return yes if value else no


def _settings(cache_dir: str | None, variant: str | None) -> dict[str, dict[str, Any]]:
    """Every setting: its variable's value, its flag, its default and what is in force."""
    given: dict[settings.Setting, str | None] = {
        settings.CACHE_DIR: str(cache_root(cache_dir)),
        settings.BUILD_CACHE: str(build_cache_dir()),
        settings.VARIANT: variant,
    }
    out = {}
    for s in settings.SETTINGS:
        value = s.raw()
        in_force = _yes_no(s.on(), "on", "off") if s.switch else given.get(s) or value or s.default
        out[s.env] = {"value": value, "flag": s.flag, "default": s.default, "in_force": in_force}
    return out


def _load_manifest(path: str | os.PathLike[str] | None, release: str) -> _manifest.Manifest | None:
    if path is None:
        return _manifest.packaged(release)
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as e:
        msg = f"cannot read the manifest {file}: {e.strerror or e}; pass an existing manifest.json"
        raise ManifestError(msg) from e
    return _manifest.Manifest.from_json(data, pinned=False, source=str(file))


def gather(
    *,
    manifest_path: str | os.PathLike[str] | None = None,
    variant: str | None = None,
    release: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Collect everything ``nexabind info`` shows.

    Args:
        manifest_path: Inspect this manifest file instead of the packaged one (unpinned).
        variant: The variant asked for; default ``NEXABIND_VARIANT``, else the best one.
        release: Release tag; default :data:`nexabind.pin.RELEASE`.
        cache_dir: Cache folder (``--cache-dir`` / ``NEXABIND_CACHE_DIR``).

    Returns:
        A JSON-ready dict: ``nexabind``, ``release``, ``llama_commit``, ``platform``,
        ``manifest``, ``choice``, ``settings``, ``installed`` and ``library``.

    Raises:
        ManifestError: The manifest cannot be read or is invalid.
        ValueError: ``variant`` or ``release`` is malformed.
    """
    release = release or pin.RELEASE
    variant = settings.VARIANT.get(variant)
    platform = detect()
    man = _load_manifest(manifest_path, release)
    report: dict[str, Any] = {
        "nexabind": __version__,
        "release": release,
        "llama_commit": pin.LLAMA_COMMIT,
        "platform": platform.to_dict(),
        "manifest": None,
        "choice": None,
    }
    wanted = targets.variant_order(platform, variant)
    if man is None:
        report["manifest"] = {"source": None, "pinned": False, "note": _NO_MANIFEST}
        report["choice"] = {"variant_order": list(wanted), "artifact": None, "rejected": []}
    else:
        try:
            _manifest.check_compatible(man)
            compatible = None
        except ManifestError as e:
            compatible = str(e)
        report["manifest"] = {
            "source": man.source,
            "pinned": man.pinned,
            "release": man.release,
            "llama_commit": man.llama_commit,
            "artifacts": len(man.artifacts),
            "incompatible": compatible,
            "note": None
            if man.pinned
            else "unpinned: digests come from this file, not the package",
        }
        choice = choose(man, platform, variant)
        report["choice"] = {
            "variant_order": list(choice.wanted),
            "artifact": choice.artifact.to_dict() if choice.artifact else None,
            "key": choice.artifact.key if choice.artifact else None,
            "rejected": [
                {"key": a.key, "name": a.name, "reason": why} for a, why in choice.rejected
            ],
            "message": None if choice.artifact else no_artifact_message(choice, platform),
        }
    report["settings"] = _settings(cache_dir, variant)
    try:
        lib = library_dir()
        report["library"] = {
            "path": str(lib), "error": None, "cpu": _cpu_variants(lib), "rpc": _rpc(lib),
        }  # fmt: skip
    except NexabindError as e:
        report["library"] = {"path": None, "error": str(e), "cpu": None, "rpc": None}
    report["installed"] = [
        dict(i.to_dict(), in_use=str(i.lib.resolve()) == report["library"]["path"])
        for i in installed(cache_dir)
    ]
    return report


def _cpu_variants(lib: Path) -> dict[str, Any]:
    """Which CPU variants ``lib`` holds, which one loads and why, and which were skipped."""
    record = read_record(lib.parent) or {}
    built = read_build_info(lib.parent).get("cpu_variants")
    forced = settings.CPU_VARIANT.get()
    if forced:
        loads = f"{forced} ({settings.CPU_VARIANT.env})"
    elif record.get("cpu_variant"):
        loads = f"{record['cpu_variant']} (the install record: ggml's pick failed its check)"
    else:
        checked = record.get("cpu_variant_checked")
        loads = "ggml's best for this CPU" + (
            f" ({checked}, checked at install)" if checked else ""
        )
    return {
        "built": built or "all",
        "loads": loads,
        "skipped": record.get("cpu_variants_skipped") or {},
    }


def _rpc(lib: Path) -> str | None:
    """The RPC protocol version of ``lib``'s RPC backend module, or None without one."""
    if not any(lib.glob("*ggml-rpc.*")):
        return None
    return str(read_build_info(lib.parent).get("rpc_protocol") or "unknown")


def render(report: dict[str, Any]) -> str:
    """Return the human-readable text of a :func:`gather` report."""
    p = report["platform"]
    libc = " ".join(filter(None, (p["libc"], p["libc_version"]))) or "-"
    lines = [
        f"nexabind {report['nexabind']}: llama.cpp {report['llama_commit']},"
        f" release {report['release']}",
        "platform:",
        f"  os:           {p['os']}",
        f"  arch:         {p['arch']} (this process)",
        f"  libc:         {libc}",
        f"  macOS:        {p['macos_version'] or '-'}",
        f"  CUDA driver:  {p['cuda_driver'] or 'none found'}",
        f"  Vulkan:       {_yes_no(p['vulkan'])}",
        f"  Metal:        {_yes_no(p['metal'])}",
        *(f"  note:         {n}" for n in p["notes"]),
    ]
    m, c = report["manifest"], report["choice"]
    if m["source"] is None:
        lines.append(f"manifest:       {m['note']}")
    else:
        pinned = "packaged, pinned" if m["pinned"] else "unpinned"
        lines.append(f"manifest:       {m['source']} ({pinned}), {m['artifacts']} artifacts")
        if m["incompatible"]:
            lines.append(f"  incompatible: {m['incompatible']}")
    lines.append(f"variant order:  {', '.join(c['variant_order'])}")
    if c["artifact"]:
        a = c["artifact"]
        lines.append(f"chosen:         {c['key']} ({a['name']}, {a['size'] / 1e6:.1f} MB)")
    elif m["source"] is not None:
        lines.append("chosen:         none fits this process")
    if c["rejected"]:
        lines.append("not taken:")
        lines += [f"  {r['key']}: {r['reason']}" for r in c["rejected"]]
    if c.get("message"):
        lines.append(c["message"].splitlines()[-1])
    lines.append("settings (env var, flag: in force):")
    for name, st in report["settings"].items():
        origin = "set" if st["value"] is not None else "default"
        lines.append(f"  {name}, {st['flag']}: {st['in_force']} ({origin})")
    lines.append("installed (* in use):")
    if not report["installed"]:
        lines.append("  none")
    for i in report["installed"]:
        state = i.get("error") or i.get("artifact") or ""
        mark = "*" if i["in_use"] else " "
        lines.append(f" {mark}{i['release']}  {i['key']}  {i['path']}  {state}".rstrip())
    lib = report["library"]
    if lib["path"]:
        lines.append(f"library:        {lib['path']}")
        cpu = lib["cpu"]
        built = cpu["built"] if isinstance(cpu["built"], str) else ", ".join(cpu["built"])
        lines.append(f"  CPU variants: {built}; loads {cpu['loads']}")
        lines += [f"  skipped:      {v}: {why}" for v, why in cpu["skipped"].items()]
        rpc = lib["rpc"]
        lines.append(f"  RPC backend:  {f'protocol {rpc}' if rpc else 'none in this build'}")
    else:
        lines.append("library:        none yet")
        lines += [f"  {line}" for line in lib["error"].splitlines()]
    return "\n".join(lines)
