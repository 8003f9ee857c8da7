"""Sessions, tasks and the slots they run in: the records an :class:`~nexabind.engine.Engine`
and its scheduler share, and what happens to a slot's KV cells between tasks.

A slot is one sequence of the context. A task takes the free slot whose cache shares the most
with its prompt (or an empty one, or the least recently used), and keeps what of that cache its
prompt shares; a session's task takes its session's slot. When sessions outnumber slots, an idle
session's cells are saved to host memory (:func:`evict`) and restored when it comes back
(:func:`restore`). These run on the scheduler's thread, under the context's lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nexabind import lowlevel
from nexabind._emit import Emitter
from nexabind._sequence import Request
from nexabind.errors import StateError
from nexabind.tokens import Outcome

__all__ = [
    "END",
    "GEN",
    "IDLE",
    "PROMPT",
    "Session",
    "Slot",
    "Task",
    "choose",
    "claim",
    "common_prefix",
    "drop_session",
    "evict",
    "free_cells",
    "restore",
    "waits_for_prompt",
]

log = logging.getLogger("nexabind._scheduler")

#: What a task's output queue holds last.
END = object()

#: What a slot is doing (``Slot.state``).
IDLE, PROMPT, GEN = "idle", "prompt", "generating"


@dataclass(eq=False)
class Session:
    """A conversation that keeps its KV cells between tasks (see ``Engine.create_session``)."""

    id: str
    n_keep: int = 0
    cache_prompt: bool = True
    sampling: dict[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    slot: Slot | None = None
    saved: tuple[bytes, array[int]] | None = None  # its KV cells, while it has no slot
    # The last chat turn as the model saw it: its prompt text, the prompt's tokens and the
    # ids it generated, and the reply's text. The next turn's prompt reuses these tokens and
    # only tokenizes what the template adds after the reply.
    turn: tuple[str, list[int], str] | None = None
    busy: bool = False
    closed: bool = False
    n_tasks: int = 0
    used: float = 0.0


@dataclass(eq=False)
class Task:
    """One unit of work and the channel its results come back on."""

    id: int
    kind: str  # completion | chat | embedding | rerank
    tokens: list[int] = field(default_factory=list)
    req: Request | None = None
    inputs: list[list[int]] = field(default_factory=list)  # embedding / rerank sequences
    session: Session | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)  # a session's new turn
    outcome: Outcome = field(default_factory=Outcome)
    out: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    vectors: Any = None
    cancelled: bool = False
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    prompt_text: str = ""
    output: Any = None  # a chat's ToolOutput (how to read its reply for tool calls)
    spelled: dict[int, str] = field(default_factory=dict)  # control tokens that spell markers
    matcher: Any = None  # an llguidance grammar's GrammarMatcher, made in the caller's thread
    # A task with the same prompt (another choice of one request): this one starts once that
    # one has read its prompt, and copies its KV cells instead of decoding them again.
    after: Task | None = None


class Slot:
    """One sequence of the context and what it is doing."""

    def __init__(self, seq_id: int, n_ctx: int) -> None:
        self.id = seq_id
        self.tokens = array("i", bytes(4 * n_ctx))  # what its KV cells hold, in order
        self.n = 0
        self.task: Task | None = None
        self.session: Session | None = None
        self.state = IDLE
        self.used = 0.0
        self.prompt: Any = None  # int32 numpy array of the task's prompt
        self.i_prompt = 0
        self.i_batch = -1
        self.pending = 0  # prompt tokens in the batch being decoded
        self.last = -1  # the token to feed at the next step
        self.sampler: lowlevel.SamplerChain | None = None
        self.sample: Callable[[int], int] | None = None  # the sampler, bound for the hot path
        self.emitter: Emitter | None = None  # what its sampled tokens emit


def choose(slots: list[Slot], task: Task, ctx: lowlevel.Context) -> Slot | None:
    """The slot ``task`` should take now, or None when it must wait; an idle session whose
    slot it takes is moved to host memory first."""
    free = [s for s in slots if s.task is None]
    if not free:
        return None
    session = task.session
    if session is not None and session.slot is not None:
        return session.slot if session.slot.task is None else None
    unowned = [s for s in free if s.session is None]
    if session is None and unowned:
        # The slot whose cache shares the longest prefix with the prompt, when that prefix
        # is a real part of it (llama-server's prompt similarity, 10%); else an empty slot,
        # else the least recently used one: a cache that helps no one goes first.
        best = max(unowned, key=lambda s: (common_prefix(s, task.tokens), -s.used))
        if common_prefix(best, task.tokens) > max(1, len(task.tokens) // 10):
            return best
    if unowned:
        return min(unowned, key=lambda s: (s.n > 0, s.used))
    idle = [s for s in free if s.session is not None and not s.session.busy]
    if not idle:
        return None
    slot = min(idle, key=lambda s: s.used)
    evict(ctx, slot)
    return slot


def waits_for_prompt(slots: list[Slot], task: Task) -> bool:
    """Whether ``task`` waits for the task it shares its prompt with to read that prompt
    (queued still, or its slot in the prompt phase)."""
    first = task.after
    if first is None or first.done.is_set():
        return False
    return first.started is None or any(s.task is first and s.state == PROMPT for s in slots)


def common_prefix(slot: Slot, tokens: list[int]) -> int:
    """How many of ``tokens`` the slot's cache holds at its start."""
    import numpy as np

    n = min(slot.n, len(tokens))
    if not n:
        return 0
    held = np.frombuffer(slot.tokens, dtype=np.int32, count=n)
    diff = np.flatnonzero(held != np.asarray(tokens[:n], dtype=np.int32))
    return int(diff[0]) if diff.size else n


def claim(ctx: lowlevel.Context, slot: Slot, task: Task, slots: Sequence[Slot] = ()) -> int:
    """Ready ``slot`` for ``task``: its session's cells in it (the cells of the session that
    held it saved to host memory), and of its cache only what the prompt shares, leaving at
    least one token to decode for its logits; a task that shares its prompt with another
    (``after``) copies the longest prefix one of ``slots`` holds. Returns how many prompt
    tokens the cache holds."""
    session = task.session
    if session is not None and session.slot is not slot:
        if slot.session is not None:
            evict(ctx, slot)
        restore(ctx, slot, session)
    elif session is None and slot.session is not None:
        evict(ctx, slot)
    if session is not None:
        session.busy = True
        if not session.cache_prompt:
            ctx.seq_rm(slot.id, -1, -1)
            slot.n = 0
    tokens = task.tokens
    n = common_prefix(slot, tokens)
    n = min(n, len(tokens) - 1)  # decode at least one token, for its logits
    if n < slot.n:
        if not ctx.seq_rm(slot.id, n, -1):
            ctx.seq_rm(slot.id, -1, -1)
            n = 0
        slot.n = n
    if task.after is not None and session is None:
        n = _copy_prefix(ctx, slot, tokens, n, slots)
    return n


def _copy_prefix(
    ctx: lowlevel.Context, slot: Slot, tokens: list[int], n: int, slots: Sequence[Slot]
) -> int:
    """Copy into ``slot`` the longest prefix of ``tokens`` another slot holds, when longer
    than the ``n`` it holds itself; return the tokens it holds now. In a unified KV cache the
    copy shares the cells (``llama_memory_seq_cp``): nothing is decoded or moved."""
    model = ctx.model
    if model.is_recurrent or model.is_hybrid:  # their state is not per position
        return n
    donor, k = None, n
    for other in slots:
        if other is not slot:
            m = min(common_prefix(other, tokens), len(tokens) - 1)
            if m > k:
                donor, k = other, m
    if donor is None:
        return n
    ctx.seq_rm(slot.id, -1, -1)
    ctx.seq_cp(donor.id, slot.id, 0, k)
    slot.tokens[:k] = donor.tokens[:k]
    slot.n = k
    return k


def evict(ctx: lowlevel.Context, slot: Slot) -> None:
    """Move a session's KV cells to host memory, freeing its slot."""
    session = slot.session
    assert session is not None
    if slot.n:
        session.saved = (ctx.state_seq_get(slot.id), slot.tokens[: slot.n])
    ctx.seq_rm(slot.id, -1, -1)
    slot.n = 0
    slot.session = None
    session.slot = None


def restore(ctx: lowlevel.Context, slot: Slot, session: Session) -> None:
    """Give ``session`` the (emptied) ``slot`` and its saved cells back, if it has any."""
    saved, session.saved = session.saved, None
    session.slot, slot.session = slot, session
    ctx.seq_rm(slot.id, -1, -1)
    slot.n = 0
    if saved is None:
        return
    data, tokens = saved
    try:
        ctx.state_seq_set(data, slot.id)
    except StateError:
        log.warning("session %s: its saved cache did not restore; decoding it again", session.id)
        ctx.seq_rm(slot.id, -1, -1)
        return
    slot.tokens[: len(tokens)] = tokens
    slot.n = len(tokens)


def free_cells(ctx: lowlevel.Context, slots: list[Slot]) -> bool:
    """Drop the cache of slots that run nothing (saving sessions' to host memory); whether
    any was dropped."""
    freed = False
    for s in slots:
        if s.task is None and s.n:
            if s.session is not None:
                evict(ctx, s)
            else:
                ctx.seq_rm(s.id, -1, -1)
                s.n = 0
            freed = True
    return freed


def drop_session(ctx: lowlevel.Context, session: Session) -> None:
    """Forget a closed session's cells: in its slot if it is idle there, and in memory."""
    slot = session.slot
    if slot is not None and slot.task is None:
        ctx.seq_rm(slot.id, -1, -1)
        slot.n = 0
        slot.session = None
    session.slot = None
    session.saved = None
