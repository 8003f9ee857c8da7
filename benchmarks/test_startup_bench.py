"""Import and first load, each in a fresh interpreter (or a fresh native process).

``import nexabind`` loads no library (it is loaded on first use); ``import llama_cpp`` loads
libllama at import, so its import time holds what nexabind spends in its first ``Llama(...)``.
The first ``Llama(...)`` is timed after the import: loading the library and its backends
(nexabind), the model and a context. The native program times main() to a ready context.
"""

from __future__ import annotations

from typing import Any

import harness

NATIVE = "native C (main to ready context)"


def test_import_and_first_load(benchmark: Any, rows: Any, bench: Any) -> None:
    cfg = bench.cfg("tiny")
    argvs = {
        "native": bench.native("startup", "tiny", 0),
        "nexabind": bench.worker("load-nexabind", cfg),
    }
    if bench.lcpp_missing is None:
        argvs["lcpp"] = bench.worker("load-lcpp", cfg)
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in argvs}
    for argv in argvs.values():  # warm the page cache
        bench.one_shot(argv)

    def one_round() -> None:
        for name, argv in argvs.items():
            results[name].append(bench.one_shot(argv))

    benchmark.pedantic(one_round, rounds=harness.rounds(10), iterations=1)

    imp = harness.median(results["nexabind"], "import_s")
    load = harness.median(results["nexabind"])
    native = harness.median(results["native"])
    first = "first Llama(tiny model)"
    rows("startup", "import in a fresh interpreter", "import nexabind", imp * 1e3, "ms")
    rows("startup", first, NATIVE, native * 1e3, "ms")
    rows(
        "startup",
        first,
        "nexabind Llama(...)",
        load * 1e3,
        "ms",
        baseline=NATIVE,
        ratio=native / load,
        note="loads the library and its backends, then the model",
    )
    if bench.lcpp_missing is not None:
        rows("startup", "import", "llama-cpp-python", 0, "-", note=bench.lcpp_missing)
        return
    l_imp = harness.median(results["lcpp"], "import_s")
    l_load = harness.median(results["lcpp"])
    rows(
        "startup",
        "import in a fresh interpreter",
        "import llama_cpp",
        l_imp * 1e3,
        "ms",
        baseline="import nexabind",
        ratio=imp / l_imp,
        note="loads libllama and its backends at import",
    )
    both = "import + first Llama(tiny model)"
    rows("startup", both, "llama-cpp-python", (l_imp + l_load) * 1e3, "ms")
    rows(
        "startup",
        both,
        "nexabind",
        (imp + load) * 1e3,
        "ms",
        baseline="llama-cpp-python",
        ratio=(l_imp + l_load) / (imp + load),
    )
