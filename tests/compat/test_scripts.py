"""Typical llama-cpp-python scripts, unchanged, run on nexabind through the ``llama_cpp`` shim.

Each script is written for llama-cpp-python (``import llama_cpp``) and prints what it found;
when llama-cpp-python is installed the same script also runs on it, on the same library and
model, to show the script is its kind of code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _tools import require

HERE = Path(__file__).resolve().parent

SCRIPTS = {
    "streaming chat loop": """
        from llama_cpp import Llama

        llm = Llama(model_path=MODEL, n_ctx=512, chat_format="chatml", verbose=False)
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for question in ["Hello!", "Tell me more."]:
            messages.append({"role": "user", "content": question})
            reply = ""
            for chunk in llm.create_chat_completion(messages, stream=True, max_tokens=12):
                delta = chunk["choices"][0]["delta"]
                if "content" in delta:
                    reply += delta["content"]
            messages.append({"role": "assistant", "content": reply})
        print("turns", len(messages))
    """,
    "JSON extraction": """
        import json
        from llama_cpp import Llama

        llm = Llama(model_path=MODEL, n_ctx=1024, chat_format="chatml", verbose=False)
        schema = {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 10},
                "mood": {"type": "string", "enum": ["happy", "sad"]},
            },
            "required": ["name", "mood"],
        }
        out = llm.create_chat_completion(
            [{"role": "user", "content": "Alice is happy. Give JSON."}],
            response_format={"type": "json_object", "schema": schema},
            max_tokens=200,
            temperature=0,
        )
        data = json.loads(out["choices"][0]["message"]["content"])
        print("keys", sorted(data), data["mood"] in ("happy", "sad"))
    """,
    "embedding search": """
        import math
        from llama_cpp import Llama

        llm = Llama(model_path=EMBED_MODEL, embedding=True, verbose=False)
        docs = ["the cat sat on the mat", "stock markets fell today", "a kitten on a rug"]
        vectors = llm.embed(docs)
        query = llm.embed("the cat sat on the mat")

        def cosine(a, b):
            dot = sum(x * y for x, y in zip(a, b))
            return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

        scores = [cosine(query, v) for v in vectors]
        print("best", scores.index(max(scores)), len(vectors[0]) == llm.n_embd())
    """,
    "stop and logprobs": """
        from llama_cpp import Llama

        llm = Llama(model_path=MODEL, n_ctx=512, logits_all=True, verbose=False)
        out = llm("Q: Name a colour. A:", max_tokens=16, stop=["Q:"], logprobs=3, temperature=0)
        lp = out["choices"][0]["logprobs"]
        ok = all(v <= 0 for v in lp["token_logprobs"])
        ok = ok and len(lp["tokens"]) == len(lp["top_logprobs"])
        print("logprobs", ok, "Q:" not in out["choices"][0]["text"])
    """,
    "grammar": """
        from llama_cpp import Llama, LlamaGrammar

        llm = Llama(model_path=MODEL, n_ctx=512, verbose=False)
        grammar = LlamaGrammar.from_string('root ::= "yes" | "no"')
        out = llm("Is the sky blue? Answer:", grammar=grammar, max_tokens=4)
        print("answer", out["choices"][0]["text"] in ("yes", "no"))
    """,
}
EXPECTED = {
    "streaming chat loop": "turns 5",
    "JSON extraction": "keys ['mood', 'name'] True",
    "embedding search": "best 0 True",
    "stop and logprobs": "logprobs True True",
    "grammar": "answer True",
}


def run(script: str, tiny_model: Path, embed_model: Path, libdir: Path, shim: bool) -> str:
    head = f"MODEL = {str(tiny_model)!r}\nEMBED_MODEL = {str(embed_model)!r}\n"
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE / "shim") if shim else str(HERE),
        "NEXABIND_LIB_PATH": str(libdir),
        "LLAMA_CPP_LIB_PATH": str(libdir),
    }
    prelude = "" if shim else "import _lcp_backends  # noqa\n"
    code = prelude + head + textwrap.dedent(script)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    if not shim and "ModuleNotFoundError: No module named 'llama_cpp'" in proc.stderr:
        require(False, "llama-cpp-python is not installed (pip install -e '.[bench]')")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_script_runs_on_nexabind_unchanged(
    name: str, tiny_model: Path, embed_model: Path, libdir: Path
) -> None:
    assert run(SCRIPTS[name], tiny_model, embed_model, libdir, shim=True) == EXPECTED[name]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_script_is_llama_cpp_python_code(
    name: str, tiny_model: Path, embed_model: Path, libdir: Path
) -> None:
    assert run(SCRIPTS[name], tiny_model, embed_model, libdir, shim=False) == EXPECTED[name]
