"""What a check process runs: load a library folder, decode quantized random models greedily.

``python -m nexabind._selfcheck decode LIBDIR WORKDIR DTYPE...`` loads ``LIBDIR`` (the CPU
variant that ``NEXABIND_CPU_VARIANT`` names, else the usual choice), writes each random model of
``DTYPE`` into ``WORKDIR`` once (later runs reuse it, so every variant decodes the same file),
decodes a 40-token prompt in one batch and 8 more tokens one at a time, and prints one JSON line:
``{"ok": true, "cpu_variant": ..., "results": {dtype: {"tokens": [...], "gaps": [...]}}}``.
``gaps`` is the margin of each greedy choice over the runner-up, so that a parent can tell a
real divergence between two variants from a near tie that summation order may flip.

``python -m nexabind._selfcheck scores LIBDIR`` prints ggml's own score of each CPU variant
module in the folder (0: this CPU cannot run it).

The parent side is :mod:`nexabind._variants`: a crash here takes only this process down.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from nexabind import loader, lowlevel
from nexabind.errors import NexabindError
from nexabind.tinymodel import ModelSpec, write_random_model

__all__ = ["N_GENERATE", "N_PROMPT", "decode_models", "main", "scores"]

#: Prompt tokens decoded in one batch: past 32, where ggml's batched matmul paths (REPACK's
#: gemm, AMX tiles) take over from the one-row kernels.
N_PROMPT = 40
#: Tokens generated one at a time after the prompt (the one-row kernels).
N_GENERATE = 8


def _decode(path: Path) -> dict[str, list[Any]]:
    import numpy as np

    with (
        lowlevel.Model(path) as model,
        lowlevel.Context(model, n_ctx=128, n_batch=64, n_threads=2) as ctx,
    ):
        n_vocab = model.n_vocab
        # Byte tokens of the built-in vocabulary (ids 3..258): no control tokens in the prompt.
        tokens = [3 + (i * 37) % 256 for i in range(N_PROMPT)]
        ctx.batch.set(tokens, 0)
        ctx.decode()
        out: list[int] = []
        gaps: list[float] = []
        pos = len(tokens)
        for _ in range(N_GENERATE):
            logits = np.asarray(ctx.logits(-1))[:n_vocab]
            top2 = np.argpartition(logits, -2)[-2:]
            best = int(top2[np.argmax(logits[top2])])
            gaps.append(float(abs(logits[top2[0]] - logits[top2[1]])))
            out.append(best)
            ctx.batch.set_one(best, pos)
            pos += 1
            ctx.decode()
    return {"tokens": out, "gaps": gaps}


def decode_models(workdir: Path, dtypes: list[str]) -> dict[str, Any]:
    """Decode the random model of each of ``dtypes`` (written into ``workdir`` once)."""
    results = {}
    for i, dtype in enumerate(dtypes):
        path = workdir / f"{dtype}.gguf"
        if not path.is_file():
            write_random_model(path, ModelSpec(dtype=dtype, seed=100 + i))
        results[dtype] = _decode(path)
    return {"cpu_variant": loader.loaded_cpu_variant(), "results": results}


def scores(libdir: Path) -> dict[str, int]:
    """ggml's score of each CPU variant module of ``libdir`` on this CPU (0: cannot run)."""
    import ctypes
    import os

    from nexabind.targets import library_names

    mode = getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 0)
    ctypes.CDLL(str(libdir / library_names()[0]), mode=mode)  # the modules need ggml-base
    found = {}
    for variant, path in loader.backend_modules(libdir)[0].items():
        score = getattr(ctypes.CDLL(str(path)), "ggml_backend_score", None)
        found[variant] = int(score()) if score is not None else 0
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def main(argv: list[str]) -> int:
    """See the module docstring; exit status 0 with a JSON line, 1 with ``{"error": ...}``."""
    try:
        if argv[:1] == ["scores"] and len(argv) == 2:
            print(json.dumps({"ok": True, "scores": scores(Path(argv[1]))}))
            return 0
        if argv[:1] == ["decode"] and len(argv) >= 4:
            lowlevel.lib(argv[1])
            report = decode_models(Path(argv[2]), argv[3:])
            print(json.dumps({"ok": True, **report}))
            return 0
    except (NexabindError, OSError, ValueError) as e:
        print(json.dumps({"ok": False, "error": str(e)}))
        return 1
    print(
        json.dumps(
            {
                "ok": False,
                "error": f"usage: decode LIBDIR WORKDIR DTYPE... | scores LIBDIR, got {argv}",
            }
        )
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
