"""Try a model of unknown origin in a child process first: :func:`check_model`.

``python -m nexabind._probe MODEL [--check-tensors]`` loads the model, renders its chat
template, tokenizes and detokenizes text with every byte value, turns every vocabulary token
into text and decodes a few tokens, then prints what it found as JSON. Anything that ends the
process there (an assertion inside llama.cpp, a crash, the memory limit) ends only the child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from nexabind import chat, lowlevel
from nexabind.errors import ModelLoadError, NexabindError

__all__ = ["check_model"]


def check_model(
    path: str | os.PathLike[str],
    *,
    check_tensors: bool = True,
    timeout: float = 600,
    memory_limit: int | None = None,
) -> dict[str, Any]:
    """Load ``path`` in a child process and exercise it; raise if that fails or crashes.

    Use it before loading a GGUF file you did not make into a long-lived process: an
    assertion inside llama.cpp aborts the process it runs in, and here that is the child.

    Args:
        path: The ``.gguf`` file.
        check_tensors: Also validate every tensor's data (slower).
        timeout: Seconds the child may take.
        memory_limit: Bytes of address space the child may use (POSIX only; None: no limit).

    Returns:
        What the child found: ``description``, ``n_vocab``, ``n_ctx_train``, ``n_params``,
        ``chat_template`` (whether it has one) and ``tokens`` (the few it decoded).

    Raises:
        ModelLoadError: The model does not load, or the child died (the message says how).
    """
    path = Path(path)
    cmd = [sys.executable, "-m", "nexabind._probe", str(path)]
    if check_tensors:
        cmd.append("--check-tensors")

    def limit() -> None:  # runs in the child, before exec
        import resource

        assert memory_limit is not None
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    try:
        r = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=limit if memory_limit and os.name == "posix" else None,
        )
    except subprocess.TimeoutExpired:
        msg = f"checking {path} did not finish in {timeout:g} s; do not load it"
        raise ModelLoadError(msg) from None
    try:
        report: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit status {r.returncode}"
        tail = " | ".join(r.stderr.strip().splitlines()[-2:])[-400:]
        msg = f"{path} crashed the process that loaded it ({how}); do not load it: {tail}"
        raise ModelLoadError(msg) from None
    if not report.get("ok"):
        msg = f"{path} failed its check: {report.get('error')}"
        raise ModelLoadError(msg)
    return report


def _exercise(path: str, check_tensors: bool) -> dict[str, Any]:
    with lowlevel.Model(path, check_tensors=check_tensors) as model:
        report: dict[str, Any] = {
            "description": model.description,
            "n_vocab": model.n_vocab,
            "n_ctx_train": model.n_ctx_train,
            "n_params": model.n_params,
            "chat_template": model.chat_template() is not None,
        }
        if report["chat_template"]:
            messages = [
                {"role": "system", "content": "You are a check."},
                {"role": "user", "content": "Hello"},
            ]
            try:
                chat.format_chat(model, messages)
            except NexabindError as e:  # a template may refuse a system message
                report["chat_template_error"] = str(e)
        text = bytes(range(1, 256)).decode("latin-1") + " héllo wörld 你好 🙂"
        toks = model.tokenize(text, add_special=True, parse_special=True)
        model.detokenize(toks)
        for tok in range(model.n_vocab):
            model.token_to_piece(tok, special=True)
        with (
            lowlevel.Context(model, n_ctx=64, n_batch=64, n_threads=1) as ctx,
            lowlevel.SamplerChain().add_greedy() as sampler,
        ):
            prompt = model.tokenize("Hello", add_special=True)
            ctx.batch.set(prompt, 0)
            ctx.decode()
            out = []
            for i in range(4):
                tok = sampler.sample(ctx)
                out.append(tok)
                ctx.batch.set_one(tok, len(prompt) + i)
                ctx.decode()
        report["tokens"] = out
    return report


def main(argv: list[str]) -> int:
    """The child: exercise ``argv[0]``, print the JSON report, return the exit status."""
    try:
        report = {"ok": True, **_exercise(argv[0], "--check-tensors" in argv[1:])}
    except NexabindError as e:
        report = {"ok": False, "error": str(e)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
