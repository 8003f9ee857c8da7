"""A forced tool call, counted: prompt and generated tokens of one named-function request.

The same request (one tool, ``tool_choice`` naming it, greedy, ``max_tokens=64``) on Gemma 3
270M through llama-cpp-python (its ``chatml-function-calling`` handler, and its plain
``chatml`` format, whose forced call is the arguments under the parameter schema) and through
nexabind (its default: chatml for this template-less model, and its ``chatml-function-calling``
handler). Prints one markdown row per contender: prompt tokens, generated tokens, finish reason,
whether the arguments parse.

    NEXABIND_LIB_PATH=... NEXABIND_TEST_GEMMA=.../gemma-3-270m-q4_k_m.gguf \\
        python benchmarks/forced_call.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
REQUEST: dict[str, Any] = {
    "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    "tools": [WEATHER],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "temperature": 0.0,
    "max_tokens": 64,
}


def row(name: str, out: dict[str, Any]) -> str:
    choice = out["choices"][0]
    calls = choice["message"].get("tool_calls") or []
    try:
        parsed = bool(calls) and isinstance(json.loads(calls[0]["function"]["arguments"]), dict)
    except ValueError:
        parsed = False
    u = out["usage"]
    return (f"| {name} | {u['prompt_tokens']} | {u['completion_tokens']} | "
            f"{choice['finish_reason']} | {'yes' if parsed else 'no'} |")  # fmt: skip


def main() -> None:
    from worker import import_lcpp

    model = os.environ["NEXABIND_TEST_GEMMA"]
    libdir = os.environ["NEXABIND_LIB_PATH"]
    rows = []
    lcpp = import_lcpp(libdir)
    for fmt in ("chatml-function-calling", "chatml"):
        llm = lcpp.Llama(model, n_ctx=2048, n_threads=1, chat_format=fmt, verbose=False)
        rows.append(row(f"llama-cpp-python `{fmt}`", llm.create_chat_completion(**REQUEST)))
        llm.close()
    from nexabind import Llama

    for fmt in (None, "chatml-function-calling"):
        with Llama(model, n_ctx=2048, n_threads=1, chat_format=fmt, verbose=False) as llm:
            name = f"nexabind `{fmt}`" if fmt else "nexabind (default: chatml)"
            rows.append(row(name, llm.create_chat_completion(**REQUEST)))
    print("| contender | prompt tokens | generated tokens | finish | arguments parse |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
