"""The loader: resolution order, one error listing every attempt, the ABI check, lazy import."""

from __future__ import annotations

import json
import os
import re
import struct
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


# --- the Windows rules, on the cross-built windows-x86_64 artifact ------------------------------

# A child Python with the loader's Windows rules switched on (there is no Windows Python here):
# sys.platform says win32 and os.add_dll_directory records its calls. Everything after that is
# the loader's own code: the DLL names, the ABI check against the artifact's abi.json (its probe
# ran under wine), the DLL directory, and the load order, up to the first LoadLibrary that this
# Linux process cannot do.
_AS_WINDOWS = """
import json, os, sys
sys.platform = "win32"
added = []
os.add_dll_directory = added.append
from nexabind import loader, pin, targets
from nexabind.errors import LibraryNotFoundError
out = {"names": targets.library_names(), "added": added}
try:
    out["resolved"] = str(loader.library_dir(sys.argv[1] if len(sys.argv) > 1 else None))
    loader.load(sys.argv[1] if len(sys.argv) > 1 else None)
except LibraryNotFoundError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


def _as_windows(env: dict[str, str], *args: str) -> dict:
    r = _run(["-c", _AS_WINDOWS, *args], env)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_windows_rules_load_the_dlls_from_their_folder(cross_build) -> None:
    win = cross_build("windows-x86_64")
    lib = win.tree / "lib"
    out = _as_windows({}, str(lib))
    assert out["names"] == ["ggml-base.dll", "ggml.dll", "llama.dll"]
    assert out["resolved"] == str(lib.resolve())
    # The folder joins the DLL search path before the first DLL loads (llama.dll imports
    # ggml.dll, and ggml loads ggml-cpu-*.dll, from beside it); ggml-base.dll loads first.
    assert out["added"] == [str(lib.resolve())]
    assert "loading llama.cpp from" in out["error"]
    assert str(lib.resolve() / "ggml-base.dll") in out["error"]


def test_windows_rules_name_the_missing_dlls(libdir: Path, tmp_path: Path) -> None:
    out = _as_windows({"NEXABIND_CACHE_DIR": str(tmp_path / "cache")}, str(libdir))
    assert "resolved" not in out and out["added"] == []
    missing = "(explicit lib_path): missing ggml-base.dll, ggml.dll, llama.dll"
    assert f"{libdir.resolve()} {missing}" in out["error"]


def test_windows_rules_find_the_installed_entry(cross_build, tmp_path: Path) -> None:
    """Nothing named: the cache entry windows-x86_64-cpu of the pinned release, as fetch
    installs it (the zip extracted by safe_extract, then the install record)."""
    from nexabind import cache
    from nexabind._archive import safe_extract

    win = cross_build("windows-x86_64")
    root = tmp_path / "cache"
    entry = cache.entry_dir(pin.RELEASE, "windows-x86_64-cpu", root)
    hashes = safe_extract(win.out / win.entry["url"], entry)
    cache.write_record(entry, {"release": pin.RELEASE, "key": "windows-x86_64-cpu"}, hashes)
    out = _as_windows({"NEXABIND_CACHE_DIR": str(root)})
    assert out["resolved"] == str((entry / "lib").resolve())
    assert out["added"] == [out["resolved"]]


def _pe_exports(dll: Path) -> set[str]:
    """The names a PE (Windows DLL) file exports: its export directory's name table."""
    data = dll.read_bytes()
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    n_sections, opt_size = struct.unpack_from("<H12xH", data, pe + 6)
    opt = pe + 24
    assert struct.unpack_from("<H", data, opt)[0] == 0x20B  # PE32+
    export_rva = struct.unpack_from("<I", data, opt + 112)[0]
    sections = [
        struct.unpack_from("<8xII4xI", data, opt + opt_size + 40 * i) for i in range(n_sections)
    ]  # (virtual size, virtual address, raw data pointer)

    def at(rva: int) -> int:
        for size, addr, raw in sections:
            if addr <= rva < addr + size:
                return rva - addr + raw
        raise ValueError(f"{dll}: RVA {rva:#x} in no section")

    n_names, _, names_rva = struct.unpack_from("<III", data, at(export_rva) + 24)
    out = set()
    for i in range(n_names):
        start = at(struct.unpack_from("<I", data, at(names_rva) + 4 * i)[0])
        out.add(data[start : data.index(b"\0", start)].decode())
    return out


def test_every_declared_function_is_exported_by_the_dlls(cross_build) -> None:
    """What the binding can call is there on Windows: llama_* in llama.dll, ggml_* in ggml.dll
    or ggml-base.dll, where loader.Modules looks them up. The device functions are only in
    ggml-base.dll, so looking in ggml.dll alone (as dlsym on Linux can) would fail."""
    from nexabind import _cdef

    lib = cross_build("windows-x86_64").tree / "lib"
    ggml, base, llama = (_pe_exports(lib / n) for n in ("ggml.dll", "ggml-base.dll", "llama.dll"))
    # Function names: an identifier before "(", not a struct returned by a function pointer.
    declared = set(re.findall(r"(?<!struct )\b((?:llama|ggml)_\w+)\s*\(", _cdef.CDEF))
    assert len(declared) > 200
    assert not {f for f in declared if f.startswith("llama_")} - llama
    assert not {f for f in declared if f.startswith("ggml_")} - (ggml | base)
    assert {"ggml_backend_dev_name", "ggml_backend_dev_description"} <= base - ggml
    assert "ggml_backend_load_all_from_path" in ggml


def test_modules_find_a_function_in_the_next_library(libdir: Path) -> None:
    """Modules looks in each library in turn: llama_backend_init is not found through the
    libggml-base handle (not among its dependencies) but in libllama."""
    code = (
        "import sys\n"
        "from nexabind._ffi import ffi\n"
        "from nexabind.loader import Modules, library_names\n"
        "base, _, llama = (ffi.dlopen(sys.argv[1] + '/' + n) for n in library_names())\n"
        "try:\n"
        "    base.llama_backend_init\n"
        "    print('base has it')\n"
        "except ffi.error:\n"
        "    pass\n"
        "m = Modules(base, llama)\n"
        "print(m.llama_backend_init is llama.llama_backend_init)\n"
        "try:\n"
        "    m.no_such_function\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    r = _run(["-c", code, str(libdir)], {})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "True",
        "none of the loaded ggml libraries exports no_such_function",
    ]
