"""One contender of a benchmark, in its own process.

``python benchmarks/worker.py KIND CONFIG_JSON``. The worker loads its model once, prints
``{"ready": ...}``, then answers commands from stdin, one a line, with one JSON line each:
``RUN`` runs the measured call once (timed inside the process, so pipes and process start-up
are not counted) and ``QUIT`` prints the peak and current RSS and exits. The native program
(benchmarks/native/bench_native.c) speaks the same protocol, so the harness can interleave
nexabind, llama-cpp-python and C round by round.

One-shot kinds (``import-*``, ``load-*``, ``cycles-*``, ``pertoken``) print one JSON line and
exit.

KIND is one of:
    nexabind-generate, nexabind-completion, nexabind-stream   greedy decode (or prefill)
    lcpp-completion, lcpp-stream                              the same through llama-cpp-python
    nexabind-embed, lcpp-embed                                embeddings of a batch of texts
    import-nexabind, import-lcpp, import-none                 import time in a fresh interpreter
    load-nexabind, load-lcpp                                  first Llama(...) in a fresh one
    cycles-nexabind, cycles-lcpp                              RSS after N load/free cycles
    pertoken                                                  allocations and profile per token
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

perf = time.perf_counter


def rss_kib() -> int:
    """Resident set size of this process now, in KiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def peak_rss_kib() -> int:
    """Peak resident set size of this process, in KiB.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child started by a big
    parent would report the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def loaded_llama_paths() -> list[str]:
    """Every libllama mapped into this process (proves which library a binding runs on)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libllama" in line and "/" in line}
    return sorted(paths)


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- contenders ---------------------------------------------------------------------------


def open_nexabind(cfg: dict[str, Any], embedding: bool = False) -> Any:
    from nexabind import Llama

    return Llama(
        cfg["model"],
        n_ctx=cfg["n_ctx"],
        n_batch=cfg["n_batch"],
        n_threads=cfg["threads"],
        n_threads_batch=cfg["threads"],
        embedding=embedding,
        lib_path=cfg["libdir"],
    )


def import_lcpp(libdir: str) -> Any:
    """Import llama-cpp-python on ``libdir``'s library and load that folder's ggml backends.

    llama-cpp-python loads ``$LLAMA_CPP_LIB_PATH/libllama.so`` at import. Our CPU build keeps
    its backends in modules (GGML_BACKEND_DL), which llama-cpp-python does not load itself, so
    the worker calls ggml_backend_load_all_from_path on the same folder, as nexabind does.
    """
    import ctypes

    if "llama_cpp" in sys.modules:
        return sys.modules["llama_cpp"]
    os.environ["LLAMA_CPP_LIB_PATH"] = libdir
    import llama_cpp

    ggml = ctypes.CDLL(str(Path(libdir) / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path(libdir.encode())
    return llama_cpp


def open_lcpp(cfg: dict[str, Any], embedding: bool = False) -> Any:
    llama_cpp = import_lcpp(cfg["libdir"])
    return llama_cpp.Llama(
        cfg["model"],
        n_ctx=cfg["n_ctx"],
        n_batch=cfg["n_batch"],
        n_ubatch=cfg["n_batch"],
        n_threads=cfg["threads"],
        n_threads_batch=cfg["threads"],
        embedding=embedding,
        # nexabind and the C program leave flash attention to llama.cpp ("auto"), which turns
        # it on for the CPU; llama-cpp-python's default would turn it off and change the math.
        flash_attn=True,
        verbose=False,
    )


def decode_runner(kind: str, cfg: dict[str, Any]) -> tuple[Any, Any]:
    """Return (the Llama, a function running one measured greedy call and returning a dict)."""
    prompt = cfg["prompt"]
    n_gen = cfg["n_gen"]
    greedy = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}

    if kind.startswith("nexabind"):
        llm = open_nexabind(cfg)
        gen_opts = {k: v for k, v in greedy.items()}
        if kind == "nexabind-generate":

            def call() -> dict[str, Any]:
                ids = [t.id for t in llm.generate(prompt, max_tokens=n_gen, **gen_opts)]
                return {"n_gen": len(ids), "tokens": ids}

        elif kind == "nexabind-completion":

            def call() -> dict[str, Any]:
                out = llm.create_completion(prompt, max_tokens=n_gen, **greedy)
                return {
                    "n_gen": out["usage"]["completion_tokens"],
                    "text": out["choices"][0]["text"],
                }

        else:

            def call() -> dict[str, Any]:
                parts = [
                    c["choices"][0]["text"]
                    for c in llm.create_completion(prompt, max_tokens=n_gen, stream=True, **greedy)
                ]
                return {"n_gen": llm.n_completion_tokens, "text": "".join(parts)}

        return llm, call

    llm = open_lcpp(cfg)
    if kind == "lcpp-completion":

        def call() -> dict[str, Any]:
            out = llm.create_completion(prompt, max_tokens=n_gen, **greedy)
            return {"n_gen": out["usage"]["completion_tokens"], "text": out["choices"][0]["text"]}

    else:

        def call() -> dict[str, Any]:
            parts = [
                c["choices"][0]["text"]
                for c in llm.create_completion(prompt, max_tokens=n_gen, stream=True, **greedy)
            ]
            # The stream has no usage: every generated token but the last was decoded.
            return {"n_gen": llm.n_tokens - len(prompt) + 1, "text": "".join(parts)}

    return llm, call


def embed_runner(kind: str, cfg: dict[str, Any]) -> tuple[Any, Any]:
    texts = cfg["texts"]
    # The same call for both: lists of floats, llama-cpp-python's result (and nexabind's
    # default; embed(..., as_array=True) would skip building the lists).
    if kind == "nexabind-embed":
        llm = open_nexabind(cfg, embedding=True)
    else:
        llm = open_lcpp(cfg, embedding=True)

    def call() -> dict[str, Any]:
        out = llm.embed(texts)
        return {"n": len(out), "dim": len(out[0])}

    return llm, call


def serve(llm: Any, call: Any) -> None:
    """Answer RUN / QUIT commands until QUIT or end of input."""
    emit({"ready": True, "libllama": loaded_llama_paths()})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "QUIT":
            break
        if cmd != "RUN":
            continue
        llm.reset()
        c0, t0 = time.process_time(), perf()
        res = call()
        res["seconds"] = perf() - t0
        res["cpu_s"] = time.process_time() - c0
        emit(res)
    emit({"peak_rss_kib": peak_rss_kib(), "rss_kib": rss_kib()})
    llm.close()


# -- one-shot kinds -----------------------------------------------------------------------


def one_shot(kind: str, cfg: dict[str, Any]) -> dict[str, Any]:
    if kind == "import-none":
        return {"seconds": 0.0}
    if kind == "import-nexabind":
        t0 = perf()
        import nexabind  # noqa: F401

        return {"seconds": perf() - t0}
    if kind == "import-lcpp":
        t0 = perf()
        import_lcpp(cfg["libdir"])
        return {"seconds": perf() - t0}
    if kind in ("load-nexabind", "load-lcpp"):
        # Import first (timed apart), then the first Llama(...): the library, its backends,
        # the model and a context.
        t0 = perf()
        if kind == "load-nexabind":
            import nexabind  # noqa: F401

            t1 = perf()
            llm = open_nexabind(cfg)
        else:
            import_lcpp(cfg["libdir"])
            t1 = perf()
            llm = open_lcpp(cfg)
        t2 = perf()
        llm.close()
        return {"import_s": t1 - t0, "seconds": t2 - t1}
    if kind in ("cycles-nexabind", "cycles-lcpp"):
        opener = open_nexabind if kind == "cycles-nexabind" else open_lcpp
        rss_10 = 0
        for i in range(cfg["cycles"]):
            opener(cfg).close()
            if i == 9:
                rss_10 = rss_kib()
        return {"cycles": cfg["cycles"], "rss_after_10_kib": rss_10, "rss_kib": rss_kib()}
    if kind == "pertoken":
        return pertoken(cfg)
    msg = f"unknown worker kind {kind!r}; see the module docstring"
    raise SystemExit(msg)


def pertoken(cfg: dict[str, Any]) -> dict[str, Any]:
    """Bytes kept and allocated per token by ``Llama.generate``, and where the time goes.

    tracemalloc sees every allocation made through Python's allocators. Between token
    ``warm`` and the last token the loop should keep nothing (``kept_bytes_per_token``) and
    its peak should not rise above one token's temporaries (``peak_growth_bytes``). The
    cProfile run gives the Python functions the loop spends its time in.
    """
    import cProfile
    import io
    import pstats
    import tracemalloc

    llm = open_nexabind(cfg)
    prompt, n_gen, warm = cfg["prompt"], cfg["n_gen"], cfg["warm"]
    greedy = {"temperature": 0.0, "top_k": 1}
    for _ in llm.generate(prompt, max_tokens=n_gen, **greedy):  # warm caches and free lists
        pass
    llm.reset()
    it = llm.generate(prompt, max_tokens=n_gen, **greedy)
    for _ in range(warm):
        next(it)
    tracemalloc.start(8)
    before = tracemalloc.take_snapshot()
    tracemalloc.reset_peak()
    # Both readings are taken inside the loop, a few tokens apart from tracemalloc's own
    # snapshot and before the generator ends (its finish reason and counters are set once
    # per call): the difference is what the loop keeps per token.
    n, first, last = 0, 10, n_gen - warm - 1
    cur0 = cur1 = peak = 0
    for _ in it:
        n += 1
        if n == first:
            cur0, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
        elif n == last:
            cur1, peak = tracemalloc.get_traced_memory()
            after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    top = [
        # traceback[-1] is the frame that allocated (frames run from the oldest).
        {"where": str(s.traceback[-1]), "size_diff": s.size_diff, "count_diff": s.count_diff}
        for s in after.compare_to(before, "traceback")[:8]
        if s.size_diff
    ]
    llm.reset()
    split = time_split(llm, prompt, n_gen, greedy)
    llm.reset()
    prof = cProfile.Profile()
    prof.enable()
    for _ in llm.generate(prompt, max_tokens=n_gen, **greedy):
        pass
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    llm.close()
    return {
        "n_measured": n,
        "n_window": last - first,
        "kept_bytes_per_token": (cur1 - cur0) / (last - first),
        "kept_bytes": cur1 - cur0,
        "peak_growth_bytes": peak - cur0,
        "top_growth": top,
        "profile": buf.getvalue(),
        **split,
    }


def time_split(llm: Any, prompt: list[int], n_gen: int, opts: dict[str, Any]) -> dict[str, Any]:
    """Per-token time of ``Llama.generate`` inside and outside llama.cpp's decode and sampling.

    The loop's ``sample`` and ``feed`` steps (``Context.token_steps``) are wrapped with a
    timer, so the rest is the time the loop spends in Python; the timer's own cost is measured
    and taken out. Every round trip through the iterator is included.
    """
    from nexabind import lowlevel

    orig = lowlevel.Context.token_steps
    acc = [0.0, 0.0]

    def token_steps(self: Any, sampler: Any) -> Any:
        steps = orig(self, sampler)
        sample_c, feed_c = steps.sample, steps.feed

        def sample() -> int:
            t0 = perf()
            tok = sample_c()
            acc[0] += perf() - t0
            return tok

        def feed(tok: int, pos: int) -> None:
            t0 = perf()
            feed_c(tok, pos)
            acc[1] += perf() - t0

        return steps._replace(sample=sample, feed=feed)

    # The timer's cost: two perf_counter calls and a float addition, per wrapped call.
    t0 = perf()
    for _ in range(10000):
        t1 = perf()
        acc[0] += perf() - t1
    timer = (perf() - t0) / 10000
    acc[0] = 0.0
    lowlevel.Context.token_steps = token_steps
    try:
        it = llm.generate(prompt, max_tokens=n_gen, **opts)
        next(it)  # the prompt's decode and the first token are not per-token work
        acc[0] = acc[1] = 0.0
        t0 = perf()
        n = sum(1 for _ in it)
        total = perf() - t0
    finally:
        lowlevel.Context.token_steps = orig
    outside = total - acc[0] - acc[1] - 2 * n * timer
    return {
        "split_n": n,
        "us_per_token": total / n * 1e6,
        "us_in_decode": acc[1] / n * 1e6,
        "us_in_sample": acc[0] / n * 1e6,
        "us_outside": outside / n * 1e6,
    }


def main(argv: list[str]) -> int:
    kind, cfg = argv[1], json.loads(argv[2])
    if kind.endswith("-embed"):
        serve(*embed_runner(kind, cfg))
    elif kind in ("nexabind-generate", "nexabind-completion", "nexabind-stream") or kind in (
        "lcpp-completion",
        "lcpp-stream",
    ):
        serve(*decode_runner(kind, cfg))
    else:
        emit(one_shot(kind, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
