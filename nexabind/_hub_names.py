"""A model's name on the hub and the files it names.

The hub's variables, read when used (``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HUB_OFFLINE``); :class:`ModelRef`, ``OWNER/REPO[:QUANT|:FILE]``; and which file(s) of a
repository a name chooses, the way llama.cpp's ``-hf`` chooses them (Q4_K_M, then Q8_0, then the
first model file; a split model's parts together), or by llama-cpp-python's glob rule
(:func:`match_all`). Pure functions of names and file lists: no cache, no network.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from nexabind.errors import ModelNotFoundError

__all__ = [
    "DEFAULT_QUANTS",
    "REPO_PATTERN",
    "ModelRef",
    "choose",
    "endpoint",
    "hub_cache_dir",
    "hub_token",
    "human_size",
    "is_gguf",
    "match_all",
    "model_heads",
    "model_parts",
    "offline",
    "quant_of",
    "split_name",
]

#: The quantizations chosen when none is named, in order (as llama.cpp's ``-hf``).
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")
#: ``OWNER/REPO`` as the hub allows it.
REPO_PATTERN = r"[\w.-]{1,96}/[\w.-]{1,96}"

_DEFAULT_ENDPOINT = "https://huggingface.co"
_ON = ("1", "ON", "YES", "TRUE")  # huggingface_hub's true values
# Patterns as text: re compiles (and caches) them on first use, not at import.
_SPLIT = r"^(.+)-([0-9]{5})-of-([0-9]{5})$"
_TAG = r"[-.]([A-Z0-9_]+)$"
# Files next to a model that are not one (llama.cpp's gguf_filename_is_model).
_NOT_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")


# -- settings, read when used ---------------------------------------------------------------


def hub_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The hub cache folder: ``cache_dir``, else as huggingface_hub finds it now.

    ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    env = os.environ
    found = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not found:
        xdg = env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        home = env.get("HF_HOME") or os.path.join(xdg, "huggingface")
        found = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(found))).absolute()


def endpoint() -> str:
    """The hub's URL: ``HF_ENDPOINT``, else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) keeps the hub out of reach."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _ON


def hub_token() -> str | None:
    """``HF_TOKEN``, else the token file huggingface_hub's login wrote, else None."""
    env = os.environ
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    path = Path(os.path.expanduser(env.get("HF_TOKEN_PATH") or os.path.join(home, "token")))
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


# -- names ----------------------------------------------------------------------------------


class ModelRef(NamedTuple):
    """A model's name: a repository and, optionally, a quantization or a file in it.

    Attributes:
        repo_id: ``OWNER/REPO`` (or a bare ``REPO``, which only the cache can resolve).
        quant: A quantization such as ``Q4_K_M`` (compared without case), or None.
        file: A ``.gguf`` path in the repository, or None.
    """

    repo_id: str
    quant: str | None = None
    file: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``OWNER/REPO[:QUANT|:FILE]``; a ``hf.co/`` or hub URL prefix is dropped.

        Raises:
            ValueError: Not a model name (the message shows the form expected).
        """
        name = text.strip()
        for prefix in (endpoint() + "/", _DEFAULT_ENDPOINT + "/", "huggingface.co/", "hf.co/"):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        repo, _, sel = name.partition(":")
        bare = "/" not in repo and re.fullmatch(r"[\w.-]{1,96}", repo) is not None
        if not (re.fullmatch(REPO_PATTERN, repo) or bare) or "--" in repo or ".." in repo:
            msg = (
                f"{text!r} is not a model name; give OWNER/REPO, OWNER/REPO:QUANT or "
                "OWNER/REPO:FILE.gguf (e.g. Qwen/Qwen3-0.6B-GGUF:Q4_K_M)"
            )
            raise ValueError(msg)
        if not sel:
            return cls(repo)
        if sel.lower().endswith(".gguf"):
            return cls(repo, file=sel)
        return cls(repo, quant=sel.upper())

    def __str__(self) -> str:
        sel = self.file or self.quant
        return f"{self.repo_id}:{sel}" if sel else self.repo_id


# -- choosing the file ----------------------------------------------------------------------


def split_name(path: str) -> tuple[str, str, int, int]:
    """``(prefix, quant tag, part, parts)`` of a ``.gguf`` path, as llama.cpp reads it."""
    prefix = path[: -len(".gguf")]
    index = count = 1
    m = re.match(_SPLIT, prefix, re.IGNORECASE)
    if m:
        prefix, index, count = m.group(1), int(m.group(2)), int(m.group(3))
    t = re.search(_TAG, prefix, re.IGNORECASE)
    return prefix, (t.group(1).upper() if t else ""), index, count


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf")


def _is_model(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return is_gguf(path) and not any(word in name for word in _NOT_MODEL)


def quant_of(path: str) -> str:
    """The quantization tag of a file name (``model-Q4_K_M.gguf`` -> ``Q4_K_M``), or ``""``."""
    return split_name(path)[1] if is_gguf(path) else ""


def model_parts(files: Iterable[str], first: str) -> list[str]:
    """Every part of the model ``first`` belongs to, in order (itself when not split)."""
    prefix, _, _, count = split_name(first)
    if count <= 1:
        return [first]
    found = {}
    for f in files:
        if is_gguf(f):
            p, _, index, n = split_name(f)
            if p == prefix and n == count:
                found[index] = f
    return [found[i] for i in sorted(found)]


def model_heads(files: Iterable[str]) -> list[str]:
    """The model files that start a model (part 1 of a split one), sorted."""
    return sorted(f for f in files if _is_model(f) and split_name(f)[2] == 1)


def human_size(n: int) -> str:
    """Bytes as people read them: ``253.1 MB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _what_exists(repo: str, files: list[str], sizes: Mapping[str, int]) -> str:
    """``Q4_K_M (253.1 MB), Q8_0 (...)``: the models of a repository, for an error message."""
    items = []
    for head in model_heads(files):
        size = sum(sizes.get(p, 0) for p in model_parts(files, head))
        tag = quant_of(head)
        unique = sum(quant_of(h) == tag for h in model_heads(files)) == 1
        label = tag if tag and unique else head
        items.append(f"{label} ({human_size(size)})" if size else label)
    return ", ".join(items)


def choose(
    repo_id: str,
    files: Iterable[str],
    ref: ModelRef,
    sizes: Mapping[str, int] | None = None,
) -> list[str]:
    """Pick the file(s) of ``ref`` among a repository's files; return every part, in order.

    A named file is taken as is (a split model's other parts come along). A quantization
    matches the file whose tag is that quantization, else, as in llama.cpp, a file whose
    path holds it followed by ``.`` or ``-`` (so ``UD-Q4_K_XL`` works too). With neither,
    Q4_K_M, then Q8_0, then the first model file. Projectors (``mmproj``), importance
    matrices and draft models are never chosen as the model.

    Raises:
        ModelNotFoundError: No such file or quantization (the message lists what exists), or
            the repository holds no GGUF model.
    """
    files = sorted(set(files))
    sizes = sizes or {}
    heads = model_heads(files)
    if not heads:
        shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
        msg = (
            f"{repo_id} holds no GGUF model ({shown or 'no files'}); llama.cpp runs .gguf "
            f"files: look for a GGUF version of it (often {repo_id}-GGUF or a quantizer's "
            "copy), or convert it with llama.cpp's convert_hf_to_gguf.py"
        )
        raise ModelNotFoundError(msg)
    if ref.file is not None:
        hits = [f for f in files if f == ref.file] or [
            f for f in files if is_gguf(f) and f.rsplit("/", 1)[-1] == ref.file
        ]
        if len(hits) != 1:
            what = "several files named" if hits else "no file"
            msg = (
                f"{repo_id} has {what} {ref.file!r}; its models: "
                f"{_what_exists(repo_id, files, sizes)}"
            )
            raise ModelNotFoundError(msg)
        first = next((h for h in model_parts(files, hits[0]) if split_name(h)[2] == 1), hits[0])
        return _complete(repo_id, files, first)
    for quant in [ref.quant] if ref.quant else list(DEFAULT_QUANTS):
        exact = [h for h in heads if quant_of(h) == quant.upper()]
        near = re.compile(re.escape(quant) + r"[.-]", re.IGNORECASE)
        hits = exact or [h for h in heads if near.search(h)]
        if hits:
            return _complete(repo_id, files, hits[0])
    if ref.quant is None:
        return _complete(repo_id, files, heads[0])
    first = quant_of(heads[0]) or heads[0]
    msg = (
        f"{repo_id} has no {ref.quant} model; it has: {_what_exists(repo_id, files, sizes)}. "
        f"Name one, e.g. {repo_id}:{first}"
    )
    raise ModelNotFoundError(msg)


def _complete(repo_id: str, files: list[str], first: str) -> list[str]:
    parts = model_parts(files, first)
    count = split_name(first)[3]
    if len(parts) != count:
        msg = (
            f"{repo_id} lists {len(parts)} of the {count} parts of {first}; the repository "
            "is incomplete, choose another model in it"
        )
        raise ModelNotFoundError(msg)
    return parts


# -- llama-cpp-python's rule: a name or glob that matches one file ------------------------------


def match_all(
    repo_id: str,
    files: list[str],
    filename: str | None,
    patterns: list[str],
    sizes: Mapping[str, int] | None = None,
) -> list[str]:
    """The files of ``filename`` (with a split model's parts) and of every pattern."""
    if filename is None:
        wanted = choose(repo_id, files, ModelRef(repo_id), sizes)
    else:
        wanted = _parts_of_match(repo_id, files, filename)
    for pattern in patterns:
        wanted += [f for f in _parts_of_match(repo_id, files, pattern) if f not in wanted]
    return wanted


def _parts_of_match(repo_id: str, files: list[str], pattern: str) -> list[str]:
    hits = [f for f in sorted(files) if fnmatch.fnmatch(f, pattern)]
    if len(hits) != 1:
        listed = json.dumps(sorted(files))
        what = "No file" if not hits else f"{len(hits)} files ({', '.join(hits)})"
        msg = f"{what} in {repo_id} match {pattern!r}; give a name that matches one of {listed}"
        raise ModelNotFoundError(msg)
    if not is_gguf(hits[0]):
        return hits
    parts = model_parts(files, hits[0])
    count = split_name(hits[0])[3]
    if len(parts) != count:
        msg = f"{repo_id} has {len(parts)} of the {count} parts of {hits[0]}"
        raise ModelNotFoundError(msg)
    return parts
