"""The chat REPL: turns that decode only their new tokens, save/load, cancel, the commands, and
the REPL in a real pseudo-terminal (typing, streaming, Ctrl-C, /clear, history)."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import sys
import threading
from pathlib import Path

import pexpect
import pytest

from nexabind import Llama
from nexabind.errors import StateError
from nexabind.repl import _MAGIC, MAX_CONVERSATION, Conversation, Turn, repl

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


def _resaved(saved: Path, path: Path, change: dict[str, object] | bytes) -> Path:
    """``saved`` (what /save wrote) with its header updated by ``change``, or replaced by it
    (bytes); the model's state after it stays."""
    data = saved.read_bytes()
    (n,) = struct.unpack_from("<Q", data, len(_MAGIC))
    head = len(_MAGIC) + 8
    if isinstance(change, bytes):
        blob = change
    else:
        blob = json.dumps({**json.loads(data[head : head + n]), **change}).encode()
    path.write_bytes(_MAGIC + struct.pack("<Q", len(blob)) + blob + data[head + n :])
    return path


#: Saved files with a bad header, and what /load says of each.
BAD = {
    "messages-str": ({"messages": "abc"}, "'messages' is str, not a list"),
    "messages-ints": ({"messages": [1, 2]}, "messages[0] is not {'role'"),
    "message-without-content": ({"messages": [{"role": "user"}]}, "messages[0] is not"),
    "message-role": ({"messages": [{"role": 5, "content": "x"}]}, "messages[0] is not"),
    "system-int": ({"system": 5}, "'system' is int, not a string"),
    "seen-int": ({"seen": 5}, "'seen' is not [text, [token ids]]"),
    "seen-str": ({"seen": "x"}, "'seen' is not [text, [token ids]]"),
    "seen-floats": ({"seen": ["x", [1.5]]}, "'seen' is not [text, [token ids]]"),
    "seen-out-of-vocab": ({"seen": ["x", [1, 10**9]]}, "'seen' holds token id 1000000000, "
                          "outside this model's vocabulary (0 to "),
    "seen-negative": ({"seen": ["x", [-1]]}, "'seen' holds token id -1, outside"),
    "not-an-object": (b"[1, 2]", "its header is not an object"),
    "nested": (b"[" * 100_000, "its header does not parse"),
}  # fmt: skip


def test_a_bad_file_is_one_line_of_error_and_the_conversation_goes_on(
    llm: Llama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conv = Conversation(llm, system="S", max_tokens=4, **GREEDY)
    list(conv.reply("Hello"))
    t1 = conv.last
    assert t1 is not None
    saved = tmp_path / "saved"
    conv.save(saved)
    before = (list(conv.messages), conv.system, conv._seen)
    files = {name: _resaved(saved, tmp_path / name, change) for name, (change, _) in BAD.items()}
    said = {
        name: f"/load failed: {files[name]} is damaged: {text}" for name, (_, text) in BAD.items()
    }
    # A conversation larger than /load reads (a sparse file: nothing is written to disk).
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.write(_MAGIC + struct.pack("<Q", MAX_CONVERSATION + 1))
        f.truncate(MAX_CONVERSATION + 100)
    said["big"] = f"/load failed: {big} is damaged: its conversation claims {MAX_CONVERSATION + 1}"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    said["fifo"] = f"/load failed: {fifo} is a FIFO, not a regular file"
    said["zero"] = "/load failed: /dev/zero is a character device, not a regular file"
    said["folder"] = f"/load failed: {tmp_path} is a folder, not a regular file"
    # Had /load opened the FIFO to block on it, this writer lets it go on (and it fails).
    writer = threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True)  # noqa: SIM115
    writer.start()
    loads = [f"/load {p}" for p in [*files.values(), big, fifo, "/dev/zero", tmp_path]]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(loads) + "\n/exit\n"))
    err = io.StringIO()
    try:
        repl(conv, out=io.StringIO(), err=err)
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # the writer's open returns
        writer.join(10)
    lines = err.getvalue().splitlines()[1:]
    assert len(lines) == len(said) and "Traceback" not in err.getvalue()
    for name, text in said.items():
        assert any(line.startswith(text) for line in lines), (name, lines)
    assert (conv.messages, conv.system, conv._seen) == before
    # The conversation goes on from where it was, the model's cache too.
    list(conv.reply("Next"))
    assert len(conv.messages) == 4 and conv.last is not None
    assert conv.last.prompt_tokens - conv.last.decoded == _kv_after(t1)


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
