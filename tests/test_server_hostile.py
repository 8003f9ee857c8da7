"""`nexabind serve` against clients that mean harm, each attack beside an ordinary user.

Every test runs a real server on 127.0.0.1 with two API keys: the attacker's and an ordinary
user's. After each attack the user's next request must still be answered.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _serve import Served, read_events

ATTACKER = {"Authorization": "Bearer attacker-key"}
USER = {"Authorization": "Bearer user-key"}
KEYS = ("--api-key", "attacker-key", "--api-key", "user-key")
GREEDY: dict[str, Any] = {"temperature": 0}
NO_EOS = {"2": -100}  # the tiny model's end-of-sequence token: generate until told to stop
CHAT = [{"role": "user", "content": "Tell me about birds"}]


@pytest.fixture(scope="module")
def server(libdir: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with Served(tiny_model, "-np", "2", "-c", "4096", *KEYS, log=log) as s:
        yield s


def _ordinary(server: Served) -> None:
    """The other user's plain chat still gets its answer."""
    status, _, body = server.post(
        "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, **GREEDY}, headers=USER
    )
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 2
    assert server.get("/health")[0] == 200


def _drop(conn: Any) -> None:
    """Go away without a word."""
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.sock.close()
    conn.close()


def _open(server: Served, body: dict[str, Any], headers: dict[str, str]) -> Any:
    """Send a request and leave its answer unread; return the connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", **headers})  # fmt: skip
    return conn


# -- no request value can hurt the scheduler ----------------------------------------------------

_NUMBERS: list[Any] = [2**31, -(2**31), 2**63, float("nan"), float("inf"), float("-inf")]
_WRONG: list[Any] = ["1", [1], {"a": 1}, True]
_OPTIONS = (
    "temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "seed", "max_tokens", "max_completion_tokens", "top_logprobs", "n",
)  # fmt: skip


def test_every_sampling_option_at_its_extremes_is_a_400_and_the_next_request_a_200(
    server: Served,
) -> None:
    for name in _OPTIONS:
        for value in _NUMBERS + _WRONG:
            if name == "seed" and value == 2**31:  # in range: answered
                continue
            body = {"messages": CHAT, "max_tokens": 2, name: value}
            status, _, answer = server.post("/v1/chat/completions", body, headers=ATTACKER)
            assert status == 400, (name, value, answer)
            assert answer["error"]["param"] == name, (name, value, answer)
        _ordinary(server)
    for value in _NUMBERS + _WRONG + [None]:
        for bias in ({"1": value}, {str(value): 1}):
            if bias == {"1": 1}:  # str("1"): a valid bias
                continue
            body = {"messages": CHAT, "max_tokens": 2, "logit_bias": bias}
            status, _, answer = server.post("/v1/chat/completions", body, headers=ATTACKER)
            assert status == 400, (bias, answer)
            assert answer["error"]["param"].startswith("logit_bias"), (bias, answer)
    for stop in ([1], [None], [["x"]], {"a": 1}, 5, ["a"] * 17):
        body = {"messages": CHAT, "max_tokens": 2, "stop": stop}
        status, _, answer = server.post("/v1/chat/completions", body, headers=ATTACKER)
        assert status == 400 and answer["error"]["param"].startswith("stop"), (stop, answer)
    # Token ids past the vocabulary (32000 tokens), and more entries than it has.
    for bias in ({"2147483647": 1}, {"32000": 1}, {str(i): 1 for i in range(32_001)},
                 {str(i): -1 for i in range(600_000)}):  # fmt: skip
        body = {"messages": CHAT, "max_tokens": 2, "logit_bias": bias}
        status, _, answer = server.post("/v1/chat/completions", body, headers=ATTACKER)
        assert status == 400 and answer["error"]["param"] == "logit_bias", answer
    _ordinary(server)
    assert "Traceback" not in server.output()


class _Stops:
    """A backend whose engine loads, then stops for good when told (a scheduler that died)."""

    def __init__(self) -> None:
        self.why: str | None = None

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def degraded(self) -> bool:
        return False

    def failure(self) -> str | None:
        return self.why

    def status(self) -> dict[str, Any]:
        return {}

    def tokens_per_second(self) -> float:
        return 0.0

    def cancel_all(self) -> None:
        pass

    async def reserve(self, kind: str, body: dict[str, Any], owner: str) -> None:
        return None

    async def run(self, kind: str, body: dict[str, Any], raw: bytes, call: Any) -> Any:
        call.permit.release()
        return {}


def test_a_dead_engine_is_a_503_in_health_and_stops_the_server() -> None:
    import asyncio

    from nexabind.server._metrics import Metrics
    from nexabind.server._options import ServeOptions
    from nexabind.server.gateway import Gateway, HTTPError

    async def scenario() -> None:
        backend = _Stops()
        gateway = Gateway(backend, ServeOptions("model.gguf"), Metrics())
        fatal: list[str] = []
        gateway.on_fatal = fatal.append
        await gateway.start()
        while gateway.state != "ok":
            await asyncio.sleep(0.01)
        assert gateway.health()[0] == 200
        (await gateway.admit()).permit.release()
        backend.why = "OverflowError: int too big to convert"
        status, body = gateway.health()
        assert status == 503 and body["status"] == "failed"
        assert "OverflowError" in body["error"]
        with pytest.raises(HTTPError, match="the engine stopped") as e:
            await gateway.admit()
        assert e.value.status == 503
        assert len(fatal) == 1  # told once: the server exits non-zero
        await gateway.close()

    asyncio.run(scenario())


# -- sessions cannot starve others ---------------------------------------------------------------


def _until(server: Served, what: str, value: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (slots := server.get("/slots", headers=USER)[1])[what] != value:
        assert time.monotonic() < deadline, slots
        time.sleep(0.02)
    return slots  # type: ignore[no-any-return]


def test_a_busy_session_starves_no_one(libdir: Path, tiny_model: Path, tmp_path: Path) -> None:
    args = ("-np", "2", "-c", "8192", "--queue-timeout", "20", *KEYS)
    with Served(tiny_model, *args, log=tmp_path / "log") as s:
        long = {"messages": CHAT, "max_tokens": 100_000, "logit_bias": NO_EOS, "stream": True,
                "session_id": "s", **GREEDY}  # fmt: skip
        holder = _open(s, long, ATTACKER)
        resp = holder.getresponse()
        assert resp.status == 200 and len(read_events(resp, 2)) == 2
        more = {"messages": CHAT, "max_tokens": 2, "session_id": "s"}
        waiting = [_open(s, more, ATTACKER) for _ in range(5)]
        _until(s, "session_waiting", 5)  # they wait for "s", holding no slot
        _ordinary(s)
        # The same session id under the other key is another conversation.
        status, _, body = s.post("/v1/chat/completions", more, headers=USER)
        assert status == 200, body
        for conn in waiting:  # abandoned: they stop waiting
            _drop(conn)
        slots = _until(s, "session_waiting", 0)
        assert slots["in_flight"] == 1  # only the stream
        _ordinary(s)
        _drop(holder)
        _until(s, "in_flight", 0)
        status, _, body = s.post("/v1/chat/completions", more, headers=ATTACKER)
        assert status == 200, body  # the session's lock went with its stream
        gone = 'nexabind_requests_total{endpoint="/v1/chat/completions",status="499"}'
        assert s.metric(gone, headers=USER) >= 5


# -- bad input is a 400 naming the field, never a 500 ---------------------------------------------

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}


def _schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


def test_malformed_bodies_schemas_and_histories_are_400s(server: Served) -> None:
    call = {"role": "assistant", "content": None}
    cases: list[tuple[Any, str]] = [
        (b"[" * 1500 + b"]" * 1500, "body"),
        (b'{"messages": ' + b"[" * 70 + b"]" * 70 + b"}", "body"),
        ({"messages": CHAT, "response_format": _schema_format(_nested(40))}, "response_format"),
        ({"messages": CHAT, "response_format": _schema_format({"$ref": "#"})}, "response_format"),
        ({"messages": CHAT, "response_format": _schema_format(
            {"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
             "$ref": "#/$defs/a"})}, "response_format"),
        ({"messages": CHAT, "response_format": _schema_format({"type": "object", "properties": {
            f"p{i}": {"type": "integer"} for i in range(30_000)}})}, "response_format"),
        ({"messages": CHAT, "response_format": {"type": "json_object", "schema": {
            "type": "object", "properties": {f"p{i}": {} for i in range(30_000)}}}},
         "response_format"),
        ({"messages": CHAT, "response_format": _schema_format({"x-guidance": 5})},
         "response_format"),
        ({"messages": CHAT, "response_format": _schema_format(
            {"type": "string", "x-guidance": {"lenient": True}})}, "response_format"),
        ({"messages": CHAT, "tools": [{**WEATHER, "function": {**WEATHER["function"],
          "parameters": {"type": "object", "x-guidance": {"whitespace_pattern": " *"}}}}]},
         "tools"),
        ({"messages": CHAT, "tools": [WEATHER], "tool_choice": {"function": 5}}, "tool_choice"),
        ({"messages": CHAT, "tools": [WEATHER], "tool_choice": {"function": {"name": 5}}},
         "tool_choice"),
        ({"messages": CHAT, "tools": [WEATHER], "tool_choice": {"type": "function"}},
         "tool_choice"),
        ({"messages": [*CHAT, {**call, "tool_calls": "get_weather"}]}, "messages"),
        ({"messages": [*CHAT, {**call, "tool_calls": [5]}]}, "messages"),
        ({"messages": [*CHAT, {**call, "tool_calls": [{"id": "c1"}]}]}, "messages"),
        ({"messages": [*CHAT, {**call, "tool_calls": [{"function": {"name": "f",
          "arguments": 5}}]}]}, "messages"),
        ({"messages": [*CHAT, {**call, "function_call": 5}]}, "messages"),
    ]  # fmt: skip
    for body, param in cases:
        status, _, answer = server.post("/v1/chat/completions", body, headers=ATTACKER)
        assert status == 400, (str(body)[:200], answer)
        assert answer["error"]["param"] == param, (str(body)[:200], answer)
    _ordinary(server)
    assert "Traceback" not in server.output()


def test_a_model_that_writes_brackets_without_end_gets_its_text_back(server: Served) -> None:
    """The tool-call parser once recursed into 1,500 '[' and answered 500 (RecursionError)."""
    body = {"messages": CHAT, "tools": [WEATHER], "max_tokens": 1500, "logit_bias": {"29961": 100},
            **GREEDY}  # fmt: skip
    status, _, answer = server.post("/v1/chat/completions", body, headers=ATTACKER)
    assert status == 200, answer
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == "[" * 1500
    _ordinary(server)


def test_what_a_llama_server_child_answers_is_relayed_well(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error object that is a string, and text with a lone surrogate (a JSON escape any
    upstream may send), once broke the forwarder (AttributeError) and the encoder."""
    import stat
    import sys

    fake = Path(__file__).with_name("_fake_llama_server.py")
    exe = tmp_path / "llama-server"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{fake}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    answer = tmp_path / "answer"
    monkeypatch.setenv("FAKE_ANSWER", str(answer))
    args = ("--engine", "llama-server", "--server-bin", str(exe), *KEYS)
    with Served(tiny_model, *args, log=tmp_path / "log") as s:
        answer.write_bytes(b'500\n{"error": "the child says no"}')
        status, _, body = s.post("/v1/chat/completions", {"messages": CHAT}, headers=USER)
        assert status == 500 and body["error"]["message"] == "the child says no", body
        answer.write_bytes(b'400\n{"error": {"message": 5, "type": 7}}')
        status, _, body = s.post("/v1/chat/completions", {"messages": CHAT}, headers=USER)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", body
        answer.write_bytes(b'200\n{"choices": [{"message": {"content": "a\\ud800b"}}]}')
        status, _, raw = s.request("POST", "/v1/chat/completions", {"messages": CHAT},
                                   headers=USER)  # fmt: skip
        assert status == 200 and b"\\ud800" in raw, raw
        assert json.loads(raw)["choices"][0]["message"]["content"] == "a\ud800b"
        assert "Traceback" not in s.output()


# -- sizes are bounded before the work ------------------------------------------------------------


def test_sizes_beyond_the_limits_are_413s_before_any_work(server: Served) -> None:
    many = [{"role": "user", "content": "hi"}] * 2049
    long = [{"role": "user", "content": chr(0x20000) * 140_000}]  # CJK Extension B
    cases: list[tuple[str, Any, str]] = [
        ("/v1/chat/completions", {"messages": many, "max_tokens": 1}, "messages"),
        ("/v1/chat/completions", {"messages": long, "max_tokens": 1}, "messages"),
        ("/v1/completions", {"prompt": "a" * 140_000, "max_tokens": 1}, "prompt"),
    ]
    for path, body, param in cases:
        status, _, answer = server.post(path, body, headers=ATTACKER)
        assert status == 413, (param, answer)
        assert answer["error"]["param"] == param and "--max-" in answer["error"]["message"]
    status, _, _ = server.post(
        "/v1/chat/completions", {"messages": many[:2048], "max_tokens": 1}, headers=ATTACKER
    )
    assert status in (200, 400)  # within the limits: it is worked on (and may not fit a slot)
    _ordinary(server)


def test_embedding_inputs_are_capped_per_request(
    libdir: Path, embed_model: Path, tmp_path: Path
) -> None:
    args = ("--embedding", "-c", "1024", "--max-inputs", "8", "--max-input-chars", "1000")
    with Served(embed_model, *args, log=tmp_path / "log") as s:
        for body, what in (({"input": ["a"] * 1_000_000}, "--max-inputs"),
                           ({"input": ["a"] * 9}, "--max-inputs"),
                           ({"input": ["a" * 600, "b" * 600]}, "--max-input-chars")):  # fmt: skip
            status, _, answer = s.post("/v1/embeddings", body)
            assert status == 413 and answer["error"]["param"] == "input", answer
            assert what in answer["error"]["message"]
        status, _, answer = s.post("/v1/embeddings", {"input": ["a"] * 8})
        assert status == 200 and len(answer["data"]) == 8


def test_rerank_documents_count_against_the_same_caps() -> None:
    from nexabind.server._options import ServeOptions
    from nexabind.server._schema import SchemaError, check_sizes

    options = ServeOptions("m.gguf", rerank=True, max_inputs=3, max_input_chars=20)
    check_sizes("rerank", {"query": "q", "documents": ["a", "b", "c"]}, options)
    for body in ({"query": "q", "documents": ["a"] * 4},
                 {"query": "q" * 19, "documents": ["ab"]}):  # fmt: skip
        with pytest.raises(SchemaError) as e:
            check_sizes("rerank", body, options)
        assert e.value.status == 413 and e.value.param == "documents"


# -- auth cannot turn off by accident -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "file", "fragment"),
    [
        ((), {"NEXABIND_API_KEY": ""}, None, "NEXABIND_API_KEY is set but empty"),
        ((), {"NEXABIND_API_KEY": "  "}, None, "NEXABIND_API_KEY is set but empty"),
        (("--api-key", ""), {}, None, "--api-key '' names no key"),
        ((), {}, "", "holds no key"),
        ((), {}, "# the keys\n\n   \n# none yet\n", "holds no key"),
        (("--api-key", "k", "--no-auth"), {}, None, "contradict"),
    ],
)
def test_a_key_option_that_names_no_key_is_a_start_up_error(
    runner: Any, tmp_path: Path, args: tuple[str, ...], env: dict[str, str], file: str | None,
    fragment: str,
) -> None:  # fmt: skip
    from nexabind.cli import cli

    argv = ["serve", str(tmp_path / "model.gguf"), *args]
    if file is not None:
        (tmp_path / "keys").write_text(file)
        argv += ["--api-key-file", str(tmp_path / "keys")]
    result = runner.invoke(cli, argv, env=env)
    assert result.exit_code == 1, result.output
    assert fragment in result.output
    assert "--no-auth" in result.output  # how to run without keys, said


def test_the_server_says_whether_keys_are_on(
    server: Served, libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    assert "API keys: on (2 keys)" in server.output()
    keys = tmp_path / "keys"
    keys.write_text("# ops team\nfile-key\n")
    with Served(tiny_model, "--api-key-file", str(keys), log=tmp_path / "log1") as s:
        assert "API keys: on (1 key)" in s.output()
        assert s.get("/v1/models")[0] == 401
        assert s.get("/v1/models", headers={"X-Api-Key": "file-key"})[0] == 200
        assert s.get("/v1/models", headers={"X-Api-Key": "# ops team"})[0] == 401
    with Served(tiny_model, "--host", "0.0.0.0", "--no-auth", log=tmp_path / "log2") as s:
        out = s.output()
        assert "API keys: off" in out and "listening on 0.0.0.0 without API keys" in out


# -- connections are bounded -----------------------------------------------------------------------


def test_idle_connections_at_the_file_limit_lock_no_one_out(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """1,100 half-sent requests against a server started at the common limit of 1024 files."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard limit of open files is {hard}; the test needs 4096")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:  # the server starts at 1024 files; this process goes back to its own limit
        s = Served(tiny_model, "-np", "1", *KEYS, ready=False, log=tmp_path / "log")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    idle: list[socket.socket] = []
    with s:
        s.wait_health(200)
        try:
            for _ in range(1100):
                c = socket.create_connection(("127.0.0.1", s.port), timeout=30)
                c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                idle.append(c)
            _ordinary(s)
        finally:
            for c in idle:
                c.close()


def _closed_by_server(c: socket.socket, drip: bytes, every: float, within: float) -> bool:
    """Send ``drip`` a byte at a time; whether the server closes the connection meanwhile."""
    deadline = time.monotonic() + within
    i = 0
    c.settimeout(every)
    while time.monotonic() < deadline:
        try:
            if c.recv(1024) == b"":
                return True
        except TimeoutError:
            pass
        except OSError:
            return True
        try:
            c.sendall(drip[i % len(drip) : i % len(drip) + 1])
        except OSError:
            return True
        i += 1
    return False


def test_headers_and_bodies_that_come_too_slowly_are_cut(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    with Served(tiny_model, "-np", "1", "--read-timeout", "1", *KEYS, log=tmp_path / "log") as s:
        c = socket.create_connection(("127.0.0.1", s.port))
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 10_000
        assert _closed_by_server(c, head, 0.2, 30)  # slowloris: a byte every 0.2 s
        c.close()
        c = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                  b"Authorization: Bearer user-key\r\n\r\n" + b"{" * 10)  # fmt: skip
        answer = c.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        c.close()
        _ordinary(s)


def test_sigterm_ends_the_server_while_a_request_tokenizes(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """One huge prompt (minutes of tokenizing with an SPM vocabulary) cannot hold the server
    past its grace period."""
    args = ("-np", "1", "--grace", "1", "--max-prompt-chars", "2000000", "--max-body", "33554432",
            *KEYS)  # fmt: skip
    with Served(tiny_model, *args, log=tmp_path / "log") as s:
        text = chr(0x20000) * 1_000_000  # CJK Extension B: tokenized in quadratic time
        body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 1},
                          ensure_ascii=False).encode()  # fmt: skip
        conn = _open_raw(s, body)
        time.sleep(2)  # it is tokenizing now
        s.proc.send_signal(15)
        assert s.proc.wait(timeout=60) == 0
        conn.close()


def _open_raw(server: Served, body: bytes) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body,
                 {"Content-Type": "application/json", **USER})  # fmt: skip
    return conn


def test_a_conversation_stays_held_until_its_worker_ends() -> None:
    """A client that leaves gives its slot back at once; the conversation it held goes to the
    next request only when the worker that may still be starting a task on it is done."""
    import asyncio

    from nexabind.server._metrics import Metrics
    from nexabind.server._options import ServeOptions
    from nexabind.server.gateway import Gateway

    class Conversation:
        def __init__(self) -> None:
            self.released = 0

        def release(self) -> None:
            self.released += 1

    async def scenario() -> None:
        gateway = Gateway(_Stops(), ServeOptions("model.gguf", parallel=1), Metrics())
        await gateway.start()
        while gateway.state != "ok":
            await asyncio.sleep(0.01)
        call = await gateway.admit()
        conv = call.permit.held = Conversation()
        let_go = call.permit.keep()  # a worker starts
        call.permit.release()  # the client left
        assert gateway.free == 1 and conv.released == 0
        await asyncio.to_thread(let_go)  # the worker ends, in its thread
        for _ in range(100):
            if conv.released:
                break
            await asyncio.sleep(0.01)
        let_go()
        call.permit.release()
        await asyncio.sleep(0.05)
        assert conv.released == 1 and gateway.free == 1
        await gateway.close()

    asyncio.run(scenario())


def test_a_huge_prompt_delays_only_itself(libdir: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Seconds of tokenizing one prompt (an SPM vocabulary and a run of CJK Extension B) once
    held the model's lock, and every other request's tokenization waited behind it."""
    args = ("-np", "2", "--max-prompt-chars", "300000", *KEYS)
    with Served(tiny_model, *args, log=tmp_path / "log") as s:
        big = {"messages": [{"role": "user", "content": chr(0x20000) * 200_000}], "max_tokens": 1}
        done = threading.Event()

        def attack() -> None:
            s.post("/v1/chat/completions", big, headers=ATTACKER)
            done.set()

        t = threading.Thread(target=attack)
        t.start()
        time.sleep(0.5)  # it is tokenizing now
        _ordinary(s)
        assert not done.is_set()  # answered while the huge prompt was still being read
        t.join()


# -- load and abuse -------------------------------------------------------------------------------


def test_streams_that_leave_at_random_among_attacks_leak_nothing(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """80 streaming clients that leave after a random number of events, on plain and session
    chats, beside the attacks of this file, for about 15 s. Afterwards every slot is free and
    nothing is counted as in flight, waiting or processing; and the ordinary user was answered
    every time."""
    import random

    args = ("-np", "4", "-c", "8192", "--max-queue", "256", *KEYS)
    with Served(tiny_model, *args, log=tmp_path / "log") as s:
        _ordinary(s)
        stop = time.monotonic() + 15
        failures: list[str] = []
        answered: list[int] = []

        def streamer(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop:
                body = {"messages": CHAT, "max_tokens": 400, "logit_bias": NO_EOS, "stream": True}
                if rng.random() < 0.3:
                    body["session_id"] = f"s{rng.randrange(4)}"
                try:
                    conn = _open(s, body, ATTACKER)
                    resp = conn.getresponse()
                    if resp.status == 200:
                        read_events(resp, rng.randrange(0, 20))
                    _drop(conn)
                except OSError:
                    pass

        def attacker(seed: int) -> None:
            rng = random.Random(seed)
            bodies = [
                {"messages": CHAT, "top_k": 2**31},
                {"messages": CHAT, "seed": float("nan")},
                {"messages": CHAT, "stop": [1]},
                {"messages": CHAT, "logit_bias": {"32000": 1}},
                {"messages": CHAT, "tools": [WEATHER], "tool_choice": {"function": 5}},
                {"messages": CHAT, "response_format": _schema_format({"$ref": "#"})},
            ]
            while time.monotonic() < stop:
                status, _, _ = s.post("/v1/chat/completions", rng.choice(bodies), headers=ATTACKER)
                if status != 400:
                    failures.append(f"attack answered {status}")

        def user() -> None:
            while time.monotonic() < stop:
                try:
                    _ordinary(s)
                    answered.append(1)
                except AssertionError as e:
                    failures.append(str(e)[:200])

        threads = [threading.Thread(target=streamer, args=(i,)) for i in range(80)]
        threads += [threading.Thread(target=attacker, args=(i,)) for i in range(2)]
        threads.append(threading.Thread(target=user))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures[:5]
        assert answered
        deadline = time.monotonic() + 60
        while True:
            slots = s.get("/slots", headers=USER)[1]
            idle = slots["slots_busy"] == 0 and slots["in_flight"] == 0
            if idle and slots["waiting"] == 0 and slots["session_waiting"] == 0:
                break
            assert time.monotonic() < deadline, slots
            time.sleep(0.05)
        assert all(sl["state"] == "idle" for sl in slots["slots"])
        assert s.metric("nexabind_requests_processing", headers=USER) == 0
        assert s.metric("nexabind_requests_deferred", headers=USER) == 0
        _ordinary(s)


def test_a_server_whose_scheduler_died_says_so_and_exits_1(libdir: Path, tiny_model: Path) -> None:
    """The scheduler thread of a real engine is broken after loading (its slot list taken
    away, so its next step raises): /health turns 503 "failed" and the server exits 1 instead
    of answering 503 forever behind an ok /health."""
    from _child import run_child
    from _serve import free_port

    code = """
    import logging, sys, threading, time, urllib.request, json
    from nexabind.server import ServeOptions, serve
    from nexabind.server._local import LocalBackend

    logging.basicConfig(level=logging.INFO)
    load = LocalBackend.load

    def broken(self):
        load(self)
        sched = self.engine._sched
        with sched.cv:
            sched.slots = None  # the thread's next look at its slots raises TypeError
            sched.cv.notify()

    LocalBackend.load = broken
    port = int(sys.argv[2])
    seen = []

    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            except urllib.error.HTTPError as e:
                body = json.loads(e.read())
                if body["status"] == "failed":  # not "loading"
                    seen.append((e.code, body))
                    return
            except OSError:
                pass
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    code = serve(ServeOptions(sys.argv[1], port=port, threads=1))
    print("SEEN", seen)
    sys.exit(code)
    """
    r = run_child(code, tiny_model, free_port(), timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the engine stopped: TypeError" in r.stderr
    assert "(503, {'status': " in r.stdout and "failed" in r.stdout, r.stdout
