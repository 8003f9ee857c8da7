"""`nexabind serve --models-dir` as a real process: models loaded on demand, the least recently
used one unloaded beyond --models-max, two models answering at once, /models/load and
/models/unload, an unknown model, the default model, the memory budget."""

from __future__ import annotations

import shutil
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _serve import Served, read_events

from nexabind.server._options import ServeOptions
from nexabind.server._router import estimate_bytes, find_models

openai = pytest.importorskip("openai")

KEY = "models-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "Tell me about birds"}]
LONG = {"prompt": "Once", "max_tokens": 100_000, "logit_bias": {"2": -100}}  # until the slot fills


@pytest.fixture(scope="module")
def models_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    for name in ("alpha", "beta", "gamma", "mmproj-alpha"):
        shutil.copy(tiny_model, folder / f"{name}.gguf")
    return folder


@pytest.fixture(scope="module")
def server(libdir: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ("--models-max", "2", "--default-model", "beta", "-np", "2", "-c", "4096",
            "--api-key", KEY)  # fmt: skip
    with Served(f"--models-dir={models_dir}", *args, log=log) as s:
        yield s


def _client(server: Served) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _statuses(server: Served) -> dict[str, str]:
    status, body = server.get("/v1/models", headers=AUTH)
    assert status == 200
    return {m["id"]: m["status"]["value"] for m in body["data"]}


def _unload_all(server: Served) -> None:
    for name in ("alpha", "beta", "gamma"):
        status, _, body = server.post("/models/unload", {"model": name}, headers=AUTH)
        assert status == 200 and body == {"success": True}


def test_find_models_names_by_stem_splits_once_without_projectors(tmp_path: Path) -> None:
    for name in ("b", "a", "big-00001-of-00002", "big-00002-of-00002", "mmproj-a"):
        (tmp_path / f"{name}.gguf").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    found = find_models((str(tmp_path),))
    assert list(found) == ["a", "b", "big"]
    assert found["big"].name == "big-00001-of-00002.gguf"
    with pytest.raises(ValueError, match="two models are named 'a'"):
        find_models((str(tmp_path), str(tmp_path)))


def test_a_request_loads_its_model_and_models_lists_every_status(server: Served) -> None:
    _unload_all(server)
    assert _statuses(server) == {"alpha": "unloaded", "beta": "unloaded", "gamma": "unloaded"}
    r = _client(server).chat.completions.create(model="alpha", messages=CHAT, max_tokens=4)
    assert r.model == "alpha" and r.usage.completion_tokens == 4
    assert _statuses(server)["alpha"] == "loaded"
    status, one = server.get("/v1/models/gamma", headers=AUTH)
    assert status == 200 and one["status"]["value"] == "unloaded"


def test_beyond_models_max_the_least_recently_used_is_unloaded(server: Served) -> None:
    _unload_all(server)
    unloads = server.metric('nexabind_model_unloads_total{model="alpha"}', headers=AUTH)
    client = _client(server)
    for name in ("alpha", "beta", "gamma"):
        r = client.completions.create(model=name, prompt="Once upon", max_tokens=2)
        assert r.model == name
    assert _statuses(server) == {"alpha": "unloaded", "beta": "loaded", "gamma": "loaded"}
    after = server.metric('nexabind_model_unloads_total{model="alpha"}', headers=AUTH)
    assert after == unloads + 1
    # beta is used again, so gamma is now the least recent: alpha's load unloads it
    client.completions.create(model="beta", prompt="Once upon", max_tokens=2)
    client.completions.create(model="alpha", prompt="Once upon", max_tokens=2)
    assert _statuses(server) == {"alpha": "loaded", "beta": "loaded", "gamma": "unloaded"}
    assert server.metric('nexabind_model_loads_total{model="alpha"}', headers=AUTH) >= 2


def _busy(server: Served, name: str) -> int:
    return server.get("/slots", headers=AUTH)[1]["models"][name].get("slots_busy", 0)


def _until_idle(server: Served, name: str) -> None:
    deadline = time.monotonic() + 30
    while _busy(server, name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _busy(server, name) == 0


def test_two_models_answer_at_once(server: Served) -> None:
    _unload_all(server)
    conn, resp = server.open_stream("/v1/completions", {"model": "alpha", **LONG}, headers=AUTH)
    try:
        assert len(read_events(resp, 2)) == 2  # alpha is generating
        answers: list[Any] = []

        def ask() -> None:
            answers.append(_client(server).chat.completions.create(
                model="gamma", messages=CHAT, max_tokens=3))  # fmt: skip

        t = threading.Thread(target=ask)
        t.start()
        t.join(120)
        assert answers and answers[0].model == "gamma"
        assert _busy(server, "alpha") == 1  # gamma loaded and answered while alpha generated
        assert _statuses(server) == {"alpha": "loaded", "beta": "unloaded", "gamma": "loaded"}
    finally:
        conn.close()
    _until_idle(server, "alpha")


def test_a_load_while_every_loaded_model_is_busy_is_a_503(server: Served) -> None:
    _unload_all(server)
    streams = [server.open_stream("/v1/completions", {"model": m, **LONG}, headers=AUTH)
               for m in ("alpha", "gamma")]  # fmt: skip
    try:
        for _, resp in streams:
            assert len(read_events(resp, 2)) == 2
        status, headers, body = server.post("/v1/completions", {"model": "beta", "prompt": "x"},
                                            headers=AUTH)  # fmt: skip
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert "--models-max 2" in body["error"]["message"]
        assert _statuses(server) == {"alpha": "loaded", "beta": "unloaded", "gamma": "loaded"}
        assert server.post("/models/unload", {"model": "alpha"}, headers=AUTH)[0] == 409
    finally:
        for conn, _ in streams:
            conn.close()
    _until_idle(server, "alpha")
    _until_idle(server, "gamma")
    # the clients are gone, their models idle: beta's load unloads the least recently used
    status, _, body = server.post("/v1/completions", {"model": "beta", "prompt": "x",
                                                      "max_tokens": 2}, headers=AUTH)  # fmt: skip
    assert status == 200 and body["model"] == "beta"
    assert sorted(_statuses(server).values()) == ["loaded", "loaded", "unloaded"]


def test_requests_racing_loads_and_evictions_are_answered(server: Served) -> None:
    _unload_all(server)
    got: list[tuple[int, str]] = []

    def ask(name: str) -> None:
        asked = {"model": name, "prompt": "Once", "max_tokens": 3}
        status, _, body = server.post("/v1/completions", asked, headers=AUTH)
        got.append((status, body["model"] if status == 200 else body["error"]["message"]))

    threads = [threading.Thread(target=ask, args=(n,)) for n in ["alpha", "beta", "gamma"] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) == 12
    # each answered by its model, or refused while both loaded models were busy
    assert all(status == 200 or (status == 503 and "--models-max" in what)
               for status, what in got), got  # fmt: skip
    assert {what for status, what in got if status == 200}
    assert list(_statuses(server).values()).count("loaded") <= 2


def test_serve_takes_a_model_or_a_models_dir(runner: Any, models_dir: Path) -> None:
    from nexabind.cli import cli

    both = runner.invoke(cli, ["serve", "x.gguf", "--models-dir", str(models_dir)])
    neither = runner.invoke(cli, ["serve"])
    for result in (both, neither):
        assert result.exit_code == 2 and "give MODEL or --models-dir DIR" in result.output


def test_the_adapters_answer_with_the_model_asked_for(server: Served) -> None:
    body = {"model": "gamma", "max_tokens": 2, "messages": CHAT}
    status, _, answer = server.post("/v1/messages", body, headers={"X-Api-Key": KEY})
    assert status == 200 and answer["model"] == "gamma"
    body = {"model": "alpha", "max_output_tokens": 2, "input": "Hi"}
    status, _, answer = server.post("/v1/responses", body, headers=AUTH)
    assert status == 200 and answer["model"] == "alpha"


def test_an_unknown_model_is_a_404_model_not_found(server: Served) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        _client(server).chat.completions.create(model="nope", messages=CHAT, max_tokens=2)
    assert e.value.code == "model_not_found"
    status, _, body = server.post("/v1/completions", {"model": "nope", "prompt": "x"},
                                  headers=AUTH)  # fmt: skip
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, _ = server.get("/v1/models/nope", headers=AUTH)
    assert status == 404


def test_a_request_without_model_goes_to_the_default(server: Served) -> None:
    status, _, body = server.post("/v1/completions", {"prompt": "Once upon", "max_tokens": 2},
                                  headers=AUTH)  # fmt: skip
    assert status == 200 and body["model"] == "beta"


def test_models_load_and_unload(server: Served) -> None:
    status, _, body = server.post("/models/load", {"model": "gamma"})
    assert status == 401
    status, _, body = server.post("/models/load", {"model": "gamma"}, headers=AUTH)
    assert status == 200 and body == {"success": True}
    assert _statuses(server)["gamma"] == "loaded"
    status, _, body = server.post("/models/unload", {"model": "gamma"}, headers=AUTH)
    assert status == 200 and _statuses(server)["gamma"] == "unloaded"
    status, _, body = server.post("/models/load", {"model": "nope"}, headers=AUTH)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, _, body = server.post("/models/load", {}, headers=AUTH)
    assert status == 400 and body["error"]["param"] == "model"


def test_the_header_gives_the_weights_bytes(tiny_model: Path) -> None:
    from gguf import GGUFReader

    from nexabind import _gguf

    want = sum(int(t.n_bytes) for t in GGUFReader(tiny_model).tensors)
    assert _gguf.summarize(tiny_model).n_bytes == want


def _header_only(path: Path) -> None:
    """A GGUF header claiming a 4 TiB f32 tensor, with no data behind it."""

    def text(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    kv = text("general.architecture") + struct.pack("<I", 8) + text("llama")
    tensor = text("token_embd.weight") + struct.pack("<IQQIQ", 2, 1 << 20, 1 << 20, 0, 0)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + kv + tensor)


def test_the_memory_budget_unloads_to_fit_and_refuses_what_never_fits(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("alpha", "beta"):
        shutil.copy(tiny_model, folder / f"{name}.gguf")
    _header_only(folder / "huge.gguf")
    one = estimate_bytes(tiny_model, ServeOptions(str(tiny_model), parallel=2, ctx_size=1024))
    assert one > tiny_model.stat().st_size // 2  # the weights, and a KV cache
    assert estimate_bytes(folder / "huge.gguf", ServeOptions("x")) >= 4 << 40
    budget = f"{1.5 * one / 2**30:.9f}"  # room for one tiny model, not two
    args = ("--models-memory", budget, "-np", "2", "-c", "1024")
    with Served(f"--models-dir={folder}", *args, log=tmp_path / "server.log") as s:
        status, headers, body = s.post("/v1/completions", {"model": "huge", "prompt": "x"})
        assert status == 503 and "more than --models-memory" in body["error"]["message"]
        assert "retry-after" not in headers  # waiting does not help
        for name in ("alpha", "beta"):
            status, _, body = s.post("/v1/completions", {"model": name, "prompt": "x",
                                                         "max_tokens": 2})  # fmt: skip
            assert status == 200 and body["model"] == name
        _, listed = s.get("/v1/models")
        statuses = {m["id"]: m["status"]["value"] for m in listed["data"]}
        assert statuses == {"alpha": "unloaded", "beta": "loaded", "huge": "unloaded"}
        assert s.terminate() == 0  # SIGTERM frees every loaded model and exits 0


def test_idle_unload_applies_to_each_model(libdir: Path, models_dir: Path, tmp_path: Path) -> None:
    args = ("--idle-unload", "1", "-np", "1", "-c", "512")
    with Served(f"--models-dir={models_dir}", *args, log=tmp_path / "server.log") as s:
        status, _, _ = s.post("/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 2})
        assert status == 200
        deadline = time.monotonic() + 30
        while (
            s.get("/v1/models")[1]["data"][0]["status"]["value"] != "unloaded"
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert s.get("/v1/models")[1]["data"][0]["status"]["value"] == "unloaded"
        assert s.metric('nexabind_model_unloads_total{model="alpha"}') == 1
        status, _, body = s.post("/v1/completions", {"model": "alpha", "prompt": "x",
                                                     "max_tokens": 2})  # fmt: skip
        assert status == 200 and body["model"] == "alpha"  # loaded again on demand
        assert s.metric('nexabind_model_loads_total{model="alpha"}') == 2


def test_sigterm_answers_requests_waiting_for_a_model_503(
    libdir: Path, models_dir: Path, tmp_path: Path
) -> None:
    args = ("-np", "1", "-c", "4096", "--grace", "5")
    with Served(f"--models-dir={models_dir}", *args, log=tmp_path / "server.log") as s:
        conn, resp = s.open_stream("/v1/completions", {"model": "alpha", **LONG})
        assert len(read_events(resp, 2)) == 2  # alpha's one slot is busy
        got: list[int] = []
        waiting = threading.Thread(
            target=lambda: got.append(
                s.post("/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 2})[0]
            )
        )
        waiting.start()
        deadline = time.monotonic() + 30
        while (
            not s.get("/slots")[1]["models"]["alpha"]["in_flight"] and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        time.sleep(0.3)  # the second request is in alpha's queue
        s.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        waiting.join(30)
        assert got == [503] and time.monotonic() - t0 < 1  # at once, not once a slot frees
        conn.close()
        assert s.terminate() == 0
