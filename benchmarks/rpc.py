"""Local decode against llama.cpp's RPC backend over loopback, and load time with ``--cache``.

    NEXABIND_LIB_PATH=... NEXABIND_BENCH_GEMMA=.../gemma-3-270m-q4_k_m.gguf \\
        python benchmarks/rpc.py [N_TOKENS]

One ``nexabind rpc-server -t 1`` on 127.0.0.1 holds every layer (``rpc_servers=``); the local
run has one thread too. Each measurement is a fresh process (a process keeps the RPC devices it
has added), which loads the model (timed) and generates ``N_TOKENS`` greedy tokens (default
128) after a short prompt, three times; the median decode tok/s is printed, and how many of the
RPC run's tokens are the local run's before the first that differs. Load time (the
``Llama(...)`` call, in fresh processes, median of three) is measured against that server and
against a second one started with ``--cache`` (its cache folder empty): the first connection
sends the weights, later ones only the hashes of the tensors over 10 MiB (ggml-rpc's
``HASH_THRESHOLD``); smaller tensors are always sent.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import harness

from nexabind.errors import RpcError
from nexabind.lowlevel import rpc

PROMPT = "Once upon a time, in a small village by the sea, there lived"
ROUNDS = 3

CHILD = """
import json, sys, time
from nexabind import Llama
model, servers, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
llm = Llama(model, n_ctx=512, n_threads=1, rpc_servers=servers or None, verbose=False)
load_s = time.perf_counter() - start
prompt = llm.tokenize(sys.argv[4].encode())
runs = []
for _ in range(int(sys.argv[5])):
    start = time.perf_counter()
    tokens = [int(t) for t in llm.generate(prompt, temp=0, max_tokens=n)]
    runs.append(len(tokens) / (time.perf_counter() - start))
print(json.dumps({"load_s": load_s, "tok_s": runs, "tokens": tokens}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def rpc_server(cache_home: Path | None) -> Iterator[str]:
    """``nexabind rpc-server -t 1`` on loopback (``--cache`` under ``cache_home``)."""
    port = _free_port()
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "nexabind", "rpc-server", "--port", str(port), "-t", "1"]
    if cache_home is not None:
        env["XDG_CACHE_HOME"] = str(cache_home)
        cmd.append("--cache")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # ready when it answers the protocol's greeting
            try:
                rpc.greet(endpoint, timeout=1)
                break
            except RpcError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nexabind rpc-server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run(model: Path, servers: str, n: int, rounds: int = ROUNDS) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), servers, str(n), PROMPT, str(rounds)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the child ended with {proc.returncode}: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    from nexabind._source import ensure_source

    with tempfile.TemporaryDirectory() as tmp:
        vocab = ensure_source() / "models" / "ggml-vocab-llama-spm.gguf"
        models = {"tiny": harness.write_model("tiny", Path(tmp), vocab)}
        gemma, why = harness.gemma_path()
        if gemma is not None:
            models["gemma-3-270m"] = gemma
        else:
            print(why, file=sys.stderr)
        print("| model | size | local tok/s | RPC tok/s | load local | load RPC | "
              "--cache 1st | --cache later | same tokens |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for name, model in models.items():
            local = run(model, "", n)
            with rpc_server(None) as endpoint:
                remote = run(model, endpoint, n)
                load = [run(model, endpoint, 1, rounds=1)["load_s"] for _ in range(ROUNDS)]
            with rpc_server(Path(tmp) / f"cache-{name}") as endpoint:
                first = run(model, endpoint, 1, rounds=1)["load_s"]
                again = [run(model, endpoint, 1, rounds=1)["load_s"] for _ in range(ROUNDS)]
            pairs = zip(local["tokens"], remote["tokens"], strict=False)
            same = next(
                (i for i, (a, b) in enumerate(pairs) if a != b),
                min(len(local["tokens"]), len(remote["tokens"])),
            )
            size = model.stat().st_size / 1e6
            print(
                f"| {name} | {size:.0f} MB | {statistics.median(local['tok_s']):.1f} "
                f"| {statistics.median(remote['tok_s']):.1f} | {local['load_s']:.2f} s "
                f"| {statistics.median(load):.2f} s | {first:.2f} s "
                f"| {statistics.median(again):.2f} s | {same}/{len(local['tokens'])} |"
            )


if __name__ == "__main__":
    main()
