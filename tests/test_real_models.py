"""Gemma 3 270M (Q4_K_M), a real trained and quantized model, through every layer: Llama's
greedy tokens equal a small C program's on the same library (build_scripts/greedy.c, the
oracle), the Engine's equal Llama's, and `nexabind serve` answers a chat with the official
openai client. The REPL's test on it is tests/test_repl.py::test_the_repl_in_a_terminal."""

from __future__ import annotations

from pathlib import Path

import pytest
from _greedy import greedy_exe, run_greedy
from _serve import Served

from nexabind import Llama
from nexabind.engine import Engine

N = 32
PROMPT = "Once upon a time, in a small village by the sea,"


@pytest.fixture(scope="module")
def oracle(
    gemma: Path, libdir: Path, llama_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """greedy.c's report on Gemma: 256-token context and batch, two threads."""
    exe = greedy_exe(None, llama_source, tmp_path_factory.mktemp("greedy"))
    return run_greedy(exe, libdir, gemma, {}, n_tokens=N, prompt=PROMPT)


def test_gemma_greedy_tokens_equal_the_c_programs(gemma: Path, libdir: Path, oracle: dict) -> None:
    with Llama(gemma, n_ctx=256, n_batch=256, n_threads=2, lib_path=libdir) as llm:
        prompt = llm.tokenize(PROMPT.encode())
        assert prompt == oracle["prompt_tokens"]
        got = [int(t) for t in llm.generate(prompt, temp=0, max_tokens=N)]
        text = llm.detokenize(got).decode()
    assert got == oracle["tokens"]
    assert len(text.split()) > 10 and text.isascii(), text  # real English, not noise


def test_gemma_through_the_engine_gives_llamas_tokens(
    gemma: Path, libdir: Path, oracle: dict
) -> None:
    with Engine(gemma, n_parallel=2, n_ctx=512, n_threads=2, lib_path=libdir) as eng:
        tid = eng.create_task(prompt=PROMPT, max_tokens=16, temperature=0.0)
        result = eng.result(tid, timeout=300)
    assert [t.id for t in result["tokens"]] == oracle["tokens"][:16]


def test_gemma_choices_of_one_prompt_copy_its_cells(gemma: Path, libdir: Path) -> None:
    """Gemma 3's cache is two (sliding-window layers and full ones): copied cells give the
    first choice's greedy text, and the prompt is decoded once."""
    prompt = "The history of the sea is long. " * 30
    with Engine(gemma, n_parallel=3, n_ctx=3 * 1024, n_threads=2, lib_path=libdir) as eng:
        first = eng.create_task(prompt=prompt, max_tokens=12, temperature=0.0)
        others = [
            eng.create_task(prompt=prompt, max_tokens=12, temperature=0.0, same_prompt_as=first)
            for _ in range(2)
        ]
        want = eng.result(first, timeout=300)
        assert [eng.result(t, timeout=300)["text"] for t in others] == [want["text"]] * 2
        assert eng.status()["prompt_tokens"] == want["usage"]["prompt_tokens"] + 2


def test_gemma_served_chat_with_the_openai_client(
    gemma: Path, libdir: Path, tmp_path: Path
) -> None:
    import openai

    # A base model has no chat template of its own: the server is told which one to use.
    with Served(gemma, "-np", "2", "-c", "1024", "--chat-template", "chatml",
                log=tmp_path / "serve.log") as s:  # fmt: skip
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        ask = [{"role": "user", "content": "Write one sentence about the sea."}]
        r = client.chat.completions.create(
            model="gemma", messages=ask, max_tokens=24, temperature=0
        )
        text = r.choices[0].message.content or ""
        assert r.usage.completion_tokens > 0 and any(c.isalpha() for c in text), text
        done = client.completions.create(model="gemma", prompt=PROMPT, max_tokens=16, temperature=0)
        assert done.choices[0].text.strip()
