"""Release manifests: strict validation, the build's own output, the packaged manifest."""

from __future__ import annotations

import copy
import hashlib
import json
import tarfile
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from nexabind import _cdef, pin
from nexabind._artifact import artifact_entry, update_manifest
from nexabind.errors import ManifestError
from nexabind.manifest import (
    Artifact,
    Manifest,
    check_compatible,
    packaged,
)

# (os, arch, variant, min_glibc, min_macos, requires): the release matrix of DESIGN.md.
MATRIX = [
    ("linux", "x86_64", "cpu", "2.35", None, {}),
    ("linux", "x86_64", "vulkan", "2.35", None, {}),
    ("linux", "x86_64", "cuda", "2.35", None, {"cuda_driver": ">=12.4"}),
    ("linux", "arm64", "cpu", "2.35", None, {}),
    ("linux", "arm64", "vulkan", "2.35", None, {}),
    ("windows", "x86_64", "cpu", None, None, {}),
    ("windows", "x86_64", "vulkan", None, None, {}),
    ("windows", "x86_64", "cuda", None, None, {"cuda_driver": ">=12.4"}),
    ("windows", "arm64", "cpu", None, None, {}),
    ("macos", "x86_64", "cpu", None, "13.3", {}),
    ("macos", "arm64", "metal", None, "14.0", {}),
]


def _six_targets() -> dict[str, Any]:
    artifacts = []
    for os_name, arch, variant, glibc, macos, requires in MATRIX:
        ext = "zip" if os_name == "windows" else "tar.gz"
        name = f"nexabind-llama-{pin.ARTIFACT_VERSION}-{os_name}-{arch}-{variant}.{ext}"
        artifacts.append(
            {
                "name": name,
                "os": os_name,
                "arch": arch,
                "variant": variant,
                "min_glibc": glibc,
                "min_macos": macos,
                "requires": requires,
                "url": name,
                "size": 1000 + len(artifacts),
                "sha256": hashlib.sha256(name.encode()).hexdigest(),
            }
        )
    return {
        "schema": 1,
        "release": pin.RELEASE,
        "llama_commit": pin.LLAMA_COMMIT,
        "llama_build": pin.LLAMA_BUILD,
        "abi_fingerprint": _cdef.CDEF_SHA256,
        "artifacts": artifacts,
    }


@pytest.fixture
def manifest() -> Manifest:
    return Manifest.from_json(json.dumps(_six_targets()), pinned=False, source="test-mirror")


# --- parsing and validation --------------------------------------------------------------------


def test_round_trip_and_keys(manifest: Manifest) -> None:
    assert len(manifest.artifacts) == len(MATRIX)
    assert manifest.to_dict() == _six_targets()
    again = Manifest.from_json(manifest.to_dict(), pinned=True, source="x")
    assert again.artifacts == manifest.artifacts and again.pinned
    assert [a.key for a in manifest.artifacts][:3] == [
        "linux-x86_64-cpu",
        "linux-x86_64-vulkan",
        "linux-x86_64-cuda",
    ]
    assert manifest.artifacts[2].requires == {"cuda_driver": ">=12.4"}
    assert len({*manifest.artifacts}) == len(MATRIX)  # hashable despite the dict field


def test_reads_what_the_build_writes(tmp_path: Path) -> None:
    # The contract with nexabind build --out / make_manifest.py: a real archive, its real entry.
    stage = tmp_path / "stage" / "lib"
    stage.mkdir(parents=True)
    (stage / "libllama.so").write_bytes(b"\x7fELF not really")
    archive = tmp_path / "out" / f"nexabind-llama-{pin.ARTIFACT_VERSION}-linux-x86_64-cpu.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(stage, "lib")
    info = {"os": "linux", "arch": "x86_64", "variant": "cpu", "min_glibc": "2.34"}
    path = update_manifest(archive.parent, artifact_entry(archive, info))
    m = Manifest.from_json(path.read_bytes(), pinned=False, source=str(path))
    (a,) = m.artifacts
    assert (a.key, a.min_glibc, a.size) == ("linux-x86_64-cpu", "2.34", archive.stat().st_size)
    assert a.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert (m.release, m.llama_commit, m.abi_fingerprint) == (
        pin.RELEASE,
        pin.LLAMA_COMMIT,
        _cdef.CDEF_SHA256,
    )
    check_compatible(m)


def test_the_manifest_is_written_through_a_temp_name_nobody_planted(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_text("keep")
    (tmp_path / "manifest.json.part").symlink_to(canary)  # the temp name used before
    entry = {"os": "linux", "arch": "x86_64", "variant": "cpu", "name": "a.tar.gz"}
    path = update_manifest(tmp_path, entry)
    assert json.loads(path.read_text())["artifacts"] == [entry]
    assert canary.read_text() == "keep"


def _broken(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(_six_targets())
    change(data)
    return data


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def change(data: dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_set(("release",), KeyError), "release is missing"),
        (_set(("release",), "a/b"), "release must be a tag"),
        (_set(("llama_commit",), 123), "llama_commit must be a non-empty string, got 123"),
        (_set(("llama_commit",), "zz-top"), "llama_commit must be a lowercase hex"),
        (_set(("llama_build",), "11312"), "llama_build must be an integer or null"),
        (_set(("llama_build",), KeyError), "llama_build is missing"),
        (_set(("abi_fingerprint",), "abc"), "abi_fingerprint must be 64 hex digits"),
        (_set(("artifacts",), []), "artifacts must be a non-empty list"),
        (_set(("extra",), 1), "unknown field 'extra'"),
        (_set(("artifacts", 0, "sha256"), "0" * 63), "artifacts[0] (linux-x86_64-cpu).sha256 must"),
        (_set(("artifacts", 0, "sha256"), "g" * 64), "sha256 must be 64 hex digits"),
        (_set(("artifacts", 1, "size"), 0), "artifacts[1] (linux-x86_64-vulkan).size must be"),
        (_set(("artifacts", 1, "size"), -5), "size must be a positive integer"),
        (_set(("artifacts", 1, "size"), True), "size must be a positive integer (bytes), got True"),
        (_set(("artifacts", 1, "size"), "12"), "size must be a positive integer"),
        (_set(("artifacts", 2, "url"), "https://evil.example/x.tar.gz"), "url must be relative"),
        (_set(("artifacts", 2, "url"), "/etc/passwd"), "url must be a relative path"),
        (_set(("artifacts", 2, "url"), "../other/x.tar.gz"), "must not contain '.', '..'"),
        (_set(("artifacts", 2, "url"), "a/../../x"), "must not contain '.', '..'"),
        (_set(("artifacts", 2, "url"), "C:\\x.zip"), "url must be relative"),
        (_set(("artifacts", 2, "url"), "x.tar.gz?sig=1"), "no query"),
        # %-escapes are read as a server or a file:// mirror reads them
        (_set(("artifacts", 2, "url"), "%2e%2e/%2E%2E/etc/hostname"), "must not contain '.', '..'"),
        (_set(("artifacts", 2, "url"), "a%2f..%2f..%2fx"), "must not contain '.', '..'"),
        (_set(("artifacts", 2, "url"), "%2fetc%2fpasswd"), "url must be a relative path"),
        (_set(("artifacts", 2, "url"), "x.tar.gz%00.zip"), "no query, fragment or control"),
        (_set(("artifacts", 3, "os"), "freebsd"), "os must be one of linux, macos, windows"),
        (_set(("artifacts", 3, "arch"), "ARM 64"), "arch must be a lowercase name"),
        (_set(("artifacts", 3, "variant"), "rocm"), "variant must be one of cuda, vulkan"),
        (_set(("artifacts", 3, "name"), "../x.tar.gz"), "name must be a plain file name"),
        (_set(("artifacts", 3, "min_glibc"), 2.35), "min_glibc must be a version like"),
        (_set(("artifacts", 9, "min_macos"), "fourteen"), "min_macos must be a version like"),
        (_set(("artifacts", 2, "requires"), ["cuda"]), "requires must be an object"),
        (_set(("artifacts", 2, "requires"), {"cuda_driver": "new"}), "requires.cuda_driver must"),
        (_set(("artifacts", 2, "libc"), "bionic"), "libc must be 'glibc', 'musl'"),
        (_set(("artifacts", 2, "signature"), "x"), "signature: unknown field"),
        (_set(("artifacts", 4), "linux-arm64"), "artifacts[4] must be an object"),
        (_set(("artifacts", 5, "name"), KeyError), "artifacts[5] (windows-x86_64-cpu).name is"),
    ],
)
def test_each_bad_field_is_named(change: Any, expected: str) -> None:
    with pytest.raises(ManifestError) as e:
        Manifest.from_json(json.dumps(_broken(change)), pinned=False, source="http://m/x.json")
    assert expected in str(e.value)
    assert "http://m/x.json" in str(e.value)


def test_every_error_is_reported_at_once() -> None:
    def change(data: dict[str, Any]) -> None:
        data["artifacts"][0]["size"] = 0
        data["artifacts"][1]["sha256"] = "nope"
        data["abi_fingerprint"] = ""

    with pytest.raises(ManifestError) as e:
        Manifest.from_json(_broken(change), pinned=False, source="m.json")
    text = str(e.value)
    assert "artifacts[0] (linux-x86_64-cpu).size" in text
    assert "artifacts[1] (linux-x86_64-vulkan).sha256" in text
    assert "abi_fingerprint must be a non-empty string" in text
    assert text.splitlines()[-1].startswith("write it with `nexabind build --out DIR`")


def test_a_hostile_manifest_gets_a_short_error() -> None:
    """Too many artifacts, too many errors, nesting too deep for the parser: each a
    ManifestError of a few lines, not a huge message or a RecursionError."""
    data = _six_targets()
    data["artifacts"] = data["artifacts"] * 200
    with pytest.raises(ManifestError, match="artifacts lists 2200 entries, over the 1000 limit"):
        Manifest.from_json(data, pinned=False, source="m")
    data["artifacts"] = [{}] * 900
    with pytest.raises(ManifestError) as e:
        Manifest.from_json(data, pinned=False, source="m")
    assert "... and " in str(e.value) and len(str(e.value).splitlines()) < 30
    with pytest.raises(ManifestError, match="manifest m is not valid JSON"):
        Manifest.from_json("[" * 100_000, pinned=False, source="m")


def test_duplicates_and_schema_and_json_errors() -> None:
    def dup(data: dict[str, Any]) -> None:
        extra = dict(data["artifacts"][0], name="other.tar.gz", url="other.tar.gz")
        data["artifacts"].append(extra)

    with pytest.raises(ManifestError, match=r"\(linux-x86_64-cpu\) duplicates artifacts\[0\]"):
        Manifest.from_json(_broken(dup), pinned=False, source="m")
    with pytest.raises(ManifestError, match="newer than this nexabind reads .1.; upgrade"):
        Manifest.from_json(_broken(_set(("schema",), 2)), pinned=False, source="m")
    with pytest.raises(ManifestError, match="schema must be 1, got None"):
        Manifest.from_json(_broken(_set(("schema",), KeyError)), pinned=False, source="m")
    with pytest.raises(ManifestError, match="manifest m.json is not valid JSON"):
        Manifest.from_json(b'{"schema": 1,', pinned=False, source="m.json")
    with pytest.raises(ManifestError, match="must be a JSON object, got list"):
        Manifest.from_json("[]", pinned=False, source="m")
    ok = Manifest.from_json(
        _broken(_set(("artifacts", 0, "sha256"), "AB" * 32)), pinned=False, source="m"
    )
    assert ok.artifacts[0].sha256 == "ab" * 32


def test_check_compatible_names_the_release_to_use(manifest: Manifest) -> None:
    check_compatible(manifest)
    old = Manifest.from_json(_broken(_set(("llama_commit",), "1234567")), pinned=False, source="m")
    with pytest.raises(ManifestError) as e:
        check_compatible(old)
    assert "built for llama.cpp 1234567" in str(e.value)
    assert f"--release {pin.RELEASE}" in str(e.value)
    other = Manifest.from_json(
        _broken(_set(("abi_fingerprint",), "0" * 64)), pinned=False, source="m"
    )
    with pytest.raises(ManifestError, match="ABI fingerprint 000000000000"):
        check_compatible(other)
    full = Manifest.from_json(
        _broken(_set(("llama_commit",), pin.LLAMA_COMMIT_FULL)), pinned=False, source="m"
    )
    check_compatible(full)


# --- packaged ----------------------------------------------------------------------------------


def test_no_manifest_is_packaged_until_a_release_exists() -> None:
    folder = resources.files("nexabind").joinpath("manifests")
    assert folder.joinpath("README.md").is_file()
    assert packaged() is None
    with pytest.raises(ValueError, match="release must be a tag"):
        packaged("../../etc/passwd")


@pytest.fixture
def shipped() -> Any:
    """Put a manifest into the package's manifests folder for one test, then remove it."""
    folder = Path(str(resources.files("nexabind").joinpath("manifests")))
    written: list[Path] = []

    def ship(release: str, data: dict[str, Any]) -> None:
        path = folder / f"{release}.json"
        path.write_text(json.dumps(data))
        written.append(path)

    yield ship
    for path in written:
        path.unlink()


def test_packaged_manifest_is_pinned(shipped: Any) -> None:
    release = f"test-{uuid.uuid4().hex[:8]}"
    shipped(release, _broken(_set(("release",), release)))
    m = packaged(release)
    assert m is not None and m.pinned and m.release == release
    assert m.source.endswith(f"manifests/{release}.json (packaged)")
    wrong = f"test-{uuid.uuid4().hex[:8]}"
    shipped(wrong, _six_targets())
    with pytest.raises(ManifestError, match=f"describes release '{pin.RELEASE}', not '{wrong}'"):
        packaged(wrong)


def test_artifact_key_and_dict() -> None:
    a = Artifact("n.tar.gz", "linux", "arm64", "vulkan", "n.tar.gz", 5, "a" * 64)
    assert a.key == "linux-arm64-vulkan"
    assert a.to_dict()["requires"] == {} and "libc" not in a.to_dict()
