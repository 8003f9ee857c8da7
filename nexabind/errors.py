"""Every error nexabind raises on purpose.

::

    NexabindError                 never raised itself; catch it to catch them all
    ├── LibraryNotFoundError      no llama.cpp library could be loaded (lists every place tried)
    ├── AbiMismatchError          the library's structs or enums differ from the binding's
    ├── BuildError                building llama.cpp from source failed (log tail and path)
    ├── ManifestError             a release manifest is malformed or has no artifact for us
    ├── DownloadError             a download failed after its retries
    │   ├── ChecksumMismatchError   size or sha256 differs from the manifest
    │   └── UnsafeArchiveError      an archive member would land outside its folder
    ├── CacheError                the cache is missing what was asked for, or is damaged
    ├── ModelLoadError            a model file could not be loaded
    ├── ContextError              a context could not be created, or is closed
    ├── DecodeError               llama_decode / llama_encode failed
    │   └── DecodeCancelled         a decode was aborted through cancel()
    ├── ContextOverflowError      a prompt or generation does not fit the context
    └── StateError                saving or restoring context state failed

Bad arguments stay ``ValueError`` / ``TypeError``.
"""

from __future__ import annotations

__all__ = [
    "AbiMismatchError",
    "BuildError",
    "CacheError",
    "ChecksumMismatchError",
    "ContextError",
    "ContextOverflowError",
    "DecodeCancelled",
    "DecodeError",
    "DownloadError",
    "LibraryNotFoundError",
    "ManifestError",
    "ModelLoadError",
    "NexabindError",
    "StateError",
    "UnsafeArchiveError",
]


class NexabindError(Exception):
    """Base of every nexabind error; never raised itself."""


class LibraryNotFoundError(NexabindError, OSError):
    """No llama.cpp shared library could be loaded."""


class AbiMismatchError(NexabindError):
    """The loaded library's ABI differs from the generated declarations."""


class BuildError(NexabindError):
    """Building llama.cpp from source failed."""


class ManifestError(NexabindError):
    """A release manifest is malformed or has no artifact for this platform."""


class DownloadError(NexabindError):
    """A download failed after its retries."""


class ChecksumMismatchError(DownloadError):
    """A downloaded file's size or sha256 differs from the manifest."""


class UnsafeArchiveError(DownloadError):
    """An archive member would be written outside the extraction folder."""


class CacheError(NexabindError):
    """The cache lacks what was asked for, or an installed entry changed."""


class ModelLoadError(NexabindError):
    """A model file could not be loaded."""


class ContextError(NexabindError):
    """A context could not be created, or was used after close()."""


class DecodeError(NexabindError):
    """llama_decode or llama_encode returned an error."""


class DecodeCancelled(DecodeError):
    """A running decode was aborted through cancel()."""


class ContextOverflowError(NexabindError):
    """A prompt or a generation does not fit in the context."""


class StateError(NexabindError):
    """Saving or restoring a context's state failed."""
