"""Inputs a hostile or careless caller sends: each is an exception that says what was wrong.

Every case that could crash the interpreter (a C abort or segfault) runs in a child process
under a memory limit; the test asserts that the child ended normally and printed the error.
"""

from __future__ import annotations

import json
import re
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from _child import ok, run_child

from nexabind.errors import TemplateError
from nexabind.tokens import StopMatcher

PRELUDE = """
import json, sys, threading, time
from nexabind import Llama
from nexabind.errors import NexabindError
def err(f):
    try:
        f()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"
"""


def child(code: str, *args: str | Path, **kw: object) -> str:
    return ok(run_child(PRELUDE + textwrap.dedent(code), *args, **kw))  # type: ignore[arg-type]


# -- threads ------------------------------------------------------------------------------------


def test_one_llama_shared_by_threads_never_crashes(libdir: Path, tiny_model: Path) -> None:
    out = child(
        """
        llm = Llama(sys.argv[1], n_ctx=512, n_threads=1)
        results = []
        def work(k):
            for _ in range(3):
                try:
                    toks = list(llm.generate(f"Hello {k}", max_tokens=20, temperature=0))
                    results.append(("done", len(toks)))
                except NexabindError as e:
                    results.append((type(e).__name__, str(e)[:40]))
                llm.tokenize("some text"); llm.detokenize([1, 2, 3])
        ths = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        [t.start() for t in ths]; [t.join() for t in ths]
        print(json.dumps(results))
        """,
        tiny_model,
    )
    results = json.loads(out)
    assert len(results) == 12
    # Each call either finished or was told that another call took the context over.
    assert {r[0] for r in results} <= {"done", "ContextError"}
    assert any(r[0] == "done" for r in results)
    assert all(r[1].startswith("this generator was superseded") for r in results if r[0] != "done")


def test_close_from_another_thread_during_generation(libdir: Path, tiny_model: Path) -> None:
    out = child(
        """
        llm = Llama(sys.argv[1], n_ctx=2048, n_threads=1)
        got, errors = [], []
        started = threading.Event()
        def run():
            try:
                for t in llm.generate("Hello", max_tokens=1500, temperature=0):
                    got.append(t); started.set()
            except NexabindError as e:
                errors.append(f"{type(e).__name__}: {e}")
            started.set()
        th = threading.Thread(target=run); th.start()
        started.wait(60); llm.close(); th.join(60)
        print(json.dumps({"alive": th.is_alive(), "n": len(got), "errors": errors,
                          "finish": llm._outcome.finish_reason,
                          "closed": llm.closed, "after": err(lambda: llm.tokenize("x"))}))
        """,
        tiny_model,
    )
    r = json.loads(out)
    assert not r["alive"] and r["closed"] and 0 < r["n"] < 1500
    # close() cancels first: a step that sees the cancel ends the generation as cancelled;
    # one that comes after the free raises ClosedError. Either way it stops, and cleanly.
    if r["errors"]:
        assert r["errors"] == [r["errors"][0]] and r["errors"][0].startswith("ClosedError: this")
    else:
        assert r["finish"] == "cancelled"
    assert r["after"].startswith("ClosedError")


def test_close_from_another_thread_during_a_long_prompt(libdir: Path, tiny_model: Path) -> None:
    out = child(
        """
        llm = Llama(sys.argv[1], n_ctx=4096, n_batch=4096, n_threads=1)
        # Time one prompt first, then close a tenth of the way into another (no shared prefix),
        # so that the close lands inside the prompt's decode on a fast machine as on a slow one.
        t0 = time.perf_counter(); list(llm.generate([1] + [451] * 4000, max_tokens=1))
        took = time.perf_counter() - t0
        prompt = [1] + [450] * 4000
        result = {}
        def run():
            result["tokens"] = [t.id for t in llm.generate(prompt, max_tokens=5)]
            result["finish"] = llm.last_finish_reason
        th = threading.Thread(target=run); th.start()
        time.sleep(took / 10); llm.close(); th.join(60)
        print(json.dumps({"alive": th.is_alive(), **result}))
        """,
        tiny_model,
    )
    r = json.loads(out)
    assert not r["alive"]
    assert r == {"alive": False, "tokens": [], "finish": "cancelled"}


# -- token ids and sizes ------------------------------------------------------------------------


def test_token_ids_outside_the_vocabulary(libdir: Path, tiny_model: Path) -> None:
    out = child(
        """
        llm = Llama(sys.argv[1], n_ctx=128, n_threads=1)
        n = llm.n_vocab()
        print(json.dumps([
            err(lambda: llm.detokenize([n])),
            err(lambda: llm.detokenize([-1])),
            err(lambda: llm.create_completion([1, 5, 999999], echo=True, max_tokens=2)),
            err(lambda: list(llm.generate([1, n], max_tokens=2))),
            err(lambda: llm._model.token_to_piece(2**31 - 1)),
            err(lambda: llm._model.is_eog(-5)),
            err(lambda: llm.create_completion("x", logit_bias={n + 7: 1.0})),
        ]))
        """,
        tiny_model,
    )
    msgs = json.loads(out)
    assert msgs[0] == "ValueError: token 32000 is outside the vocabulary of 32000 tokens (0..31999)"
    assert msgs[1].startswith("ValueError: token -1 is outside the vocabulary of 32000")
    assert msgs[2].startswith("ValueError: prompt token 999999 is outside the vocabulary")
    assert msgs[3].startswith("ValueError: prompt token 32000 is outside the vocabulary")
    assert msgs[4].startswith("ValueError: token 2147483647 is outside")
    assert msgs[5].startswith("ValueError: token -5 is outside")
    assert msgs[6].startswith("ValueError: logit_bias token 32007 is outside")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_threads": 10**6}, "n_threads=1000000 is invalid; use 1..512 threads"),
        ({"n_threads_batch": 0}, "n_threads_batch=0 is invalid"),
        ({"n_batch": 0}, "n_batch=0 is invalid; use a positive number"),
        ({"n_ubatch": -3}, "n_ubatch=-3 is invalid"),
        ({"n_ctx": -1}, "n_ctx=-1 is invalid"),
        ({"n_ctx": 2**40}, "n_ctx=1099511627776 is invalid"),
        ({"n_ctx": 10**9}, "needs about"),
    ],
)
def test_constructor_arguments_are_checked(
    libdir: Path, tiny_model: Path, kwargs: dict[str, int], message: str
) -> None:
    out = child(
        "print(err(lambda: Llama(sys.argv[1], **json.loads(sys.argv[2]))))",
        tiny_model,
        json.dumps(kwargs),
        timeout=60,  # n_ctx=10**9 is refused from an estimate, not after minutes of allocation
    )
    assert message in out
    assert out.startswith(("ValueError", "ContextError"))


@pytest.mark.parametrize(
    "kwargs",
    [{"n_ctx": 32}, {"n_ctx": 64}, {"n_batch": 32}, {"n_ubatch": 32}, {"n_ubatch": 1}],
)
def test_small_embedding_contexts_work(
    libdir: Path, embed_model: Path, kwargs: dict[str, int]
) -> None:
    out = child(
        """
        with Llama(sys.argv[1], embedding=True, **json.loads(sys.argv[2])) as m:
            print(m.embed(["hello world", "a"], as_array=True).shape)
        """,
        embed_model,
        json.dumps(kwargs),
    )
    assert out.strip() == "(2, 64)"


def test_ggml_aborts_without_a_debugger(libdir: Path, tiny_model: Path) -> None:
    out = child(
        "import os; from nexabind import lowlevel; lowlevel.lib(); "
        "print(os.environ.get('GGML_NO_BACKTRACE'))",
        env={"GGML_NO_BACKTRACE": ""},
    )
    assert out.strip() == ""  # a value the user set is kept
    r = run_child(
        "import os; os.environ.pop('GGML_NO_BACKTRACE', None)\n"
        "from nexabind import lowlevel; lowlevel.lib(); print(os.environ['GGML_NO_BACKTRACE'])"
    )
    assert ok(r).strip() == "1"


# -- hostile model files ------------------------------------------------------------------------


def _patched(src: Path, dest: Path, key: str, fmt: str, value: object) -> Path:
    import struct

    data = bytearray(src.read_bytes())
    k = key.encode()
    at = data.find(struct.pack("<Q", len(k)) + k)
    assert at >= 0, key
    at += 8 + len(k) + 4
    data[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    dest.write_bytes(data)
    return dest


@pytest.mark.parametrize(
    ("key", "fmt", "value", "message"),
    [
        ("llama.block_count", "<I", 0x7FFFFFFF, "llama.block_count is 2147483647, outside 1..512"),
        ("llama.block_count", "<I", 0, "llama.block_count is 0, outside 1..512"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            "<f",
            float("nan"),
            "llama.attention.layer_norm_rms_epsilon is nan, not a finite number >= 0",
        ),
    ],
)
def test_header_values_llama_cpp_aborts_on_are_refused(
    libdir: Path, tiny_model: Path, tmp_path: Path, key: str, fmt: str, value: object, message: str
) -> None:
    bad = _patched(tiny_model, tmp_path / "bad.gguf", key, fmt, value)
    out = child("print(err(lambda: list(Llama(sys.argv[1]).generate('hi', max_tokens=2))))", bad)
    assert out.startswith("ModelLoadError") and message in out


def test_a_vocabulary_with_duplicates_or_without_byte_tokens_is_refused(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    data = tiny_model.read_bytes()
    dup = tmp_path / "dup.gguf"
    dup.write_bytes(data.replace(b"<0x0A>", b"<0x0B>", 1))  # two tokens now read <0x0B>
    out = child("print(err(lambda: Llama(sys.argv[1])))", dup)
    assert "ModelLoadError" in out and "has 1 duplicate token texts" in out
    nobyte = tmp_path / "nobyte.gguf"
    nobyte.write_bytes(data.replace(b"<0x0A>", b"<0xZZ>", 1))
    out = child("print(err(lambda: Llama(sys.argv[1])))", nobyte)
    assert "ModelLoadError" in out and "lacks the byte token(s) <0x0A>" in out


def test_check_model_loads_in_a_child(libdir: Path, tiny_model: Path, tmp_path: Path) -> None:
    from nexabind import check_model

    report = check_model(tiny_model, memory_limit=4 << 30)
    assert report["n_vocab"] == 32000 and report["chat_template"] and len(report["tokens"]) == 4
    bad = _patched(tiny_model, tmp_path / "bad.gguf", "llama.block_count", "<I", 0)
    with pytest.raises(Exception, match="failed its check: .*block_count is 0"):
        check_model(bad)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"\0" * 100)
    with pytest.raises(Exception, match="does not start with 'GGUF'"):
        check_model(not_gguf)


def test_gguf_fuzz_never_crashes(libdir: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Seeded mutations of a real model, each loaded and used in a child: every one loads
    and runs, or is refused with a NexabindError. None aborts, none raises anything else."""
    from _fuzz import fuzz

    counts, bad = fuzz(tiny_model, tmp_path, n=int(__import__("os").environ.get("NB_FUZZ", 120)))
    assert not bad, f"{counts}: {bad[:5]}"
    assert counts["aborts"] == 0 and counts["other"] == 0
    assert counts["ok"] > 0 and counts["refused"] > 0


# -- chat templates and messages ----------------------------------------------------------------

HOSTILE_TEMPLATES = {
    "nested loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "ran over its 1 s limit",
    ),
    "loops over one range": (
        "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
        "ran over its 1 s limit",
    ),
    "repetition": ("{{ 'x' * 10**10 }}", "a repetition of 10,000,000,000 characters"),
    "power": ("{{ 2 ** 100000000 }}", "would build a power"),
    "recursion": (
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "recursed too deep",
    ),
    "padding": ("{{ 'x' | center(10000000000) }}", "the center filter of 10,000,000,000"),
    "replace": ("{% set s = 'x' * 100000 %}{{ s | replace('', s) }}", "str.replace()"),
    "doubling": (
        "{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}"
        "{% endfor %}",
        "a concatenation",
    ),
    "format width": ("{{ '%999999999s' % 'x' }}", "a padded field of 999,999,999"),
    "str.format width": ("{{ '{:>999999999}'.format('x') }}", "a padded field"),
    "output": ("{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}", "an output of"),
}


def test_hostile_templates_end_with_template_error() -> None:
    import subprocess
    import sys

    code = textwrap.dedent(
        """
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from nexabind.chat import render_jinja
        out = {}
        for name, (src, _) in json.loads(sys.stdin.read()).items():
            try:
                render_jinja(src, [{"role": "user", "content": "hi"}], timeout=1.0)
                out[name] = "rendered"
            except Exception as e:
                out[name] = f"{type(e).__name__}: {e}"
        print(json.dumps(out))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(HOSTILE_TEMPLATES),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    for name, (_, message) in HOSTILE_TEMPLATES.items():
        assert got[name].startswith("TemplateError: "), (name, got[name])
        assert message in got[name], (name, got[name])


def test_a_template_can_still_do_ordinary_work() -> None:
    from nexabind.chat import render_jinja

    src = (
        "{{ ', '.join(range(3)|map('string')) }}|{{ messages[0].content.replace('h', 'H') }}|"
        "{{ 'ab'|center(6) }}|{{ '%3s'|format('x') }}|{{ [1, 2]|join('-') }}|"
        "{{ {'a': 1}|tojson }}|{{ '{} {}'.format(1, 2) }}|"
        "{% for m in messages %}{% if loop.index > 0 %}{% break %}{% endif %}{% endfor %}"
        "{% generation %}{{ 'g' * 3 }}{% endgeneration %}"
    )
    out = render_jinja(src, [{"role": "user", "content": "hi"}])
    assert out == '0, 1, 2|Hi|  ab  |  x|1-2|{"a": 1}|1 2|ggg'


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", "messages must be a list of {role, content} dicts, got str"),
        ([["user", "hi"]], "messages[0] is a list; give a {role, content} dict"),
        ([{"content": "hi"}], "messages[0].role is missing"),
        ([{"role": "", "content": "hi"}], "messages[0].role is ''"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], "messages[1].content is missing"),
        ([{"role": "user", "content": None}], "messages[0].content is missing"),
        ([{"role": "user", "content": {"text": "hi"}}], "messages[0].content is a dict"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages[0].content[0] is type 'image_url'; this model takes text only",
        ),
        ([{"role": "user", "content": "a\ud800b"}], "messages[0].content is not valid text"),
    ],
)
def test_malformed_messages_name_the_index_and_field(messages: object, message: str) -> None:
    from nexabind.chat import render_jinja

    with pytest.raises(ValueError, match=re.escape(message)):
        render_jinja("{% for m in messages %}{{ m.content }}{% endfor %}", messages)  # type: ignore[arg-type]


def test_text_parts_are_joined_and_tool_call_turns_may_lack_content() -> None:
    from nexabind.chat import render_jinja

    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    messages = [
        {"role": "user", "content": parts},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ]  # fmt: skip
    src = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    assert render_jinja(src, messages) == "[one\ntwo][None]"


def test_builtin_templates_refuse_nul_characters(libdir: Path) -> None:
    from nexabind import lowlevel
    from nexabind.chat import apply_builtin_template

    lowlevel.lib(libdir)
    with pytest.raises(ValueError, match=re.escape("messages[1].content holds a NUL character")):
        apply_builtin_template(
            "chatml", [{"role": "user", "content": "a"}, {"role": "user", "content": "b\0c"}]
        )
    with pytest.raises(ValueError, match=re.escape("messages[0].content is not valid text")):
        apply_builtin_template("chatml", [{"role": "user", "content": "\udcff"}])


# -- stop strings -------------------------------------------------------------------------------


def test_a_long_stop_string_costs_memory_linear_in_its_length() -> None:
    stop = "ab" * 15_000  # 30,000 characters
    tracemalloc.start()
    try:
        m = StopMatcher([stop])
        emitted = []
        for _ in range(14_999):  # one pair short of the stop string: all of it is held
            out, hit = m.feed("ab")
            emitted.append(out)
            assert not hit
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "".join(emitted) == "" and len(m.held) == 29_998
    assert peak < 2 << 20  # the old table of every prefix took ~474 MB
    out, hit = m.feed("abc")  # completes the stop string
    assert hit and out == ""
    m = StopMatcher([stop])
    for _ in range(100):
        m.feed("ab")
    assert m.feed("c") == ("ab" * 100 + "c", False)  # the held text comes out once it can't match


def test_stop_matching_agrees_with_searching_the_whole_text() -> None:
    import random

    rng = random.Random(7)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 5))) for _ in range(3)]
        chunks = ["".join(rng.choice("ab c") for _ in range(rng.randint(0, 4))) for _ in range(8)]
        m = StopMatcher(stops)
        got, hit = "", False
        for c in chunks:
            out, hit = m.feed(c)
            got += out
            if hit:
                break
        if not hit:
            got += m.flush()
        text = ""
        want, want_hit = None, False
        for c in chunks:  # what a server does: search everything generated so far
            text += c
            found = [text.find(s) for s in stops if s in text]
            if found:
                want, want_hit = text[: min(found)], True
                break
        assert (got, hit) == ((want, True) if want_hit else (text, False))


# -- cancellation -------------------------------------------------------------------------------


def test_cancel_before_a_call_applies_to_it(libdir: Path, tiny_model: Path) -> None:
    from nexabind import Llama

    with Llama(tiny_model, n_ctx=256, n_threads=1, lib_path=libdir) as llm:
        llm.cancel()
        res = llm("Hello", max_tokens=20, temperature=0)
        assert res["choices"][0]["finish_reason"] == "cancelled"
        assert res["choices"][0]["text"] == "" and res["usage"]["completion_tokens"] == 0
        # consumed: the next call runs
        res = llm("Hello", max_tokens=5, temperature=0)
        assert res["choices"][0]["finish_reason"] == "length"


def test_a_cancelled_stream_says_so(libdir: Path, tiny_model: Path) -> None:
    from nexabind import Llama

    with Llama(tiny_model, n_ctx=256, n_threads=1, lib_path=libdir) as llm:
        chunks = []
        for c in llm("Hello", max_tokens=50, temperature=0, stream=True):
            chunks.append(c)
            if len(chunks) == 3:
                llm.cancel()
        assert chunks[-1]["choices"][0]["finish_reason"] == "cancelled"
        assert len(chunks) < 50


def test_template_error_is_in_the_tree() -> None:
    from nexabind.errors import NexabindError

    assert issubclass(TemplateError, NexabindError) and issubclass(TemplateError, ValueError)
