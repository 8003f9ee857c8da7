"""The loader: resolution order, one error listing every attempt, the ABI check, lazy import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nexabind import loader, pin
from nexabind.errors import AbiMismatchError
from nexabind.platform import target


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "NEXABIND_LIB_PATH"}
    full.update(env)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=full, timeout=120
    )


@pytest.fixture
def abi(libdir: Path) -> dict:
    path = loader.abi_file(libdir)
    if path is None:
        pytest.skip(f"no abi.json next to {libdir}; build it with `nexabind build --install`")
    return json.loads(path.read_text())


def _mirror(libdir: Path, dest: Path) -> Path:
    """An artifact-shaped folder: dest/lib/* links to the real libraries."""
    lib = dest / "lib"
    lib.mkdir(parents=True)
    for f in libdir.iterdir():
        if f.name != "abi.json":
            (lib / f.name).symlink_to(f.resolve())
    return lib


def test_import_loads_no_native_library_nor_numpy() -> None:
    code = (
        "import sys, nexabind\n"
        "maps = open('/proc/self/maps').read() if sys.platform == 'linux' else ''\n"
        "print('numpy' in sys.modules, 'libllama' in maps or 'libggml' in maps,"
        " 'nexabind._ffi' in sys.modules)\n"
    )
    r = _run(["-c", code], {})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "False"]


def test_load_from_env(libdir: Path) -> None:
    r = _run(["-m", "nexabind.lowlevel"], {"NEXABIND_LIB_PATH": str(libdir)})
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info["ok"] and Path(info["libdir"]) == libdir.resolve()
    assert "CPU" in info["system_info"]


def test_load_from_cache(libdir: Path, abi: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    os_name, arch = target()
    entry = cache / "libs" / pin.RELEASE / f"{os_name}-{arch}-cpu"
    lib = _mirror(libdir, entry)
    (entry / "abi.json").write_text(json.dumps(abi))
    r = _run(["-m", "nexabind.lowlevel"], {"NEXABIND_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert Path(info["libdir"]) == lib.resolve()
    assert info["abi_checked"] is True


def test_tampered_abi_json_names_the_field(abi: dict) -> None:
    loader.check_abi(abi)  # the real one passes
    bad = json.loads(json.dumps(abi))
    bad["structs"]["llama_batch"]["offsets"]["logits"] += 8
    with pytest.raises(AbiMismatchError, match=r"offsetof\(struct llama_batch, logits\)"):
        loader.check_abi(bad)
    bad = json.loads(json.dumps(abi))
    bad["structs"]["llama_context_params"]["size"] += 4
    with pytest.raises(AbiMismatchError, match=r"sizeof\(struct llama_context_params\)"):
        loader.check_abi(bad)
    bad = dict(abi, llama_commit="deadbeef")
    with pytest.raises(AbiMismatchError, match="llama_commit.*deadbeef.*nexabind fetch"):
        loader.check_abi(bad)
    bad = json.loads(json.dumps(abi))
    bad["enums"]["LLAMA_VOCAB_TYPE_BPE"] = 7
    with pytest.raises(AbiMismatchError, match="LLAMA_VOCAB_TYPE_BPE"):
        loader.check_abi(bad)


def test_tampered_abi_json_refuses_to_load(libdir: Path, abi: dict, tmp_path: Path) -> None:
    lib = _mirror(libdir, tmp_path / "artifact")
    bad = json.loads(json.dumps(abi))
    bad["structs"]["llama_batch"]["size"] = 48
    (tmp_path / "artifact" / "abi.json").write_text(json.dumps(bad))
    r = _run(["-m", "nexabind.lowlevel", str(lib)], {})
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert "sizeof(struct llama_batch)" in out["error"] and "48" in out["error"]
    # refused before loading anything: no crash, clear JSON


def test_local_build_without_abi_json_warns(libdir: Path, tmp_path: Path) -> None:
    lib = _mirror(libdir, tmp_path / "local")
    code = (
        "import logging, sys; logging.basicConfig(level=logging.WARNING)\n"
        "from nexabind import loader; loader.load(sys.argv[1]); print('loaded')\n"
    )
    r = _run(["-c", code, str(lib)], {})
    assert r.returncode == 0, r.stderr
    assert "loaded" in r.stdout and "ABI not checked" in r.stderr
