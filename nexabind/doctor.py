"""``nexabind doctor``: load llama.cpp, report what it found, and decode real weight types.

Every decode of a quantized model runs in a child first (:mod:`nexabind._variants`): a CPU
variant whose kernels crash takes the child down, not the doctor, and the best variant that
works is recorded in the install record so that the loader uses it from then on.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from nexabind import _variants
from nexabind._install_record import read_record, update_record
from nexabind.cache import library_dir

__all__ = ["DOCTOR_DTYPES", "check_all_variants", "diagnose"]

#: Weight types doctor decodes: f32, and the quantized families that AMX and REPACK take.
DOCTOR_DTYPES = ("f32", "q4_0", "q8_0")


def diagnose(lib_path: str | None = None, n_tokens: int = 8) -> dict[str, Any]:
    """Check the library's CPU variant on quantized models, then load it and generate.

    Args:
        lib_path: Library folder (default: the usual resolution, see ``nexabind.loader``).
        n_tokens: Tokens to generate with the random f32 model in this process.

    Returns:
        A report: ``libdir``, ``llama_version``, ``system_info``, ``cpu_variant``,
        ``cpu_variants_skipped`` (variant: why), ``decoded`` (weight type: greedy tokens, from
        the check child), ``devices``, ``tokens``, ``tok_per_s``.

    Raises:
        NexabindError: Whatever step failed, with its message (LibraryNotFoundError when no CPU
            variant decodes).
    """
    libdir = library_dir(lib_path)
    with tempfile.TemporaryDirectory(prefix="nexabind-doctor-") as tmp:
        first = _variants.run_check(libdir, Path(tmp), dtypes=DOCTOR_DTYPES)
        choice = _variants.choose(libdir, Path(tmp), first)
        if choice.variant is not None:
            fields = {"cpu_variant": choice.variant, "cpu_variants_skipped": choice.skipped}
            update_record(libdir.parent, fields)
            first = _variants.run_check(libdir, Path(tmp), choice.variant, DOCTOR_DTYPES)
        report = _load_and_generate(lib_path, Path(tmp), n_tokens)
    recorded = (read_record(libdir.parent) or {}).get("cpu_variants_skipped")
    report["cpu_variants_skipped"] = choice.skipped or recorded or {}
    report["decoded"] = {d: r["tokens"] for d, r in first.results.items()}
    return report


def _load_and_generate(lib_path: str | None, tmp: Path, n_tokens: int) -> dict[str, Any]:
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
        "cpu_variant": loader.loaded_cpu_variant(),
    }
    path = write_random_model(tmp / "tiny.gguf", ModelSpec())
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


def check_all_variants(
    lib_path: str | None = None, dtypes: tuple[str, ...] | None = None
) -> list[_variants.Row]:
    """Decode each weight type with every CPU variant this CPU can run, one child each, and
    compare the greedy tokens with the baseline variant's (see :func:`_variants.check_all`)."""
    from nexabind.tinymodel import DTYPES

    libdir = library_dir(lib_path)
    dtypes = dtypes or tuple(d for d in DTYPES if d != "f16")
    with tempfile.TemporaryDirectory(prefix="nexabind-doctor-") as tmp:
        return _variants.check_all(libdir, Path(tmp), dtypes)
