"""``nexabind doctor``: load the library, report what it found, and generate a few tokens."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["diagnose"]


def diagnose(lib_path: str | None = None, n_tokens: int = 8) -> dict[str, Any]:
    """Load llama.cpp, describe it, and run a tiny random model end to end.

    Args:
        lib_path: Library folder (default: the usual resolution, see ``nexabind.loader``).
        n_tokens: Tokens to generate with the random model.

    Returns:
        A report: ``libdir``, ``llama_version``, ``system_info``, ``cpu_variant``,
        ``devices``, ``tokens``, ``tok_per_s``.

    Raises:
        NexabindError: Whatever step failed, with its message.
    """
    from nexabind import loader, lowlevel
    from nexabind.tinymodel import ModelSpec, write_random_model

    lowlevel.lib(lib_path)
    libdir = loader.loaded_dir()
    report: dict[str, Any] = {
        "libdir": str(libdir),
        "abi_checked": libdir is not None and loader.abi_file(libdir) is not None,
        "llama_version": lowlevel.version(),
        "system_info": lowlevel.system_info(),
        "devices": lowlevel.devices(),
    }
    report["cpu_variant"] = _cpu_variant()
    with tempfile.TemporaryDirectory(prefix="nexabind-doctor-") as tmp:
        path = Path(tmp) / "tiny.gguf"
        write_random_model(path, ModelSpec())
        with (
            lowlevel.Model(path) as model,
            lowlevel.Context(model, n_ctx=128) as ctx,
            lowlevel.SamplerChain().add_greedy() as sampler,
        ):
            prompt = model.tokenize("Hello")
            ctx.batch.set(prompt, 0)
            ctx.decode()
            out = []
            pos = len(prompt)
            t0 = time.perf_counter()
            for _ in range(n_tokens):
                tok = sampler.sample(ctx)
                out.append(tok)
                ctx.batch.set_one(tok, pos)
                pos += 1
                ctx.decode()
            dt = time.perf_counter() - t0
    report["tokens"] = out
    report["tok_per_s"] = round(n_tokens / dt, 1) if dt > 0 else None
    return report


def _cpu_variant() -> str | None:
    # ggml loads its chosen CPU backend module with dlopen; the mapped file names it.
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    for line in maps.read_text().splitlines():
        variant = _variant_of(line.rsplit("/", 1)[-1])
        if variant:
            return variant
    return None


# libggml-cpu-haswell.so, libggml-cpu-armv8.2_1.so (dots in the tag), or libggml-cpu.so.
_CPU_MODULE = re.compile(r"libggml-cpu(?:-([\w.]+?))?\.(?:so|dylib)")


def _variant_of(filename: str) -> str | None:
    """The CPU variant a ggml CPU module's file name says (``cpu`` for the plain one)."""
    m = _CPU_MODULE.fullmatch(filename)
    return (m.group(1) or "cpu") if m else None
