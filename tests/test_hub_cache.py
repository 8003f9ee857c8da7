"""hub's cache (nexabind._hub_cache): listing complete models, last use, removal.

Models get into the hub cache through pulls from the loopback hub (tests/_hub.py, the
``hf_hub`` fixture), as they do for a user.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _hub import Hub, cached_blobs

from nexabind import _hub_cache, cache, hub
from nexabind.errors import CacheError, DownloadError, ModelNotFoundError

TINY = "acme/tiny-GGUF"
SPLIT = "acme/split-GGUF"


def test_models_lists_complete_models_with_their_headers(hf_hub: Hub) -> None:
    q4, q8, split = hub.pull(TINY), hub.pull(f"{TINY}:Q8_0"), hub.pull(SPLIT)
    listed = hub.models()
    assert [m.name for m in listed] == [f"{SPLIT}:Q4_K_M", f"{TINY}:Q4_K_M", f"{TINY}:Q8_0"]
    d = listed[1].to_dict()
    assert d["size"] == q4.size == q4.path.stat().st_size
    assert (d["architecture"], d["context_length"], d["file_type"]) == ("llama", 2048, "F32")
    assert d["parameters"] > 100_000 and d["last_used"] is None
    assert listed[0].size == sum(p.stat().st_size for p in split.paths)
    hub.mark_used(q8)
    (used,) = [m for m in hub.models() if m.last_used is not None]
    assert used.name == f"{TINY}:Q8_0"


def test_remove_takes_what_it_names_and_only_that(hf_hub: Hub) -> None:
    from huggingface_hub import hf_hub_download

    hub.pull(TINY)
    q8 = hub.pull(f"{TINY}:Q8_0")
    # Another tool's file in the same repository stays.
    readme = hf_hub_download(TINY, "README.md", endpoint=hf_hub.url, cache_dir=hub.hub_cache_dir())
    assert hub.remove(f"{TINY}:Q4_K_M") == [q8.path.with_name("tiny-Q4_K_M.gguf")]
    assert [m.name for m in hub.models()] == [f"{TINY}:Q8_0"]
    assert len(cached_blobs(TINY)) == 2  # the Q8_0 model's and the README's
    hub.remove(TINY)
    assert hub.models() == [] and Path(readme).exists()
    with pytest.raises(ModelNotFoundError, match="not in the hub cache .* it holds: nothing"):
        hub.remove(TINY)
    # A repository left with nothing goes entirely.
    hub.pull(SPLIT)
    hub.remove(SPLIT)
    assert not (hub.hub_cache_dir() / "models--acme--split-GGUF").exists()


def test_a_split_model_missing_a_part_is_not_listed(hf_hub: Hub) -> None:
    hf_hub.plan(hf_hub.resolve_path(SPLIT, "Q4_K_M/split-Q4_K_M-00003-of-00003.gguf"), "404")
    with pytest.raises((DownloadError, ModelNotFoundError)):
        hub.pull(SPLIT)
    snap = hub.hub_cache_dir() / "models--acme--split-GGUF" / "snapshots"
    assert len(list(snap.rglob("*.gguf"))) == 2  # two parts arrived
    assert hub.models() == [] and hub.find(SPLIT) is None


def test_writes_never_follow_a_link_planted_at_a_temp_name(tmp_path: Path) -> None:
    # The names the writes used before: .<name>.<pid>.tmp beside the file.
    canary = tmp_path / "canary"
    canary.write_text("keep")
    repo = tmp_path / "models--acme--x"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / f".main.{os.getpid()}.tmp").symlink_to(canary)
    _hub_cache.write_ref(repo, "main", "abc")
    assert (repo / "refs" / "main").read_text() == "abc"
    cache.cache_root().mkdir(parents=True)
    (cache.cache_root() / f".models-used.json.{os.getpid()}.tmp").symlink_to(canary)
    hub.mark_used(tmp_path / "m.gguf")
    assert str(tmp_path / "m.gguf") in _hub_cache.read_used()
    assert canary.read_text() == "keep"


# -- removal stays in its repository ------------------------------------------------------------


def _relink(link: Path, target: Path) -> None:
    link.unlink()
    link.symlink_to(target)


def _outside(tmp_path: Path, source: Path) -> Path:
    """A canary outside the hub cache: a copy of ``source``."""
    canary = tmp_path / "outside" / "canary.gguf"
    canary.parent.mkdir(exist_ok=True)
    canary.write_bytes(source.read_bytes())
    return canary


def test_rm_removes_a_snapshot_link_to_a_file_outside_as_a_link(
    hf_hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    q4, q8 = hub.pull(TINY), hub.pull(f"{TINY}:Q8_0")
    canary = _outside(tmp_path, q8.path)
    _relink(q8.path, canary)
    assert hub.remove(f"{TINY}:Q8_0") == [q8.path]
    assert canary.stat().st_size == q8.size
    assert not q8.path.is_symlink() and q4.path.exists()
    assert f"left {canary} in place: it lies outside " in caplog.text


def test_rm_removes_a_blob_that_is_a_link_as_a_link(hf_hub: Hub, tmp_path: Path) -> None:
    q4 = hub.pull(TINY)
    blob = q4.path.resolve()
    canary = _outside(tmp_path, blob)
    _relink(blob, canary)
    hub.remove(TINY)
    assert canary.stat().st_size == q4.size
    assert not (hub.hub_cache_dir() / "models--acme--tiny-GGUF").exists()


def test_rm_does_not_delete_through_a_snapshot_folder_that_is_a_link(
    hf_hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    q4 = hub.pull(TINY)
    canary = _outside(tmp_path, q4.path).rename(tmp_path / "outside" / "tiny-Q8_0.gguf")
    linked = q4.path.parents[1] / ("0" * 40)
    linked.symlink_to(canary.parent)
    assert [m.name for m in hub.models()] == [f"{TINY}:Q4_K_M", f"{TINY}:Q8_0"]
    assert hub.remove(TINY) == [q4.path]  # the copy in the linked snapshot stays
    assert canary.stat().st_size == q4.size
    assert f"left {canary} in place: it lies outside " in caplog.text
    assert [m.path for m in hub.models()] == [linked / "tiny-Q8_0.gguf"]


def test_rm_does_not_delete_through_a_repository_folder_that_is_a_link(
    hf_hub: Hub, tmp_path: Path
) -> None:
    q4 = hub.pull(TINY)
    repo = hub.hub_cache_dir() / "models--acme--tiny-GGUF"
    moved = repo.rename(tmp_path / "elsewhere")
    repo.symlink_to(moved)
    blob = moved / "blobs" / q4.path.resolve().name
    assert hub.find(TINY) == q4  # listed and used through the link
    with pytest.raises(CacheError, match="nothing removed; its files lie outside .* by hand"):
        hub.remove(TINY)
    assert blob.stat().st_size == q4.size and (moved / "snapshots" / q4.commit / q4.file).exists()
    assert repo.is_symlink() and hub.find(TINY) == q4


def test_rm_leaves_another_repositorys_blob(hf_hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    q8, split = hub.pull(f"{TINY}:Q8_0"), hub.pull(SPLIT)
    other = q8.path.resolve()  # acme/tiny-GGUF's blob
    _relink(split.paths[0], other)
    hub.remove(SPLIT)
    assert other.stat().st_size == q8.size
    assert [m.name for m in hub.models()] == [f"{TINY}:Q8_0"]
    assert f"left {other} in place: it lies outside " in caplog.text
