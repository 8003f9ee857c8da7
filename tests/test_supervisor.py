"""The llama-server engine: flags, readiness, restart with backoff, SIGTERM then SIGKILL — with a
stand-in that misbehaves on purpose, and with the real llama-server killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
from _serve import Served, events, read_events

from nexabind._build import server_binary
from nexabind.server import ServeOptions
from nexabind.server._forward import upstream_body
from nexabind.server.gateway import HTTPError
from nexabind.server.supervisor import Supervisor, SupervisorError, find_binary, server_argv

IN_CI = bool(os.environ.get("CI"))
FAKE = Path(__file__).with_name("_fake_llama_server.py")


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    exe = tmp_path / "llama-server"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_flags_come_from_the_same_options() -> None:
    o = ServeOptions("m.gguf", parallel=3, ctx_size=4096, threads=2, alias="m", rerank=True)
    argv = server_argv("/bin/llama-server", o, 5555)
    assert argv[:7] == [
        "/bin/llama-server",
        "-m",
        "m.gguf",
        "--host",
        "127.0.0.1",
        "--port",
        "5555",
    ]
    joined = " ".join(argv)
    for part in ("-np 3", "-c 4096", "-t 2", "-tb 2", "--alias m", "--reranking", "--kv-unified"):
        assert part in joined
    assert "--api-key" not in joined  # the key goes through the environment
    assert " -n " not in joined  # no cap unless asked for
    capped = server_argv("/bin/llama-server", ServeOptions("m.gguf", n_predict=64), 5555)
    assert "-n 64" in " ".join(capped)


def test_embedding_options_as_llama_server_reads_them() -> None:
    raw = json.dumps({"input": "hi", "normalize": False}).encode()
    sent = json.loads(upstream_body("embedding", {"input": "hi", "normalize": False}, raw))
    assert sent == {"input": "hi", "normalize": False, "embd_normalize": -1}
    plain = b'{"input": "hi"}'
    assert upstream_body("embedding", {"input": "hi"}, plain) is plain
    with pytest.raises(HTTPError) as e:
        upstream_body("embedding", {"input": "hi", "dimensions": 8}, b"{}")
    assert e.value.status == 400 and "--engine llama-server" in str(e.value)


def test_a_missing_binary_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXABIND_BUILD_CACHE", str(tmp_path))
    with pytest.raises(SupervisorError, match="nexabind build --with-server"):
        find_binary(ServeOptions("m.gguf", engine="llama-server"))
    with pytest.raises(SupervisorError, match="is not an executable file"):
        find_binary(ServeOptions("m.gguf", engine="llama-server", server_bin=str(tmp_path)))


def test_restart_with_backoff_and_degraded_meanwhile(
    fake_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ARGV", str(tmp_path / "argv"))
    sup = Supervisor(fake_bin, ServeOptions("m.gguf"), backoff=(0.3, 1.0), health_interval=0.05)
    sup.start()
    try:
        assert sup.state == "ready"
        first = sup.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        seen = set()
        deadline = time.monotonic() + 30
        while (sup.restarts < 1 or sup.state != "ready") and time.monotonic() < deadline:
            seen.add(sup.state)
            time.sleep(0.01)
        assert "degraded" in seen and sup.state == "ready" and sup.restarts == 1
        assert sup.pid not in (None, first)
        # A start that keeps failing is retried with a growing wait, and stays degraded.
        monkeypatch.setenv("FAKE_EXIT", "3")
        os.kill(sup.pid, signal.SIGKILL)  # type: ignore[arg-type]
        time.sleep(2.5)
        assert sup.state == "degraded"
        starts = (tmp_path / "argv").read_text().splitlines()
        assert 3 <= len(starts) <= 6  # 0.3 s, 0.6 s, 1.0 s, 1.0 s: a few, not a busy loop
        assert all(json.loads(s)[json.loads(s).index("-m") + 1] == "m.gguf" for s in starts)
    finally:
        sup.stop()
    assert sup.state == "stopped"


def test_stop_sends_sigterm_then_sigkill(fake_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_IGNORE_TERM", "1")
    sup = Supervisor(fake_bin, ServeOptions("m.gguf"), stop_timeout=0.5)
    sup.start()
    pid = sup.pid
    assert pid is not None
    t0 = time.monotonic()
    sup.stop()
    assert time.monotonic() - t0 >= 0.5  # it waited for SIGTERM first
    assert not _alive(pid) and sup.restarts == 0


def test_a_start_that_fails_reports_its_last_lines(
    fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EXIT", "2")
    sup = Supervisor(fake_bin, ServeOptions("m.gguf"))
    with pytest.raises(SupervisorError, match="exited with code 2 while starting"):
        sup.start()
    assert sup.state == "stopped"


# -- the real llama-server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_server() -> Path:
    found = server_binary()
    if found is None:
        msg = "no llama-server in the build cache: run `nexabind build --with-server`"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def test_llama_server_engine_killed_mid_run_is_restarted(
    libdir: Path, tiny_model: Path, tmp_path: Path, llama_server: Path
) -> None:
    import openai

    args = ("--engine", "llama-server", "-np", "2", "-c", "8192", "--alias", "tiny")
    with Served(tiny_model, *args, log=tmp_path / "log") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert r.model == "tiny" and r.usage.completion_tokens == 4
        chunks = list(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
            temperature=0, stream=True,
        ))  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            r.choices[0].message.content
        )
        pid = s.get("/slots")[1]["pid"]
        conn, resp = s.open_stream("/v1/completions", {
            "prompt": "Once", "max_tokens": 100_000, "temperature": 0,
            "logit_bias": {"2": -100},
        })  # fmt: skip
        assert len(read_events(resp, 2)) == 2
        os.kill(pid, signal.SIGKILL)
        tail = events(resp)
        assert "error" in tail[-1] and "broke off" in tail[-1]["error"]["message"]
        conn.close()
        states = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status, body = s.get("/health")
            states.add((status, body["status"]))
            if status == 200:
                break
            time.sleep(0.02)
        assert (503, "degraded") in states and status == 200
        assert s.get("/slots")[1]["restarts"] == 1 and s.get("/slots")[1]["pid"] != pid
        assert s.metric("nexabind_engine_restarts_total") == 1
        again = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
        assert again.usage.completion_tokens == 3
        child = s.get("/slots")[1]["pid"]
        assert s.terminate() == 0
    assert not _alive(child)  # SIGTERM of the gateway stops its llama-server
