"""What a task of an :class:`~nexabind.engine.Engine` is made of, from ``create_task``'s
arguments: its request (sampling options, stop strings, log-probabilities), the plan of a chat
(grammar, tools, template variables), its prompt tokens (after a session's history, cut to fit
a slot), and the token sequences of an embedding or rerank task.

Everything here runs in the caller's thread, before the task is queued: a bad argument fails
``create_task`` at once and the scheduler never sees it.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Any

from nexabind import chat, lowlevel
from nexabind._chat_plan import ChatPlan, plan_chat
from nexabind._emit import spelled_markers
from nexabind._sequence import Request
from nexabind._slots import Session, Task
from nexabind.errors import ContextOverflowError
from nexabind.grammar import GrammarMatcher, LlamaGrammar
from nexabind.sampling import INT32_MAX, SAMPLING_KEYS, SamplingOptions, check_int

__all__ = [
    "KINDS",
    "embedding_inputs",
    "grammar_matcher",
    "plan_task",
    "prompt_tokens",
    "sampling_options",
    "task_request",
]

#: The kinds of task an engine runs.
KINDS = ("completion", "chat", "embedding", "rerank")


def sampling_options(sampling: dict[str, Any]) -> SamplingOptions:
    """``sampling`` as :class:`SamplingOptions`.

    Raises:
        TypeError: An unknown option (the message lists the known ones).
        ValueError: An option out of range.
    """
    unknown = set(sampling) - SAMPLING_KEYS
    if unknown:
        msg = f"unknown sampling options {sorted(unknown)}; known: {sorted(SAMPLING_KEYS)}"
        raise TypeError(msg)
    return SamplingOptions(**sampling)


def task_request(
    model: lowlevel.Model,
    seed: int | None,
    max_tokens: int | None,
    stop: str | Sequence[str] | None,
    logprobs: bool | int,
    sampling: dict[str, Any],
) -> Request:
    """A generation task's request; ``seed`` is the engine's default (``sampling`` may hold
    its own)."""
    if sampling.get("seed") is None and seed is not None:
        sampling["seed"] = seed
    n_top = (
        None if isinstance(logprobs, bool) else check_int("logprobs", logprobs, 0, model.n_vocab)
    )
    bias = sampling.get("logit_bias")
    if isinstance(bias, Sized) and len(bias) > model.n_vocab:
        msg = (
            f"logit_bias has {len(bias)} entries but the vocabulary has {model.n_vocab} tokens; "
            "give at most one per token"
        )
        raise ValueError(msg)
    opts = sampling_options(sampling)
    if opts.logit_bias:
        model.check_tokens(list(opts.logit_bias), "logit_bias token")
    if max_tokens is not None:
        max_tokens = check_int("max_tokens", max_tokens, -INT32_MAX - 1, INT32_MAX)
    return Request(
        opts,
        max_tokens=max_tokens,
        stops=_stops(stop),
        want_logprobs=n_top is not None or bool(logprobs),
        n_top=n_top,
    )


def grammar_matcher(model: lowlevel.Model, req: Request) -> GrammarMatcher | None:
    """The matcher of a request's llguidance grammar, if it has one: made here, in the
    caller's thread (the first one of a model reads its whole vocabulary), not in the
    scheduler's.

    Raises:
        ValueError: The grammar cannot run (llguidance's message, or a limit it hit).
    """
    g = req.opts.grammar
    if isinstance(g, LlamaGrammar) and g.engine == "llguidance":
        return g.matcher(model)
    return None


def _stops(stop: object) -> list[str]:
    """``stop`` (a string, or a sequence of strings) as a list."""
    if stop is None or isinstance(stop, str):
        return [stop] if stop else []
    if not isinstance(stop, Sequence) or isinstance(stop, bytes):
        msg = f"stop must be a string or a list of strings, not {type(stop).__name__}"
        raise TypeError(msg)
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            msg = f"stop[{i}] must be a string, not {type(s).__name__} {s!r:.60}"
            raise TypeError(msg)
    return [s for s in stop if s]


def plan_task(
    model: lowlevel.Model,
    chat_template: str | None,
    kind: str,
    messages: list[dict[str, Any]] | None,
    *,
    response_format: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    functions: list[dict[str, Any]] | None,
    function_call: str | dict[str, Any] | None,
    grammar: Any,
) -> ChatPlan:
    """The plan of a generation task (for a completion, only its grammar); ``chat_template``
    is the engine's (None: the model's)."""
    if kind != "chat":
        if tools or functions or tool_choice or function_call:
            msg = "tools and functions are for chat tasks; use kind='chat'"
            raise ValueError(msg)
        return plan_chat([], template=None, response_format=response_format, grammar=grammar)
    if messages is None:
        msg = "a chat task needs messages=[{'role': ..., 'content': ...}, ...]"
        raise ValueError(msg)
    return plan_chat(
        chat.check_messages(messages),
        template=chat.jinja_source(model, chat_template),
        tools=tools,
        tool_choice=tool_choice,
        functions=functions,
        function_call=function_call,
        response_format=response_format,
        grammar=grammar,
    )


def prompt_tokens(
    model: lowlevel.Model,
    chat_template: str | None,
    room: int,
    kind: str,
    prompt: str | Sequence[int] | None,
    plan: ChatPlan,
    session: Session | None,
    task: Task,
) -> list[int]:
    """The prompt of a generation task, within ``room`` (a slot's cells); a chat's messages,
    how to read its reply and the text of marker tokens are set on ``task``."""
    if kind == "chat":
        task.messages = plan.messages
        task.output = plan.output
        task.spelled = spelled_markers(model, plan.markers)
        history = []
        if session is not None:
            if session.system_prompt and not session.messages:
                task.messages.insert(0, {"role": "system", "content": session.system_prompt})
            history = session.messages
        text = chat.format_chat(
            model, [*history, *task.messages], template=chat_template, **plan.extra
        )
        task.prompt_text = text
        turn = session.turn if session is not None else None
        # Continue from what the model saw: the last prompt and its reply.
        seen = None if turn is None else (turn[0] + turn[2], turn[1])
        tokens = chat.continue_prompt(model, text, seen)
        if plan.opener:  # a forced call starts in the prompt
            tokens += model.tokenize(plan.opener, add_special=False, parse_special=True)
    else:
        if prompt is None:
            msg = "a completion task needs prompt= (text or token ids)"
            raise ValueError(msg)
        if isinstance(prompt, (str, bytes)):
            start = session is None or not session.tokens
            words = prompt if isinstance(prompt, str) else prompt.decode("utf-8", "replace")
            if session is not None and start and session.system_prompt:
                words = session.system_prompt + words
            tokens = model.tokenize(words, add_special=start)
        else:
            tokens = [int(t) for t in prompt]
            model.check_tokens(tokens, "prompt token")
        if session is not None:
            tokens = session.tokens + tokens
    if not tokens:
        msg = "the prompt is empty; give at least one token"
        raise ValueError(msg)
    return _fit(tokens, session, room)


def _fit(tokens: list[int], session: Session | None, room: int) -> list[int]:
    if len(tokens) < room:
        return tokens
    if session is not None:
        # A long conversation keeps its first n_keep tokens and its recent half.
        keep = min(session.n_keep, room // 2)
        return tokens[:keep] + tokens[len(tokens) - (room // 2 - keep) :]
    msg = (
        f"the prompt has {len(tokens)} tokens but a slot holds {room}; shorten it, or "
        "create the Engine with a larger n_ctx (or fewer n_parallel)"
    )
    raise ContextOverflowError(msg)


def embedding_inputs(
    model: lowlevel.Model,
    limit: int,
    kind: str,
    input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | None,
    query: str | None,
    documents: Sequence[str] | None,
) -> list[list[int]]:
    """The token sequences of an embedding or rerank task, each cut to ``limit`` tokens."""
    if kind == "embedding":
        if input is None:
            msg = "an embedding task needs input= (a text or a list of texts)"
            raise ValueError(msg)
        seqs = [_embedding_tokens(model, item)[:limit] for item in _embedding_items(input)]
    else:
        if query is None or documents is None:
            msg = "a rerank task needs query= and documents="
            raise ValueError(msg)
        seqs = [_rerank_tokens(model, query, d)[:limit] for d in documents]
    if not seqs or not all(seqs):
        msg = f"an {kind} task needs at least one non-empty text"
        raise ValueError(msg)
    return seqs


def _embedding_items(input: Any) -> list[Any]:
    """The inputs of an embedding task: a text or token ids alone, or a list of them."""
    if isinstance(input, str) or (input and isinstance(input[0], int)):
        return [input]
    return list(input)


def _embedding_tokens(model: lowlevel.Model, item: Any) -> list[int]:
    if isinstance(item, str):
        return model.tokenize(item, add_special=True)
    tokens = [int(t) for t in item]
    model.check_tokens(tokens, "input token")
    return tokens


def _rerank_tokens(model: lowlevel.Model, query: str, document: str) -> list[int]:
    """The sequence a rank-pooling model scores, as llama.cpp's server builds it."""
    template = model.chat_template("rerank")
    if template is not None:
        text = template.replace("{query}", query).replace("{document}", document)
        return model.tokenize(text, add_special=False, parse_special=True)
    out: list[int] = []
    if model.add_bos and model.bos >= 0:
        out.append(model.bos)
    out += model.tokenize(query, add_special=False)
    eos = model.eos
    if eos >= 0:
        out.append(eos)
    out += model.tokenize(document, add_special=False)
    if eos >= 0:
        out.append(eos)
    return out
