"""Fixtures of the benchmark suites: the library, the models, the native program, the rows.

Run the suites with ``python benchmarks/run.py`` (see benchmarks/README.md); ``pytest`` from the
repository root collects only tests/.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import pytest

RESULTS = Path(__file__).resolve().parent / "results"


@pytest.fixture(scope="session")
def libdir() -> Path:
    """The llama.cpp library folder every contender runs on (NEXABIND_LIB_PATH, else the cache)."""
    from nexabind.cache import library_dir
    from nexabind.errors import NexabindError

    try:
        path = library_dir()
    except NexabindError as e:
        pytest.fail(str(e))
    os.environ["NEXABIND_LIB_PATH"] = str(path)
    return path


@pytest.fixture(scope="session")
def vocab() -> Path:
    """llama.cpp's SPM vocabulary (the tests' tokenizer), from the pinned source tree."""
    from nexabind._source import ensure_source

    return ensure_source() / "models" / "ggml-vocab-llama-spm.gguf"


@pytest.fixture(scope="session")
def bench_models(vocab: Path) -> dict[str, Path]:
    """The benchmark models, written once into benchmarks/results/models/ and reused."""
    folder = RESULTS / "models"
    folder.mkdir(parents=True, exist_ok=True)
    return {name: harness.write_model(name, folder, vocab) for name in harness.model_specs()}


@pytest.fixture(scope="session")
def native_exe(libdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """benchmarks/native/bench_native.c compiled against ``libdir``."""
    return harness.compile_native(libdir, tmp_path_factory.mktemp("native"))


@pytest.fixture(scope="session")
def lcpp_missing() -> str | None:
    """None when llama-cpp-python is importable, else the reason its rows are left out."""
    reason = harness.lcpp_available()
    if reason:
        sys.stderr.write(f"\n*** {reason}\n")
    return reason


@pytest.fixture(scope="session")
def env(libdir: Path) -> dict[str, str]:
    """The environment of every worker: the library folder for nexabind and llama-cpp-python."""
    return harness.worker_env(libdir)


@dataclass
class Bench:
    """What a suite needs to start contenders on one of the benchmark models."""

    libdir: Path
    models: dict[str, Path]
    native_exe: Path
    env: dict[str, str]
    lcpp_missing: str | None
    tmp_path: Path
    started: list[harness.Worker] = field(default_factory=list)

    def tokenize(self, text: str, model: str) -> list[int]:
        return harness.tokenize(text, self.models[model], self.libdir)

    def cfg(self, model: str, **extra: Any) -> dict[str, Any]:
        """A worker's settings: the model, the library and the shared context settings."""
        return {
            "model": str(self.models[model]),
            "libdir": str(self.libdir),
            "threads": harness.THREADS,
            "n_ctx": harness.N_CTX,
            "n_batch": harness.N_BATCH,
            **extra,
        }

    def native(
        self, mode: str, model: str, n_gen: int, prompt: list[int] | None = None
    ) -> list[str]:
        """The native program's argv (the prompt goes through a file of token ids)."""
        tokens_file = None
        if prompt is not None:
            tokens_file = self.tmp_path / f"prompt-{len(prompt)}.txt"
            tokens_file.write_text(" ".join(map(str, prompt)))
        return harness.native_argv(
            self.native_exe, mode, self.models[model], self.libdir, n_gen, tokens_file
        )

    def worker(self, kind: str, cfg: dict[str, Any]) -> list[str]:
        return harness.worker_argv(kind, cfg)

    def spawn(self, name: str, argv: list[str]) -> harness.Worker:
        """Start a worker; the fixture stops it at the end of the test."""
        w = harness.Worker(name, argv, self.env)
        self.started.append(w)
        return w

    def one_shot(self, argv: list[str]) -> dict[str, Any]:
        return harness.one_shot(argv, self.env)


@pytest.fixture
def bench(
    libdir: Path,
    bench_models: dict[str, Path],
    native_exe: Path,
    env: dict[str, str],
    lcpp_missing: str | None,
    tmp_path: Path,
) -> Any:
    """A :class:`Bench`; the workers it started are stopped after the test."""
    b = Bench(libdir, bench_models, native_exe, env, lcpp_missing, tmp_path)
    yield b
    for w in b.started:
        w.kill()


@pytest.fixture
def rows(benchmark: Any) -> Callable[..., None]:
    """Add a row to the results table (kept in the benchmark's extra_info for run.py)."""
    table = benchmark.extra_info.setdefault("rows", [])

    def add(
        section: str,
        case: str,
        contender: str,
        value: float,
        unit: str,
        *,
        baseline: str | None = None,
        ratio: float | None = None,
        goal: float | None = None,
        note: str = "",
    ) -> None:
        table.append(
            {
                "section": section,
                "case": case,
                "contender": contender,
                "value": value,
                "unit": unit,
                "baseline": baseline,
                "ratio": ratio,
                "goal": goal,
                "met": None if goal is None or ratio is None else ratio >= goal,
                "note": note,
            }
        )

    return add
