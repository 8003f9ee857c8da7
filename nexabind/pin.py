"""The llama.cpp version this nexabind release is built against, and where its source comes from.

Everything that names a llama.cpp version reads it from here: the build, the manifest, the
release tag of the prebuilt libraries and the cache layout.
"""

from __future__ import annotations

#: llama.cpp commit (short hash) the generated declarations and the libraries come from.
LLAMA_COMMIT = "0c1e57098"
#: The full hash (git can fetch a commit only by its full hash).
LLAMA_COMMIT_FULL = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"

#: llama.cpp build number (``bNNNN`` tag) of that commit, or None when it has none.
#: Upstream tags this commit b11312; artifacts are named by commit until releases adopt it.
LLAMA_BUILD: int | None = None

#: Release tag of the prebuilt libraries; bump the ``-rN`` suffix to rebuild the same commit.
#: r2: the source carries ``nexabind/patches`` (the AMX tile-config fix); r1 was unpatched.
RELEASE = f"llama-{LLAMA_COMMIT}-r2"

#: Where ``nexabind fetch`` downloads from: ``<base>/<release>/<artifact url>``.
DEFAULT_BASE_URL = "https://github.com/nexabind/nexabind/releases/download"

#: Source locations, tried in this order.
GIT_URL = "https://github.com/ggml-org/llama.cpp.git"
ARCHIVE_URL = f"https://github.com/ggml-org/llama.cpp/archive/{LLAMA_COMMIT_FULL}.tar.gz"
#: The llama-cpp-python sdist vendors llama.cpp at exactly LLAMA_COMMIT (``vendor/llama.cpp``).
SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_SUBDIR = "vendor/llama.cpp"

#: Label of an artifact: the build number when known, the commit otherwise.
ARTIFACT_VERSION = f"b{LLAMA_BUILD}" if LLAMA_BUILD is not None else LLAMA_COMMIT
