"""Find, load and ABI-check the llama.cpp shared libraries, once per process.

Nothing here calls into the library: :func:`nexabind.lowlevel.lib` sets it up once loaded.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, NamedTuple

from nexabind import settings
from nexabind._install_record import INSTALL_RECORD, read_record
from nexabind.cache import library_dir
from nexabind.errors import AbiMismatchError, LibraryNotFoundError
from nexabind.targets import cpu_variant_of, library_names

__all__ = [
    "Handles",
    "Modules",
    "abi_file",
    "backend_modules",
    "check_abi",
    "cpu_variant_choice",
    "library_dir",
    "load",
    "loaded_cpu_variant",
    "loaded_dir",
]

log = logging.getLogger("nexabind.loader")

_lock = threading.Lock()
_handles: Handles | None = None


def abi_file(libdir: Path) -> Path | None:
    """Return the ``abi.json`` that describes the libraries in ``libdir``, or None."""
    for cand in (libdir.parent / "abi.json", libdir / "abi.json"):
        if cand.is_file():
            return cand
    return None


def check_abi(abi: dict[str, Any], source: str = "abi.json") -> None:
    """Compare a probe's ``abi.json`` with the generated declarations.

    Args:
        abi: The parsed ``abi.json``.
        source: Where it came from, for the message.

    Raises:
        AbiMismatchError: Naming the first field (commit, cdef hash, pointer size, struct size or
            offset, enum value) that differs.
    """
    from nexabind import _cdef
    from nexabind._ffi import ffi

    def fail(what: str, want: object, got: object) -> None:
        msg = (
            f"ABI mismatch in {source}: {what} is {got!r} in the library but {want!r} in "
            f"nexabind's declarations; install the matching library with `nexabind fetch` "
            f"or rebuild with `nexabind build --install`"
        )
        raise AbiMismatchError(msg)

    if abi.get("llama_commit") != _cdef.LLAMA_COMMIT:
        fail("llama_commit", _cdef.LLAMA_COMMIT, abi.get("llama_commit"))
    if abi.get("cdef_sha256") != _cdef.CDEF_SHA256:
        fail("cdef_sha256", _cdef.CDEF_SHA256, abi.get("cdef_sha256"))
    if abi.get("pointer_size") != ffi.sizeof("void *"):
        fail("pointer_size", ffi.sizeof("void *"), abi.get("pointer_size"))
    structs = abi.get("structs", {})
    for tag, fields in _cdef.STRUCTS.items():
        got = structs.get(tag)
        if got is None:
            fail(f"struct {tag}", "present", None)
        size = ffi.sizeof(f"struct {tag}")
        if got.get("size") != size:
            fail(f"sizeof(struct {tag})", size, got.get("size"))
        offsets = got.get("offsets", {})
        for field in fields:
            off = ffi.offsetof(f"struct {tag}", field)
            if offsets.get(field) != off:
                fail(f"offsetof(struct {tag}, {field})", off, offsets.get(field))
    enums = abi.get("enums", {})
    for consts in _cdef.ENUMS.values():
        for name in consts:
            want = ffi.integer_const(name)
            if enums.get(name) != want:
                fail(f"enum value {name}", want, enums.get(name))


class Handles(NamedTuple):
    """The loaded libraries: cffi handles of ``libllama`` and of ggml (:class:`Modules` of
    ``libggml`` and ``libggml-base``), and their folder."""

    lib: Any
    ggml: Any
    libdir: Path


class Modules:
    """Functions of several loaded libraries, each looked up in the first that exports it.

    On Windows a DLL exports only its own functions (GetProcAddress does not search its
    imports as dlsym does), and ggml's are split: the registry (``ggml_backend_dev_count``,
    ``ggml_backend_load_all_from_path``) is in ggml.dll, the device functions
    (``ggml_backend_dev_name``) in ggml-base.dll.
    """

    def __init__(self, *libs: Any) -> None:
        self._libs = libs

    def __getattr__(self, name: str) -> Any:
        from nexabind._ffi import ffi

        for lib in self._libs:
            try:
                found = getattr(lib, name)
            except (AttributeError, ffi.error):  # cffi: "symbol ... not found in library"
                continue
            setattr(self, name, found)  # the next lookup is a plain attribute
            return found
        msg = f"none of the loaded ggml libraries exports {name}"
        raise AttributeError(msg)


def _open(libdir: Path) -> Handles:
    import ctypes

    from nexabind._ffi import ffi

    names = library_names()
    if sys.platform == "win32":
        # The folder joins the DLL search path of this process, so that llama.dll finds
        # ggml.dll, and ggml finds its backend modules, beside it (ctypes loads with
        # LOAD_LIBRARY_SEARCH_DEFAULT_DIRS, which leaves PATH out).
        os.add_dll_directory(str(libdir))  # type: ignore[attr-defined]
    # Load the ggml libraries first, globally, so libllama and the backend modules that
    # ggml_backend_load_all_from_path dlopens later resolve against these exact copies.
    mode = getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 0)
    for name in names[:-1]:
        ctypes.CDLL(str(libdir / name), mode=mode)
    lib = ffi.dlopen(str(libdir / names[-1]), ffi.RTLD_NOW | ffi.RTLD_GLOBAL)
    ggml = ffi.dlopen(str(libdir / names[1]), ffi.RTLD_NOW | ffi.RTLD_GLOBAL)
    base = ffi.dlopen(str(libdir / names[0]), ffi.RTLD_NOW | ffi.RTLD_GLOBAL)
    return Handles(lib, Modules(ggml, base), libdir)


def load(lib_path: str | os.PathLike[str] | None = None) -> Handles:
    """Load llama.cpp once per process and return its handles (nothing is called yet).

    :func:`nexabind.lowlevel.lib` is the one caller: it sets the library up (log routing,
    backend modules, init) before anything uses it.

    The ABI is checked against ``abi.json`` (next to ``lib/`` or in the folder itself) before
    the library is first used; a local build without ``abi.json`` loads with a warning.

    Args:
        lib_path: Library folder; see :func:`library_dir`. Once loaded, only the same folder
            (or None) is accepted.

    Returns:
        The cffi handles of ``libllama`` and ``libggml`` and the folder they came from.

    Raises:
        LibraryNotFoundError: Nothing to load, or the libraries failed to load.
        AbiMismatchError: The library's ABI differs from the declarations.
    """
    global _handles
    if _handles is not None:
        if lib_path is not None and Path(lib_path).expanduser().resolve() != _handles.libdir:
            msg = (
                f"llama.cpp is already loaded from {_handles.libdir} in this process; it "
                f"cannot also load {lib_path}: use a new process"
            )
            raise LibraryNotFoundError(msg)
        return _handles
    with _lock:
        if _handles is not None:
            return _handles
        libdir = library_dir(lib_path)
        abi_path = abi_file(libdir)
        if abi_path is None:
            log.warning("no abi.json next to %s: ABI not checked (local build?)", libdir)
        else:
            try:
                abi = json.loads(abi_path.read_text())
            except (OSError, ValueError) as e:
                msg = f"cannot read {abi_path}: {e}; reinstall with `nexabind fetch`"
                raise AbiMismatchError(msg) from e
            check_abi(abi, str(abi_path))
        try:
            _handles = _open(libdir)
        except OSError as e:
            msg = f"loading llama.cpp from {libdir} failed: {e}; run `nexabind fetch`"
            raise LibraryNotFoundError(msg) from e
        return _handles


def loaded_dir() -> Path | None:
    """Return the folder the library was loaded from, or None before :func:`load`."""
    return None if _handles is None else _handles.libdir


def backend_modules(libdir: Path) -> tuple[dict[str, Path], list[Path]]:
    """The ggml backend modules of a library folder: CPU variants by name, and the others
    (CUDA, Vulkan, RPC, ...). Empty in a build without ``GGML_BACKEND_DL``."""
    core = set(library_names())
    cpu: dict[str, Path] = {}
    others = []
    for path in sorted(libdir.iterdir()) if libdir.is_dir() else []:
        name = path.name
        if name in core or not name.startswith(("libggml-", "ggml-")):
            continue
        if not name.endswith((".so", ".dylib", ".dll")):
            continue  # versioned soname links (libggml-base.so.0) and the like
        variant = cpu_variant_of(name)
        if variant is not None:
            cpu[variant] = path
        else:
            others.append(path)
    return cpu, others


def cpu_variant_choice(libdir: Path) -> tuple[str | None, str]:
    """The CPU variant to load from ``libdir`` instead of ggml's best, and why.

    ``NEXABIND_CPU_VARIANT`` wins; else the variant the install recorded when ggml's own pick
    failed its decode check (``cpu_variant`` in the install record). ``(None, ...)``: let ggml
    pick.
    """
    given = settings.CPU_VARIANT.get()
    if given:
        return str(given), settings.CPU_VARIANT.env
    chosen = (read_record(libdir.parent) or {}).get("cpu_variant")
    if isinstance(chosen, str) and chosen:
        return chosen, f"the install record ({libdir.parent / INSTALL_RECORD})"
    return None, "ggml's best for this CPU"


def loaded_cpu_variant() -> str | None:
    """The ggml CPU variant this process has loaded (``haswell``, ``zen4``, ``cpu`` for a
    plain build), read from the mapped module files; None before loading, or off Linux."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    for line in maps.read_text().splitlines():
        variant = cpu_variant_of(line.rsplit("/", 1)[-1])
        if variant:
            return variant
    return None
