"""nexabind.choice: the artifact chosen for a platform, and why every other one was not."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_manifest import MATRIX, _six_targets

from nexabind import pin
from nexabind.choice import choose, no_artifact_message
from nexabind.manifest import Manifest
from nexabind.platform import Platform

LINUX = Platform("linux", "x86_64", "glibc", "2.36")


@pytest.fixture
def manifest() -> Manifest:
    return Manifest.from_json(json.dumps(_six_targets()), pinned=False, source="test-mirror")


def _reasons(choice: Any) -> dict[str, str]:
    return {a.key: reason for a, reason in choice.rejected}


def test_cpu_only_linux_explains_every_other_artifact(manifest: Manifest) -> None:
    c = choose(manifest, LINUX)
    assert c.artifact is not None and c.artifact.key == "linux-x86_64-cpu"
    reasons = _reasons(c)
    assert len(reasons) == len(MATRIX) - 1
    assert reasons["linux-x86_64-cuda"] == "needs CUDA driver >=12.4, none found"
    assert reasons["linux-x86_64-vulkan"] == "no Vulkan loader found"
    assert reasons["linux-arm64-cpu"] == "other arch (this process is x86_64)"
    assert reasons["windows-x86_64-cpu"] == "other os (this process runs on linux)"
    assert c.wanted == ("cpu",) and c.release == pin.RELEASE and c.source == "test-mirror"


def test_gpu_preference_and_driver_versions(manifest: Manifest) -> None:
    new = Platform("linux", "x86_64", "glibc", "2.39", cuda_driver="12.4", vulkan=True)
    c = choose(manifest, new)
    assert c.artifact is not None and c.artifact.key == "linux-x86_64-cuda"
    assert _reasons(c)["linux-x86_64-vulkan"] == "cuda is preferred"
    assert _reasons(c)["linux-x86_64-cpu"] == "cuda is preferred"
    old = Platform("linux", "x86_64", "glibc", "2.39", cuda_driver="12.2", vulkan=True)
    c = choose(manifest, old)
    assert c.artifact is not None and c.artifact.key == "linux-x86_64-vulkan"
    assert _reasons(c)["linux-x86_64-cuda"] == "needs CUDA driver >=12.4, this system has 12.2"
    newer = Platform("windows", "x86_64", cuda_driver="13.0")
    c = choose(manifest, newer)
    assert c.artifact is not None and c.artifact.key == "windows-x86_64-cuda"


def test_glibc_too_old(manifest: Manifest) -> None:
    p = Platform("linux", "x86_64", "glibc", "2.31")
    c = choose(manifest, p)
    assert c.artifact is None
    assert _reasons(c)["linux-x86_64-cpu"] == "glibc 2.35 needed, this system has 2.31"
    msg = no_artifact_message(c, p)
    assert "linux-x86_64 (glibc 2.31, no GPU runtime found)" in msg
    assert "  linux-x86_64-cpu: glibc 2.35 needed, this system has 2.31" in msg
    assert "  macos-arm64-metal: other os (this process runs on linux)" in msg
    assert msg.rstrip().endswith("nexabind build --install")
    # 2.35 itself is enough: versions compare as numbers, not strings ("2.4" < "2.35").
    assert choose(manifest, Platform("linux", "x86_64", "glibc", "2.35")).artifact is not None


def test_musl(manifest: Manifest) -> None:
    p = Platform("linux", "x86_64", "musl", "1.2.4", notes=("musl libc: ...",))
    c = choose(manifest, p)
    assert c.artifact is None
    assert _reasons(c)["linux-x86_64-cpu"] == "built for glibc, this system uses musl"
    assert "note: musl libc" in no_artifact_message(c, p)
    data = _six_targets()
    data["artifacts"].append(
        dict(data["artifacts"][3], os="linux", arch="x86_64", variant="cpu", libc="musl")
    )
    data["artifacts"][-1].update(name="musl.tar.gz", url="musl.tar.gz", arch="x86_64")
    data["artifacts"].pop(0)  # one artifact per (os, arch, variant): replace glibc's
    m = Manifest.from_json(data, pinned=False, source="m")
    c = choose(m, p)
    assert c.artifact is not None and c.artifact.name == "musl.tar.gz"
    assert choose(m, LINUX).artifact is None


def test_rosetta_gets_the_x86_64_build_and_the_warning(manifest: Manifest) -> None:
    note = "x86_64 Python under Rosetta 2 on Apple silicon: llama.cpp gets no AVX"
    p = Platform("macos", "x86_64", macos_version="14.5", notes=(note,))
    c = choose(manifest, p)
    assert c.artifact is not None and c.artifact.key == "macos-x86_64-cpu"
    assert _reasons(c)["macos-arm64-metal"] == "other arch (this process is x86_64)"
    c = choose(manifest, p, "metal")
    assert c.artifact is None
    msg = no_artifact_message(c, p)
    assert f"note: {note}" in msg
    assert "variant metal" in msg and "nexabind build --install --variant metal" in msg


def test_macos_versions(manifest: Manifest) -> None:
    arm = Platform("macos", "arm64", macos_version="14.5", metal=True)
    c = choose(manifest, arm)
    assert c.artifact is not None and c.artifact.key == "macos-arm64-metal"
    old = Platform("macos", "arm64", macos_version="13.6", metal=True)
    c = choose(manifest, old)
    assert c.artifact is None
    assert _reasons(c)["macos-arm64-metal"] == "macOS 14.0 needed, this system has 13.6"


def test_explicit_variant(manifest: Manifest) -> None:
    gpu = Platform("linux", "x86_64", "glibc", "2.36", cuda_driver="12.6", vulkan=True)
    c = choose(manifest, gpu, "cpu")
    assert c.artifact is not None and c.artifact.key == "linux-x86_64-cpu"
    assert _reasons(c)["linux-x86_64-cuda"] == "variant cuda not requested (asked for cpu)"
    # Asked for CUDA without a driver: nothing, and the message says why.
    c = choose(manifest, LINUX, "cuda")
    assert c.artifact is None and c.wanted == ("cuda",)
    msg = no_artifact_message(c, LINUX)
    assert "linux-x86_64-cuda: needs CUDA driver >=12.4, none found" in msg
    # A variant this target is not built for at all.
    win_arm = Platform("windows", "arm64")
    c = choose(manifest, win_arm, "vulkan")
    assert c.artifact is None
    assert _reasons(c)["windows-arm64-cpu"] == "variant cpu not requested (asked for vulkan)"
    assert choose(manifest, win_arm).artifact.key == "windows-arm64-cpu"  # type: ignore[union-attr]


def test_unknown_requirement_is_refused_not_ignored(manifest: Manifest) -> None:
    data = _six_targets()
    data["artifacts"][0]["requires"] = {"rocm": ">=6.0"}
    m = Manifest.from_json(data, pinned=False, source="m")
    c = choose(m, LINUX)
    assert c.artifact is None
    assert (
        "requires rocm >=6.0, which this nexabind cannot check; upgrade nexabind"
        in (_reasons(c)["linux-x86_64-cpu"])
    )


@pytest.mark.parametrize(
    ("spec", "have", "ok"),
    [
        (">=12.4", "12.4", True),
        (">=12.4", "12.10", True),  # numbers, not strings
        (">=12.4", "12.3", False),
        (">12.4", "12.4", False),
        ("==12", "12.0", True),
        ("<13", "12.9", True),
        ("<=12.4", "13.0", False),
        ("12.4", "12.6", True),  # a bare version is a minimum
    ],
)
def test_cuda_requirement_specs(spec: str, have: str, ok: bool) -> None:
    data = _six_targets()
    data["artifacts"][2]["requires"] = {"cuda_driver": spec}
    m = Manifest.from_json(data, pinned=False, source="m")
    p = Platform("linux", "x86_64", "glibc", "2.36", cuda_driver=have)
    c = choose(m, p, "cuda")
    assert (c.artifact is not None) is ok, _reasons(c).get("linux-x86_64-cuda")
