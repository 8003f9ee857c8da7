"""The chat REPL of ``nexabind run``: a conversation with a model in a terminal.

Each turn renders the whole conversation with the model's chat template but decodes only its
new tokens: the prompt continues from the tokens the model saw (its previous prompt and the
ids it generated, see :meth:`nexabind.Llama.chat_tokens`), and :class:`~nexabind.Llama` keeps
the KV cache of that prefix. Replies stream as they are generated; Ctrl-C stops a reply (the
part written so far stays in the conversation) and never the REPL.

Commands: ``/clear``, ``/system [TEXT]``, ``/save FILE``, ``/load FILE``, ``/help``, ``/exit``
(or Ctrl-D). A line ending with ``\\`` continues on the next one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from nexabind._emit import text_of
from nexabind._files import open_regular, write_atomic
from nexabind.errors import ContextOverflowError, NexabindError, StateError
from nexabind.llama import Llama

__all__ = ["FALLBACK_STOPS", "FALLBACK_TEMPLATE", "Conversation", "Turn", "interruptible", "repl"]

#: The template used when a model has none (as llama.cpp's tools do), and the stop strings
#: that end a reply with it (a model not trained on it may not end its turn otherwise).
FALLBACK_TEMPLATE = "chatml"
FALLBACK_STOPS = ("<|im_end|>", "<|im_start|>")

_MAGIC = b"NEXABIND-CHAT\n"
#: The most bytes /load reads of a conversation (its messages, system prompt and token ids);
#: the model's state after it is read only for the same model, and checked whole.
MAX_CONVERSATION = 16 << 20
_ROLES = ("user", "assistant")
_HELP = """\
/clear         forget the conversation (the system prompt stays)
/system [TEXT] show the system prompt, or set it
/save FILE     save the conversation and the model's state
/load FILE     load what /save wrote
/exit          leave (also Ctrl-D); Ctrl-C stops a reply
a line ending with \\ continues on the next line"""


@dataclass
class Turn:
    """What one reply cost.

    Attributes:
        prompt_tokens: Tokens of the whole prompt (the conversation so far).
        decoded: Prompt tokens decoded for this turn (the rest came from the KV cache).
        generated: Tokens of the reply.
        seconds: Time from the prompt to the reply's last token.
        finish_reason: ``stop``, ``length`` or ``cancelled``.
    """

    prompt_tokens: int
    decoded: int
    generated: int
    seconds: float
    finish_reason: str | None

    def __str__(self) -> str:
        rate = self.generated / self.seconds if self.seconds > 0 else 0.0
        return (
            f"[prompt {self.prompt_tokens} tokens: {self.decoded} decoded, "
            f"{self.prompt_tokens - self.decoded} cached; reply {self.generated} tokens, "
            f"{rate:.1f} tok/s; {self.finish_reason}]"
        )


class Conversation:
    """A multi-turn chat with a :class:`~nexabind.Llama`, each turn decoding only what is new.

    Args:
        llama: The model; its ``chat_template`` (or the model's own) renders the turns.
        system: The system prompt.
        max_tokens: Most tokens per reply (None: until the model ends it or the context is
            full).
        stop: Stop strings.
        **sampling: Sampling options for every reply (``temperature``, ``top_k``, ...).
    """

    def __init__(
        self,
        llama: Llama,
        *,
        system: str | None = None,
        max_tokens: int | None = None,
        stop: tuple[str, ...] = (),
        **sampling: Any,
    ) -> None:
        self.llama = llama
        self.system = system
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.sampling = sampling
        self.messages: list[dict[str, Any]] = []
        self.last: Turn | None = None
        # The text the model saw last (prompt and reply) and its tokens, to continue from.
        self._seen: tuple[str, list[int]] | None = None

    def _rendered(self, extra: list[dict[str, Any]]) -> str:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.llama.format_chat([*system, *self.messages, *extra])

    def reply(self, text: str) -> Iterator[str]:
        """Send a user message; yield the reply's text as it is generated.

        The turn joins the conversation when the iterator ends (also when it is closed early
        or the generation is cancelled with ``llama.cancel()``), unless no token came.

        Raises:
            TemplateError: The chat template refused the conversation.
            ContextOverflowError: The conversation no longer fits the context (``/clear``).
        """
        user = {"role": "user", "content": text}
        prompt = self._rendered([user])
        tokens = self.llama.chat_tokens(prompt, self._seen)
        start = time.perf_counter()
        it = self.llama.generate(
            tokens, max_tokens=self.max_tokens, stop=self.stop, **self.sampling
        )
        ids: list[int] = []
        pieces: list[str] = []
        try:
            for tok in it:
                ids.append(tok.id)
                pieces.append(tok.text)
                yield tok.text
        finally:
            close = getattr(it, "close", None)  # a generator: stop it now, not at collection
            if close is not None:
                close()
            self.last = Turn(
                len(tokens),
                self.llama.n_prompt_tokens_decoded,
                len(ids),
                time.perf_counter() - start,
                self.llama.last_finish_reason,
            )
            if ids:
                reply = "".join(pieces)
                self.messages += [user, {"role": "assistant", "content": reply}]
                # Continue from the generated ids only when they are exactly the reply's text
                # (a stop string, cut from the reply, or an end-of-turn token the template
                # writes again would not be); else the next turn tokenizes the rendering. The
                # bytes read as the decode loop's emitter reads them.
                seen = text_of(self.llama.detokenize(ids, special=True))
                self._seen = (prompt + reply, tokens + ids) if seen == reply else None

    def clear(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.messages = []
        self._seen = None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the conversation and the model's state (its KV cache) to ``path``."""
        header = {
            "model": _model_id(self.llama),
            "system": self.system,
            "messages": self.messages,
            "seen": self._seen,
        }
        blob = json.dumps(header).encode()
        state = bytes(self.llama.save_state())  # the checked byte form of the LlamaState
        write_atomic(path, _MAGIC + struct.pack("<Q", len(blob)) + blob + state)

    def load(self, path: str | os.PathLike[str]) -> bool:
        """Read what :meth:`save` wrote; return whether the model's state came with it.

        A file saved with another model brings the conversation only: its tokens are decoded
        at the next turn. The whole file is checked before anything changes: a file that is
        refused leaves the conversation and the model's state as they were.

        Raises:
            StateError: Not a file :meth:`save` wrote, a damaged one (a field of the wrong
                type, token ids outside the vocabulary), or one whose conversation is larger
                than :data:`MAX_CONVERSATION`.
            OSError: The file cannot be read, or it is not a regular file (a device, a FIFO).
        """
        f, size = open_regular(path)
        with f:
            head = f.read(len(_MAGIC) + 8)
            if not head.startswith(_MAGIC) or len(head) < len(_MAGIC) + 8:
                msg = f"{path} is not a conversation saved with /save"
                raise StateError(msg)
            (n,) = struct.unpack_from("<Q", head, len(_MAGIC))
            if n > min(MAX_CONVERSATION, size - len(head)):
                msg = (
                    f"{path} is damaged: its conversation claims {n} bytes, more than the file "
                    f"holds or the {MAX_CONVERSATION >> 20} MiB /load reads"
                )
                raise StateError(msg)
            header = _conversation(f.read(n), path, self.llama)
            same = header.get("model") == _model_id(self.llama)
            state = f.read() if same else b""
        if same:
            self.llama.load_state(state)
        seen = header.get("seen")
        self.messages = header["messages"]
        self.system = header.get("system")
        self._seen = (seen[0], seen[1]) if same and seen else None
        return same


def _conversation(data: bytes, path: str | os.PathLike[str], llama: Llama) -> dict[str, Any]:
    """The header :meth:`Conversation.save` wrote, every field checked (``seen``'s token ids
    against ``llama``'s vocabulary when it is the model that saved it).

    Raises:
        StateError: It does not parse, or a field has the wrong type or value.
    """
    try:
        header = json.loads(data)
    except (ValueError, RecursionError) as e:
        msg = f"{path} is damaged: its header does not parse ({str(e)[:200]})"
        raise StateError(msg) from e
    bad = _bad_field(header, llama)
    if bad:
        msg = f"{path} is damaged: {bad}; not loaded, the conversation is as it was"
        raise StateError(msg)
    return header


def _bad_field(header: Any, llama: Llama) -> str | None:
    """What is wrong with a saved header, or None."""
    if not isinstance(header, dict):
        return "its header is not an object"
    messages = header.get("messages")
    if not isinstance(messages, list):
        return f"'messages' is {type(messages).__name__}, not a list"
    for i, m in enumerate(messages):
        if not (
            isinstance(m, dict)
            and set(m) == {"role", "content"}
            and m["role"] in _ROLES
            and isinstance(m["content"], str)
        ):
            return f"messages[{i}] is not {{'role': 'user' or 'assistant', 'content': str}}"
    system = header.get("system")
    if system is not None and not isinstance(system, str):
        return f"'system' is {type(system).__name__}, not a string"
    seen = header.get("seen")
    if seen is None:
        return None
    if not (
        isinstance(seen, list)
        and len(seen) == 2
        and isinstance(seen[0], str)
        and isinstance(seen[1], list)
        and all(type(t) is int for t in seen[1])
    ):
        return "'seen' is not [text, [token ids]]"
    if header.get("model") != _model_id(llama):
        return None  # (another model's ids: not used)
    n_vocab, n_ctx = llama.n_vocab(), llama.n_ctx()
    if len(seen[1]) > n_ctx:
        return f"'seen' holds {len(seen[1])} token ids, more than this context's {n_ctx}"
    out = next((t for t in seen[1] if not 0 <= t < n_vocab), None)
    if out is not None:
        return f"'seen' holds token id {out}, outside this model's vocabulary (0 to {n_vocab - 1})"
    return None


def _model_id(llama: Llama) -> dict[str, Any]:
    path = Path(llama.model_path)
    return {"file": path.name, "size": path.stat().st_size, "n_ctx": llama.n_ctx()}


@contextlib.contextmanager
def interruptible(llama: Llama) -> Iterator[list[bool]]:
    """While the block runs, Ctrl-C (SIGINT) cancels the generation instead of raising."""
    hit = [False]

    def on_sigint(_sig: int, _frame: object) -> None:
        hit[0] = True
        llama.cancel()

    try:
        old = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
        yield hit
        return
    try:
        yield hit
    finally:
        signal.signal(signal.SIGINT, old)


def _history(path: Path | None) -> Callable[[], None]:
    """Load the readline history from ``path``; return what saves it back."""
    try:
        import readline
    except ImportError:  # Windows: no readline, input() still edits a line
        return lambda: None
    if path is None:
        return lambda: None
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)

    def save() -> None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)

    return save


def _read(prompt: str) -> str:
    """One message: a line, or several when each but the last ends with a backslash."""
    lines = []
    line = input(prompt)
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input("... ")
    lines.append(line)
    return "\n".join(lines)


def repl(
    conv: Conversation,
    *,
    history: Path | None = None,
    stats: bool = False,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> None:
    """Talk with ``conv``'s model until ``/exit`` or end of input.

    Args:
        conv: The conversation (and its model).
        history: The readline history file (None: no history kept).
        stats: After each reply, show its prompt and decode counts on ``err``.
        out: Where replies go (stdout).
        err: Where status lines go (stderr).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    save_history = _history(history)

    def say(text: str) -> None:
        print(text, file=err, flush=True)

    say("Type a message; /help lists the commands, /exit (or Ctrl-D) leaves.")
    prompt = ">>> " if sys.stdin.isatty() else ""  # piped in: the output is the replies only
    try:
        while True:
            try:
                text = _read(prompt)
            except KeyboardInterrupt:
                say("^C (/exit or Ctrl-D to leave)")
                continue
            except EOFError:
                say("")
                return
            if not text.strip():
                continue
            if text.startswith("/"):
                if _command(conv, text, say) == "exit":
                    return
                continue
            with interruptible(conv.llama) as hit:
                try:
                    for piece in conv.reply(text):
                        out.write(piece)
                        out.flush()
                except ContextOverflowError as e:
                    say(f"\nerror: {e}\n/clear forgets the conversation; -c sets a larger context")
                    continue
                except NexabindError as e:
                    say(f"\nerror: {e}")
                    continue
            out.write("\n")
            out.flush()
            if hit[0]:
                say("[stopped]")
            if stats and conv.last is not None:
                say(str(conv.last))
    finally:
        save_history()


def _command(conv: Conversation, text: str, say: Callable[[str], None]) -> str | None:
    name, _, arg = text.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return "exit"
    if name in ("/help", "/?"):
        say(_HELP)
    elif name == "/clear":
        conv.clear()
        say("conversation cleared")
    elif name == "/system":
        if not arg:
            say(f"system prompt: {conv.system!r}")
        else:
            conv.system = arg
            say("system prompt set (it applies from the start of the conversation)")
    elif name in ("/save", "/load"):
        if not arg:
            say(f"{name} needs a file name: {name} FILE")
            return None
        try:
            if name == "/save":
                conv.save(arg)
                say(f"saved the conversation ({len(conv.messages)} messages) to {arg}")
            elif conv.load(arg):
                say(f"loaded {len(conv.messages)} messages and the model's state from {arg}")
            else:
                say(
                    f"loaded {len(conv.messages)} messages from {arg}; it was saved with another "
                    "model or context size, so they are decoded again at the next turn"
                )
        except (OSError, NexabindError) as e:
            say(f"{name} failed: {e}")
    else:
        say(f"unknown command {name}; /help lists the commands")
    return None
