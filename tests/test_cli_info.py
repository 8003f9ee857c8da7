"""`nexabind info`: platform, manifest, choice and why, settings; CliRunner and a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_manifest import _six_targets

from nexabind import pin, settings
from nexabind._source import build_cache_dir
from nexabind.cli import cli
from nexabind.platform import detect, target


def _info(runner: CliRunner, *args: str) -> dict[str, Any]:
    r = runner.invoke(cli, ["info", "--json", *args])
    assert r.exit_code == 0, r.output
    assert "probing this platform" in r.stderr  # status on stderr, data alone on stdout
    return json.loads(r.stdout)


def test_info_json_without_a_packaged_manifest(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, _isolated_cache: Path
) -> None:
    monkeypatch.setenv("NEXABIND_BASE_URL", "http://127.0.0.1:8765/mirror")
    monkeypatch.setenv("NEXABIND_OFFLINE", "1")
    report = _info(runner)
    assert report["platform"] == detect().to_dict()
    assert (report["release"], report["llama_commit"]) == (pin.RELEASE, pin.LLAMA_COMMIT)
    assert report["manifest"]["source"] is None
    assert report["manifest"]["note"] == "none packaged yet: a mirror's manifest would be unpinned"
    assert report["choice"]["artifact"] is None
    s = report["settings"]
    assert s["NEXABIND_BASE_URL"]["value"] == "http://127.0.0.1:8765/mirror"
    assert s["NEXABIND_OFFLINE"]["in_force"] == "on"
    assert s["NEXABIND_CACHE_DIR"]["in_force"] == str(_isolated_cache)
    assert s["NEXABIND_LIB_PATH"] == {
        "value": None,
        "flag": "--lib-path",
        "default": "none: the library installed in the cache",
        "in_force": "none: the library installed in the cache",
    }
    assert s["NEXABIND_VARIANT"]["value"] is None
    # Every variable nexabind reads is listed, with its flag twin.
    assert list(s) == [x.env for x in settings.SETTINGS]
    assert s["NEXABIND_ALLOW_HTTP"] == {
        "value": None, "flag": "--allow-http", "default": "off", "in_force": "off",
    }  # fmt: skip
    assert s["NEXABIND_BUILD_CACHE"]["in_force"] == str(build_cache_dir())
    assert s["NEXABIND_LLAMA_SDIST"]["flag"] == "--sdist"
    assert report["installed"] == []
    assert report["library"]["path"] is None
    assert str(_isolated_cache) in report["library"]["error"]


def test_info_text(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXABIND_VARIANT", "cpu")
    r = runner.invoke(cli, ["info"])
    assert r.exit_code == 0, r.output
    p = detect()
    assert f"  arch:         {p.arch} (this process)" in r.stdout
    assert f"  libc:         {p.libc} {p.libc_version}" in r.stdout or p.libc is None
    assert "manifest:       none packaged yet: a mirror's manifest would be unpinned" in r.stdout
    assert "  NEXABIND_VARIANT, --variant: cpu (set)" in r.stdout
    assert "  NEXABIND_OFFLINE, --offline: off (default)" in r.stdout
    assert "library:        none yet" in r.stdout and "nexabind fetch" in r.stdout


def test_info_chooses_from_a_six_target_manifest(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(_six_targets()))
    report = _info(runner, "--manifest", str(path))
    m, c = report["manifest"], report["choice"]
    assert (m["source"], m["pinned"], m["artifacts"], m["incompatible"]) == (
        str(path),
        False,
        11,
        None,
    )
    os_name, arch = target()
    keys = {f"{a['os']}-{a['arch']}-{a['variant']}" for a in _six_targets()["artifacts"]}
    assert c["key"] is not None and c["key"].startswith(f"{os_name}-{arch}-")
    # Every other artifact is listed once, with a reason.
    assert {r["key"] for r in c["rejected"]} == keys - {c["key"]}
    assert all(r["reason"] for r in c["rejected"])
    other = next(r for r in c["rejected"] if not r["key"].startswith(f"{os_name}-"))
    assert other["reason"] == f"other os (this process runs on {os_name})"
    r = runner.invoke(cli, ["info", "--manifest", str(path)])
    assert f"manifest:       {path} (unpinned), 11 artifacts" in r.stdout
    assert f"chosen:         {c['key']} (" in r.stdout and "not taken:" in r.stdout


def test_info_explains_an_unavailable_variant(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "manifest.json"
    data = _six_targets()
    data["artifacts"] = [a for a in data["artifacts"] if a["variant"] != "vulkan"]
    path.write_text(json.dumps(data))
    monkeypatch.setenv("NEXABIND_VARIANT", "vulkan")
    report = _info(runner, "--manifest", str(path))
    c = report["choice"]
    assert c["artifact"] is None and c["variant_order"] == ["vulkan"]
    assert "nexabind build --install --variant vulkan" in c["message"]
    assert report["settings"]["NEXABIND_VARIANT"]["in_force"] == "vulkan"
    r = runner.invoke(cli, ["info", "--manifest", str(path), "--variant", "vulkan"])
    assert "chosen:         none fits this process" in r.stdout
    assert "nexabind build --install --variant vulkan" in r.stdout


def test_info_flags_an_incompatible_manifest(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps(dict(_six_targets(), llama_commit="abcdef1")))
    report = _info(runner, "--manifest", str(path))
    assert f"--release {pin.RELEASE}" in report["manifest"]["incompatible"]
    r = runner.invoke(cli, ["info", "--manifest", str(path)])
    assert "  incompatible: manifest" in r.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--variant", "rocm"], "unknown variant 'rocm'; choose one of cuda, vulkan, metal, cpu"),
        (["--manifest", "/nonexistent/m.json"], "cannot read the manifest /nonexistent/m.json"),
        (["--release", "../x"], "release must be a tag like"),
    ],
)
def test_info_bad_input(runner: CliRunner, args: list[str], expected: str) -> None:
    r = runner.invoke(cli, ["info", *args])
    assert r.exit_code == 1
    assert expected in r.stderr


def test_info_bad_manifest_names_the_field(runner: CliRunner, tmp_path: Path) -> None:
    data = _six_targets()
    data["artifacts"][2]["sha256"] = "deadbeef"
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    r = runner.invoke(cli, ["info", "--manifest", str(path)])
    assert r.exit_code == 1
    assert f"manifest {path} is invalid" in r.stderr
    assert "artifacts[2] (linux-x86_64-cuda).sha256 must be 64 hex digits" in r.stderr


def test_info_on_the_real_release_as_a_process(release_mirror: Path, _isolated_cache: Path) -> None:
    manifest = release_mirror / pin.RELEASE / "manifest.json"
    env = {k: v for k, v in os.environ.items() if k != "NEXABIND_LIB_PATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "nexabind", "info", "--json", "--manifest", str(manifest)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    built = json.loads(manifest.read_text())["artifacts"][0]
    # The library built on this machine is the one chosen for this machine.
    assert report["choice"]["artifact"] == built
    assert report["manifest"]["incompatible"] is None
    assert report["settings"]["NEXABIND_CACHE_DIR"]["in_force"] == str(_isolated_cache)
    assert "probing this platform" in proc.stderr


def test_info_shows_the_fetched_library_in_use(
    runner: CliRunner, cli_fetched: Path, release_mirror: Path
) -> None:
    lib = cli_fetched
    report = _info(runner, "--manifest", str(release_mirror / pin.RELEASE / "manifest.json"))
    (entry,) = report["installed"]
    assert entry["key"] == report["choice"]["key"] and entry["in_use"] is True
    assert (
        entry["release"] == pin.RELEASE
        and entry["artifact"] == report["choice"]["artifact"]["name"]
    )
    cpu = report["library"].pop("cpu")
    report["library"].pop("rpc")
    assert report["library"] == {"path": str(lib.resolve()), "error": None}
    assert cpu["built"] == "all" and cpu["skipped"] == {}
    assert (
        cpu["loads"].startswith("ggml's best for this CPU (")
        and "checked at install" in cpu["loads"]
    )
    r = runner.invoke(cli, ["info"])
    assert f" *{pin.RELEASE}  {entry['key']}  {entry['path']}" in r.stdout
    assert f"library:        {lib.resolve()}" in r.stdout
