"""A serving contender in its own process: nexabind's Engine, or llama-server driven over HTTP.

``python benchmarks/serving.py KIND CONFIG_JSON`` speaks worker.py's protocol (``{"ready"}``,
then one JSON line per ``RUN``, ``QUIT``). KIND:

    engine          nexabind.Engine in this process; the client streams are threads here
    llama-server    llama-server started from CONFIG's ``server`` path on a loopback port, the
                    client streams are threads here speaking its streaming /completion API

CONFIG's ``mode`` picks what a RUN measures:

    throughput      ``streams`` greedy streams of ``n_gen`` tokens at once (distinct prompts),
                    all started together; aggregate tokens/s = their tokens / the wall time
    ttft            ``busy`` streams decode in the background; then one new request with a
                    ``probe`` prompt arrives: the time to its first token

Every request bans the model's end-of-generation tokens (a logit bias), so every stream
produces exactly ``n_gen`` tokens on both sides.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker import emit, peak_rss_kib, rss_kib  # noqa: E402

perf = time.perf_counter


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class EngineSide:
    def __init__(self, cfg: dict[str, Any]) -> None:
        from nexabind import lowlevel
        from nexabind.engine import Engine

        lowlevel.lib(cfg["libdir"])
        self.engine = Engine(
            cfg["model"],
            n_parallel=cfg["n_parallel"],
            n_ctx=cfg["n_ctx"],
            n_batch=cfg["n_batch"],
            n_threads=cfg["threads"],
            n_threads_batch=cfg["threads"],
            flash_attn=True,
        )
        self.bias = {int(t): -1e9 for t in cfg["ban"]}

    def cpu(self) -> float:
        return time.process_time()

    def stream(self, prompt: list[int], n_gen: int, first: list[float]) -> int:
        tid = self.engine.create_task(
            prompt=prompt, max_tokens=n_gen, temperature=0.0, logit_bias=self.bias
        )
        n = 0
        for _ in self.engine.stream(tid):
            if not n:
                first.append(perf())
            n += 1
        return n

    def start_busy(self, prompt: list[int], n_gen: int) -> Any:
        tid = self.engine.create_task(
            prompt=prompt, max_tokens=n_gen, temperature=0.0, logit_bias=self.bias
        )
        it = self.engine.stream(tid)
        for _ in range(4):
            next(it)
        return tid

    def stop_busy(self, handle: Any) -> None:
        self.engine.cancel(handle)

    def close(self) -> None:
        self.engine.close()


class ServerSide:
    def __init__(self, cfg: dict[str, Any]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = [
            cfg["server"], "-m", cfg["model"], "--host", "127.0.0.1", "--port", str(self.port),
            "-np", str(cfg["n_parallel"]), "-c", str(cfg["n_ctx"]), "-b", str(cfg["n_batch"]),
            "-t", str(cfg["threads"]), "-tb", str(cfg["threads"]), "-fa", "on", "--kv-unified",
            "--no-webui", "--log-disable",
        ]  # fmt: skip
        env = {**os.environ, "LD_LIBRARY_PATH": str(Path(cfg["server"]).parent)}
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode()[-3000:] if self.proc.stderr else ""
                msg = f"llama-server exited with {self.proc.returncode}: {err}"
                raise SystemExit(msg)
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                msg = "llama-server did not become ready in 300 s"
                raise SystemExit(msg)
            time.sleep(0.2)
        self.ban = [[int(t), False] for t in cfg["ban"]]

    def cpu(self) -> float:
        return _cpu_of(self.proc.pid) + time.process_time()

    def _open(self, prompt: list[int], n_gen: int) -> Any:
        body = json.dumps(
            {
                "prompt": prompt,
                "n_predict": n_gen,
                "temperature": 0.0,
                "stream": True,
                "logit_bias": self.ban,
                "cache_prompt": True,
            }
        )
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
        return conn, conn.getresponse()

    def stream(self, prompt: list[int], n_gen: int, first: list[float]) -> int:
        conn, resp = self._open(prompt, n_gen)
        n = 0
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            msg = json.loads(line[6:])
            if msg.get("stop"):
                break
            if not n:
                first.append(perf())
            n += 1
        conn.close()
        return n

    def start_busy(self, prompt: list[int], n_gen: int) -> Any:
        conn, resp = self._open(prompt, n_gen)
        got = 0
        for line in resp:
            if line.startswith(b"data: "):
                got += 1
                if got == 4:
                    break
        return conn

    def stop_busy(self, handle: Any) -> None:
        handle.close()  # llama-server cancels a task whose client went away

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def throughput(side: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    prompts, n_gen = cfg["prompts"][: cfg["streams"]], cfg["n_gen"]
    counts: list[int] = []
    firsts: list[float] = []
    barrier = threading.Barrier(len(prompts) + 1)

    def client(p: list[int]) -> None:
        barrier.wait()
        counts.append(side.stream(p, n_gen, firsts))

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    c0 = side.cpu()
    barrier.wait()
    t0 = perf()
    for t in threads:
        t.join()
    seconds = perf() - t0
    return {
        "seconds": seconds,
        "cpu_s": side.cpu() - c0,
        "tokens": sum(counts),
        "tok_per_s": sum(counts) / seconds,
        "ttft_s": max(firsts) - t0 if firsts else None,
    }


def ttft(side: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    busy = [side.start_busy(p, cfg["n_gen"]) for p in cfg["prompts"][: cfg["busy"]]]
    first: list[float] = []
    t0 = perf()
    side.stream(cfg["probe"], 1, first)
    seconds = first[0] - t0
    for h in busy:
        side.stop_busy(h)
    time.sleep(0.05)  # let the cancels land before the next round
    return {"seconds": seconds}


def main(argv: list[str]) -> int:
    kind, cfg = argv[1], json.loads(argv[2])
    side = EngineSide(cfg) if kind == "engine" else ServerSide(cfg)
    measure = throughput if cfg["mode"] == "throughput" else ttft
    emit({"ready": True})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "QUIT":
            break
        if cmd == "RUN":
            emit(measure(side, cfg))
    emit({"peak_rss_kib": peak_rss_kib(), "rss_kib": rss_kib()})
    side.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
