"""hub's names (nexabind._hub_names): model names, the choice of file, the hub's variables.

Pure functions of names and file lists: no hub, no cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nexabind import hub
from nexabind.errors import ModelNotFoundError
from nexabind.hub import ModelRef


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("Qwen/Qwen3-0.6B-GGUF", ModelRef("Qwen/Qwen3-0.6B-GGUF")),
        ("Qwen/Qwen3-0.6B-GGUF:q8_0", ModelRef("Qwen/Qwen3-0.6B-GGUF", quant="Q8_0")),
        ("a/b:sub/m-Q4_K_M.gguf", ModelRef("a/b", file="sub/m-Q4_K_M.gguf")),
        ("hf.co/a/b:UD-Q4_K_XL", ModelRef("a/b", quant="UD-Q4_K_XL")),
        ("https://huggingface.co/a/b", ModelRef("a/b")),
        ("gemma-GGUF", ModelRef("gemma-GGUF")),
    ],
)
def test_names_parse(text: str, ref: ModelRef) -> None:
    assert ModelRef.parse(text) == ref


@pytest.mark.parametrize("bad", ["", "a/b/c", "a--b/c", "../x", "a/b c", ":Q4_K_M"])
def test_bad_names_say_the_form(bad: str) -> None:
    with pytest.raises(ValueError, match="OWNER/REPO:QUANT"):
        ModelRef.parse(bad)


FILES = [
    "README.md",
    "m-F16.gguf",
    "m-IQ4_XS.gguf",
    "m-Q8_0.gguf",
    "m-UD-Q4_K_XL.gguf",
    "mmproj-m-Q4_K_M.gguf",
    "big/m-Q4_K_M-00002-of-00002.gguf",
    "big/m-Q4_K_M-00001-of-00002.gguf",
]


def test_choice_follows_llama_cpp() -> None:
    # Q4_K_M first (the projector of that name is not a model), a split model whole, in order.
    assert hub.choose("r", FILES, ModelRef("r")) == [
        "big/m-Q4_K_M-00001-of-00002.gguf",
        "big/m-Q4_K_M-00002-of-00002.gguf",
    ]
    without = [f for f in FILES if "big/" not in f]
    assert hub.choose("r", without, ModelRef("r")) == ["m-Q8_0.gguf"]  # then Q8_0
    assert hub.choose("r", ["b-F16.gguf", "a-BF16.gguf"], ModelRef("r")) == ["a-BF16.gguf"]
    assert hub.choose("r", FILES, ModelRef("r", quant="IQ4_XS")) == ["m-IQ4_XS.gguf"]
    assert hub.choose("r", FILES, ModelRef("r", quant="UD-Q4_K_XL")) == ["m-UD-Q4_K_XL.gguf"]
    assert hub.choose("r", FILES, ModelRef("r", quant="Q4_K_XL")) == ["m-UD-Q4_K_XL.gguf"]
    # A part names its model; a file by its base name.
    two = ["big/m-Q4_K_M-00001-of-00002.gguf", "big/m-Q4_K_M-00002-of-00002.gguf"]
    assert hub.choose("r", FILES, ModelRef("r", file="m-Q4_K_M-00002-of-00002.gguf")) == two


def test_choice_errors_list_what_exists() -> None:
    sizes = {"m-Q8_0.gguf": 8_000_000, "m-F16.gguf": 16_000_000}
    with pytest.raises(ModelNotFoundError, match=r"no Q2_K model; it has: .*Q8_0 \(8\.0 MB\)"):
        hub.choose("r", FILES, ModelRef("r", quant="Q2_K"), sizes)
    with pytest.raises(ModelNotFoundError, match="no file 'x.gguf'; its models: Q4_K_M, F16"):
        hub.choose("r", FILES, ModelRef("r", file="x.gguf"))
    with pytest.raises(ModelNotFoundError, match="holds no GGUF model .*convert_hf_to_gguf"):
        hub.choose("r", ["model.safetensors", "mmproj-x.gguf"], ModelRef("r"))
    with pytest.raises(ModelNotFoundError, match="lists 1 of the 2 parts"):
        hub.choose("r", ["m-Q4_K_M-00001-of-00002.gguf"], ModelRef("r"))


def test_settings_are_read_when_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert hub.hub_cache_dir() == Path(os.environ["HF_HOME"]) / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub.hub_cache_dir() == tmp_path / "elsewhere"
    assert hub.endpoint() == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example/")
    assert hub.endpoint() == "http://mirror.example"
    assert not hub.offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline()
