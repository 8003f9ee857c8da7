"""The chat REPL: turns that decode only their new tokens, save/load, cancel, the commands, and
the REPL in a real pseudo-terminal (typing, streaming, Ctrl-C, /clear, history)."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import pexpect
import pytest

from nexabind import Llama
from nexabind.errors import StateError
from nexabind.repl import Conversation, Turn, repl

GREEDY = {"temperature": 0.0}


@pytest.fixture
def llm(libdir: Path, tiny_model: Path):
    with Llama(tiny_model, n_ctx=1024, n_threads=1, lib_path=libdir) as m:
        yield m


def _kv_after(turn: Turn) -> int:
    """Tokens the KV cache holds after a turn: the prompt and every reply token but the last
    (sampled, not decoded yet); all of them when an end-of-generation token followed."""
    return turn.prompt_tokens + turn.generated - (turn.finish_reason != "stop")


def test_each_turn_decodes_only_its_new_tokens(llm: Llama) -> None:
    conv = Conversation(llm, system="Be brief.", max_tokens=12, **GREEDY)
    first = "".join(conv.reply("Hello"))
    t1 = conv.last
    assert t1 is not None and t1.decoded == t1.prompt_tokens and t1.generated > 0
    "".join(conv.reply("And then?"))
    t2 = conv.last
    assert t2 is not None
    # The prompt is the conversation so far, but only what follows the tokens the model
    # already holds is decoded: the end of its turn and the new message.
    assert t2.prompt_tokens - t2.decoded == _kv_after(t1)
    new = t2.prompt_tokens - (t1.prompt_tokens + t1.generated)
    assert 0 < new <= t2.decoded <= new + 1
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 2
    assert conv.messages[1]["content"] == first
    # The continuation keeps the ids the model generated, whatever its text re-tokenizes to.
    render = llm.format_chat([{"role": "system", "content": "Be brief."}, *conv.messages])
    tokens = llm.chat_tokens(render, conv._seen)
    assert tokens[: t2.prompt_tokens + t2.generated] == conv._seen[1]  # type: ignore[index]


def test_a_cancelled_reply_keeps_its_text_and_the_next_turn_continues(llm: Llama) -> None:
    conv = Conversation(llm, max_tokens=200, **GREEDY)
    pieces = []
    for piece in conv.reply("Hello"):
        pieces.append(piece)
        if len(pieces) == 3:
            llm.cancel()
    t1 = conv.last
    assert t1 is not None and (t1.finish_reason, t1.generated) == ("cancelled", 3)
    assert conv.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    list(conv.reply("More"))
    assert conv.last is not None and conv.last.prompt_tokens - conv.last.decoded == _kv_after(t1)


def test_save_and_load_bring_back_the_conversation_and_the_cache(
    llm: Llama, tiny_model: Path, libdir: Path, tmp_path: Path
) -> None:
    conv = Conversation(llm, system="S", max_tokens=8, **GREEDY)
    list(conv.reply("Hello"))
    conv.save(tmp_path / "chat.bin")
    expected = "".join(conv.reply("Next"))
    with Llama(tiny_model, n_ctx=1024, n_threads=1, lib_path=libdir) as other:
        again = Conversation(other, max_tokens=8, **GREEDY)
        assert again.load(tmp_path / "chat.bin") is True
        assert (again.system, len(again.messages)) == ("S", 2)
        assert "".join(again.reply("Next")) == expected
        assert again.last is not None and again.last.decoded < again.last.prompt_tokens // 2
    # Another context size: the conversation comes, the state does not; it is decoded again.
    with Llama(tiny_model, n_ctx=512, n_threads=1, lib_path=libdir) as small:
        third = Conversation(small, max_tokens=8, **GREEDY)
        assert third.load(tmp_path / "chat.bin") is False
        assert "".join(third.reply("Next")) == expected
        assert third.last is not None and third.last.decoded == third.last.prompt_tokens
    (tmp_path / "junk").write_bytes(b"not a chat")
    with pytest.raises(StateError, match="is not a conversation saved with /save"):
        conv.load(tmp_path / "junk")


def test_save_writes_through_a_fresh_temp_file_and_leaves_nothing_behind(
    llm: Llama, tmp_path: Path
) -> None:
    conv = Conversation(llm, max_tokens=4, **GREEDY)
    list(conv.reply("Hello"))
    canary = tmp_path / "canary"
    canary.write_text("keep")
    target = tmp_path / "chat.bin"
    planted = Path(f"{target}.{os.getpid()}.tmp")  # the temp name /save used before
    planted.symlink_to(canary)
    conv.save(target)
    assert canary.read_text() == "keep"
    assert Conversation(llm).load(target) is True
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="Is a directory"):
        conv.save(tmp_path / "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["canary", "chat.bin", planted.name, "folder"]
    )
    assert list((tmp_path / "folder").iterdir()) == []


def test_the_commands(llm: Llama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [
        "/help", "/system Answer in French.", "/system", "Hello", "/save", f"/save {tmp_path}/c",
        "/clear", "/load /nonexistent", f"/load {tmp_path}/c", "/nope", "two \\", "lines", "/exit",
        "never read",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    out, err = io.StringIO(), io.StringIO()
    conv = Conversation(llm, max_tokens=4, **GREEDY)
    repl(conv, out=out, err=err, stats=True)
    said = err.getvalue()
    for text in [
        "/clear         forget the conversation",
        "system prompt set",
        "system prompt: 'Answer in French.'",
        "/save needs a file name",
        f"saved the conversation (2 messages) to {tmp_path}/c",
        "conversation cleared",
        "/load failed: [Errno 2] No such file",
        f"loaded 2 messages and the model's state from {tmp_path}/c",
        "unknown command /nope",
    ]:
        assert text in said, text
    assert len(re.findall(r"\[prompt \d+ tokens: \d+ decoded", said)) == 2
    assert conv.messages[-2] == {"role": "user", "content": "two \nlines"}


# -- in a pseudo-terminal -----------------------------------------------------------------------

#: A template that writes the conversation as one text, so a base model continues it.
PLAIN = "{% for m in messages %}{{ m.content }}{% endfor %}"
STATS = re.compile(
    r"\[prompt (\d+) tokens: (\d+) decoded, (\d+) cached; reply (\d+) tokens, [\d.]+ tok/s; "
    r"(\w+)\]"
)


def test_the_repl_in_a_terminal(gemma: Path, libdir: Path, tmp_path: Path) -> None:
    (tmp_path / "plain.jinja").write_text(PLAIN)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TERM": "xterm"}
    args = ["-m", "nexabind", "run", str(gemma), "--chat-template", str(tmp_path / "plain.jinja")]
    args += ["--temp", "0", "-n", "16", "-c", "512", "--stats"]
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=120)

    def stats() -> tuple[int, ...]:
        child.expect(STATS)
        m = child.match
        return (*map(int, m.groups()[:4]), m.group(5))

    try:
        child.expect_exact(">>> ")
        child.send("Once upon a time, a dragon\r")
        child.expect_exact("Once upon a time, a dragon\r\n")  # typed, echoed
        child.expect(r"\w")  # the reply streams: its first word is there before it ends
        child.sendintr()
        child.expect_exact("[stopped]")
        p1, d1, c1, g1, why = stats()
        assert why == "cancelled" and 0 < g1 < 16 and (d1, c1) == (p1, 0)

        child.expect_exact(">>> ")  # Ctrl-C stopped the reply, not the REPL
        child.send(" said\r")
        p2, d2, c2, g2, why = stats()
        assert why == "length" and g2 == 16
        # Only the new text (and the one reply token sampled but not decoded) was decoded.
        assert c2 == p1 + g1 - 1 and d2 == p2 - c2 and d2 <= p2 - (p1 + g1) + 1 <= 4

        child.expect_exact(">>> ")
        child.send("/clear\r")
        child.expect_exact("conversation cleared")
        child.expect_exact(">>> ")
        child.send("A cat\r")
        p3, d3, c3, g3, why = stats()
        assert p3 < p1 and d3 == p3 - c3  # the conversation is gone

        child.expect_exact(">>> ")
        child.sendintr()  # at the prompt: the REPL stays
        child.expect_exact("/exit or Ctrl-D to leave")
        child.expect_exact(">>> ")
        child.send("\x1b[A")  # up: the last line comes back from the history
        child.expect_exact("A cat")
        child.send("\x15/exit\r")  # Ctrl-U clears the line
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "state" / "nexabind" / "repl-history").read_text()
    assert "Once upon a time, a dragon" in history and "/clear" in history
