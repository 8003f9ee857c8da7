"""llama-cpp-python 0.3.36's own test files, run on nexabind through a ``llama_cpp`` shim.

The test files come from llama-cpp-python's sdist (the pinned file the build also takes the
llama.cpp source from, :func:`nexabind._source.ensure_sdist`), unchanged, and run in a child
pytest with ``shim/`` first on the path, so ``import llama_cpp`` is nexabind. The models they
download from the Hugging Face hub are replaced by local stand-ins (random weights, the same
architectures' code paths) in a hub cache the child reads offline.

:data:`LLAMA_CPP_PYTHON_PASSES` records which of those tests llama-cpp-python itself passes on
the same stand-ins; nexabind must pass every one of them. When llama-cpp-python is installed
(``pip install -e '.[bench]'``), :func:`test_the_record_is_llama_cpp_python_s_own` runs the files
against it on the same library and stand-ins, so the record cannot drift from the truth.

What the record leaves out, and why llama-cpp-python fails it on stand-ins too: the tests that
check a real model's text (``" jumps over the lazy dog."``), ``test_real_model`` (it checks
Qwen3.5's token ids; it drives llama-cpp-python's ctypes layer, which nexabind does not copy:
``nexabind.lowlevel`` is its low-level API), and the hybrid (Falcon-H1) cases, which have no
stand-in.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from _tools import require

from nexabind import pin

HERE = Path(__file__).resolve().parent
SHIM = HERE / "shim"
LCP_FILES = (
    "tests/test_llama.py",
    "tests/test_llama_chat_format.py",
    "tests/test_llama_grammar.py",
    "tests/test_llama_speculative.py",
)
REVISION = "0" * 40  # the snapshot the stand-ins are filed under in the hub cache

#: The tests llama-cpp-python 0.3.36 passes on these stand-ins (see the module docstring).
LLAMA_CPP_PYTHON_PASSES = frozenset(
    {
        "test_llama.py::test_llama_cpp_version",
        "test_llama.py::test_llama_cpp_tokenization",
        "test_llama.py::test_recurrent_model_prompt_cache_reset",
        *(
            f"test_llama.py::{name}[{case}]"
            for name in (
                "test_exact_cached_prompt_reuse_matches_fresh",
                "test_loaded_exact_cached_prompt_reuse_matches_fresh",
                "test_ram_cache_exact_prompt_hit_matches_fresh",
                "test_shorter_prompt_prefix_reuse_matches_fresh",
            )
            for case in (
                "llama_cpp_transformer_model_path-False-False",
                "llama_cpp_recurrent_model_path-True-False",
            )
        ),
        "test_llama.py::test_real_llama_embeddings",
        "test_llama_chat_format.py::test_mistral_instruct",
        "test_llama_chat_format.py::test_hf_tokenizer_config_str_to_chat_formatter",
        "test_llama_grammar.py::test_grammar_from_string",
        "test_llama_grammar.py::test_composed_pydantic_grammar",
        "test_llama_grammar.py::test_grammar_anyof",
        "test_llama_speculative.py::test_find_candidate_pred_tokens",
    }
)


@pytest.fixture(scope="session")
def lcp_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-cpp-python's ``tests/`` and the vocabulary files they read, from its sdist."""
    from nexabind._source import ensure_sdist

    sdist = ensure_sdist()
    root = tmp_path_factory.mktemp("lcp")
    top = f"llama_cpp_python-{pin.SDIST_VERSION}/"
    wanted = ("tests/", "vendor/llama.cpp/models/ggml-vocab-")
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name.removeprefix(top)
            if m.isfile() and rel.startswith(wanted) and rel.endswith((".py", ".gguf")):
                m.name = rel
                members.append(m)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, members=members, filter="data")
        else:  # Python < 3.12 without the backported filter
            tar.extractall(root, members=members)  # noqa: S202 - pinned sdist, sha256 checked
    return root


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, llama_source: Path) -> Path:
    """A Hugging Face hub cache holding a stand-in for every model the test files download."""
    from nexabind.tinymodel import ModelSpec, write_random_mamba, write_random_model

    vocab = llama_source / "models" / "ggml-vocab-llama-spm.gguf"
    root = tmp_path_factory.mktemp("hub")
    stand_ins = {
        ("lmstudio-community/Qwen3.5-0.8B-GGUF", "Qwen3.5-0.8B-Q8_0.gguf"): None,
        ("ggml-org/models", "tinyllamas/stories15M-q4_0.gguf"): None,
        ("CompendiumLabs/bge-small-en-v1.5-gguf", "bge-small-en-v1.5-q4_k_m.gguf"): "mean",
        ("QuantFactory/mamba-130m-hf-GGUF", "mamba-130m-hf.Q2_K.gguf"): "mamba",
    }
    for (repo, filename), kind in stand_ins.items():
        folder = root / f"models--{repo.replace('/', '--')}"
        target = folder / "snapshots" / REVISION / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        if kind == "mamba":
            write_random_mamba(target, vocab=vocab)
        else:
            write_random_model(target, ModelSpec(pooling=kind), vocab=vocab)
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(REVISION)
    return root


def run_files(tree: Path, hub: Path, *, shim: bool, libdir: Path) -> dict[str, str]:
    """Run llama-cpp-python's test files in a child pytest; return each test's outcome."""
    report = tree / ("nexabind.xml" if shim else "llama_cpp_python.xml")
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "NEXABIND_LIB_PATH": str(libdir),
        "LLAMA_CPP_LIB_PATH": str(libdir),
        "PYTHONPATH": str(SHIM if shim else HERE),
    }
    cmd = [sys.executable, "-m", "pytest", *LCP_FILES, "-q", "-p", "no:cacheprovider",
           f"--junitxml={report}", "--rootdir", str(tree)]  # fmt: skip
    if not shim:
        cmd += ["-p", "_lcp_backends"]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1200)
    if not report.is_file():
        msg = f"the child pytest wrote no report ({proc.returncode}):\n{proc.stdout[-3000:]}"
        raise AssertionError(msg + proc.stderr[-3000:])
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        module = case.get("classname", "").rpartition(".")[2]
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        outcomes[f"{module}.py::{case.get('name')}"] = kinds.pop() if kinds else "passed"
    return outcomes


def test_nexabind_passes_what_llama_cpp_python_passes(
    lcp_tree: Path, hub_cache: Path, libdir: Path
) -> None:
    outcomes = run_files(lcp_tree, hub_cache, shim=True, libdir=libdir)
    missing = sorted(LLAMA_CPP_PYTHON_PASSES - {t for t, o in outcomes.items() if o == "passed"})
    assert not missing, f"nexabind does not pass {missing}; all outcomes: {outcomes}"
    assert len(LLAMA_CPP_PYTHON_PASSES) >= 13


def test_the_record_is_llama_cpp_python_s_own(
    lcp_tree: Path, hub_cache: Path, libdir: Path
) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('llama_cpp'))"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    if probe.stdout.strip() == "None":
        require(False, "llama-cpp-python is not installed (pip install -e '.[bench]')")
    outcomes = run_files(lcp_tree, hub_cache, shim=False, libdir=libdir)
    passed = {t for t, o in outcomes.items() if o == "passed"}
    assert passed == LLAMA_CPP_PYTHON_PASSES, (
        f"llama-cpp-python passes {sorted(passed - LLAMA_CPP_PYTHON_PASSES)} beyond the record "
        f"and not {sorted(LLAMA_CPP_PYTHON_PASSES - passed)}; outcomes: {outcomes}"
    )
