"""hub's downloads (nexabind._hub_pull): pulls and from_pretrained through huggingface_hub,
from a hub on 127.0.0.1.

The hub (tests/_hub.py, the ``hf_hub`` fixture) speaks the endpoints huggingface_hub uses and
logs every request, so a test can tell what was asked of it, and nothing, when a model resolves
from the cache. It misbehaves on request: drops a download, answers 500, sends a damaged file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _hub import Hub, cached_blobs

from nexabind import hub
from nexabind.errors import ChecksumMismatchError, DownloadError, ModelNotFoundError

TINY = "acme/tiny-GGUF"
SPLIT = "acme/split-GGUF"


# -- pulling -------------------------------------------------------------------------------------


def test_pull_chooses_downloads_and_resolves_from_the_cache_without_a_request(
    hf_hub: Hub, hub_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    m = hub.pull(TINY)
    assert (m.name, m.file, m.quant) == (f"{TINY}:Q4_K_M", "tiny-Q4_K_M.gguf", "Q4_K_M")
    assert m.path.read_bytes() == hub_files["q4"].read_bytes()
    assert m.commit == hf_hub.repos[TINY].commit
    assert m.path.is_relative_to(Path(os.environ["HF_HOME"]) / "hub")
    # One listing, then the metadata and the content of the one file (from the listed commit).
    assert [(r.method, r.path) for r in hf_hub.log] == [
        ("GET", f"/api/models/{TINY}/revision/main"),
        ("HEAD", hf_hub.resolve_path(TINY, "tiny-Q4_K_M.gguf")),
        ("GET", hf_hub.resolve_path(TINY, "tiny-Q4_K_M.gguf")),
    ]
    seen = len(hf_hub.log)
    assert hub.find(TINY) == m
    assert hub.resolve(f"{TINY}:q4_k_m") == m
    assert hub.find("tiny-GGUF") == m  # the repository's name alone, when only one has it
    assert hub.find(f"{TINY}:Q8_0") is None  # not pulled
    assert len(hf_hub.log) == seen  # nothing asked of the hub
    # A pull of what is there asks for the listing only.
    assert hub.pull(TINY) == m
    assert [r.path for r in hf_hub.log[seen:]] == [f"/api/models/{TINY}/revision/main"]
    # Offline, with the hub gone: the cache still answers; what it lacks is a clear error.
    hf_hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.pull(TINY) == m
    with pytest.raises(ModelNotFoundError, match="not in the hub cache .* HF_HUB_OFFLINE"):
        hub.pull(f"{TINY}:Q8_0")


def test_hf_hub_cache_is_where_models_go(
    hf_hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "shared-hub"))
    m = hub.pull(TINY)
    assert m.path.is_relative_to(tmp_path / "shared-hub" / "models--acme--tiny-GGUF")
    assert hub.models() == [m]
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub.models() == [] and hub.models(tmp_path / "shared-hub") == [m]


def test_a_new_commit_is_pulled_and_the_old_snapshot_stays_usable(
    hf_hub: Hub, hub_files: dict[str, Path]
) -> None:
    old = hub.pull(f"{TINY}:Q8_0")
    # The new commit's Q4_K_M file holds what the cache has already (as the Q8_0 model's blob).
    commit = hf_hub.add(TINY, {"tiny-Q4_K_M.gguf": hub_files["q8"]})
    new = hub.pull(TINY)
    assert new.commit == commit != old.commit
    assert len(hf_hub.downloads()) == 1  # linked to that blob, not downloaded again
    # refs/main names the new commit; a model only the old one has is still found.
    assert hub.find(f"{TINY}:Q8_0") == old
    assert {m.name for m in hub.models()} == {f"{TINY}:Q4_K_M", f"{TINY}:Q8_0"}


def test_a_split_model_comes_whole_and_loads(hf_hub: Hub, libdir: Path) -> None:
    from nexabind import Llama

    m = hub.pull(SPLIT)
    assert m.files == tuple(f"Q4_K_M/split-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3))
    assert [p.exists() for p in m.paths] == [True] * 3
    (listed,) = hub.models()
    header = listed.header()
    # The parameters of all three parts, counted from the headers as llama.cpp counts them.
    with Llama(m.path, n_ctx=64, lib_path=libdir) as llm:
        assert header["parameters"] == llm._check().model.n_params
        assert header["architecture"] == "llama" and header["context_length"] == 2048
        assert len(list(llm.generate("Hello", max_tokens=4, temperature=0))) == 4


def test_a_real_model_pulled_with_a_dropped_connection_resumes(
    hf_hub: Hub, gemma: Path, libdir: Path
) -> None:
    from nexabind import lowlevel

    hf_hub.add("google/gemma-3-270m-GGUF", {"gemma-3-270m-Q4_K_M.gguf": gemma})
    path = hf_hub.resolve_path("google/gemma-3-270m-GGUF", "gemma-3-270m-Q4_K_M.gguf")
    hf_hub.plan(path, "truncate:200000000")
    m = hub.pull("google/gemma-3-270m-GGUF")
    first, second = [r for r in hf_hub.downloads() if r.path == path]
    # huggingface_hub writes what it received (in whole chunks) and asks for the rest.
    assert first.sent == 200_000_000 and "Range" not in first.headers
    start = int(second.headers["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= first.sent and second.status == 206
    assert second.sent == gemma.stat().st_size - start
    assert m.path.stat().st_size == gemma.stat().st_size  # and the sha256 was checked
    header = m.header()
    model = lowlevel.Model(m.path, n_gpu_layers=0)
    try:
        assert header["parameters"] == model.n_params
    finally:
        model.close()
    assert (header["architecture"], header["context_length"]) == ("gemma3", 32768)
    assert (header["title"], header["file_type"]) == ("Gemma 3 270m", "Q4_K_M")


def test_an_interrupted_download_is_a_clear_error_and_leaves_nothing(hf_hub: Hub) -> None:
    path = hf_hub.resolve_path(TINY, "tiny-Q4_K_M.gguf")
    hf_hub.plan(path, "truncate:100000", "500")
    with pytest.raises(DownloadError, match=r"HTTP 500 when asked to download acme/tiny-GGUF"):
        hub.pull(TINY)
    assert hub.models() == []
    assert not [b for b in cached_blobs(TINY) if not b.endswith(".lock")]  # no partial file left
    assert hub.pull(TINY).quant == "Q4_K_M"  # and a pull again completes it


def test_a_damaged_download_is_deleted(hf_hub: Hub) -> None:
    hf_hub.plan(hf_hub.resolve_path(TINY, "tiny-Q4_K_M.gguf"), "tamper")
    with pytest.raises(ChecksumMismatchError, match="arrived damaged: the hub lists [0-9a-f]{64}"):
        hub.pull(TINY)
    assert hub.models() == [] and cached_blobs(TINY) == []


def test_bad_requests_are_clear_errors(hf_hub: Hub) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no repository acme/nothing on http://127"):
        hub.pull("acme/nothing")
    with pytest.raises(ModelNotFoundError, match="acme/plain holds no GGUF model"):
        hub.pull("acme/plain")
    with pytest.raises(ModelNotFoundError, match=r"no Q2_K model; it has: Q4_K_M \(.*\), Q8_0"):
        hub.pull(f"{TINY}:Q2_K")
    with pytest.raises(ValueError, match="with its owner"):
        hub.pull("tiny-GGUF")
    assert not hf_hub.downloads()


def test_a_gated_repository_needs_its_token(
    hf_hub: Hub, hub_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_hub.add("acme/gated-GGUF", {"g-Q4_K_M.gguf": hub_files["q4"]}, token="hf_secret")
    with pytest.raises(DownloadError, match="acme/gated-GGUF is gated: .* set HF_TOKEN"):
        hub.pull("acme/gated-GGUF")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert hub.pull("acme/gated-GGUF").quant == "Q4_K_M"
    assert hf_hub.downloads()[-1].headers["Authorization"] == "Bearer hf_secret"


def test_too_little_space_is_refused_before_downloading(hf_hub: Hub) -> None:
    hf_hub.repos[TINY].sizes["tiny-Q4_K_M.gguf"] = 1 << 60
    with pytest.raises(DownloadError, match=r"not enough space to pull .* needs 1152921504\.6 GB"):
        hub.pull(TINY)
    assert not hf_hub.downloads()


def test_an_unreachable_hub_is_a_clear_error(hf_hub: Hub) -> None:
    hf_hub.stop()
    with pytest.raises(DownloadError, match=r"could not list the files of acme/tiny-GGUF from"):
        hub.pull(TINY)


# -- llama-cpp-python's from_pretrained ------------------------------------------------------------


def test_from_pretrained_matches_one_file_and_then_needs_no_hub(
    hf_hub: Hub, libdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nexabind import Llama

    with pytest.raises(ModelNotFoundError, match=r"3 files \(.*\) in acme/tiny-GGUF match"):
        hub.from_pretrained(TINY, "*.gguf")
    with pytest.raises(ModelNotFoundError, match=r"No file in acme/tiny-GGUF match '\*Q2_K\*'"):
        hub.from_pretrained(TINY, "*Q2_K*")
    with Llama.from_pretrained(TINY, "*Q8_0.gguf", n_ctx=64, lib_path=libdir) as llm:
        assert Path(llm.model_path).name == "tiny-Q8_0.gguf"
    seen = len(hf_hub.log)
    path = hub.from_pretrained(TINY, "*Q8_0.gguf")
    assert path == Path(llm.model_path) and len(hf_hub.log) == seen
    (m,) = hub.models()
    assert m.last_used is not None  # loading it counts as a use
    # A split model from its first part's name; extra files; a folder of one's own.
    first = hub.from_pretrained(SPLIT, "*00001-of-00003.gguf")
    assert [p.exists() for p in hub.find(SPLIT).paths] == [True] * 3 and first.exists()
    local = hub.from_pretrained(TINY, "tiny-Q4*", ["README.md"], local_dir=tmp_path / "here")
    assert local == tmp_path / "here" / "tiny-Q4_K_M.gguf"
    assert (tmp_path / "here" / "README.md").read_text() == "# a model card\n"
    seen = len(hf_hub.log)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (
        hub.from_pretrained(TINY, "tiny-Q4*", ["README.md"], local_dir=tmp_path / "here") == local
    )
    assert len(hf_hub.log) == seen
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set"):
        hub.from_pretrained(TINY, "*Q4_K_M.gguf")  # in local_dir only, not in the cache
