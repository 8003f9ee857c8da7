"""Which ggml CPU variant of a library folder really works here: each one checked in a child.

ggml picks the CPU variant with the highest score for this CPU, and a variant whose kernels
fault (SIGILL in the AMX kernels of an unpatched ``sapphirerapids`` build, say) takes the whole
process down on the first quantized matmul. So every check runs in a child process
(``python -m nexabind._selfcheck``) that decodes quantized random models, and a crash is a
sentence naming the variant and the signal:

- :func:`choose` (install, doctor): ggml's own pick if it decodes, else the best variant that
  does, with why each better one was skipped;
- :func:`check_all` (``doctor --all-variants``): every variant this CPU can run, each compared
  token by token with the baseline variant ``x64``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nexabind import settings
from nexabind.errors import LibraryNotFoundError

__all__ = ["BASELINE", "CHECK_DTYPES", "Check", "Choice", "Row", "check_all", "choose",
           "compare", "died", "json_lines", "run_check", "scores"]  # fmt: skip

#: The variant every other is compared with: plain x86-64 (SSE2), no SIMD extension at all.
BASELINE = "x64"
#: Weight types the install and doctor decode: the families that AMX and REPACK take.
CHECK_DTYPES = ("q4_0", "q8_0")
#: A greedy choice whose margin over the runner-up is below this may flip between variants
#: (their float summation orders differ); a divergence there is a near tie, not a fault.
NEAR_TIE = 1e-3
_TIMEOUT = 300.0


def died(code: int) -> str:
    """How a child ended, in words: ``died of SIGILL (Illegal instruction)``, ``exit status 3``."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        sig = signal.Signals(-code)
    except ValueError:
        return f"died of signal {-code}"
    return f"died of {sig.name} ({signal.strsignal(sig) or sig.name})"


def json_lines(out: str) -> list[dict[str, Any]]:
    """The JSON objects a check child printed, one a line (anything else is skipped)."""
    found = []
    for line in out.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            found.append(obj)
    return found


@dataclass
class Check:
    """What one child reported: the variant asked for (None: the usual choice), the one it
    loaded, its decode results per weight type, or the error that ended it."""

    variant: str | None
    loaded: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _child(args: list[str], variant: str | None, timeout: float) -> tuple[int, dict[str, Any]]:
    """Run ``python -m nexabind._selfcheck ARGS`` with ``variant`` (None: the loader's usual
    choice in this environment)."""
    env = dict(os.environ)
    if variant is not None:
        env[settings.CPU_VARIANT.env] = variant
    cmd = [sys.executable, "-m", "nexabind._selfcheck", *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 1, {"error": f"did not finish in {timeout:.0f} s"}
    lines = json_lines(r.stdout)
    report = lines[-1] if lines else {}
    if r.returncode < 0:  # a signal says it all; stderr holds only the log before it
        report["error"] = died(r.returncode)
    elif r.returncode != 0 and "error" not in report:
        report["error"] = f"{died(r.returncode)}: {r.stderr.strip()[-300:]}".rstrip(": ")
    return r.returncode, report


def scores(libdir: Path, timeout: float = _TIMEOUT) -> dict[str, int]:
    """ggml's own score of each CPU variant of ``libdir`` on this CPU, best first (0: this CPU
    lacks its instructions); checked in a child."""
    code, report = _child(["scores", str(libdir)], None, timeout)
    if code != 0:
        msg = f"scoring the CPU variants of {libdir} failed: {report['error']}"
        raise LibraryNotFoundError(msg)
    return {str(k): int(v) for k, v in report.get("scores", {}).items()}


def run_check(
    libdir: Path,
    workdir: Path,
    variant: str | None = None,
    dtypes: tuple[str, ...] = CHECK_DTYPES,
    timeout: float = _TIMEOUT,
) -> Check:
    """Decode the random models of ``dtypes`` with ``variant`` of ``libdir`` in a child.

    ``workdir`` keeps the models between checks, so every variant decodes the same files.
    """
    args = ["decode", str(libdir), str(workdir), *dtypes]
    code, report = _child(args, variant, timeout)
    if code != 0:
        return Check(variant, error=str(report["error"]))
    return Check(variant, report.get("cpu_variant"), report.get("results", {}))


@dataclass
class Choice:
    """The outcome of :func:`choose`: the variant to record (None: ggml's pick works), the one
    that decoded, and why each better one was skipped."""

    variant: str | None
    loaded: str | None
    skipped: dict[str, str] = field(default_factory=dict)


def choose(libdir: Path, workdir: Path, first: Check | None = None) -> Choice:
    """The best CPU variant of ``libdir`` that decodes quantized models here.

    Args:
        libdir: The library folder.
        workdir: Where the check models are written (and kept).
        first: The check of ggml's own pick, when the caller ran it already.

    Raises:
        LibraryNotFoundError: No variant decodes; the message lists why each failed.
    """
    first = first or run_check(libdir, workdir)
    if first.ok:
        return Choice(None, first.loaded)
    forced = settings.CPU_VARIANT.get()
    if forced:
        msg = (
            f"CPU variant {forced} (from {settings.CPU_VARIANT.env}) {first.error} while decoding "
            f"quantized models; unset {settings.CPU_VARIANT.env} to let nexabind choose"
        )
        raise LibraryNotFoundError(msg)
    ranked = [v for v, s in scores(libdir).items() if s > 0]
    skipped: dict[str, str] = {}
    for i, variant in enumerate(ranked):
        # ggml's pick is the best-scoring variant: the first check was that one.
        check = first if i == 0 else run_check(libdir, workdir, variant)
        if check.ok:
            return Choice(variant, check.loaded or variant, skipped)
        skipped[variant] = str(check.error)
    lines = "\n  ".join(f"{v}: {why}" for v, why in skipped.items()) or first.error
    msg = f"no CPU variant of {libdir} decodes a quantized model on this machine:\n  {lines}"
    raise LibraryNotFoundError(msg)


def compare(base: dict[str, Any], other: dict[str, Any]) -> str:
    """One variant's greedy tokens against the baseline's, in words: ``agrees``, ``near tie at
    token k`` (the baseline's margin there was under :data:`NEAR_TIE`), or ``diverges at token
    k (margin m)``."""
    for k, (a, b) in enumerate(zip(base["tokens"], other["tokens"], strict=False)):
        if a != b:
            margin = base["gaps"][k]
            if margin < NEAR_TIE:
                return f"near tie at token {k} (margin {margin:.2g})"
            return f"diverges at token {k} (margin {margin:.3g})"
    return "agrees"


@dataclass
class Row:
    """One line of :func:`check_all`'s table."""

    variant: str
    score: int
    verdicts: dict[str, str]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(
            not v.startswith("diverges") for v in self.verdicts.values()
        )


def check_all(libdir: Path, workdir: Path, dtypes: tuple[str, ...]) -> list[Row]:
    """Every CPU variant of ``libdir`` this CPU can run, each decoding ``dtypes`` in a child of
    its own, compared with :data:`BASELINE` (the first row)."""
    ranked = {v: s for v, s in scores(libdir).items() if s > 0}
    if BASELINE not in ranked:
        msg = f"{libdir} has no {BASELINE} CPU variant to compare with (variants: {sorted(ranked)})"
        raise LibraryNotFoundError(msg)
    base = run_check(libdir, workdir, BASELINE, dtypes)
    if not base.ok:
        return [Row(BASELINE, ranked[BASELINE], {}, base.error)]
    rows = [Row(BASELINE, ranked[BASELINE], dict.fromkeys(dtypes, "baseline"))]
    for variant, score in sorted(ranked.items(), key=lambda kv: kv[1]):
        if variant == BASELINE:
            continue
        check = run_check(libdir, workdir, variant, dtypes)
        if not check.ok:
            rows.append(Row(variant, score, {}, check.error))
            continue
        verdicts = {d: compare(base.results[d], check.results[d]) for d in dtypes}
        rows.append(Row(variant, score, verdicts))
    return rows
