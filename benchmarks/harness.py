"""The benchmark harness: models, the native program, worker processes, interleaved rounds.

Every contender runs in its own process (benchmarks/worker.py or the compiled
benchmarks/native/bench_native.c), loads its model once and answers ``RUN`` with one timed call.
:class:`Interleaved` asks every contender in turn, round after round (A B C A B C ...), so a
noisy neighbour slows every contender alike, and the medians are compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NATIVE_SRC = HERE / "native" / "bench_native.c"
WORKER = HERE / "worker.py"

# One decode thread: the reference machine has 2 cores shared with other work, and per-token
# overhead shows most when the model's own compute is not spread over threads.
THREADS = int(os.environ.get("NEXABIND_BENCH_THREADS", "1"))
# Multiplies every round count (0.2 for a quick look, 2 for a quieter table).
ROUNDS_SCALE = float(os.environ.get("NEXABIND_BENCH_ROUNDS", "1"))
N_CTX = 2048
N_BATCH = 512
N_GEN = 1000
DECODE_PROMPT = "Once upon a time, in a small village by the sea, there lived"

# The tests' tiny model (tests/conftest.py) and a ~100 MB one with realistic compute per token.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def rounds(n: int) -> int:
    """``n`` scaled by NEXABIND_BENCH_ROUNDS, at least 3 (a median needs a few samples)."""
    return max(3, round(n * ROUNDS_SCALE))


def model_specs() -> dict[str, Any]:
    from nexabind.tinymodel import ModelSpec

    return {
        "tiny": ModelSpec(chat_template=CHATML),
        # Seed 4: its 1,000 greedy tokens after DECODE_PROMPT are valid UTF-8 (see
        # test_decode_bench.py for why that matters).
        "100mb": ModelSpec(
            n_embd=512, n_layer=8, n_head=8, n_head_kv=4, n_ff=1408, dtype="f16", seed=4
        ),
        "embed": ModelSpec(pooling="mean", seed=7),
        # The same shape quantized by llama.cpp, for the CPU variant suite: q8_0 and q4_0 are the
        # types AMX and REPACK take.
        **{
            f"100mb-{q}": ModelSpec(
                n_embd=512, n_layer=8, n_head=8, n_head_kv=4, n_ff=1408, dtype=q, seed=4
            )
            for q in ("q8_0", "q4_0")
        },
    }


def write_model(name: str, folder: Path, vocab: Path) -> Path:
    """Write the benchmark model ``name`` (see :func:`model_specs`) into ``folder``."""
    from nexabind.tinymodel import write_random_model

    spec = model_specs()[name]
    # The file name carries the spec, so a changed spec never reuses a stale file.
    key = hashlib.sha256(f"{spec!r} {vocab.name}".encode()).hexdigest()[:10]
    path = folder / f"bench-{name}-{key}.gguf"
    if not path.exists():
        write_random_model(path, spec, vocab=vocab)
    return path


# -- the native program ---------------------------------------------------------------------


def compile_native(libdir: Path, out_dir: Path) -> Path:
    """Compile bench_native.c with the system ``cc`` against ``libdir``'s headers and libraries.

    The headers are in the ``include/`` folder beside ``lib/`` (the artifact layout); the rpath
    makes the program load exactly ``libdir``'s libraries.

    Raises:
        RuntimeError: No C compiler, no headers, or the compile failed (with its output).
    """
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    include = libdir.parent / "include"
    if cc is None:
        msg = "no C compiler (cc) on PATH: install one (e.g. apt-get install gcc) or set CC"
        raise RuntimeError(msg)
    if not (include / "llama.h").is_file():
        msg = f"no llama.h in {include}: the library folder must sit beside its include/ folder"
        raise RuntimeError(msg)
    exe = out_dir / "bench_native"
    cmd = [
        cc,
        "-O2",
        "-std=c11",
        "-Wall",
        f"-I{include}",
        str(NATIVE_SRC),
        "-o",
        str(exe),
        f"-L{libdir}",
        "-lllama",
        "-lggml",
        "-lggml-base",
        f"-Wl,-rpath,{libdir}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = f"compiling the native benchmark failed:\n{' '.join(cmd)}\n{proc.stderr}"
        raise RuntimeError(msg)
    return exe


def native_argv(
    exe: Path, mode: str, model: Path, libdir: Path, n_gen: int, tokens_file: Path | None = None
) -> list[str]:
    argv = [str(exe), mode, str(model), str(libdir), str(THREADS), str(N_CTX), str(N_BATCH)]
    argv.append(str(n_gen))
    if tokens_file is not None:
        argv.append(str(tokens_file))
    return argv


def worker_argv(kind: str, cfg: dict[str, Any]) -> list[str]:
    return [sys.executable, str(WORKER), kind, json.dumps(cfg)]


def worker_env(libdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["NEXABIND_LIB_PATH"] = str(libdir)
    env["LLAMA_CPP_LIB_PATH"] = str(libdir)
    env["PYTHONHASHSEED"] = "0"
    return env


def lcpp_available() -> str | None:
    """None when llama-cpp-python can be imported, else why not (said in the table)."""
    import importlib.util

    if os.environ.get("NEXABIND_BENCH_NO_LCPP"):
        return "llama-cpp-python left out (NEXABIND_BENCH_NO_LCPP is set): its rows are skipped"
    if importlib.util.find_spec("llama_cpp") is None:
        return (
            "llama-cpp-python is not installed: its rows are skipped. Install it without "
            "compiling llama.cpp: CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install -e .[bench]"
        )
    return None


# -- worker processes ---------------------------------------------------------------------


class WorkerError(RuntimeError):
    """A worker process failed; the message holds its stderr."""


@dataclass
class Worker:
    """A contender process speaking the RUN / QUIT protocol (see benchmarks/worker.py)."""

    name: str
    argv: Sequence[str]
    env: dict[str, str] | None = None
    ready: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by close/kill)
        self.proc = subprocess.Popen(
            list(self.argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env=self.env,
        )
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._err.seek(0)
            msg = (
                f"benchmark worker {self.name} exited with {self.proc.returncode}:\n"
                f"{self._err.read()[-4000:]}"
            )
            raise WorkerError(msg)
        res = json.loads(line)
        if "error" in res:
            msg = f"benchmark worker {self.name}: {res['error']}"
            raise WorkerError(msg)
        return res

    def _send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def run(self) -> dict[str, Any]:
        """One timed call; the dict holds at least ``seconds``."""
        self._send("RUN")
        return self._read()

    def close(self) -> dict[str, Any]:
        """Stop the worker; returns its peak and current RSS in KiB."""
        if self.proc.poll() is not None:
            return {}
        self._send("QUIT")
        res = self._read()
        self.proc.wait(timeout=60)
        self._err.close()
        return res

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


def one_shot(argv: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a one-shot worker (or the native program) and return its last JSON line."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        msg = f"{argv[:3]} exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
        raise WorkerError(msg)
    return json.loads(lines[-1])


def one_shot_all(
    argvs: dict[str, Sequence[str]], env: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`one_shot` for every argv at once (for measurements that timing does not affect)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(argvs)) as pool:
        futures = {name: pool.submit(one_shot, argv, env) for name, argv in argvs.items()}
        return {name: f.result() for name, f in futures.items()}


class Interleaved:
    """Run every worker once per :meth:`round`, in turn, and keep each worker's results.

    The order rotates from round to round (A B C, B C A, C A B, ...) so that no contender
    always runs right after the same neighbour. The warm-up rounds are not kept.
    """

    def __init__(self, workers: Sequence[Worker], warmup: int = 1) -> None:
        self.workers = list(workers)
        self.results: dict[str, list[dict[str, Any]]] = {w.name: [] for w in workers}
        self.n = 0
        for _ in range(warmup):
            for w in self.workers:
                w.run()

    def round(self) -> None:
        k = self.n % len(self.workers)
        for w in [*self.workers[k:], *self.workers[:k]]:
            self.results[w.name].append(w.run())
        self.n += 1


def median(results: Sequence[dict[str, Any]], key: str = "seconds") -> float:
    return statistics.median(r[key] for r in results)


def ratio(
    base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], key: str = "seconds"
) -> float:
    """How many times faster ``other`` is than ``base``: the median of the per-round ratios.

    Both ran in the same rounds, so each round's ratio compares samples taken a moment apart;
    a slow drift in the load of the machine cancels out of it. ``key="cpu_s"`` compares the
    CPU time of the process instead, which time slices lost to other processes do not inflate
    (one thread: the CPU time is the work done).
    """
    return statistics.median(b[key] / o[key] for b, o in zip(base, other, strict=True))


def spread(results: Sequence[dict[str, Any]], key: str = "seconds") -> float:
    """Relative spread of the samples: (max - min) / median."""
    vals = [r[key] for r in results]
    return (max(vals) - min(vals)) / statistics.median(vals)


def tokenize(text: str, model: Path, libdir: Path) -> list[int]:
    """``text`` as ``model``'s token ids, BOS included (what every contender is given)."""
    from nexabind import lowlevel

    lowlevel.lib(libdir)
    with lowlevel.Model(model, vocab_only=True) as m:
        return m.tokenize(text, add_special=True)


def text_of(tokens: Sequence[int], model: Path, libdir: Path) -> str:
    """What nexabind's incremental decoder makes of ``tokens`` (to compare with a completion)."""
    from nexabind import lowlevel

    lowlevel.lib(libdir)
    with lowlevel.Model(model, vocab_only=True) as m:
        data = b"".join(m.token_to_piece(t) for t in tokens)
    return data.decode("utf-8", "replace")


def gemma_path() -> tuple[Path | None, str]:
    """Gemma 3 270M (NEXABIND_BENCH_GEMMA, else shared/models/gemma-3-270m.sh above the
    checkout), or None and why it is left out."""
    if os.environ.get("NEXABIND_BENCH_GEMMA"):
        return Path(os.environ["NEXABIND_BENCH_GEMMA"]), ""
    for folder in HERE.parents:
        script = folder / "shared" / "models" / "gemma-3-270m.sh"
        if script.is_file():
            proc = subprocess.run([str(script)], capture_output=True, text=True)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode == 0 and lines and Path(lines[-1]).is_file():
                return Path(lines[-1]), ""
            return None, f"{script} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
    return None, "Gemma 3 270M left out: set NEXABIND_BENCH_GEMMA to its .gguf"
