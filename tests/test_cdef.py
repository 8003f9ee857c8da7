"""The generated declarations match the pinned llama.h, and drift is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from nexabind import _cdef

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "build_scripts" / "gen_cdef.py"


def gen_check(source: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(GEN), "--check", "--source", str(source)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_cdef_is_current(llama_source: Path) -> None:
    result = gen_check(llama_source)
    assert result.returncode == 0, result.stderr


def test_stale_cdef_is_detected(llama_source: Path, tmp_path: Path) -> None:
    shutil.copytree(llama_source / "include", tmp_path / "include")
    shutil.copytree(llama_source / "ggml" / "include", tmp_path / "ggml" / "include")
    header = tmp_path / "include" / "llama.h"
    text = header.read_text()
    anchor = "int32_t n_tokens;"
    assert anchor in text
    header.write_text(text.replace(anchor, anchor + "\n        int32_t n_extra;", 1))
    result = gen_check(tmp_path)
    assert result.returncode == 1
    assert "stale: nexabind/_cdef.py" in result.stderr
    assert "run: python build_scripts/gen_cdef.py" in result.stderr


def test_cdef_describes_the_structs_the_binding_uses() -> None:
    assert _cdef.LLAMA_COMMIT.startswith("0c1e570")
    assert "n_tokens" in _cdef.STRUCTS["llama_batch"]
    assert "n_ctx" in _cdef.STRUCTS["llama_context_params"]
    assert "LLAMA_VOCAB_TYPE_SPM" in _cdef.ENUMS["llama_vocab_type"]
    # ggml_tensor stays opaque: its array sizes are expressions cffi cannot parse.
    assert "ggml_tensor" not in _cdef.STRUCTS
    assert "struct ggml_tensor;" in _cdef.CDEF


def test_ffi_module_matches_the_cdef() -> None:
    from nexabind._ffi import ffi

    for struct, fields in _cdef.STRUCTS.items():
        ctype = ffi.typeof(f"struct {struct}")
        assert ffi.sizeof(ctype) > 0
        names = {name for name, _ in ctype.fields}
        assert set(fields) <= names, struct
