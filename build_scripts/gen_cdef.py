"""Generate nexabind's cffi declarations from the pinned llama.h.

    python build_scripts/gen_cdef.py [--source LLAMA_CPP_DIR] [--check]

Writes ``nexabind/_cdef.py`` (the declarations, plus the struct fields and enum constants that the
ABI probe and the loader compare) and ``nexabind/_ffi.py`` (cffi's out-of-line ABI module, so that
importing nexabind needs neither a compiler nor pycparser). ``--check`` regenerates in memory and
exits 1 when either file differs: the declarations are stale against the header.

How: the C compiler preprocesses llama.h against tiny stand-ins for the libc headers; pycparser
parses the result, whose line markers say which header each declaration came from. Every
declaration of llama.h is kept, plus the ggml declarations they need (transitively), plus a short
list of ggml functions the binding calls itself (backend loading and listing). Structs that llama.h
only points to and that the binding never looks into stay opaque. Integer ``#define`` constants of
llama.h are kept as cffi constants.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CDEF_PATH = ROOT / "nexabind" / "_cdef.py"
FFI_PATH = ROOT / "nexabind" / "_ffi.py"

# ggml functions the binding calls directly, beyond what llama.h's own declarations need.
GGML_FUNCTIONS = (
    "ggml_backend_load_all",
    "ggml_backend_load_all_from_path",
    "ggml_backend_load",
    "ggml_backend_reg_count",
    "ggml_backend_reg_get",
    "ggml_backend_reg_by_name",
    "ggml_backend_reg_name",
    "ggml_backend_reg_dev_count",
    "ggml_backend_reg_dev_get",
    "ggml_backend_reg_get_proc_address",
    "ggml_backend_dev_count",
    "ggml_backend_dev_get",
    "ggml_backend_dev_by_type",
    "ggml_backend_dev_name",
    "ggml_backend_dev_description",
    "ggml_backend_dev_type",
    "ggml_backend_dev_memory",
    "ggml_backend_dev_get_props",
    "ggml_backend_dev_backend_reg",
    "ggml_time_us",
    "ggml_type_name",
)

# Structs reached only through pointers whose layout the binding never reads: kept opaque, so
# that their internals (and the constant expressions in their array sizes) stay out of the cdef.
OPAQUE = ("ggml_tensor", "ggml_context", "ggml_cgraph", "ggml_backend_buffer")

# Stand-ins for the libc headers: enough for pycparser to parse, dropped from the output (cffi
# knows these types itself).
FAKE_LIBC = {
    "stddef.h": "typedef unsigned long size_t; typedef long ptrdiff_t;\n#define NULL 0\n",
    "stdint.h": "".join(
        f"typedef int {t}_t;\n"
        for t in (
            [
                "int8",
                "int16",
                "int32",
                "int64",
                "uint8",
                "uint16",
                "uint32",
                "uint64",
                "intptr",
                "uintptr",
            ]
        )
    ),
    "stdbool.h": "typedef _Bool bool;\n#define true 1\n#define false 0\n",
    "stdio.h": "typedef struct _FILE FILE;\n",
    "stdarg.h": "typedef char * va_list;\n",
    "stdlib.h": "",
    "string.h": "",
    "assert.h": "",
}

_DEFINE = re.compile(r"^\s*#define\s+(LLAMA_[A-Z0-9_]+)\s+(\S+)", re.M)


def header_commit(source: Path) -> str:
    """The llama.cpp commit the header belongs to, from nexabind's pin."""
    sys.path.insert(0, str(ROOT))
    try:
        from nexabind.pin import LLAMA_COMMIT
    except ImportError:  # the pin may not exist yet while bootstrapping
        LLAMA_COMMIT = "0c1e57098"
    return LLAMA_COMMIT


def preprocess(source: Path) -> str:
    """Preprocess llama.h with line markers, against the fake libc headers."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("gen_cdef: no C compiler found (set CC): it is needed to preprocess llama.h")
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in FAKE_LIBC.items():
            Path(tmp, name).write_text(text)
        cmd = [
            cc, "-E", "-nostdinc", "-std=c11", "-U__GNUC__", "-D__attribute__(x)=",
            "-D__declspec(x)=", "-D_Noreturn=", "-D__restrict__=", "-D__restrict=",
            f"-I{tmp}", f"-I{source / 'include'}", f"-I{source / 'ggml' / 'include'}",
            str(source / "include" / "llama.h"),
        ]  # fmt: skip
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def integer_defines(source: Path) -> dict[str, str]:
    """``#define LLAMA_X <integer>`` constants of llama.h, aliases resolved."""
    raw = dict(_DEFINE.findall((source / "include" / "llama.h").read_text()))
    out: dict[str, str] = {}
    for name, value in raw.items():
        while value in raw:
            value = raw[value]
        value = value.rstrip("uUlL")
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", value):
            out[name] = value
    return out


def generate(source: Path) -> tuple[str, str]:
    """Return the text of ``_cdef.py`` and ``_ffi.py`` for the header in ``source``."""
    from pycparser import c_ast, c_generator, c_parser

    text = preprocess(source)
    ast = c_parser.CParser().parse(text, filename="<llama.h>")
    gen = c_generator.CGenerator()

    def origin(node: c_ast.Node) -> str:
        return Path(node.coord.file).name if node.coord else ""

    # Index the ggml declarations by the names they define.
    defs: dict[str, list[c_ast.Node]] = {}
    for node in ast.ext:
        if origin(node) in FAKE_LIBC:
            continue
        for name in defined_names(node):
            defs.setdefault(name, []).append(node)

    wanted: list[c_ast.Node] = [n for n in ast.ext if origin(n) == "llama.h"]
    wanted += [defs[f][0] for f in GGML_FUNCTIONS]
    chosen: dict[int, c_ast.Node] = {}
    queue = list(wanted)
    while queue:
        node = queue.pop()
        if id(node) in chosen:
            continue
        chosen[id(node)] = node
        for ref in referenced_names(node):
            for dep in defs.get(ref, []):
                if origin(dep) != "llama.h" and ref not in {f"struct {o}" for o in OPAQUE}:
                    queue.append(dep)

    lines: list[str] = []
    structs: dict[str, tuple[str, ...]] = {}
    enums: dict[str, tuple[str, ...]] = {}
    declared_opaque: set[str] = set()
    seen: set[str] = set()
    for node in ast.ext:  # keep the header's order: definitions come before their uses
        if id(node) not in chosen:
            continue
        for tag in OPAQUE:
            if f"struct {tag}" in referenced_names(node) and tag not in declared_opaque:
                lines.append(f"struct {tag};")
                declared_opaque.add(tag)
        body = struct_or_enum(node)
        if isinstance(body, c_ast.Struct) and body.decls is not None and body.name in OPAQUE:
            continue
        if isinstance(body, c_ast.Struct) and body.decls is not None and body.name:
            structs[body.name] = field_names(body)
        if isinstance(body, c_ast.Enum) and body.values is not None and body.name:
            enums[body.name] = tuple(e.name for e in body.values.enumerators)
        decl = gen.visit(node) + ";"
        if decl not in seen:  # ggml headers repeat some typedefs; C allows that, cffi does not
            seen.add(decl)
            lines.append(decl)
    for name, value in integer_defines(source).items():
        lines.append(f"#define {name} {value}")
    cdef = "\n".join(lines) + "\n"
    return render_cdef(cdef, header_commit(source), structs, enums), render_ffi(cdef)


def struct_or_enum(node: object) -> object:
    """The struct or enum a top-level declaration defines, if any."""
    from pycparser import c_ast

    t = getattr(node, "type", None)
    while isinstance(t, c_ast.TypeDecl):
        t = t.type
    return t if isinstance(t, (c_ast.Struct, c_ast.Enum, c_ast.Union)) else None


def field_names(struct: object) -> tuple[str, ...]:
    """A struct's field names; members of an anonymous union are named directly, as in C."""
    names: list[str] = []
    for decl in struct.decls:  # type: ignore[attr-defined]
        if decl.name is not None:
            names.append(decl.name)
        else:
            names.extend(field_names(decl.type))
    return tuple(names)


def defined_names(node: object) -> list[str]:
    """Names a top-level declaration defines: typedef, function, struct/enum tag, enum consts."""
    from pycparser import c_ast

    names: list[str] = []
    if getattr(node, "name", None):
        names.append(node.name)  # type: ignore[attr-defined]
    body = struct_or_enum(node)
    if isinstance(body, c_ast.Struct) and body.name and body.decls is not None:
        names.append(f"struct {body.name}")
    if isinstance(body, c_ast.Enum) and body.name:
        names.append(f"enum {body.name}")
    return names


def referenced_names(node: object) -> set[str]:
    """Typedef names and struct/enum tags used by a declaration (not the ones it defines)."""
    from pycparser import c_ast

    found: set[str] = set()

    class Visitor(c_ast.NodeVisitor):
        def visit_IdentifierType(self, n: c_ast.IdentifierType) -> None:
            found.update(n.names)

        def visit_Struct(self, n: c_ast.Struct) -> None:
            if n.name:
                found.add(f"struct {n.name}")
            self.generic_visit(n)

        def visit_Enum(self, n: c_ast.Enum) -> None:
            if n.name:
                found.add(f"enum {n.name}")
            self.generic_visit(n)

    Visitor().visit(node)
    body = struct_or_enum(node)
    if body is not None and getattr(body, "name", None):
        kind = "struct" if isinstance(body, c_ast.Struct) else "enum"
        # A struct that refers to itself (linked lists) is not a dependency of itself.
        found.discard(f"{kind} {body.name}")
    return found


def render_cdef(
    cdef: str, commit: str, structs: dict[str, tuple[str, ...]], enums: dict[str, tuple[str, ...]]
) -> str:
    digest = hashlib.sha256(cdef.encode()).hexdigest()
    return (
        "# Generated by build_scripts/gen_cdef.py from llama.h of llama.cpp "
        f"{commit} - do not edit.\n"
        '"""cffi declarations of the llama.cpp C API (and the ggml parts it needs)."""\n\n'
        f"LLAMA_COMMIT = {commit!r}\n\n"
        f"CDEF_SHA256 = {digest!r}\n\n"
        f"STRUCTS: dict[str, tuple[str, ...]] = {structs!r}\n\n"
        f"ENUMS: dict[str, tuple[str, ...]] = {enums!r}\n\n"
        f'CDEF = r"""\n{cdef}"""\n'
    )


def render_ffi(cdef: str) -> str:
    import cffi

    builder = cffi.FFI()
    builder.cdef(cdef)
    builder.set_source("nexabind._ffi", None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "_ffi.py")
        with contextlib.redirect_stdout(io.StringIO()):  # cffi prints "generating ..."
            builder.emit_python_code(str(out))
        code = out.read_text()
    return "# Generated by build_scripts/gen_cdef.py - do not edit.\n" + code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="llama.cpp source tree (default: pinned)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the files are stale")
    args = parser.parse_args(argv)
    source = args.source
    if source is None:
        sys.path.insert(0, str(ROOT))
        from nexabind._source import ensure_source

        source = ensure_source()
    if not (source / "include" / "llama.h").is_file():
        sys.exit(f"gen_cdef: {source} has no include/llama.h: pass the llama.cpp source tree")
    cdef_text, ffi_text = generate(source)
    if args.check:
        stale = [
            str(path.relative_to(ROOT))
            for path, text in ((CDEF_PATH, cdef_text), (FFI_PATH, ffi_text))
            if not path.is_file() or path.read_text() != text
        ]
        if stale:
            print(
                f"stale: {', '.join(stale)} differ from what {source}/include/llama.h gives; "
                "run: python build_scripts/gen_cdef.py",
                file=sys.stderr,
            )
            return 1
        print("up to date")
        return 0
    CDEF_PATH.write_text(cdef_text)
    FFI_PATH.write_text(ffi_text)
    print(f"wrote {CDEF_PATH.relative_to(ROOT)} and {FFI_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
