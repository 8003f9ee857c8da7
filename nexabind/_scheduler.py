"""The scheduler of an :class:`~nexabind.engine.Engine`: one thread, one context, many sequences.

Each step puts the next token of every generating slot and chunks of the prompts waiting to be
read into ONE batch, runs ONE ``llama_decode``, then samples every slot that has logits with its
own sampler chain (continuous batching: a task joins at the next step, a finished one leaves
without stalling the others). Only this thread touches the context; callers talk to it through
the task queue and each task's output queue, so a cancel lands at the next step and no lock is
held across a decode by anyone else. Which slot a task takes and how a session's KV cells move
between slots and host memory is :mod:`nexabind._slots`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from array import array
from collections import deque
from typing import Any

from nexabind import _embed, lowlevel
from nexabind._emit import Emitter
from nexabind._llguidance import constrained
from nexabind._slots import (
    END,
    GEN,
    IDLE,
    PROMPT,
    Session,
    Slot,
    Task,
    choose,
    claim,
    drop_session,
    free_cells,
    waits_for_prompt,
)
from nexabind.errors import BusyError, ClosedError, ContextOverflowError, NexabindError
from nexabind.sampling import build_sampler
from nexabind.tokens import Token

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)


class Scheduler:
    """Owns the context and the thread that drives it.

    Args:
        ctx: The context, with ``n_seq_max`` sequences and a unified KV cache.
        n_ctx_slot: KV cells one sequence may use.
        max_queue: Tasks that may wait for a slot before :meth:`submit` refuses more.
    """

    def __init__(self, ctx: lowlevel.Context, n_ctx_slot: int, max_queue: int) -> None:
        self.ctx = ctx
        self.model = ctx.model
        self.n_ctx_slot = n_ctx_slot
        self.max_queue = max_queue
        self.slots = [Slot(i, n_ctx_slot) for i in range(ctx.n_seq_max)]
        self.batch = lowlevel.Batch(ctx.n_batch)
        self.is_eog, self.piece = ctx.vocab_steps()
        self.pending: deque[Task] = deque()
        self.cv = threading.Condition()
        self.stopping = False
        self.ids = itertools.count(1)
        self.n_generated = 0
        self.n_prompt = 0
        self.n_steps = 0
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)
        self.error: BaseException | None = None
        """What stopped the thread, if it stopped by an error (a bug: every task's own error
        ends that task only)."""
        self.thread = threading.Thread(target=self._run, name="nexabind-engine", daemon=True)
        self.thread.start()

    # -- what callers use (any thread) ------------------------------------------------------

    def submit(self, task: Task) -> None:
        """Queue ``task`` for the next step.

        Raises:
            BusyError: The queue holds ``max_queue`` tasks already.
            ClosedError: The engine is closed.
        """
        with self.cv:
            if self.stopping:
                msg = "the engine is closed; create a new one"
                if self.error is not None:
                    msg = f"the engine's scheduler stopped ({self.failure}); create a new Engine"
                raise ClosedError(msg)
            if len(self.pending) >= self.max_queue:
                msg = (
                    f"the engine's queue is full ({self.max_queue} tasks wait for a slot); "
                    "retry later, or create the Engine with a larger max_queue"
                )
                raise BusyError(msg)
            self.pending.append(task)
            self.cv.notify()

    def cancel(self, task: Task) -> None:
        """Ask for ``task`` to end; it does at the next step (a finished one: no-op)."""
        task.cancelled = True
        with self.cv:
            self.cv.notify()

    def stop(self) -> None:
        """End every task as cancelled, stop the thread and wait for it."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if threading.current_thread() is not self.thread:
            self.thread.join()

    @property
    def failure(self) -> str | None:
        """Why the thread stopped, when an error stopped it (None: it runs, or was stopped)."""
        e = self.error
        return None if e is None else f"{type(e).__name__}: {e}"

    def status(self) -> dict[str, Any]:
        """Slots, queue, throughput and KV use, as one consistent-enough snapshot."""
        slots = [
            {
                "id": s.id,
                "state": s.state,
                "task": s.task.id if s.task else None,
                "session": s.session.id if s.session else None,
                "n_tokens": s.n,
            }
            for s in self.slots
        ]
        now = time.monotonic()
        recent = [(t, n) for t, n in self._rate if now - t < 10]
        rate = 0.0
        if len(recent) > 1 and recent[-1][0] > recent[0][0]:
            rate = sum(n for _, n in recent[1:]) / (recent[-1][0] - recent[0][0])
        return {
            "slots": slots,
            "slots_busy": sum(s.task is not None for s in self.slots),
            "slots_idle": sum(s.task is None for s in self.slots),
            "queue": len(self.pending),
            "tokens_per_second": round(rate, 2),
            "kv_cells_used": sum(s.n for s in self.slots),
            "kv_cells": self.ctx.n_ctx,
            "n_ctx_slot": self.n_ctx_slot,
            "generated_tokens": self.n_generated,
            "prompt_tokens": self.n_prompt,
            "steps": self.n_steps,
        }

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self.cv:
                    while not (self.stopping or self.pending or self._running()):
                        self.cv.wait()
                    if self.stopping:
                        break
                    arrivals = list(self.pending)
                with self.ctx.lock:
                    left = self._admit(arrivals)
                    self._step()
                # The tasks stay in the queue while they are admitted, so that submit() counts
                # them against max_queue until they have a slot.
                gone = {id(t) for t in arrivals} - {id(t) for t in left}
                with self.cv:
                    self.pending = deque(t for t in self.pending if id(t) not in gone)
                if left and not self._running():
                    time.sleep(0.001)  # nothing could start: let a cancel or close in
        except BaseException as e:  # a bug here must not leave callers waiting forever
            log.exception("the engine's scheduler stopped")
            self.error = e
            self._fail_all(e)
            raise
        finally:
            self._fail_all(None)

    def _running(self) -> bool:
        return any(s.task is not None for s in self.slots)

    def _fail_all(self, error: BaseException | None) -> None:
        with self.cv:
            self.stopping = True
            waiting = list(self.pending)
            self.pending.clear()
        for task in waiting:
            self._finish(task, "cancelled", error)
        for slot in self.slots:
            if slot.task is not None:
                self._end(slot, "cancelled", error)

    # -- admission ----------------------------------------------------------------------------

    def _admit(self, arrivals: list[Task]) -> list[Task]:
        """Start what can start; return what must wait (in order)."""
        left: list[Task] = []
        for task in arrivals:
            if task.cancelled:
                self._finish(task, "cancelled")
            elif task.kind in ("embedding", "rerank"):
                self._embed(task)
            elif left:  # first come, first served: nothing overtakes a waiting task
                left.append(task)
            else:
                wait = waits_for_prompt(self.slots, task)
                slot = None if wait else choose(self.slots, task, self.ctx)
                if slot is None:
                    left.append(task)
                    continue
                self._begin(slot, task)
        return left

    def _begin(self, slot: Slot, task: Task) -> None:
        """Start ``task`` in ``slot``; whatever fails here fails that task only (a logit bias
        outside the vocabulary, a grammar that does not parse, a value llama.cpp refuses), and
        the slot and every other task go on."""
        assert task.req is not None
        opts = task.req.opts
        sampler: lowlevel.SamplerChain | None = None
        try:
            sampler = build_sampler(self.model, opts, self.n_ctx_slot)
            matcher = task.matcher
            self._start(slot, task, sampler)
            sampler = None  # the slot owns it now
            if matcher is not None:
                assert slot.sample is not None
                slot.sample = constrained(
                    matcher, slot.sample, self.ctx.logits, reject_first=not opts.penalties
                )
        except Exception as e:  # noqa: BLE001 - the task's error, handed to its caller
            log.debug("task %d failed to start: %r", task.id, e)
            if sampler is not None:
                sampler.close()
            if slot.task is task:
                self._end(slot, "stop", e)
            else:
                if task.session is not None:
                    task.session.busy = False
                self._finish(task, "stop", e)

    def _start(self, slot: Slot, task: Task, sampler: lowlevel.SamplerChain) -> None:
        import numpy as np

        n = claim(self.ctx, slot, task, self.slots)
        tokens = task.tokens
        req = task.req
        assert req is not None
        slot.task = task
        slot.state = PROMPT
        slot.prompt = np.asarray(tokens, dtype=np.int32)
        slot.i_prompt = n
        slot.sampler = sampler
        slot.sample = self.ctx.sampler_step(sampler)
        room = self.n_ctx_slot - len(tokens)
        # What each token emits is Llama's emitter too: the same tokens give the same text.
        slot.emitter = Emitter(
            self.piece,
            self.is_eog,
            stops=req.stops,
            limit=min(req.max_tokens, room) if req.max_tokens and req.max_tokens > 0 else room,
            logits=self.ctx.logits if req.want_logprobs else None,
            n_top=req.n_top,
            spelled=task.spelled,
        )
        task.started = time.monotonic()
        task.outcome.prompt_tokens = len(tokens)

    # -- one step -----------------------------------------------------------------------------

    def _step(self) -> None:
        batch = self.batch
        batch.clear()
        active = []
        for s in self.slots:
            task = s.task
            if task is None:
                continue
            if task.cancelled:
                self._end(s, "cancelled")
                continue
            active.append(s)
            if s.state == GEN:
                s.i_batch = batch.add(s.last, s.n, s.id, True)
        budget = batch.capacity - batch.n_tokens
        prompts = sorted(
            (s for s in active if s.state == PROMPT),
            key=lambda s: s.task.created if s.task else 0.0,
        )
        for s in prompts:
            s.i_batch = -1
            s.pending = 0
            if budget <= 0:
                continue
            k = min(budget, len(s.prompt) - s.i_prompt)
            done = s.i_prompt + k == len(s.prompt)
            chunk = s.prompt[s.i_prompt : s.i_prompt + k]
            idx = batch.append(chunk, s.i_prompt, s.id, logits_last=done)
            s.pending = k
            s.i_batch = idx if done else -1
            budget -= k
        if not batch.n_tokens:
            return
        if not self._decode(active):
            return
        self.n_steps += 1
        generated = 0
        for s in active:
            if s.task is None:
                continue
            if s.state == GEN:
                s.tokens[s.n] = s.last
                s.n += 1
                generated += 1
            elif s.pending:
                k = s.pending
                s.tokens[s.n : s.n + k] = array(
                    "i", s.prompt[s.i_prompt : s.i_prompt + k].tobytes()
                )
                s.n += k
                s.i_prompt += k
                self.n_prompt += k
                if s.i_prompt == len(s.prompt):
                    s.state = GEN
            if s.i_batch >= 0:
                try:
                    self._sample(s)
                except Exception as e:  # noqa: BLE001 - a grammar at a dead end: this task only
                    self._end(s, "stop", e)
        self.n_generated += generated
        self._rate.append((time.monotonic(), generated))

    def _decode(self, active: list[Slot]) -> bool:
        """Decode the batch; on a full KV cache, free cells and retry, failing tasks last."""
        while True:
            try:
                self.ctx.decode(self.batch)
                return True
            except ContextOverflowError as e:
                if free_cells(self.ctx, self.slots):
                    continue
                victim = next((s for s in reversed(active) if s.task and s.pending), None)
                victim = victim or next((s for s in reversed(active) if s.task), None)
                if victim is None:
                    return False
                self._end(victim, "length", e)
                self._rebuild(active)
                if not self.batch.n_tokens:
                    return False
            except NexabindError as e:
                for s in active:
                    if s.task is not None:
                        self._end(s, "stop", e)
                return False

    def _rebuild(self, active: list[Slot]) -> None:
        """Refill the batch without the slots that just ended."""
        self.batch.clear()
        for s in active:
            if s.task is None:
                continue
            if s.state == GEN:
                s.i_batch = self.batch.add(s.last, s.n, s.id, True)
            elif s.pending:
                done = s.i_prompt + s.pending == len(s.prompt)
                chunk = s.prompt[s.i_prompt : s.i_prompt + s.pending]
                idx = self.batch.append(chunk, s.i_prompt, s.id, logits_last=done)
                s.i_batch = idx if done else -1

    def _sample(self, s: Slot) -> None:
        task, emitter = s.task, s.emitter
        assert task is not None and emitter is not None and s.sample is not None
        tok = s.sample(s.i_batch)  # under the context's lock, on a row with logits
        if task.first_token is None:
            task.first_token = time.monotonic()
        token = emitter.update(tok, s.i_batch)
        if token is not None:
            self._emit(task, token)
        if emitter.reason is None:
            s.last = tok
        else:
            self._end(s, emitter.reason, by_stop=emitter.hit)

    def _emit(self, task: Task, token: Token) -> None:
        task.outcome.completion_tokens += 1
        task.text.append(token.text)
        task.ids.append(token.id)
        task.out.put(token)

    def _end(
        self, s: Slot, reason: str, error: BaseException | None = None, *, by_stop: bool = False
    ) -> None:
        task = s.task
        assert task is not None
        if s.sampler is not None:
            s.sampler.close()
            s.sampler = None
            s.sample = None
        s.task = None
        s.state = IDLE
        s.used = time.monotonic()
        s.prompt = None
        session = task.session
        if session is not None:
            session.busy = False
            session.used = s.used
            session.n_tasks += 1
            if error is None and reason != "cancelled":
                session.tokens = s.tokens[: s.n].tolist()
                if task.kind == "chat":
                    reply = "".join(task.text)
                    session.messages += [*task.messages, {"role": "assistant", "content": reply}]
                    # A stop string was cut from the reply but the model saw its tokens: the
                    # next turn then renders the conversation again instead.
                    session.turn = (
                        None if by_stop else (task.prompt_text, task.tokens + task.ids, reply)
                    )
            if session.closed:
                drop_session(self.ctx, session)
        self._finish(task, reason, error)

    def close_session(self, session: Session) -> None:
        """Forget a session's cells (now if it is idle, else when its task ends)."""
        session.closed = True
        if not session.busy:
            with self.ctx.lock:
                drop_session(self.ctx, session)

    def _finish(self, task: Task, reason: str, error: BaseException | None = None) -> None:
        task.outcome.finish_reason = reason
        task.error = error
        task.out.put(END)
        task.done.set()

    # -- embeddings and reranking -------------------------------------------------------------

    def _embed(self, task: Task) -> None:
        """Embed a task's sequences now (an embedding engine runs nothing else)."""
        try:
            vectors, n = _embed.embed_tokens(self.ctx, task.inputs, n_seqs=len(self.slots))
        except Exception as e:  # noqa: BLE001 - the task's error, handed to its caller
            self._finish(task, "stop", e)
            return
        self.n_prompt += n
        task.outcome.prompt_tokens = n
        task.vectors = vectors
        self._finish(task, "stop")
