"""Seeded mutations of a GGUF model, each loaded and used in a child process."""

from __future__ import annotations

import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CHILD = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from nexabind import Llama
from nexabind.errors import NexabindError
try:
    with Llama(sys.argv[1], n_ctx=64, n_threads=1) as m:
        m.detokenize(m.tokenize("Hello world, h\u00e9llo \u4f60\u597d \U0001f642"))
        list(m.generate("Hello", max_tokens=4, temperature=0))
        m.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2)
    print("OK")
except NexabindError as e:
    print("REFUSED", type(e).__name__)
"""


def _mutate(data: bytes, seed: int) -> bytes:
    """Flip bits, set bytes or write 32-bit values at 1-4 places, mostly in the header."""
    rng = random.Random(seed)
    d = bytearray(data)
    # The metadata (vocabulary included) is the first ~0.7 MB of the test model; most
    # mutations land there, some anywhere.
    limit = len(d) if rng.random() < 0.2 else min(len(d), 740_000)
    kind = rng.choice(["flip", "byte", "int"])
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(8, limit - 4)
        if kind == "flip":
            d[at] ^= 1 << rng.randrange(8)
        elif kind == "byte":
            d[at] = rng.randrange(256)
        else:
            d[at : at + 4] = rng.randrange(2**32).to_bytes(4, "little")
    return bytes(d)


def _one(model: bytes, folder: Path, seed: int) -> tuple[int, str, str]:
    path = folder / f"m{seed}.gguf"
    path.write_bytes(_mutate(model, seed))
    try:
        r = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return seed, "hang", ""
    finally:
        path.unlink()
    if r.returncode < 0:
        tail = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:]
        return seed, "aborts", f"signal {-r.returncode}: {' '.join(tail)[-300:]}"
    if r.returncode != 0 or not r.stdout.strip():
        return seed, "other", r.stderr.strip()[-300:]
    return seed, "ok" if r.stdout.startswith("OK") else "refused", r.stdout.strip()


def fuzz(model: Path, folder: Path, n: int, workers: int = 2) -> tuple[dict[str, int], list[Any]]:
    """Run ``n`` mutations (seeds 0..n-1); return the counts per outcome and the failures.

    Outcomes: ``ok`` (loaded and ran), ``refused`` (a NexabindError), ``aborts`` (the child
    died by a signal: inside llama.cpp, since Python cannot), ``other`` (any other exception:
    a defect of nexabind), ``hang``.
    """
    data = model.read_bytes()
    with ThreadPoolExecutor(workers) as ex:
        results = list(ex.map(lambda s: _one(data, folder, s), range(n)))
    counts = dict.fromkeys(("ok", "refused", "aborts", "other", "hang"), 0)
    for _, outcome, _ in results:
        counts[outcome] += 1
    return counts, [r for r in results if r[1] not in ("ok", "refused")]
