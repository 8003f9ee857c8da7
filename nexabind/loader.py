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

from nexabind.errors import AbiMismatchError, LibraryNotFoundError

__all__ = [
    "LIBRARY_NAMES",
    "Handles",
    "Modules",
    "abi_file",
    "check_abi",
    "library_dir",
    "library_names",
    "load",
    "loaded_dir",
]

log = logging.getLogger("nexabind.loader")

_lock = threading.Lock()
_handles: Handles | None = None

#: The libraries of an artifact's ``lib/`` per os, in load order: ggml-base, ggml, llama.
LIBRARY_NAMES = {
    "windows": ("ggml-base.dll", "ggml.dll", "llama.dll"),
    "macos": ("libggml-base.dylib", "libggml.dylib", "libllama.dylib"),
    "linux": ("libggml-base.so", "libggml.so", "libllama.so"),
}


def library_names() -> tuple[str, ...]:
    """The libraries to load on this process's os, in order (read from ``sys.platform``)."""
    if sys.platform == "win32":
        return LIBRARY_NAMES["windows"]
    return LIBRARY_NAMES["macos" if sys.platform == "darwin" else "linux"]


def _cache_entry() -> Path:
    """The ``lib`` folder of the cache entry to load: see :func:`nexabind.cache.best_installed`."""
    from nexabind import cache, pin
    from nexabind.platform import target

    found = cache.best_installed(pin.RELEASE)
    if found is not None:
        return found.lib
    # Nothing installed: name the folder `nexabind fetch` installs by default, for the message.
    os_name, arch = target()
    variant = os.environ.get("NEXABIND_VARIANT") or "cpu"
    return cache.entry_dir(pin.RELEASE, f"{os_name}-{arch}-{variant}") / "lib"


def _candidates(lib_path: str | os.PathLike[str] | None) -> list[tuple[str, Path]]:
    if lib_path is not None:
        return [("explicit lib_path", Path(lib_path))]
    out = []
    env = os.environ.get("NEXABIND_LIB_PATH")
    if env:
        out.append(("NEXABIND_LIB_PATH", Path(env)))
    out.append(("cache entry for this release and platform", _cache_entry()))
    return out


def _missing(folder: Path) -> str | None:
    if not folder.is_dir():
        return "no such folder"
    absent = [n for n in library_names() if not (folder / n).exists()]
    return f"missing {', '.join(absent)}" if absent else None


def library_dir(lib_path: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the folder holding the llama.cpp libraries, without loading anything.

    Order: ``lib_path``, then ``NEXABIND_LIB_PATH``, then the cache entry of the pinned release
    for this platform.

    Args:
        lib_path: An explicit folder; when given, nothing else is tried.

    Returns:
        The absolute folder that holds ``libllama`` and its ggml libraries.

    Raises:
        LibraryNotFoundError: No candidate holds the libraries; lists every place tried and why.
    """
    tried = []
    for label, folder in _candidates(lib_path):
        folder = folder.expanduser().resolve()
        why = _missing(folder)
        if why is None:
            return folder
        tried.append(f"  {folder} ({label}): {why}")
    msg = (
        "no llama.cpp library found; tried:\n"
        + "\n".join(tried)
        + "\nrun `nexabind fetch` (or `nexabind build --install`), or set NEXABIND_LIB_PATH"
    )
    raise LibraryNotFoundError(msg)


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
