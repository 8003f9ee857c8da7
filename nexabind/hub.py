"""GGUF models from the Hugging Face hub, in huggingface_hub's shared cache.

A model is named ``OWNER/REPO[:QUANT|:FILE]``: ``Qwen/Qwen3-0.6B-GGUF``,
``unsloth/Qwen3-0.6B-GGUF:Q8_0``, ``ggml-org/gemma-3-270m-GGUF:gemma-3-270m-Q8_0.gguf``. The
file is chosen the way llama.cpp's ``-hf`` chooses it: Q4_K_M by default, else Q8_0, else the
first model file; a split model (``...-00001-of-00003.gguf``) comes whole.

Files go through ``huggingface_hub`` into its cache, so a model pulled here is one other tools
see, and the other way round. The hub's variables are read when a function runs, not at
import: ``HF_HUB_CACHE`` (else ``HF_HOME/hub``), ``HF_ENDPOINT``, ``HF_TOKEN`` (gated and
private repos) and ``HF_HUB_OFFLINE`` (only the cache is used). ::

    <HF_HUB_CACHE>/models--OWNER--REPO/
      refs/main                     the commit the last pull resolved
      snapshots/<commit>/<file>     links to blobs/, created once a blob is complete
      blobs/<sha256>                the files' contents

A model whose files are all in a snapshot is complete; nothing else is listed, so a pull that
was cut short never shows. Resolving a model that is in the cache asks the hub nothing: a pull
is what looks for a newer commit. Downloads resume within a pull after a dropped connection
(huggingface_hub retries with a ``Range`` request), and each file downloaded is checked
against the sha256 the hub lists for it.

Which models were used when is recorded in nexabind's cache (``models-used.json``).

This module is the face; the code is in three private modules, bottom up:
:mod:`nexabind._hub_names` (the hub's variables, names, the choice of file),
:mod:`nexabind._hub_cache` (listing, finding and removing cached models; last used) and
:mod:`nexabind._hub_pull` (downloads through huggingface_hub).
"""

from __future__ import annotations

from nexabind._hub_cache import CachedModel, find, mark_used, models, remove
from nexabind._hub_names import (
    DEFAULT_QUANTS,
    ModelRef,
    choose,
    endpoint,
    hub_cache_dir,
    human_size,
    offline,
)
from nexabind._hub_names import quant_of as quant_of  # public, not in __all__ (as before)
from nexabind._hub_pull import from_pretrained, pull, resolve

__all__ = [
    "DEFAULT_QUANTS",
    "CachedModel",
    "ModelRef",
    "choose",
    "endpoint",
    "find",
    "from_pretrained",
    "hub_cache_dir",
    "human_size",
    "mark_used",
    "models",
    "offline",
    "pull",
    "remove",
    "resolve",
]
