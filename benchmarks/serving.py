"""A serving contender in its own process: nexabind's Engine, or llama-server driven over HTTP.

``python benchmarks/serving.py KIND CONFIG_JSON`` speaks worker.py's protocol (``{"ready"}``,
then one JSON line per ``RUN``, ``QUIT``). KIND:

    engine          nexabind.Engine in this process; the client streams are threads here
    llama-server    llama-server started from CONFIG's ``server`` path on a loopback port, the
                    client streams are threads here speaking its streaming /completion API
    gateway         ``nexabind serve`` (its gateway and the in-process Engine) on a loopback
                    port, with the same slots, context and threads as llama-server

CONFIG's ``mode`` picks what a RUN measures:

    throughput      ``streams`` greedy streams of ``n_gen`` tokens at once (distinct prompts),
                    all started together; aggregate tokens/s = their tokens / the wall time
    ttft            ``busy`` streams decode in the background; then one new request with a
                    ``probe`` prompt arrives: the time to its first token
    load            (llama-server, gateway) ``clients`` threads each send ``requests`` streamed
                    chat requests (/v1/chat/completions, ``n_gen`` tokens) one after another:
                    aggregate tokens/s, time to first token p50 / p99, errors by kind
    rss             (gateway, llama-server) ``total`` short streamed chat requests from
                    ``clients`` threads; the server's RSS after each ``every`` of them

Every request bans the model's end-of-generation tokens (a logit bias), so every stream
produces exactly ``n_gen`` tokens on both sides.
"""

from __future__ import annotations

import contextlib
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


def _die_with_parent() -> None:
    """In the server's child: SIGTERM when this worker dies (the harness kills workers)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)


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
        return tid, it  # the iterator stays referenced: dropping it cancels the task

    def stop_busy(self, handle: Any) -> None:
        self.engine.cancel(handle[0])

    def close(self) -> None:
        self.engine.close()


class ServerSide:
    name = "llama-server"

    def __init__(self, cfg: dict[str, Any]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv, env = self.command(cfg)
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode()[-3000:] if self.proc.stderr else ""
                msg = f"{self.name} exited with {self.proc.returncode}: {err}"
                raise SystemExit(msg)
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                msg = f"{self.name} did not become ready in 300 s"
                raise SystemExit(msg)
            time.sleep(0.2)
        self.ban = [[int(t), False] for t in cfg["ban"]]
        self.bias = {str(t): -100 for t in cfg["ban"]}

    def command(self, cfg: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        argv = [
            cfg["server"], "-m", cfg["model"], "--host", "127.0.0.1", "--port", str(self.port),
            "-np", str(cfg["n_parallel"]), "-c", str(cfg["n_ctx"]), "-b", str(cfg["n_batch"]),
            "-t", str(cfg["threads"]), "-tb", str(cfg["threads"]), "-fa", "on", "--kv-unified",
            "--no-webui", "--log-disable",
        ]  # fmt: skip
        if cfg.get("chat_template"):
            argv += ["--chat-template", cfg["chat_template"]]
        return argv, {**os.environ, "LD_LIBRARY_PATH": str(Path(cfg["server"]).parent)}

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
        return int(line.split()[1])

    def chat(
        self, messages: list[dict[str, str]], n_gen: int, first: list[float]
    ) -> tuple[int, str | None]:
        """One streamed chat request (OpenAI's API): (tokens generated, error or None)."""
        body = json.dumps({
            "messages": messages, "max_tokens": n_gen, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": self.bias,
        })  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                resp.read()
                return 0, f"HTTP {resp.status}"
            n = 0
            for line in resp:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    return n, None
                msg = json.loads(payload)
                if "error" in msg:
                    return n, "error event"
                choices = msg.get("choices") or []
                if not first and choices and (choices[0].get("delta") or {}).get("content"):
                    first.append(perf())
                if msg.get("usage"):
                    n = int(msg["usage"]["completion_tokens"])
            return n, "no [DONE]"
        except OSError as e:
            return 0, type(e).__name__
        finally:
            conn.close()

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
                # The last message may carry the last token's text too; it reports the count.
                n = msg.get("tokens_predicted", n + bool(msg.get("content")))
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


class GatewaySide(ServerSide):
    """``nexabind serve``: the gateway in front of the in-process Engine."""

    name = "nexabind serve"

    def command(self, cfg: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        argv = [
            sys.executable, "-m", "nexabind", "serve", cfg["model"], "--port", str(self.port),
            "-np", str(cfg["n_parallel"]), "-c", str(cfg["n_ctx"]), "-t", str(cfg["threads"]),
            "--max-queue", str(cfg.get("max_queue", 4096)), "--queue-timeout", "3600",
            "--quiet", "--lib-path", cfg["libdir"],
        ]  # fmt: skip
        if cfg.get("chat_template"):
            argv += ["--chat-template", cfg["chat_template"]]
        return argv, dict(os.environ)


_TOPICS = ["the sea", "a fox", "old maps", "rain", "a lantern", "the moon", "bread", "trains"]


def _messages(k: int, j: int) -> list[dict[str, str]]:
    topic = _TOPICS[(k + j) % len(_TOPICS)]
    return [{"role": "user", "content": f"Request {k}.{j}: tell me a story about {topic}."}]


def _run_together(
    side: Any, threads: list[threading.Thread], barrier: threading.Barrier
) -> tuple[float, float, float]:
    """Start the client threads, release them together at ``barrier`` and wait for them all.

    Returns when they were released, the seconds until the last one ended, and the CPU
    seconds ``side`` spent meanwhile.
    """
    for t in threads:
        t.start()
    c0 = side.cpu()
    barrier.wait()
    t0 = perf()
    for t in threads:
        t.join()
    return t0, perf() - t0, side.cpu() - c0


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


def load(side: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    clients, per, n_gen = cfg["clients"], cfg["requests"], cfg["n_gen"]
    ttfts: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        barrier.wait()
        for j in range(per):
            first: list[float] = []
            t0 = perf()
            n, err = side.chat(_messages(k, j), n_gen, first)
            if first:
                ttfts.append(first[0] - t0)
            tokens.append(n)
            if err:
                errors.append(err)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    _t0, seconds, cpu_s = _run_together(side, threads, barrier)
    kinds: dict[str, int] = {}
    for e in errors:
        kinds[e] = kinds.get(e, 0) + 1
    return {
        "seconds": seconds,
        "cpu_s": cpu_s,
        "requests": clients * per,
        "tokens": sum(tokens),
        "short": sum(1 for n in tokens if n != n_gen),
        "tok_per_s": sum(tokens) / seconds,
        "ttft_p50": _pct(ttfts, 0.5),
        "ttft_p99": _pct(ttfts, 0.99),
        "errors": kinds,
        "rss_kib": side.rss_kib(),
    }


def rss(side: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    total, clients, every, n_gen = cfg["total"], cfg["clients"], cfg["every"], cfg["n_gen"]
    lock = threading.Lock()
    issued = done = 0
    samples: list[tuple[int, int]] = [(0, side.rss_kib())]
    errors: list[str] = []

    def client(k: int) -> None:
        nonlocal issued, done
        while True:
            with lock:
                if issued >= total:
                    return
                issued += 1
                j = issued
            _, err = side.chat(_messages(k, j), n_gen, [])
            with lock:
                done += 1
                if err:
                    errors.append(err)
                if done % every == 0:
                    samples.append((done, side.rss_kib()))

    t0 = perf()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"seconds": perf() - t0, "requests": done, "samples": samples, "errors": len(errors)}


def throughput(side: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    prompts, n_gen = cfg["prompts"][: cfg["streams"]], cfg["n_gen"]
    counts: list[int] = []
    firsts: list[float] = []
    barrier = threading.Barrier(len(prompts) + 1)

    def client(p: list[int]) -> None:
        barrier.wait()
        counts.append(side.stream(p, n_gen, firsts))

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    t0, seconds, cpu_s = _run_together(side, threads, barrier)
    return {
        "seconds": seconds,
        "cpu_s": cpu_s,
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
    side = {"engine": EngineSide, "llama-server": ServerSide, "gateway": GatewaySide}[kind](cfg)
    measure = {"throughput": throughput, "ttft": ttft, "load": load, "rss": rss}[cfg["mode"]]
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
