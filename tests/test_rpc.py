"""llama.cpp's RPC backend from Python: `nexabind rpc-server` on loopback serves this machine's
CPU, and Llama, Engine and `nexabind serve --rpc` put a model's layers on it, with the tokens a
local run gives; a server that is not there, or a public address, is a clear error."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from _child import run_child
from _serve import Served, free_port

from nexabind import Llama
from nexabind.engine import Engine

PROMPT = "Hello world, the"


@pytest.fixture(scope="module")
def rpc_server(libdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``nexabind rpc-server`` on 127.0.0.1, one thread: its endpoint."""
    yield from _rpc_server(libdir, tmp_path_factory)


@pytest.fixture(scope="module")
def rpc_server_2(libdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second one."""
    yield from _rpc_server(libdir, tmp_path_factory)


def _rpc_server(libdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("rpc") / "rpc-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nexabind", "rpc-server", "--port", str(port), "-t", "1",
             "--lib-path", str(libdir)], stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
        proc.terminate()
        proc.wait(timeout=10)


def _local_tokens(model: Path, libdir: Path) -> list[int]:
    with Llama(model, n_ctx=256, n_threads=1, lib_path=libdir) as llm:
        return [int(t) for t in llm.generate(llm.tokenize(PROMPT.encode()), temp=0, max_tokens=16)]


def test_llama_with_an_rpc_server_gives_the_local_tokens(
    libdir: Path, tiny_model_f32: Path, rpc_server: str
) -> None:
    want = _local_tokens(tiny_model_f32, libdir)
    # In a child: the server's devices join the process's backends for good.
    code = """
        import json, sys
        from nexabind import Llama
        llm = Llama(sys.argv[1], n_ctx=256, n_threads=1, rpc_servers=sys.argv[2])
        prompt = llm.tokenize(sys.argv[3].encode())
        tokens = [int(t) for t in llm.generate(prompt, temp=0, max_tokens=16)]
        print(json.dumps(tokens))
    """
    r = run_child(code, tiny_model_f32, rpc_server, PROMPT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == want


def test_a_quantized_model_over_two_rpc_servers_gives_the_local_tokens(
    libdir: Path, tiny_model: Path, rpc_server: str, rpc_server_2: str
) -> None:
    """The q8_0 model's layers spread over two servers (and this process's CPU)."""
    want = _local_tokens(tiny_model, libdir)
    code = """
        import json, sys
        from nexabind import Llama
        llm = Llama(sys.argv[1], n_ctx=256, n_threads=1, rpc_servers=sys.argv[2].split(","),
                    verbose=True)
        prompt = llm.tokenize(sys.argv[3].encode())
        print(json.dumps([int(t) for t in llm.generate(prompt, temp=0, max_tokens=16)]))
    """
    r = run_child(code, tiny_model, f"{rpc_server},{rpc_server_2}", PROMPT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == want
    # llama.cpp's own log says where the layers went.
    assert f"using device RPC0 ({rpc_server})" in r.stderr
    assert f"using device RPC1 ({rpc_server_2})" in r.stderr


def test_the_engine_and_the_server_take_rpc_servers(
    libdir: Path, tiny_model_f32: Path, rpc_server: str, tmp_path: Path
) -> None:
    want = _local_tokens(tiny_model_f32, libdir)
    with Engine(tiny_model_f32, n_parallel=1, n_ctx=256, n_threads=1, lib_path=libdir,
                rpc_servers=[rpc_server]) as eng:  # fmt: skip
        tid = eng.create_task(prompt=PROMPT, max_tokens=16, temperature=0.0)
        assert [t.id for t in eng.result(tid, timeout=120)["tokens"]] == want
    with Served(tiny_model_f32, "-np", "1", "-c", "256", "--rpc", rpc_server,
                log=tmp_path / "serve.log") as s:  # fmt: skip
        ask = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        status, _, body = s.post("/v1/completions", ask)
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 4


def test_an_rpc_server_that_is_not_there_is_an_error_not_a_crash(
    libdir: Path, tiny_model_f32: Path
) -> None:
    port = free_port()  # nothing listens there
    code = """
        import sys
        from nexabind import Llama
        from nexabind.errors import RpcError
        for servers in (f"127.0.0.1:{sys.argv[2]}", "no-port-here", ["127.0.0.1:99999"]):
            try:
                Llama(sys.argv[1], n_ctx=64, rpc_servers=servers)
            except (RpcError, ValueError) as e:
                print(type(e).__name__, e)
    """
    r = run_child(code, tiny_model_f32, str(port))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith(f"RpcError RPC server 127.0.0.1:{port} does not answer")
    assert "nexabind rpc-server --host HOST --port PORT" in lines[0]
    assert lines[1].endswith("got 'no-port-here'")
    assert lines[1].startswith("ValueError an RPC server is HOST:PORT (e.g. 192.168.1.7:50052)")
    assert lines[2].startswith("ValueError an RPC server is HOST:PORT")


def test_rpc_server_refuses_an_open_address_without_the_flag(libdir: Path) -> None:
    env = {**os.environ, "NEXABIND_LIB_PATH": str(libdir)}
    r = subprocess.run(
        [sys.executable, "-m", "nexabind", "rpc-server", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert r.returncode == 2
    assert "--host 0.0.0.0 is not loopback" in r.stderr
    assert "--i-know-this-is-unauthenticated" in r.stderr


def test_the_build_records_the_rpc_protocol(libdir: Path) -> None:
    from nexabind.info import gather

    info = json.loads((libdir.parent / "build-info.json").read_text())
    abi = json.loads((libdir.parent / "abi.json").read_text())
    assert info["rpc_protocol"] == abi["rpc_protocol"] == "7.0.0"
    assert any(libdir.glob("libggml-rpc.*"))
    assert gather()["library"]["rpc"] == "7.0.0"


def test_rpc_server_on_a_taken_port_says_so(libdir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "nexabind", "rpc-server", "--port", str(port), "-t", "1",
             "--lib-path", str(libdir)], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert r.returncode == 1
    assert f"the RPC server at 127.0.0.1:{port} stopped (is the port taken?)" in r.stderr


@contextmanager
def _fake_rpc_server(answer: bytes | None) -> Iterator[str]:
    """A peer on loopback that reads each greeting and answers ``answer`` (``None``: nothing,
    holding the connection open; ``b"trickle"``: a byte a second): its endpoint."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(64)
            if answer is None:
                held.append(conn)
                continue
            if answer == b"trickle":  # a byte a second, forever
                threading.Thread(target=_trickle, args=(conn,), daemon=True).start()
                continue
            conn.sendall(answer)
            conn.close()

    threading.Thread(target=loop, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in held:
            conn.close()


def _trickle(conn: socket.socket) -> None:
    with conn:
        try:
            while True:
                conn.sendall(b"\x00")
                time.sleep(1)
        except OSError:
            return


def _hello_answer(major: int, minor: int, patch: int) -> bytes:
    return struct.pack("<QBBBB", 28, major, minor, patch, 0) + bytes(24)


_REFUSED = """
    import sys, time
    from nexabind import Llama
    from nexabind.errors import RpcError
    start = time.monotonic()
    try:
        Llama(sys.argv[1], n_ctx=64, rpc_servers=sys.argv[2])
    except RpcError as e:
        print(f"{time.monotonic() - start:.1f}", e)
"""


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (_hello_answer(8, 0, 0), "speaks protocol 8.0.0, this library 7.0.0"),
        (_hello_answer(7, 1, 0), "speaks protocol 7.1.0, this library 7.0.0"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "is not an RPC server: its answer"),
        (b"", "is not an RPC server: its answer to the greeting is b''"),
        (None, "did not answer the RPC greeting within 5 s: not an RPC server"),
        (b"trickle", "did not answer the RPC greeting within 5 s: not an RPC server"),
    ],
    ids=["other-major", "newer-minor", "garbage", "closes", "silent", "trickle"],
)
def test_a_server_of_another_protocol_or_not_an_rpc_server_is_refused_before_ggml_sees_it(
    libdir: Path, tiny_model_f32: Path, answer: bytes | None, says: str
) -> None:
    # ggml aborts the process on each of these; the greeting in Python turns them into RpcError.
    with _fake_rpc_server(answer) as endpoint:
        r = run_child(_REFUSED, tiny_model_f32, endpoint, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        seconds, _, message = r.stdout.strip().partition(" ")
        assert endpoint in message
        assert says in message
        assert float(seconds) < 15


def test_the_greeting_reads_the_real_servers_version_and_leaves_it_serving(
    libdir: Path, rpc_server: str
) -> None:
    code = """
        import sys
        from nexabind.lowlevel._rpc import greet, rpc_devices
        print(greet(sys.argv[1]), greet(sys.argv[1]), len(rpc_devices([sys.argv[1]])) > 0)
    """
    r = run_child(code, rpc_server, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["7.0.0", "7.0.0", "True"]
