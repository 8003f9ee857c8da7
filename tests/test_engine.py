"""Engine: many tasks and sessions on one model, against the real library and tiny models."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _child import ok, run_child

from nexabind import Llama
from nexabind.backends import TextModel, available, load_model
from nexabind.engine import Engine
from nexabind.errors import (
    BusyError,
    ClosedError,
    ContextOverflowError,
    SessionNotFoundError,
    TaskTimeoutError,
)

GREEDY = {"temperature": 0.0}
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dogs",
    "ran",
    "fast",
    "and",
    "birds",
    "sang",
    "loud",
    "songs",
    "over",
    "hills",
]


@pytest.fixture(scope="module")
def engine(libdir: Path, tiny_model: Path):
    with Engine(tiny_model, n_parallel=4, n_ctx=4 * 512, n_threads=1, lib_path=libdir) as e:
        yield e


def _alone(model: Path, prompt: str | list[int], n: int) -> list[int]:
    with Llama(model, n_ctx=512, n_threads=1) as llm:
        return [t.id for t in llm.generate(prompt, max_tokens=n, **GREEDY)]


def _ids(tokens) -> list[int]:
    return [t.id for t in tokens]


def _near_tie(llm: Llama, prompt: str, want: list[int], got: list[int]) -> bool:
    """Whether ``got`` leaves ``want`` where the two tokens' logits (run alone) are within the
    kernels' noise: a quantized model's kernels differ with the batch's shape (one row or many,
    REPACK's gemm or gemv), which can flip a near tie but never a clear choice."""
    k = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), None)
    if k is None:  # one ends where the other goes on: not a choice between two tokens
        return False
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode()) + want[:k])
    row = np.asarray(llm.scores[-1])  # the last position (without logits_all only it is kept)
    # The kernels' noise across batch shapes stays under 0.3% of the logits' range
    # (test_variants.py::test_quantized_kernels_agree_across_batch_shapes); slots that read
    # each other's cells would differ by whole units.
    return bool(abs(row[want[k]] - row[got[k]]) < 2e-3 * float(row.max() - row.min()))


def test_32_threads_over_4_slots_each_get_their_own_tokens(
    engine: Engine, tiny_model: Path
) -> None:
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40))) for _ in range(96)]
    want = {}
    llm = Llama(tiny_model, n_ctx=512, n_threads=1)
    for p in set(prompts):
        llm.reset()
        want[p] = _ids(llm.generate(p, max_tokens=32, **GREEDY))
    wrong: list[tuple[str, list[int]]] = []

    def client(k: int) -> None:
        for j in range(3):
            p = prompts[3 * k + j]
            if j % 2:  # streamed and waited-for tasks mixed
                got = _ids(engine.generate(p, max_tokens=32, **GREEDY))
            else:
                tid = engine.create_task(prompt=p, max_tokens=32, **GREEDY)
                got = _ids(engine.result(tid, timeout=120)["tokens"])
            if got != want[p]:
                wrong.append((p, got))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with llm:
        wrong = [(p, got) for p, got in wrong if not _near_tie(llm, p, want[p], got)]
    assert not wrong, f"{len(wrong)} of 96 results differ from the prompt run alone"
    status = engine.status()
    assert status["slots_busy"] == 0 and status["queue"] == 0
    # continuous batching: far fewer decode steps than tokens
    assert status["steps"] < status["generated_tokens"]


def test_a_result_has_the_completion_shape(engine: Engine) -> None:
    tid = engine.create_task(prompt="Hello world", max_tokens=5, stop=["zzz"], **GREEDY)
    r = engine.result(tid, timeout=60)
    assert r["kind"] == "completion" and r["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 5 == len(r["tokens"])
    assert r["text"] == "".join(t.text for t in r["tokens"])
    with pytest.raises(KeyError, match=f"no task {tid}"):
        engine.result(tid)  # a result is collected once


def test_a_task_reuses_the_slot_with_the_longest_common_prefix(engine: Engine) -> None:
    base = " ".join(WORDS * 3)
    engine.result(engine.create_task(prompt=base, max_tokens=2, **GREEDY))
    engine.result(engine.create_task(prompt="something else entirely", max_tokens=2, **GREEDY))
    before = engine.status()["prompt_tokens"]
    engine.result(engine.create_task(prompt=base + " and then more", max_tokens=2, **GREEDY))
    decoded = engine.status()["prompt_tokens"] - before
    assert 0 < decoded <= 6  # only the new words, not the ~50 shared ones


def test_sessions_keep_their_conversation_and_survive_eviction(
    libdir: Path, tiny_model_f32: Path
) -> None:
    tiny_model = tiny_model_f32  # the replay below must give equal text (see the fixture)
    turns = ["Hello there", "tell me more", "and after that", "thanks"]
    n_sessions = 5
    with Engine(tiny_model, n_parallel=2, n_ctx=2 * 512, n_threads=1, lib_path=libdir) as eng:
        sids = [eng.create_session() for _ in range(n_sessions)]
        replies: dict[str, list[str]] = {s: [] for s in sids}
        swapped = False
        for turn in turns:  # round-robin: 5 sessions on 2 slots swap out and back in
            for k, sid in enumerate(sids):
                tid = eng.create_task(
                    "chat",
                    messages=[{"role": "user", "content": f"{turn} {k}"}],
                    session=sid,
                    max_tokens=6,
                    **GREEDY,
                )
                replies[sid].append(eng.result(tid, timeout=60)["text"])
                swapped |= any(eng.session_info(s)["swapped_out"] for s in sids)
        assert swapped
        info = eng.session_info(sids[0])
        assert info["messages"] == 2 * len(turns) and info["tasks"] == len(turns)
    # Each conversation, replayed turn by turn with its whole history in a fresh Llama.
    with Llama(tiny_model, n_ctx=512, n_threads=1, lib_path=libdir) as llm:
        for k, sid in enumerate(sids):
            history: list[dict[str, str]] = []
            for turn, reply in zip(turns, replies[sid], strict=True):
                history.append({"role": "user", "content": f"{turn} {k}"})
                want = "".join(t.text for t in llm.chat(history, max_tokens=6, **GREEDY))
                assert reply == want
                history.append({"role": "assistant", "content": want})


def test_a_follow_up_turn_decodes_only_its_new_tokens(engine: Engine) -> None:
    sid = engine.create_session(system_prompt="Be brief.")
    first = [{"role": "user", "content": " ".join(WORDS)}]
    engine.result(engine.create_task("chat", messages=first, session=sid, max_tokens=4, **GREEDY))
    held = engine.session_info(sid)["n_tokens"]  # the first prompt and 3 of its 4 tokens
    before = engine.status()["prompt_tokens"]
    follow = [{"role": "user", "content": "go on"}]
    tid = engine.create_task("chat", messages=follow, session=sid, max_tokens=4, **GREEDY)
    prompt = engine.result(tid)["usage"]["prompt_tokens"]  # the whole conversation
    decoded = engine.status()["prompt_tokens"] - before
    # The last reply token, the end of that turn and the new turn: nothing before them.
    assert held > 20 and decoded == prompt - held
    engine.close_session(sid)
    with pytest.raises(SessionNotFoundError, match="no session"):
        engine.session_info(sid)


def test_cancel_stops_within_a_step_and_frees_the_slot(engine: Engine) -> None:
    tid = engine.create_task(prompt="Once upon a time", max_tokens=400, **GREEDY)
    outcome = engine.outcome(tid)
    got = []
    produced = 0
    for tok in engine.stream(tid):
        got.append(tok)
        if len(got) == 3:
            produced = outcome.completion_tokens  # the consumer may lag the scheduler
            engine.cancel(tid)
    # Every token produced was streamed; after the cancel, at most the step in flight added one.
    assert outcome.completion_tokens == len(got) <= produced + 1
    assert outcome.finish_reason == "cancelled"
    deadline = time.monotonic() + 10
    while engine.status()["slots_busy"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.status()["slots_busy"] == 0


def test_a_callback_that_returns_true_stops_the_task(engine: Engine) -> None:
    tid = engine.create_task(prompt="Once upon a time", max_tokens=400, **GREEDY)
    outcome = engine.outcome(tid)
    seen: list[str] = []
    made: list[int] = []

    def callback(tok: Any) -> bool:
        seen.append(tok.text)
        if len(seen) >= 4 and not made:
            made.append(outcome.completion_tokens)  # produced when it said stop
        return len(seen) >= 4

    toks = list(engine.stream(tid, callback=callback))
    # A reader slower than the scheduler finds tokens waiting; what counts is that the task
    # stopped within a step or two of the callback's answer, far short of its 400 tokens.
    assert 4 <= len(toks) <= made[0] + 2 < 400
    engine.cancel(tid)  # cancelling a finished task is a no-op


def test_close_with_tasks_running_ends_them_as_cancelled(libdir: Path, tiny_model: Path) -> None:
    out = ok(
        run_child(
            """
            import json, sys, threading
            from nexabind.engine import Engine
            eng = Engine(sys.argv[1], n_parallel=2, n_ctx=2048, n_threads=1)
            ids = [eng.create_task(prompt=f"Hello {i}", max_tokens=900) for i in range(6)]
            first = next(eng.stream(ids[0]))
            eng.close()
            out = []
            for i in ids[1:]:
                try:
                    out.append(eng.result(i, timeout=30)["finish_reason"])
                except Exception as e:
                    out.append(type(e).__name__)
            try:
                eng.create_task(prompt="x")
            except Exception as e:
                out.append(type(e).__name__)
            eng.close()
            print(json.dumps(out))
            """,
            tiny_model,
            timeout=120,
        )
    )
    assert json.loads(out) == ["cancelled"] * 5 + ["ClosedError"]


def test_bad_input_fails_that_task_only(engine: Engine, libdir: Path, tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="n_parallel=0 is invalid"):
        Engine(tiny_model, n_parallel=0, lib_path=libdir)
    good = engine.create_task(prompt="Hello", max_tokens=3, **GREEDY)
    with pytest.raises(ContextOverflowError, match="but a slot holds 512"):
        engine.create_task(prompt=[1] + [450] * 600, max_tokens=3)
    with pytest.raises(ValueError, match="kind='translate' is invalid"):
        engine.create_task("translate", prompt="x")
    with pytest.raises(ValueError, match="cannot run on a generation engine"):
        engine.create_task("embedding", input="x")
    with pytest.raises(ValueError, match="prompt token 99999 is outside the vocabulary"):
        engine.create_task(prompt=[1, 99999])
    with pytest.raises(ValueError, match=r"messages\[0\].role is missing"):
        engine.create_task("chat", messages=[{"content": "x"}])
    with pytest.raises(TypeError, match="unknown sampling options"):
        engine.create_task(prompt="x", temprature=0.5)
    with pytest.raises(ValueError, match="top_p=2"):
        engine.create_task(prompt="x", top_p=2)
    with pytest.raises(SessionNotFoundError, match="no session 'nope'"):
        engine.create_task(prompt="x", session="nope")
    with pytest.raises(KeyError, match="no task 123456"):
        engine.result(123456)
    with pytest.raises(ValueError, match="logit_bias token 99999 is outside the vocabulary"):
        engine.create_task(prompt="x", logit_bias={99999: -1.0})
    # A grammar that does not parse fails when its task starts, in the scheduler thread: that
    # task fails, and the engine goes on.
    bad = engine.create_task(prompt="x", grammar='root ::= "a', **GREEDY)
    with pytest.raises(ValueError):
        engine.result(bad, timeout=60)
    assert engine.result(good, timeout=60)["usage"]["completion_tokens"] == 3
    after = engine.create_task(prompt="Hello", max_tokens=2, **GREEDY)
    assert engine.result(after, timeout=60)["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"top_k": 2**31}, "top_k"),
        ({"top_k": 3_000_000_000}, "top_k"),
        ({"penalty_last_n": 2**31}, "penalty_last_n"),
        ({"penalty_last_n": -(2**31)}, "penalty_last_n"),
        ({"seed": 2**63}, "seed"),
        ({"temperature": float("nan")}, "temperature"),
        ({"mirostat_tau": float("inf")}, "mirostat_tau"),
        ({"top_k": "40"}, "top_k"),
        ({"stop": [1]}, r"stop\[0\]"),
        ({"stop": 5}, "stop"),
        ({"logprobs": 2**31}, "logprobs"),
        ({"max_tokens": 2**63}, "max_tokens"),
        ({"logit_bias": {2**31: 1.0}}, "logit_bias"),
        ({"logit_bias": dict.fromkeys(range(40_000), 1.0)}, "logit_bias"),
    ],
)
def test_values_the_c_api_cannot_take_fail_in_the_caller(
    engine: Engine, options: dict[str, Any], field: str
) -> None:
    """Each of these once killed the scheduler thread (an OverflowError or a TypeError there):
    now create_task refuses it, naming the field, and the engine goes on."""
    with pytest.raises((ValueError, TypeError), match=field):
        engine.create_task(prompt="x", **options)
    after = engine.create_task(prompt="Hello", max_tokens=2, **GREEDY)
    assert engine.result(after, timeout=60)["usage"]["completion_tokens"] == 2
    assert engine.failure is None


def test_a_task_that_fails_inside_the_scheduler_fails_alone(engine: Engine) -> None:
    """Values that slip past the checks (set on a request after it was made) fail in the
    scheduler's thread: that task gets the error, the thread and the other tasks go on."""
    from nexabind._sequence import Request
    from nexabind._slots import Task
    from nexabind.sampling import SamplingOptions

    broken = []
    for field, value, stops in (("top_k", 2**40, []), ("temperature", 0.5, [1])):
        opts = SamplingOptions()
        setattr(opts, field, value)
        broken.append(Task(10**6 + len(broken), "completion", tokens=[1, 450],
                           req=Request(opts, max_tokens=2, stops=stops)))  # fmt: skip
    good = engine.create_task(prompt="Hello", max_tokens=3, **GREEDY)
    for task in broken:
        engine._sched.submit(task)
    for task, kind in zip(broken, (OverflowError, TypeError), strict=True):
        assert task.done.wait(60)
        assert isinstance(task.error, kind), task.error
    assert engine.result(good, timeout=60)["usage"]["completion_tokens"] == 3
    assert engine.failure is None
    after = engine.create_task(prompt="Hello", max_tokens=2, **GREEDY)
    assert engine.result(after, timeout=60)["usage"]["completion_tokens"] == 2


def test_queue_full_and_timeouts(libdir: Path, tiny_model: Path) -> None:
    with Engine(
        tiny_model, n_parallel=1, n_ctx=1024, n_threads=1, max_queue=1, lib_path=libdir
    ) as eng:
        running = eng.create_task(prompt="Hello", max_tokens=800)
        deadline = time.monotonic() + 10
        while not eng.status()["slots_busy"] and time.monotonic() < deadline:
            time.sleep(0.005)
        waiting = eng.create_task(prompt="Hello again", max_tokens=2)
        with pytest.raises(BusyError, match="queue is full"):
            eng.create_task(prompt="one too many")
        with pytest.raises(TaskTimeoutError, match=f"task {waiting} did not finish within"):
            eng.result(waiting, timeout=0.01)
        eng.cancel(running)
        assert eng.result(waiting, timeout=60)["finish_reason"] == "length"
    with pytest.raises(ClosedError, match="is closed"):
        eng.create_task(prompt="x")
    eng.close()  # idempotent


def test_embedding_and_rerank_tasks(
    libdir: Path, embed_model: Path, tmp_path: Path, llama_source: Path
) -> None:
    texts = ["Hello world", "the cat", "a much longer text about birds and dogs", "x"]
    with Llama(embed_model, embedding=True, n_ctx=1024, n_threads=1, lib_path=libdir) as llm:
        want = llm.embed(texts)
    with Engine(
        embed_model, embedding=True, n_parallel=4, n_ctx=1024, n_threads=1, lib_path=libdir
    ) as eng:
        with pytest.raises(ValueError, match="cannot run on an embedding engine"):
            eng.create_task(prompt="x")
        ids = [eng.create_task("embedding", input=texts) for _ in range(3)]
        for tid in ids:
            got = np.array(eng.result(tid, timeout=60)["embeddings"], dtype=np.float32)
            assert np.allclose(got, want, atol=1e-4)
    from nexabind.tinymodel import ModelSpec, write_random_model

    ranker = write_random_model(
        tmp_path / "rank.gguf",
        ModelSpec(pooling="rank", seed=5),
        vocab=llama_source / "models" / "ggml-vocab-llama-spm.gguf",
    )
    docs = ["birds sing", "cats sit", "dogs run fast"]
    # One sequence per decode: a real reranker has a classifier head that gives one score per
    # sequence, and llama.cpp reads the scores of a batch that way; this random model has no
    # head (its pooled output is n_embd wide), so only a batch of one reads right.
    with Engine(ranker, embedding=True, n_parallel=1, n_threads=1, lib_path=libdir) as eng:
        scores = eng.result(eng.create_task("rerank", query="who sings?", documents=docs))["scores"]
        again = eng.result(eng.create_task("rerank", query="who sings?", documents=docs[::-1]))
    assert len(scores) == 3 and all(np.isfinite(scores))
    assert np.allclose(scores, again["scores"][::-1], atol=1e-4)


def test_status_reports_slots_queue_throughput_and_cells(engine: Engine) -> None:
    engine.result(engine.create_task(prompt="Hello", max_tokens=20, **GREEDY))
    s = engine.status()
    assert len(s["slots"]) == 4 and s["slots_idle"] == 4 and s["kv_cells"] == 2048
    assert s["n_ctx_slot"] == 512 and s["kv_cells_used"] > 0
    assert s["tokens_per_second"] >= 0 and s["generated_tokens"] > 0
    assert {"id", "state", "task", "session", "n_tokens"} <= set(s["slots"][0])


def test_llama_and_engine_are_text_models(engine: Engine, libdir: Path, tiny_model: Path) -> None:
    assert isinstance(engine, TextModel) and engine.model_type == "llama"
    with Llama(tiny_model, n_ctx=128, lib_path=libdir) as llm:
        assert isinstance(llm, TextModel) and llm.err is None
        with pytest.raises(ValueError):
            list(llm.generate([1, 10**6]))
    assert "llama.cpp" in available()
    model = load_model(tiny_model, n_parallel=1, n_ctx=256, n_threads=1)
    try:
        assert isinstance(model, Engine)
        assert len(list(model.chat([{"role": "user", "content": "hi"}], max_tokens=3))) == 3
    finally:
        model.close()
    with pytest.raises(ValueError, match="no backend named 'nope'"):
        load_model(tiny_model, backend="nope")


def test_memory_stays_flat_over_10000_tasks(libdir: Path, tiny_model: Path) -> None:
    out = ok(
        run_child(
            """
            import json, sys
            from nexabind.engine import Engine
            def rss():
                for line in open("/proc/self/status"):
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
            eng = Engine(sys.argv[1], n_parallel=4, n_ctx=1024, n_threads=1)
            def run(n):
                ids = []
                for i in range(n):
                    ids.append(eng.create_task(prompt=f"Hi {i % 7}", max_tokens=2))
                    if len(ids) == 64:
                        [eng.result(t) for t in ids]; ids.clear()
                [eng.result(t) for t in ids]
            run(1000)
            before = rss()
            run(9000)
            print(json.dumps({"before": before, "after": rss()}))
            eng.close()
            """,
            tiny_model,
            timeout=600,
        )
    )
    r = json.loads(out)
    assert r["after"] - r["before"] < 8 << 20, r  # no growth per task (9,000 more tasks)


def test_structured_output_and_tool_calls_through_the_engine(
    libdir: Path, tiny_model: Path
) -> None:
    from test_llguidance import SCHEMAS, validate
    from test_structured import ASK, HERMES_TEMPLATE, TIME, WEATHER

    from nexabind import openai

    with Engine(
        tiny_model, n_parallel=4, n_ctx=4 * 1024, n_threads=1, chat_template=HERMES_TEMPLATE,
        lib_path=libdir,
    ) as eng:  # fmt: skip
        # JSON schemas, decoded together in one batch: each reply valid under its own schema.
        names = list(SCHEMAS)[:8]
        ids = {
            name: eng.create_task(
                "chat",
                messages=ASK,
                max_tokens=300,
                temperature=0.9,
                seed=3,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": SCHEMAS[name]},
                },
            )  # fmt: skip
            for name in names
        }
        for name, tid in ids.items():
            r = eng.result(tid, timeout=120)
            assert r["finish_reason"] == "stop", (name, r["text"])
            validate(json.loads(r["text"]), SCHEMAS[name])
        # A completion under json_object with a schema (a bounded one: an open object lets a
        # random model write keys for ever).
        schema = {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["a"],
            "additionalProperties": False,
        }
        fmt = {"type": "json_object", "schema": schema}
        r = eng.result(eng.create_task(prompt="Data:", max_tokens=200, response_format=fmt))
        assert r["finish_reason"] == "stop"
        validate(json.loads(r["text"]), schema)
        # A required call: OpenAI's shape, arguments valid under the function's parameters.
        tid = eng.create_task(
            "chat", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", seed=2,
            max_tokens=200,
        )  # fmt: skip
        out = eng.completion(tid)
        c = out["choices"][0]
        assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None
        call = c["message"]["tool_calls"][0]
        tool = WEATHER if call["function"]["name"] == "get_weather" else TIME
        validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
        # Streamed: the calls come as tool_calls deltas.
        tid = eng.create_task(
            "chat", messages=ASK, tools=[WEATHER], seed=4, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )  # fmt: skip
        chunks = list(
            openai.chat_chunks(
                eng.stream(tid), eng.outcome(tid), model="m", tools=eng.chat_output(tid)
            )
        )
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert any(d.get("tool_calls") for d in deltas)
        with pytest.raises(ValueError, match="give grammar or response_format, not both"):
            eng.create_task(
                "chat",
                messages=ASK,
                grammar='root ::= "x"',
                response_format={"type": "json_object"},
            )
        with pytest.raises(ValueError, match="tools and functions are for chat tasks"):
            eng.create_task(prompt="x", tools=[WEATHER])


def test_choices_of_one_prompt_decode_it_once(libdir: Path, tiny_model_f32: Path) -> None:
    """Tasks created with same_prompt_as start once the first has read the prompt and copy its
    KV cells: the prompt is decoded once, and greedy choices equal the first's."""
    prompt = " ".join(WORDS * 6)
    with Engine(tiny_model_f32, n_parallel=4, n_ctx=4 * 512, n_threads=1) as engine:
        n_prompt = len(engine._model.tokenize(prompt, add_special=True))
        first = engine.create_task(prompt=prompt, max_tokens=6, **GREEDY)
        others = [
            engine.create_task(prompt=prompt, max_tokens=6, same_prompt_as=first, **GREEDY)
            for _ in range(3)
        ]
        want = engine.result(first, timeout=120)["tokens"]
        for tid in others:
            assert _ids(engine.result(tid, timeout=120)["tokens"]) == _ids(want)
        # the first read it all; each other choice, only its last token (for its logits)
        assert engine.status()["prompt_tokens"] == n_prompt + 3
