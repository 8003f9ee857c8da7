"""Choose the artifact of a release manifest for a platform, and say why every other one was not.

An artifact fits a process when its os, arch and libc match, the process has at least its
minimum glibc or macOS version, and it meets every entry of its ``requires`` (a CUDA driver
version); among those that fit, the first variant of
:func:`nexabind.targets.variant_order` is chosen.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from nexabind.manifest import VERSION_SPEC, Artifact, Manifest
from nexabind.platform import Platform
from nexabind.targets import variant_order

__all__ = ["REQUIREMENTS", "Choice", "choose", "describe", "no_artifact_message"]

#: Requirements an artifact may list in ``requires`` and the Platform field each is checked on.
REQUIREMENTS = {"cuda_driver": "CUDA driver"}


class Choice(NamedTuple):
    """The artifact chosen for a platform, and why every other one was not.

    (A named tuple, not a frozen dataclass: this module is imported by every ``nexabind fetch``,
    and a frozen dataclass compiles its methods at import.)

    Attributes:
        artifact: The chosen artifact, or None when none fits.
        rejected: ``(artifact, reason)`` for every other artifact of the manifest.
        wanted: The variants tried, in order.
        release: The manifest's release.
        source: Where the manifest came from.
    """

    artifact: Artifact | None
    rejected: tuple[tuple[Artifact, str], ...]
    wanted: tuple[str, ...]
    release: str = ""
    source: str = ""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text))


def _satisfies(have: str, spec: str) -> bool:
    m = re.fullmatch(VERSION_SPEC, spec.strip())
    if m is None:
        return False
    op, want = m.group(1) or ">=", _version(m.group(2))
    # Compare as equal-length tuples, so "12" == "12.0".
    width = max(len(want), len(_version(have)))
    a = _version(have) + (0,) * (width - len(_version(have)))
    b = want + (0,) * (width - len(want))
    return {">=": a >= b, ">": a > b, "==": a == b, "<=": a <= b, "<": a < b}[op]


def _unusable(a: Artifact, p: Platform) -> str | None:
    """Why ``a`` cannot run in a process like ``p`` at all (variant preference aside)."""
    if a.os != p.os:
        return f"other os (this process runs on {p.os})"
    if a.arch != p.arch:
        return f"other arch (this process is {p.arch})"
    if a.os == "linux" and p.libc is not None:
        built_for = a.libc or "glibc"
        if built_for != p.libc:
            return f"built for {built_for}, this system uses {p.libc}"
    glibc = p.libc_version if p.libc == "glibc" else None
    if a.min_glibc and glibc and _version(glibc) < _version(a.min_glibc):
        return f"glibc {a.min_glibc} needed, this system has {p.libc_version}"
    if a.min_macos and p.macos_version and _version(p.macos_version) < _version(a.min_macos):
        return f"macOS {a.min_macos} needed, this system has {p.macos_version}"
    for key, spec in sorted(a.requires.items()):
        label = REQUIREMENTS.get(key)
        if label is None:
            return f"requires {key} {spec}, which this nexabind cannot check; upgrade nexabind"
        have = getattr(p, key)
        if have is None:
            return f"needs {label} {spec}, none found"
        if not _satisfies(have, spec):
            return f"needs {label} {spec}, this system has {have}"
    return None


_NOT_DETECTED = {
    "cuda": "no CUDA driver found",
    "vulkan": "no Vulkan loader found",
    "metal": "Metal needs macOS on arm64",
}


def choose(manifest: Manifest, platform: Platform, variant: str | None = None) -> Choice:
    """Choose the best artifact of ``manifest`` for ``platform``.

    Filters by os, arch, libc, minimum glibc and macOS versions and ``requires``, then takes the
    first variant of :func:`nexabind.targets.variant_order` that remains.

    Args:
        manifest: The release manifest.
        platform: The process to choose for (:func:`nexabind.platform.detect`).
        variant: An explicit variant (``--variant`` / ``NEXABIND_VARIANT``); None chooses.

    Returns:
        The :class:`Choice`; its ``artifact`` is None when nothing fits (see
        :func:`no_artifact_message`).

    Raises:
        ValueError: ``variant`` is not one of :data:`nexabind.targets.VARIANTS`.
    """
    wanted = variant_order(platform, variant)
    rejected: list[tuple[Artifact, str]] = []
    fitting: list[Artifact] = []
    for a in manifest.artifacts:
        reason = _unusable(a, platform)
        if reason is None:
            fitting.append(a)
        else:
            rejected.append((a, reason))
    chosen = None
    for v in wanted:
        chosen = next((a for a in fitting if a.variant == v), None)
        if chosen is not None:
            break
    for a in fitting:
        if a is chosen:
            continue
        if variant is not None:
            reason = f"variant {a.variant} not requested (asked for {variant})"
        elif a.variant not in wanted:
            reason = _NOT_DETECTED.get(a.variant, f"variant {a.variant} not usable here")
        else:
            reason = f"{chosen.variant if chosen else '?'} is preferred"
        rejected.append((a, reason))
    order = {id(a): i for i, a in enumerate(manifest.artifacts)}
    rejected.sort(key=lambda item: order[id(item[0])])
    return Choice(chosen, tuple(rejected), wanted, manifest.release, manifest.source)


def describe(platform: Platform) -> str:
    """One line naming the process for messages, e.g. ``linux-x86_64 (glibc 2.36, no GPU)``."""
    details = []
    if platform.libc:
        details.append(" ".join(filter(None, (platform.libc, platform.libc_version))))
    if platform.macos_version:
        details.append(f"macOS {platform.macos_version}")
    gpus = [f"CUDA driver {platform.cuda_driver}"] if platform.cuda_driver else []
    gpus += ["Vulkan"] if platform.vulkan else []
    gpus += ["Metal"] if platform.metal else []
    details.append(", ".join(gpus) if gpus else "no GPU runtime found")
    return f"{platform.os}-{platform.arch} ({', '.join(details)})"


def no_artifact_message(choice: Choice, platform: Platform) -> str:
    """Explain that no artifact fits: what exists, why each was refused, and what to run.

    Args:
        choice: A :class:`Choice` whose ``artifact`` is None.
        platform: The platform it was made for.

    Returns:
        A multi-line message ending with the ``nexabind build`` command to run.
    """
    variants = "/".join(choice.wanted)
    head = (
        f"no prebuilt llama.cpp library of release {choice.release or '?'} fits this process,"
        f" {describe(platform)}, variant {variants}"
    )
    if choice.source:
        head += f" (manifest {choice.source})"
    lines = [head + ":"]
    if choice.rejected:
        lines += [f"  {a.key}: {reason}" for a, reason in choice.rejected]
    else:
        lines.append("  (the manifest lists no artifacts)")
    variant = choice.wanted[0] if len(choice.wanted) == 1 else "cpu"
    build = "nexabind build --install" + (f" --variant {variant}" if variant != "cpu" else "")
    lines += [
        *(f"note: {n}" for n in platform.notes),
        f"Build it from source instead (needs CMake and a C++ compiler; a few minutes): {build}",
    ]
    return "\n".join(lines)
