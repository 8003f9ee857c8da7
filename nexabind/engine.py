"""``Engine``: one model serving many conversations at once, with continuous batching.

One model, one context with ``n_parallel`` sequences in a unified KV cache, and a scheduler
thread (:mod:`nexabind._scheduler`) that decodes every active sequence in one
``llama_decode`` per step. Callers submit tasks from any number of threads and read their
results (blocking with a timeout), stream them (an iterator, or a callback that stops the task
by returning a true value) or cancel them. Sessions keep their KV cells between tasks, so a
follow-up turn decodes only its new tokens; when sessions outnumber slots, an idle session's
cells move to host memory and come back when it resumes. :mod:`nexabind._tasks` turns
:meth:`Engine.create_task`'s arguments into a task.

::

    with Engine("model.gguf", n_parallel=4) as engine:
        tid = engine.create_task("chat", messages=[{"role": "user", "content": "Hi"}])
        for tok in engine.stream(tid):
            print(tok.text, end="")
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from nexabind import _embed, lowlevel, openai
from nexabind._scheduler import Scheduler
from nexabind._slots import END, Session, Task
from nexabind._tasks import (
    KINDS,
    embedding_inputs,
    grammar_matcher,
    plan_task,
    prompt_tokens,
    sampling_options,
    task_request,
)
from nexabind.errors import ClosedError, SessionNotFoundError, TaskTimeoutError
from nexabind.tokens import Outcome, Token
from nexabind.tool_calls import ToolOutput

__all__ = ["Engine", "default_n_ctx"]


def default_n_ctx(n_parallel: int, n_ctx_train: int | None) -> int:
    """The KV cells an Engine takes when it is given no ``n_ctx``: ``n_parallel`` x the
    model's training length, each slot's share capped at 4096."""
    return n_parallel * min(n_ctx_train or 4096, 4096)


log = logging.getLogger(__name__)

#: The turn end of the chatml format: a stop string of every chat rendered with it.
_CHATML_STOP = "<|im_end|>"


class Engine:
    """Many tasks on one model: a context of ``n_parallel`` sequences and a scheduler thread.

    Args:
        model_path: The ``.gguf`` file.
        n_parallel: Sequences decoded together (slots).
        n_ctx: KV cells in all (None: ``n_parallel`` x the model's training length, each
            slot's share capped at 4096); each slot may use ``n_ctx // n_parallel``.
        n_batch: Most tokens one decode takes (generation steps and prompt chunks).
        n_ubatch: Tokens per compute step inside a decode.
        n_threads: Threads for generation (None: llama.cpp's default).
        n_threads_batch: Threads for prompt processing (None: as ``n_threads``).
        n_gpu_layers: Layers on the GPU (None: all, when a GPU backend is present).
        flash_attn: True, False, or None for llama.cpp's choice.
        embedding: An embedding engine (``embedding`` and ``rerank`` tasks only).
        chat_template: A jinja template or a llama.cpp built-in name, for chat tasks (None:
            the model's; chatml, with a warning logged once, when it has none, as ``Llama``).
        seed: Default sampling seed.
        max_queue: Tasks that may wait for a slot; more raise ``BusyError``.
        check_tensors: Validate every tensor's data while loading.
        rpc_servers: ``host:port`` of llama.cpp RPC servers whose devices take layers too (see
            :class:`nexabind.lowlevel.Model`). Trusted networks only.
        lib_path: Folder of the llama.cpp libraries.

    Raises:
        ValueError: ``n_parallel`` below 1, or another argument out of range.
        ModelLoadError: The model file is missing or invalid.
        ContextError: The context could not be created.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_parallel: int = 4,
        n_ctx: int | None = None,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        n_gpu_layers: int | None = None,
        flash_attn: bool | None = None,
        embedding: bool = False,
        chat_template: str | None = None,
        seed: int | None = None,
        max_queue: int = 256,
        check_tensors: bool = False,
        rpc_servers: Sequence[str] | str | None = None,
        lib_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(n_parallel, int) or n_parallel < 1:
            msg = f"n_parallel={n_parallel!r} is invalid; use 1 or more sequences"
            raise ValueError(msg)
        if max_queue < 0:
            msg = f"max_queue={max_queue} is invalid; use 0 or more"
            raise ValueError(msg)
        lowlevel.lib(lib_path)
        self.model_path = str(model_path)
        self._model = lowlevel.Model(
            model_path,
            n_gpu_layers=999 if n_gpu_layers is None else n_gpu_layers,
            check_tensors=check_tensors,
            rpc_servers=lowlevel.rpc.endpoints(rpc_servers),
        )
        try:
            if not n_ctx:
                n_ctx = default_n_ctx(n_parallel, self._model.n_ctx_train)
            self._ctx = lowlevel.Context(
                self._model,
                n_ctx=n_ctx,
                n_batch=max(n_batch, n_parallel),
                n_ubatch=n_ubatch,
                n_threads=n_threads,
                n_threads_batch=n_threads_batch,
                embeddings=embedding,
                n_seq_max=n_parallel,
                flash_attn=flash_attn,
                kv_unified=True,
            )
        except BaseException:
            self._model.close()
            raise
        self.n_parallel = n_parallel
        self.embedding = embedding
        if chat_template is None and not embedding and self._model.chat_template() is None:
            log.warning("%s has no chat template: chats use the chatml format (give a chat "
                        "template to choose another)", self.model_path)  # fmt: skip
            chat_template = "chatml"
        self.chat_template = chat_template
        self.seed = seed
        self.model_type: str = self._model.metadata().get("general.architecture", "unknown")
        """The model's architecture (``general.architecture``)."""
        self.err: BaseException | None = None
        """The error that ended the last :meth:`generate` / :meth:`chat` iterator, if any."""
        self._tasks: dict[int, Task] = {}
        self._sessions: dict[str, Session] = {}
        self._ids = itertools.count(1)
        self._last_id = 0
        self._lock = threading.Lock()
        self._sched = Scheduler(self._ctx, self._ctx.n_ctx // n_parallel, max_queue)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._sched is None

    def close(self) -> None:
        """End every task as cancelled, stop the scheduler, free the model. Idempotent."""
        sched = getattr(self, "_sched", None)
        if sched is None:
            return
        self._sched = None  # type: ignore[assignment]
        sched.stop()
        self._ctx.close()
        self._model.close()

    @property
    def failure(self) -> str | None:
        """Why the scheduler thread stopped, if an error stopped it (a bug: it then runs no
        task again, and every call raises ``ClosedError``); None while it runs or once closed.
        """
        sched = self._sched
        return None if sched is None else sched.failure

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scheduler(self) -> Scheduler:
        sched = self._sched
        if sched is None:
            msg = f"this Engine ({self.model_path}) is closed; create a new one"
            raise ClosedError(msg)
        return sched

    # -- sessions ---------------------------------------------------------------------------

    def create_session(
        self,
        *,
        system_prompt: str | None = None,
        n_keep: int = 0,
        cache_prompt: bool = True,
        **sampling: Any,
    ) -> str:
        """Start a conversation whose KV cells stay between its tasks; return its id.

        Chat tasks of a session send only the new messages: the session keeps the
        conversation (and the assistant's replies). Completion tasks continue the session's
        text.

        Args:
            system_prompt: The system message of a chat, or the start of a completion text.
            n_keep: Tokens at the start that stay when a long conversation is cut to fit.
            cache_prompt: Reuse the cells between tasks (False: decode it all each time).
            **sampling: Default sampling options of the session's tasks.

        Raises:
            TypeError: An unknown sampling option.
            ValueError: ``n_keep`` is negative or a sampling option is out of range.
        """
        self._scheduler()
        sampling_options(sampling)
        if n_keep < 0:
            msg = f"n_keep={n_keep} is invalid; use 0 or more tokens"
            raise ValueError(msg)
        sid = f"sess-{uuid.uuid4().hex[:16]}"
        self._sessions[sid] = Session(
            sid, n_keep=n_keep, cache_prompt=cache_prompt, sampling=sampling,
            system_prompt=system_prompt,
        )  # fmt: skip
        return sid

    def close_session(self, session_id: str) -> None:
        """Forget a session and its cells.

        Raises:
            SessionNotFoundError: No session has that id.
        """
        session = self._session(session_id)
        del self._sessions[session_id]
        self._scheduler().close_session(session)

    def session_info(self, session_id: str) -> dict[str, Any]:
        """A session's state: messages, tokens held, whether it has a slot or sits in memory.

        Raises:
            SessionNotFoundError: No session has that id.
        """
        s = self._session(session_id)
        return {
            "id": s.id,
            "messages": len(s.messages),
            "n_tokens": len(s.tokens),
            "slot": s.slot.id if s.slot is not None else None,
            "swapped_out": s.saved is not None,
            "busy": s.busy,
            "tasks": s.n_tasks,
        }

    def _session(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            msg = f"no session {session_id!r} in this engine (never created, or closed)"
            raise SessionNotFoundError(msg) from None

    # -- tasks ------------------------------------------------------------------------------

    def create_task(
        self,
        kind: str = "completion",
        *,
        prompt: str | Sequence[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
        input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | None = None,
        query: str | None = None,
        documents: Sequence[str] | None = None,
        session: str | None = None,
        max_tokens: int | None = 16,
        stop: str | Sequence[str] | None = None,
        logprobs: bool | int = False,
        response_format: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        functions: list[dict[str, Any]] | None = None,
        function_call: str | dict[str, Any] | None = None,
        same_prompt_as: int | None = None,
        **sampling: Any,
    ) -> int:
        """Queue a task; return its id at once.

        Args:
            kind: ``completion`` (``prompt``), ``chat`` (``messages``), ``embedding``
                (``input``: a text or a list) or ``rerank`` (``query`` and ``documents``).
            prompt: Text or token ids of a completion.
            messages: The conversation of a chat (in a session: its new messages).
            input: What to embed: a text or token ids, or a list of texts or of token-id lists.
            query: What to rank ``documents`` by (a rank-pooling model).
            documents: The texts to rank.
            session: A session id (see :meth:`create_session`).
            max_tokens: Most tokens to generate (None or <= 0: as many as the slot holds).
            stop: Stop strings.
            logprobs: True fills ``Token.logprob``; a number also ``Token.top_logprobs``.
            response_format: OpenAI's structured output (``json_object``, ``json_schema``):
                the reply is generated under the schema's grammar.
            tools, tool_choice, functions, function_call: OpenAI's tool calls (chat tasks;
                see :meth:`chat_output` for reading the reply).
            same_prompt_as: The id of a task with the same prompt (another choice of one
                request, OpenAI's ``n``): this task starts once that one has read its prompt
                and copies its KV cells (``llama_memory_seq_cp``) instead of decoding the
                prompt again.
            **sampling: Sampling options (see :class:`nexabind.sampling.SamplingOptions`),
                ``grammar`` among them.

        Raises:
            ValueError: A missing or malformed input, an option out of range, or a task
                this engine does not run (generation on an embedding engine, and back).
            TypeError: An unknown option.
            ContextOverflowError: The prompt does not fit a slot (this task only).
            SessionNotFoundError: No session has that id.
            BusyError: The queue is full.
            ClosedError: The engine is closed.
        """
        sched = self._scheduler()
        if kind not in KINDS:
            msg = f"kind={kind!r} is invalid; use one of {', '.join(KINDS)}"
            raise ValueError(msg)
        if (kind in ("embedding", "rerank")) != self.embedding:
            what = "an embedding engine" if self.embedding else "a generation engine"
            msg = (
                f"a {kind} task cannot run on {what}; create the Engine with "
                f"embedding={not self.embedding}"
            )
            raise ValueError(msg)
        sess = self._session(session) if session is not None else None
        task = Task(next(self._ids), kind, session=sess)
        if same_prompt_as is not None:
            with self._lock:  # None once that task is over and collected: nothing to wait for
                task.after = self._tasks.get(same_prompt_as)
        model = self._model
        if kind in ("embedding", "rerank"):
            limit = _embed.max_tokens(self._ctx)
            task.inputs = embedding_inputs(model, limit, kind, input, query, documents)
        else:
            if sess is not None:
                sampling = {**sess.sampling, **sampling}
            plan = plan_task(
                model, self.chat_template, kind, messages, response_format=response_format,
                tools=tools, tool_choice=tool_choice, functions=functions,
                function_call=function_call, grammar=sampling.get("grammar"),
            )  # fmt: skip
            sampling["grammar"] = plan.grammar
            task.req = task_request(model, self.seed, max_tokens, stop, logprobs, sampling)
            if kind == "chat" and self.chat_template == "chatml":  # its turns end with a text
                task.req.stops.append(_CHATML_STOP)
            task.matcher = grammar_matcher(model, task.req)
            task.tokens = prompt_tokens(
                model, self.chat_template, sched.n_ctx_slot, kind, prompt, plan, sess, task
            )
        with self._lock:
            self._tasks[task.id] = task
            self._last_id = max(self._last_id, task.id)
        try:
            sched.submit(task)
        except BaseException:
            with self._lock:
                del self._tasks[task.id]
            raise
        return task.id

    def _task(self, task_id: int) -> Task:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None:
            msg = f"no task {task_id} in this engine"
            raise KeyError(msg)
        return task

    def cancel(self, task_id: int) -> None:
        """Stop a task within one decode step and free its slot.

        Cancelling a task that has finished (its result collected or not) does nothing.

        Raises:
            KeyError: This engine never issued that id.
        """
        with self._lock:
            task = self._tasks.get(task_id)
            issued = 0 < task_id <= self._last_id
        if task is None:
            if issued:
                return
            msg = f"no task {task_id} in this engine"
            raise KeyError(msg)
        sched = self._sched
        if sched is not None and not task.done.is_set():
            sched.cancel(task)

    def result(self, task_id: int, timeout: float | None = None) -> dict[str, Any]:
        """Wait for a task and return what it produced.

        Returns:
            ``{"id", "kind", "text", "finish_reason", "usage"}`` for generation tasks (and
            ``"tokens"``: the :class:`~nexabind.tokens.Token` list); ``"embeddings"`` (lists of
            floats) or ``"scores"`` for embedding and rerank tasks.

        Raises:
            TaskTimeoutError: It did not finish within ``timeout`` seconds (it goes on).
            KeyError: No task has that id.
            NexabindError: The task failed (its own error: context full, decode failure...).
        """
        task = self._task(task_id)
        if not task.done.wait(timeout):
            msg = f"task {task_id} did not finish within {timeout:g} s; it is still running"
            raise TaskTimeoutError(msg)
        self._forget(task)
        if task.error is not None:
            raise task.error
        out: dict[str, Any] = {
            "id": task.id,
            "kind": task.kind,
            "finish_reason": task.outcome.finish_reason,
            "usage": {
                "prompt_tokens": task.outcome.prompt_tokens,
                "completion_tokens": task.outcome.completion_tokens,
                "total_tokens": task.outcome.prompt_tokens + task.outcome.completion_tokens,
            },
        }
        if task.kind in ("completion", "chat"):
            toks = []
            while (item := task.out.get()) is not END:
                toks.append(item)
            out["tokens"] = toks
            out["text"] = "".join(t.text for t in toks)
        elif task.kind == "embedding":
            out["embeddings"] = task.vectors.tolist()
        else:
            out["scores"] = [float(v[0]) for v in task.vectors]
        return out

    def stream(
        self,
        task_id: int,
        callback: Callable[[Token], Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[Token]:
        """The tokens of a generation task as they come.

        With ``callback``, it is called for each token in this thread and a true return value
        cancels the task; the iterator still yields every token that was produced.

        Raises:
            TaskTimeoutError: No token came for ``timeout`` seconds (the task goes on).
            KeyError: No task has that id.
            NexabindError: The task failed.
        """
        task = self._task(task_id)
        if task.kind not in ("completion", "chat"):
            msg = f"task {task_id} is an {task.kind} task: use result()"
            raise ValueError(msg)
        return self._stream(task, callback, timeout)

    def _stream(
        self, task: Task, callback: Callable[[Token], Any] | None, timeout: float | None
    ) -> Iterator[Token]:
        import queue as _queue

        try:
            while True:
                try:
                    item = task.out.get(timeout=timeout)
                except _queue.Empty:
                    msg = f"task {task.id} sent no token for {timeout:g} s"
                    raise TaskTimeoutError(msg) from None
                if item is END:
                    break
                if callback is not None and callback(item):
                    self.cancel(task.id)
                yield item
            if task.error is not None:
                raise task.error
        finally:
            if not task.done.is_set():  # the caller stopped early: so does the task
                self.cancel(task.id)
            else:
                self._forget(task)

    def chat_output(self, task_id: int) -> ToolOutput | None:
        """How to read a chat task's reply for tool calls (for :mod:`nexabind.openai`'s chat
        shapes, ``tools=``); None when the task asked for no tools."""
        return self._task(task_id).output

    def outcome(self, task_id: int) -> Outcome:
        """How a task ended (filled in once it has): finish reason and token counts."""
        return self._task(task_id).outcome

    def _forget(self, task: Task) -> None:
        with self._lock:
            self._tasks.pop(task.id, None)

    def status(self) -> dict[str, Any]:
        """Slots busy and idle, queue length, tokens/s, KV cells used, per-slot state."""
        return {**self._scheduler().status(), "sessions": len(self._sessions)}

    # -- TextModel --------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], **options: Any) -> Iterator[Token]:
        """Generate after ``prompt`` (the ``TextModel`` call); options as :meth:`create_task`."""
        return self._iterate(self.create_task("completion", prompt=prompt, **options))

    def chat(self, messages: list[dict[str, Any]], **options: Any) -> Iterator[Token]:
        """Answer ``messages`` (the ``TextModel`` call); options as :meth:`create_task`."""
        return self._iterate(self.create_task("chat", messages=messages, **options))

    def _iterate(self, task_id: int) -> Iterator[Token]:
        self.err = None
        try:
            yield from self.stream(task_id)
        except BaseException as e:
            self.err = e
            raise

    def token_to_piece(self, token: int) -> bytes:
        """The bytes of ``token`` (what names a top log-probability in the OpenAI shapes)."""
        self._scheduler()
        return self._model.token_to_piece(token)

    # -- OpenAI shapes ------------------------------------------------------------------------

    def completion(self, task_id: int, *, model: str | None = None) -> dict[str, Any]:
        """A task's result as an OpenAI ``text_completion`` / ``chat.completion`` dict."""
        task = self._task(task_id)
        if task.kind == "chat":
            return openai.chat_completion(
                self.stream(task_id),
                task.outcome,
                model=model or self.model_path,
                piece=self._model.token_to_piece,
                tools=task.output,
            )
        return openai.completion(
            self.stream(task_id),
            task.outcome,
            model=model or self.model_path,
            piece=self._model.token_to_piece,
        )
