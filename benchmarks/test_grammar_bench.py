"""Structured output: the per-token cost of a JSON-schema constraint, and compiling a schema.

Per token: the same one-token-at-a-time loop (``Context.token_steps``, as ``Llama.generate``
runs it) with temperature sampling, unconstrained and under a JSON schema, on the ~100 MB
random model and on Gemma 3 270M (a 262,144-token vocabulary). The constrained contenders are
nexabind's llguidance matcher (the drawn token checked, the logits masked only when it is
refused), the same matcher masking every token, and llama.cpp's grammar sampler in the chain
fed the GBNF that llama-cpp-python's converter makes of the schema; llama-cpp-python's own
``create_completion`` with and without that grammar runs in the same rounds. The unconstrained
loop generates as many tokens as the constrained one did, and time per generated token (the
prompt's decode left out) is compared: goal, the constraint costs at most 10% per token.

Compiling: a 50-property schema to a grammar and a matcher (the vocabulary already read), goal
under 50 ms; reading a vocabulary once per model; llama-cpp-python's converter plus llama.cpp's
grammar parser for the same schema.

This file is also the worker of its contenders: ``python benchmarks/test_grammar_bench.py KIND
CONFIG_JSON`` speaks benchmarks/worker.py's RUN / QUIT protocol.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import harness
import pytest

GOAL_COST = 1 / 1.10  # constrained tokens/s over unconstrained: at most 10% slower
GOAL_COMPILE_MS = 50.0
ROUNDS = {"100mb": 5, "gemma": 5}
PROMPT = "Here is a list of four people as JSON:\n"
SEED = 7
S = {"type": "string", "maxLength": 24}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 4,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "name": S,
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "city": S,
                    "tags": {"type": "array", "items": {**S, "maxLength": 12}, "maxItems": 3},
                    "active": {"type": "boolean"},
                },
                "required": ["name", "age", "city", "tags", "active"],
            },
        }
    },
    "required": ["people"],
}
NAMES = {
    "loop-plain": "nexabind loop, unconstrained",
    "loop-json": "nexabind loop, json_schema (llguidance: check, mask on refusal)",
    "loop-json-mask": "nexabind loop, json_schema (llguidance: mask every token)",
    "loop-gbnf": "nexabind loop, GBNF of the schema (llama.cpp grammar sampler)",
    "lcpp-plain": "llama-cpp-python create_completion, unconstrained",
    "lcpp-json": "llama-cpp-python create_completion(grammar=from_json_schema)",
}


def schema_50() -> dict[str, Any]:
    """A 50-property object schema of mixed types, half of them required."""
    kinds: list[dict[str, Any]] = [
        {"type": "string", "maxLength": 40},
        {"type": "integer", "minimum": 0, "maximum": 10_000},
        {"type": "number", "minimum": -1, "maximum": 1},
        {"type": "boolean"},
        {"enum": ["low", "medium", "high"]},
        {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        {"type": "string", "format": "date"},
        {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}},
        {"type": ["string", "null"]},
        {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
    ]
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(50)}
    return {"type": "object", "properties": props, "required": list(props)[::2]}


@functools.cache
def _lcpp_grammar_module() -> Any:
    """llama-cpp-python's llama_grammar.py, loaded without its package (which loads a library)."""
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "llama_grammar.py"
    mod_spec = importlib.util.spec_from_file_location("_lcpp_llama_grammar", path)
    assert mod_spec is not None and mod_spec.loader is not None
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def lcpp_gbnf(schema: dict[str, Any]) -> str:
    """The GBNF llama-cpp-python's converter makes of ``schema``."""
    return _lcpp_grammar_module().json_schema_to_gbnf(json.dumps(schema))


# -- the contenders, in worker processes -----------------------------------------------------


class _Loop:
    """nexabind's token loop on the low-level API, with or without a grammar."""

    def __init__(self, kind: str, cfg: dict[str, Any]) -> None:
        from nexabind import lowlevel
        from nexabind.grammar import LlamaGrammar

        lowlevel.lib(cfg["libdir"])
        self.kind, self.cfg = kind, cfg
        self.model = lowlevel.Model(cfg["model"])
        t = cfg["threads"]
        self.ctx = lowlevel.Context(
            self.model, n_ctx=cfg["n_ctx"], n_batch=cfg["n_batch"], n_threads=t, n_threads_batch=t
        )
        self.grammar = None
        if kind.startswith("loop-json"):
            self.grammar = LlamaGrammar.from_json_schema(cfg["schema"])
            self.grammar.matcher(self.model)  # reads the vocabulary once, before any round

    def reset(self) -> None:
        self.ctx.clear()

    def close(self) -> None:
        self.ctx.close()
        self.model.close()

    def __call__(self) -> dict[str, Any]:
        from nexabind.sampling import SamplingOptions, build_sampler

        ctx, cfg, prompt = self.ctx, self.cfg, self.cfg["prompt"]
        ctx.batch.set(prompt, 0)
        ctx.decode()
        opts = SamplingOptions(temperature=0.8, seed=cfg["seed"], grammar=cfg.get("gbnf"))
        with build_sampler(self.model, opts, ctx.n_ctx) as chain:
            steps = ctx.token_steps(chain)
            draws = [0]
            draw = steps.sample

            def counted() -> int:
                draws[0] += 1
                return draw()

            sample = counted
            if self.grammar is not None:
                matcher = self.grammar.matcher(self.model)
                sample = matcher.constrain(ctx, counted, reject_first=self.kind == "loop-json")
            sampling = 0.0  # CPU time in sample(): what a constraint adds, apart from decode noise
            cpu = time.process_time
            stop_at_eog = self.kind != "loop-plain"  # the unconstrained loop makes n_gen tokens
            n, pos, out = 0, len(prompt), []
            c0, t0 = time.process_time(), time.perf_counter()
            while n < cfg["n_gen"]:
                c = cpu()
                tok = sample()
                sampling += cpu() - c
                if stop_at_eog and steps.is_eog(tok):
                    break
                out.append(tok)
                n += 1
                steps.feed(tok, pos)
                pos += 1
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        text = self.model.detokenize(out)
        return {"n_gen": n, "s_per_token": dt / n, "cpu_per_token": dc / n, "draws": draws[0],
                "sample_cpu_per_token": sampling / n, "text": text}  # fmt: skip


def lcpp_runner(kind: str, cfg: dict[str, Any]) -> tuple[Any, Any]:
    import worker

    llm = worker.open_lcpp(cfg)
    llama_cpp = sys.modules["llama_cpp"]
    grammar = None
    if kind == "lcpp-json":
        grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(cfg["schema"]), verbose=False)

    def call() -> dict[str, Any]:
        # The prompt is decoded first and not timed; create_completion then finds it in the
        # cache and decodes only its last token again. Not streamed: on the random models'
        # stray bytes, llama-cpp-python's stream re-detokenizes its whole output per token.
        llm.eval(cfg["prompt"])
        c0, t0 = time.process_time(), time.perf_counter()
        out = llm.create_completion(
            cfg["prompt"], max_tokens=cfg["n_gen"], temperature=0.8, seed=cfg["seed"],
            grammar=grammar,
        )  # fmt: skip
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        n = out["usage"]["completion_tokens"]
        return {"n_gen": n, "s_per_token": dt / n, "cpu_per_token": dc / n,
                "text": out["choices"][0]["text"]}  # fmt: skip

    return llm, call


def main(argv: list[str]) -> int:
    import worker

    kind, cfg = argv[1], json.loads(argv[2])
    if kind.startswith("loop-"):
        loop = _Loop(kind, cfg)
        worker.serve(loop, loop)
    else:
        worker.serve(*lcpp_runner(kind, cfg))
    return 0


# -- the suites --------------------------------------------------------------------------------


def _spawn(bench: Any, kind: str, cfg: dict[str, Any]) -> harness.Worker:
    argv = [sys.executable, str(Path(__file__).resolve()), kind, json.dumps(cfg)]
    return bench.spawn(kind, argv)


@pytest.mark.parametrize("model_name", ["100mb", "gemma"])
def test_json_schema_per_token(benchmark: Any, rows: Any, bench: Any, model_name: str) -> None:
    section = "structured output: time per token"
    if model_name == "gemma":
        path, why = harness.gemma_path()
        if path is None:
            rows(section, "Gemma 3 270M", "all", 0, "-", note=why)
            return
        model = path
    else:
        model = bench.models[model_name]
    prompt = harness.tokenize(PROMPT, model, bench.libdir)
    cfg = {**bench.cfg("tiny"), "model": str(model), "prompt": prompt, "seed": SEED,
           "schema": SCHEMA, "n_gen": 1000}  # fmt: skip
    # The constrained run decides the length; every other contender makes as many tokens.
    first = _spawn(bench, "loop-json", cfg)
    probe = first.run()
    n = probe["n_gen"]
    assert n < cfg["n_gen"], f"the bounded schema did not end: {probe['text'][:200]!r}"
    json.loads(probe["text"])
    plain = {**cfg, "n_gen": n}
    cfg["n_gen"] = n + 1  # room for the end token: a constrained loop stops at it
    workers = [first, _spawn(bench, "loop-plain", plain), _spawn(bench, "loop-json-mask", cfg)]
    notes: dict[str, str] = {}
    if bench.lcpp_missing is None:
        workers.append(_spawn(bench, "loop-gbnf", {**cfg, "gbnf": lcpp_gbnf(SCHEMA)}))
        workers += [_spawn(bench, "lcpp-plain", plain), _spawn(bench, "lcpp-json", cfg)]
    inter = harness.Interleaved(workers)
    benchmark.pedantic(inter.round, rounds=harness.rounds(ROUNDS[model_name]), iterations=1)
    res = inter.results

    assert {r["n_gen"] for r in res["loop-json"]} == {n}  # the same tokens every round
    for kind in ("loop-json", "loop-json-mask", "loop-gbnf", "lcpp-json"):
        if kind not in res:
            continue
        if res[kind][0]["n_gen"] > n:
            notes[kind] = f"cut at {n + 1} tokens"
            continue
        try:
            json.loads(res[kind][0]["text"])
            notes[kind] = "output parses as JSON"
        except ValueError:
            notes[kind] = "output ended but does not parse as JSON"
    name = "Gemma 3 270M" if model_name == "gemma" else "100mb random model"
    case = f"{name}, {n} tokens of a 4-person JSON list"
    for kind, r in res.items():
        base = "lcpp-plain" if kind.startswith("lcpp") else "loop-plain"
        spt = harness.median(r, "s_per_token")
        note = [f"{spt * 1e3:.2f} ms/token", f"{statistics.median(x['n_gen'] for x in r)} tokens"]
        if kind != base:
            cpu = harness.ratio(res[base], r, "cpu_per_token")
            note.append(f"CPU-time ratio {cpu:.3f}")
        if kind.startswith("loop-") and kind != base:
            # The constraint's own cost, read from CPU time in sample() (decode noise apart).
            extra = harness.median(r, "sample_cpu_per_token") - harness.median(
                res[base], "sample_cpu_per_token"
            )
            share = extra / harness.median(res[base], "cpu_per_token")
            note.append(f"sampling +{extra * 1e3:.3f} ms/token CPU (+{share:.1%} of a token)")
        if kind == "loop-json":
            # One draw per token and one for the end, plus one more for each refusal.
            refused = (r[0]["draws"] - r[0]["n_gen"] - 1) / max(r[0]["n_gen"], 1)
            note.append(f"{refused:.0%} of tokens refused at the first draw")
        if kind in notes:
            note.append(notes[kind])
        note.append(f"spread {harness.spread(r, 's_per_token'):.0%}")
        rows(
            section,
            case,
            NAMES[kind],
            1 / spt,
            "tok/s",
            baseline=None if kind == base else NAMES[base],
            ratio=None if kind == base else harness.ratio(res[base], r, "s_per_token"),
            goal=GOAL_COST if kind == "loop-json" else None,
            note="; ".join(note),
        )
    if "lcpp-json" in res:
        rows(
            section,
            case,
            NAMES["loop-json"],
            1 / harness.median(res["loop-json"], "s_per_token"),
            "tok/s",
            baseline=NAMES["lcpp-json"],
            ratio=harness.ratio(res["lcpp-json"], res["loop-json"], "s_per_token"),
            note="constrained against constrained",
        )
    else:
        rows(section, case, "llama-cpp-python", 0, "-", note=bench.lcpp_missing or "")


def _median_ms(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def test_schema_compile(benchmark: Any, rows: Any, bench: Any) -> None:
    from nexabind import lowlevel
    from nexabind.grammar import GrammarMatcher, LlamaGrammar

    section = "structured output: compiling a schema"
    path, why = harness.gemma_path()
    vocab_name = "Gemma 3 270M" if path else "100mb model"
    lowlevel.lib(bench.libdir)
    model = lowlevel.Model(path or bench.models["100mb"], vocab_only=True)
    schema = schema_50()

    t0 = time.perf_counter()
    LlamaGrammar.from_json_schema({"type": "integer"}).matcher(model)
    first = time.perf_counter() - t0

    def compile_schema() -> None:
        GrammarMatcher(LlamaGrammar.from_json_schema(schema), model)

    benchmark.pedantic(compile_schema, rounds=harness.rounds(30), iterations=1, warmup_rounds=2)
    ms = benchmark.stats.stats.median * 1e3
    case = f"50-property schema, {vocab_name} vocabulary ({model.n_vocab:,} tokens)"
    rows(
        section,
        case,
        "nexabind from_json_schema + GrammarMatcher",
        ms,
        "ms",
        baseline=f"goal: {GOAL_COMPILE_MS:.0f} ms",
        ratio=GOAL_COMPILE_MS / ms,
        goal=1.0,
        note="the vocabulary already read" + ("" if path else f"; {why}"),
    )
    rows(
        section,
        f"reading the {vocab_name} vocabulary for llguidance",
        "nexabind, once per model",
        first * 1e3,
        "ms",
        note="the first matcher of a model pays it",
    )
    if bench.lcpp_missing is None:
        from nexabind.sampling import SamplingOptions, build_sampler

        def lcpp_compile() -> None:
            gbnf = lcpp_gbnf(schema)
            build_sampler(model, SamplingOptions(grammar=gbnf)).close()

        lcpp_compile()  # the converter's module is loaded once, outside the timing
        lms = _median_ms(lcpp_compile, harness.rounds(10))
        rows(
            section,
            case,
            "llama-cpp-python converter + llama.cpp grammar parser",
            lms,
            "ms",
            baseline="nexabind from_json_schema + GrammarMatcher",
            ratio=ms / lms,
            note="json_schema_to_gbnf, then llama_sampler_init_grammar",
        )
    model.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
