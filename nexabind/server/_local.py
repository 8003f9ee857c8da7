"""The in-process engine behind the gateway: a :class:`~nexabind.engine.Engine`.

Each admitted request runs in a worker thread: it creates the engine task, then turns the
task's tokens into OpenAI's shapes (:mod:`nexabind.openai`) and hands SSE events to the event
loop one by one (``call_soon_threadsafe``), so the loop never blocks on the engine. A request
whose client goes away cancels its task, which ends at the engine's next step and frees the
slot. ``session_id`` (or ``user``) routes a chat to an engine session that keeps the
conversation's KV cells between turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nexabind import _embed, chat, openai
from nexabind.engine import Engine
from nexabind.errors import (
    BusyError,
    ClosedError,
    ContextOverflowError,
    NexabindError,
    SessionNotFoundError,
)
from nexabind.server._metrics import Metrics
from nexabind.server._options import ServeOptions
from nexabind.server._schema import field_of
from nexabind.server.gateway import Call, HTTPError
from nexabind.tokens import Outcome, Token

__all__ = ["LocalBackend", "as_flags", "encode_json", "sse"]

log = logging.getLogger(__name__)

#: The last event of a stream that ended well.
DONE = b"data: [DONE]\n\n"

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty",
             "presence_penalty", "frequency_penalty", "seed", "logit_bias")  # fmt: skip
_STRUCTURED = ("response_format", "tools", "tool_choice", "functions", "function_call")


def encode_json(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON; text holding a lone surrogate (a model's ``"\\ud800"``
    in call arguments) is written with ``\\u`` escapes instead, which JSON allows."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode()


def sse(obj: Any) -> bytes:
    """One server-sent event: ``data: {json}`` and a blank line."""
    return b"data: " + encode_json(obj) + b"\n\n"


#: The engine's advice in Python arguments, and the same advice in ``nexabind serve`` flags.
_FLAGS = (
    ("create the Engine with a larger n_ctx (or fewer n_parallel)",
     "start the server with a larger -c/--ctx-size (or a smaller -np/--parallel)"),
    ("create the Engine with a larger max_queue", "start the server with a larger --max-queue"),
    ("pass a jinja template with chat_template=...",
     "start the server with --chat-template (a jinja template or a built-in name)"),
    ("pass chat_template= (", "start the server with --chat-template ("),
)  # fmt: skip


def as_flags(message: str) -> str:
    """An engine error's message, its advice naming the server's flags, not Python's."""
    for python, flag in _FLAGS:
        message = message.replace(python, flag)
    return message


def to_http(e: BaseException, param: str | None = None) -> HTTPError:
    """The HTTP answer for an engine error (bad input is a 400, never a 500)."""
    if isinstance(e, HTTPError):
        return e
    text = as_flags(str(e))
    if isinstance(e, ContextOverflowError):
        return HTTPError(400, text, param=param, code="context_length_exceeded")
    if isinstance(e, (ValueError, TypeError)) and not isinstance(e, SessionNotFoundError):
        return HTTPError(400, text, param=param or field_of(text))
    if isinstance(e, BusyError):
        return HTTPError(429, text, headers={"Retry-After": "1"})
    if isinstance(e, ClosedError):
        return HTTPError(503, "the model was unloaded; retry", headers={"Retry-After": "1"})
    if isinstance(e, NexabindError):
        return HTTPError(500, text)
    log.error("unexpected error", exc_info=e)
    return HTTPError(500, f"internal error ({type(e).__name__}); see the server's log")


@dataclass(eq=False)
class _Conversation:
    """An engine session and the messages it holds, for ``session_id`` / ``user``.

    One request at a time has it: the others wait on the event loop for :attr:`lock`
    (:meth:`LocalBackend.reserve`); the holder's permit releases it (:meth:`release`).
    """

    sid: str | None = None  # the engine's session, made by the first request's worker
    history: list[tuple[str, str]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def release(self) -> None:
        if self.lock.locked():
            self.lock.release()


def _cancel(engine: Engine, call: Call) -> None:
    """Cancel the engine tasks of ``call`` (if it has any yet)."""
    for tid in call.task or ():
        with contextlib.suppress(KeyError, ClosedError):
            engine.cancel(tid)


def _close_session(engine: Engine, sid: str) -> None:
    with contextlib.suppress(SessionNotFoundError, ClosedError):
        engine.close_session(sid)


def _max_tokens(body: dict[str, Any], cap: int) -> int | None:
    """The tokens a request may generate: its ``max_completion_tokens``, ``max_tokens`` or
    ``n_predict`` (llama-server's name; -1: no limit), within the server's ``-n`` cap."""
    asked = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("n_predict")
    if asked is None or asked < 0:
        asked = None
    if cap > 0:
        return cap if asked is None else min(asked, cap)
    return asked


def _summed(
    engine: Engine,
    tids: list[int],
    chunks: Iterable[dict[str, Any]],
    outcomes: list[Outcome],
    total: Outcome,
) -> Iterator[dict[str, Any]]:
    """``chunks``; once they are done, ``total`` holds the tokens of every choice's
    ``outcomes`` (the prompt once). The choices' tasks are discarded however it ends."""
    try:
        yield from chunks
    finally:
        _discard(engine, tids)
    total.prompt_tokens = outcomes[0].prompt_tokens
    total.completion_tokens = sum(o.completion_tokens for o in outcomes)


def _discard(engine: Engine, tids: list[int]) -> None:
    """Cancel the tasks of ``tids`` whose answers were not read (a choice before them failed)
    and let the engine forget them; those that were read are gone already."""
    for tid in tids:
        with contextlib.suppress(KeyError, ClosedError):
            engine.cancel(tid)
    for tid in tids:
        with contextlib.suppress(Exception):  # its own error: the request has failed already
            engine.result(tid)


def _key(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m.get("content") or "") for m in messages]


class LocalBackend:
    """An :class:`~nexabind.engine.Engine` in this process."""

    def __init__(self, options: ServeOptions, metrics: Metrics) -> None:
        self.options = options
        self.metrics = metrics
        self.engine: Engine | None = None
        self.pool = ThreadPoolExecutor(options.parallel + 4, thread_name_prefix="nexabind-serve")
        self.calls: set[Call] = set()
        # Conversations by (API key index, session id); touched on the event loop only.
        self._conversations: OrderedDict[tuple[str, str], _Conversation] = OrderedDict()
        self.session_waiting = 0  # requests waiting for a busy conversation

    # -- Backend ----------------------------------------------------------------------------

    def load(self) -> None:
        o = self.options
        self.engine = Engine(
            o.model,
            n_parallel=o.parallel,
            n_ctx=o.ctx_size,
            n_threads=o.threads,
            n_threads_batch=o.threads,
            embedding=not o.generates,
            chat_template=o.chat_template,
            max_queue=o.parallel + o.max_queue,
            lib_path=o.lib_path,
            rpc_servers=o.rpc,
        )

    def unload(self) -> None:
        engine, self.engine = self.engine, None
        for conv in self._conversations.values():
            conv.sid, conv.history = None, []  # the engine's sessions go with it
        if engine is not None:
            engine.close()

    def degraded(self) -> bool:
        return False

    def failure(self) -> str | None:
        engine = self.engine
        return None if engine is None else engine.failure

    def status(self) -> dict[str, Any]:
        engine = self.engine
        waiting = {"session_waiting": self.session_waiting}
        if engine is None:
            return {"loaded": False, **waiting}
        try:
            return {"loaded": True, **engine.status(), **waiting}
        except ClosedError:
            return {"loaded": False, **waiting}

    def tokens_per_second(self) -> float:
        engine = self.engine
        try:
            return float(engine.status()["tokens_per_second"]) if engine else 0.0
        except ClosedError:
            return 0.0

    def cancel_all(self) -> None:
        engine = self.engine
        for call in list(self.calls):
            call.cut = "the server is shutting down: the request was cancelled"
            if engine is not None:
                _cancel(engine, call)

    async def reserve(self, kind: str, body: dict[str, Any], owner: str) -> _Conversation | None:
        name = body.get("session_id") or body.get("user")
        if kind != "chat" or not name:
            return None
        conv = self._conversation((owner, name))
        self.session_waiting += 1
        try:
            await asyncio.wait_for(conv.lock.acquire(), self.options.queue_timeout)
        except asyncio.TimeoutError:
            msg = (
                f"the conversation {name!r} is busy with another request and stayed so for "
                f"{self.options.queue_timeout:g} s (--queue-timeout); send one request at a "
                "time per session_id"
            )
            raise HTTPError(429, msg, param="session_id", headers={"Retry-After": "1"}) from None
        finally:
            self.session_waiting -= 1
        return conv

    async def run(self, kind: str, body: dict[str, Any], raw: bytes, call: Call) -> Any:
        engine = self.engine
        if engine is None:
            raise HTTPError(503, "the model is not loaded; retry", headers={"Retry-After": "1"})
        if kind in ("chat", "completion") and not self.options.generates:
            what = "embedding" if self.options.embedding else "rerank"
            msg = f"this server runs an {what} model; start it without --{what} to generate"
            raise HTTPError(501, msg)
        if kind in ("embedding", "rerank"):
            flag = "--embedding" if kind == "embedding" else "--rerank"
            if (
                kind == "embedding"
                and not self.options.embedding
                or (kind == "rerank" and not self.options.rerank)
            ):
                msg = f"this server does not serve /v1/{kind}s; start it with {flag}"
                if kind == "rerank":
                    msg = "this server does not serve /v1/rerank; start it with --rerank"
                raise HTTPError(501, msg)
            return await self._blocking(call, lambda: self._embed(engine, kind, body, call))
        start, shape = self._generation(engine, kind, body, call)
        if body.get("stream"):
            return await self._stream(engine, call, start, shape)
        return await self._blocking(call, lambda: shape(start()))

    # -- generation -------------------------------------------------------------------------

    def _generation(
        self, engine: Engine, kind: str, body: dict[str, Any], call: Call
    ) -> tuple[Callable[[], list[int]], Callable[[list[int]], Any]]:
        """What creates the tasks (in the worker: one per choice, ``n``) and what turns them
        into a response."""
        sampling = {k: body[k] for k in _SAMPLING if k in body}
        n = body.get("n") or 1
        # Structured output and tool calls, as the engine takes them (empty lists: none).
        asked = {k: body[k] for k in _STRUCTURED if body.get(k) not in (None, [])}
        max_tokens = _max_tokens(body, self.options.n_predict)
        stop = body.get("stop")
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        model = self.options.name
        stream = bool(body.get("stream"))
        usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        if kind == "chat":
            try:
                messages = chat.check_messages(body["messages"])
            except ValueError as e:
                raise HTTPError(400, str(e), param="messages") from None
            logprobs = bool(body.get("logprobs"))
            n_top: bool | int = (body.get("top_logprobs") or 0) if logprobs else False
            # A router's lease holds the conversation besides the model's slot.
            held = getattr(call.permit.held, "conversation", call.permit.held)
            conv = held if isinstance(held, _Conversation) else None
            if conv is not None and n > 1:
                msg = (
                    f"n={n} cannot continue a conversation (session_id or user): its history "
                    "holds one reply; ask for n=1, or leave session_id and user out"
                )
                raise HTTPError(400, msg, param="n")

            def start_one(sampling: dict[str, Any], first: int | None) -> int:
                session = None
                todo = messages
                if conv is not None:  # this request holds it (reserve)
                    have = conv.history
                    if (
                        conv.sid is not None
                        and len(messages) > len(have)
                        and (_key(messages[: len(have)]) == have)
                    ):
                        todo = messages[len(have) :]
                    else:  # new, or another conversation under the same name: start over
                        if conv.sid is not None:
                            with contextlib.suppress(SessionNotFoundError):
                                engine.close_session(conv.sid)
                        conv.sid, conv.history = engine.create_session(), []
                    session = conv.sid
                return engine.create_task(
                    "chat", messages=todo, session=session, max_tokens=max_tokens,
                    stop=stop, logprobs=n_top, same_prompt_as=first, **asked, **sampling,
                )  # fmt: skip

            def finish(outcome: Outcome, text: str) -> None:
                if conv is not None and outcome.finish_reason in ("stop", "length"):
                    conv.history = [*_key(messages), ("assistant", text)]

            def shaped(tokens: Iterable[Token], outcome: Outcome, tid: int) -> Any:
                f = openai.chat_chunks if stream else openai.chat_completion
                return f(tokens, outcome, model=model, logprobs=logprobs,
                         piece=engine.token_to_piece, id=rid, created=created,
                         tools=engine.chat_output(tid))  # fmt: skip

        else:
            prompt = body["prompt"]
            n_lp = body.get("logprobs")

            def echoed() -> str:  # in the worker, once the task has checked the prompt
                if not body.get("echo"):
                    return ""
                if isinstance(prompt, str):
                    return prompt
                pieces = b"".join(engine.token_to_piece(t) for t in prompt)
                return pieces.decode("utf-8", "replace")

            def start_one(sampling: dict[str, Any], first: int | None) -> int:
                lp: bool | int = n_lp if n_lp is not None else False
                return engine.create_task(
                    "completion", prompt=prompt, max_tokens=max_tokens, stop=stop,
                    logprobs=lp, same_prompt_as=first, **asked, **sampling,
                )  # fmt: skip

            def finish(outcome: Outcome, text: str) -> None:
                pass

            def shaped(tokens: Iterable[Token], outcome: Outcome, tid: int) -> Any:
                f = openai.completion_chunks if stream else openai.completion
                return f(tokens, outcome, model=model, prefix=echoed(), suffix=body.get("suffix"),
                         logprobs=n_lp, piece=engine.token_to_piece, id=rid,
                         created=created)  # fmt: skip

        def start() -> list[int]:
            tids: list[int] = []
            try:
                for i in range(n):  # a seed gives each choice its own: seed, seed + 1, ...
                    own = {**sampling, "seed": (sampling["seed"] + i) & 0xFFFFFFFF} if (
                        i and "seed" in sampling) else sampling  # fmt: skip
                    # The prompt is decoded once: the other choices copy the first's cells.
                    tids.append(start_one(own, tids[0] if tids else None))
            except BaseException:
                for tid in tids:
                    with contextlib.suppress(KeyError, ClosedError):
                        engine.cancel(tid)
                raise
            return tids

        def tokens_of(tid: int, outcome: Outcome, texts: list[str], last: bool) -> Iterator[Token]:
            try:
                for t in engine.stream(tid):
                    if call.first_token is None:
                        call.first_token = time.monotonic()
                        self.metrics.first_token(call.first_token - call.arrived)
                    texts.append(t.text)
                    yield t
            finally:
                # The conversation's history first: the permit's release lets the next
                # request on it in.
                finish(outcome, "".join(texts))
                self.metrics.tokens(outcome.prompt_tokens, outcome.completion_tokens)
                if last:
                    call.permit.release()

        def shape(tids: list[int]) -> Any:
            self._attach(engine, call, tids)
            outcomes = [engine.outcome(tid) for tid in tids]

            def one(i: int) -> Any:  # a stream's chunks, or an answer (when not streamed)
                return shaped(tokens_of(tids[i], outcomes[i], [], i == n - 1), outcomes[i], tids[i])

            if n == 1:
                out, total = one(0), outcomes[0]
            elif stream:
                total = Outcome()
                chunks = openai.indexed_chunks([one(i) for i in range(n)])
                out = _summed(engine, tids, chunks, outcomes, total)
            else:
                try:
                    return openai.merge_choices([one(i) for i in range(n)])
                finally:
                    _discard(engine, tids)
            if stream and usage:
                out = openai.with_usage(out, total)
            return out

        return start, shape

    def _conversation(self, name: tuple[str, str]) -> _Conversation:
        """The conversation ``name`` (an API key's index and the session id); beyond
        ``max_sessions``, the least recently used idle one is closed (on the loop)."""
        conv = self._conversations.get(name)
        if conv is not None:
            self._conversations.move_to_end(name)
            return conv
        conv = self._conversations[name] = _Conversation()
        idle = [k for k, c in self._conversations.items() if not c.lock.locked()]
        for key in idle[: max(0, len(self._conversations) - self.options.max_sessions)]:
            old = self._conversations.pop(key)
            engine = self.engine
            if old.sid is not None and engine is not None:
                self.pool.submit(_close_session, engine, old.sid)
        return conv

    def _embed(self, engine: Engine, kind: str, body: dict[str, Any], call: Call) -> Any:
        if kind == "embedding":
            tid = engine.create_task("embedding", input=body["input"])
        else:
            tid = engine.create_task("rerank", query=body["query"], documents=body["documents"])
        self._attach(engine, call, [tid])
        try:
            res = engine.result(tid)
        finally:
            call.permit.release()
        n = res["usage"]["prompt_tokens"]
        self.metrics.tokens(n, 0)
        if kind == "embedding":
            fmt = body.get("encoding_format") or "float"
            unit = body.get("normalize", True)  # OpenAI's vectors have unit length
            try:
                vectors = _embed.shorten(res["embeddings"], body.get("dimensions"), unit=unit)
            except ValueError as e:
                raise HTTPError(400, str(e), param="dimensions") from None
            return openai.embedding_list(vectors, model=self.options.name,
                                         prompt_tokens=n, encoding_format=fmt)  # fmt: skip
        docs = body["documents"] if body.get("return_documents") else None
        return openai.rerank_list(res["scores"], model=self.options.name, prompt_tokens=n,
                                  documents=docs, top_n=body.get("top_n"))  # fmt: skip

    # -- running in the worker threads --------------------------------------------------------

    def _attach(self, engine: Engine, call: Call, tids: list[int]) -> None:
        """Note a call's tasks; cancel them at once when its client is already gone."""
        call.task = tids
        if call.gone:
            _cancel(engine, call)

    def _abandon(self, call: Call) -> None:
        """The client went away: cancel its task, now or as soon as it exists."""
        call.gone = True
        engine = self.engine
        if engine is not None:
            _cancel(engine, call)

    def _run_owned(self, call: Call, work: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``work`` in a worker that owns the call: when the work ends, however it ends,
        the call's permit goes back, and the conversation it holds once the work has ended
        (a client that leaves gives its slot back at once, but its worker may still be
        starting a task on the conversation)."""

        let_go = call.permit.keep()

        def owned() -> Any:
            try:
                return work()
            finally:
                call.permit.release()
                let_go()

        try:
            return asyncio.get_running_loop().run_in_executor(self.pool, owned)
        except BaseException:  # never started (the pool is shut down)
            call.permit.release()
            let_go()
            raise

    async def _blocking(self, call: Call, work: Callable[[], Any]) -> Any:
        """Run ``work`` in a worker; its engine errors become HTTP answers."""
        self.calls.add(call)
        try:
            return await self._run_owned(call, work)
        except asyncio.CancelledError:  # the client went away: stop its task
            self._abandon(call)
            raise
        except Exception as e:  # noqa: BLE001 - every error becomes an HTTP answer
            raise to_http(e) from None
        finally:
            self.calls.discard(call)

    async def _stream(
        self,
        engine: Engine,
        call: Call,
        start: Callable[[], list[int]],
        shape: Callable[[list[int]], Iterable[dict[str, Any]]],
    ) -> AsyncIterator[bytes]:
        """Create the task (errors are HTTP answers), then stream its chunks as SSE events."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(q.put_nowait, (kind, value))

        def work() -> None:
            try:
                tids = start()
            except BaseException as e:  # noqa: BLE001 - handed to the request
                put("fail", e)
                return
            self._attach(engine, call, tids)
            put("started", tids)
            try:
                for chunk in shape(tids):
                    put("data", sse(chunk))
                if call.cut is not None:
                    put("data", sse(HTTPError(503, call.cut).body()))
                else:
                    put("data", DONE)
            except Exception as e:  # noqa: BLE001 - sent as the stream's error event
                err = to_http(e)
                put("data", sse(err.body()))
            finally:
                call.permit.release()
                put("end", None)

        self.calls.add(call)
        try:
            self._run_owned(call, work)
            kind, value = await q.get()
        except BaseException:
            self._abandon(call)
            self.calls.discard(call)
            raise
        if kind == "fail":
            self.calls.discard(call)
            raise to_http(value)
        return self._events(engine, call, q)

    async def _events(
        self, engine: Engine, call: Call, q: asyncio.Queue[tuple[str, Any]]
    ) -> AsyncIterator[bytes]:
        ended = False
        try:
            while True:
                kind, value = await q.get()
                if kind == "end":
                    ended = True
                    return
                yield value
        finally:
            self.calls.discard(call)
            if not ended:  # the client went away: stop the task
                self._abandon(call)
