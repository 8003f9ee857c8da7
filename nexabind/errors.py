"""Every error nexabind raises on purpose.

::

    NexabindError                 never raised itself; catch it to catch them all
    ├── LibraryNotFoundError      no llama.cpp library could be loaded (lists every place tried)
    ├── AbiMismatchError          the library's structs or enums differ from the binding's
    ├── BuildError                building llama.cpp from source failed (log tail and path)
    ├── ManifestError             a release manifest is malformed or has no artifact for us
    ├── DownloadError             a download failed after its retries
    │   ├── ChecksumMismatchError   size or sha256 differs from the manifest
    │   ├── UnsafeArchiveError      an archive member would land outside its folder, or is too big
    │   └── DownloadTimeoutError    a download or manifest read passed its deadline (+ TimeoutError)
    ├── CacheError                the cache is missing what was asked for, is damaged, or cannot
    │                             be written (a full disk, staging on another filesystem)
    ├── ModelNotFoundError        no such model on the hub or in its cache           (+ ValueError)
    ├── ClosedError               a model, context, sampler or Llama was used after close()
    ├── ModelLoadError            a model file could not be loaded               (+ ValueError)
    ├── ContextError              a context could not be created                 (+ ValueError)
    ├── DecodeError               llama_decode / llama_encode failed           (+ RuntimeError)
    │   └── DecodeCancelled         a decode was aborted through cancel()
    ├── ContextOverflowError      a prompt or generation does not fit the context (+ ValueError)
    ├── StateError                saving or restoring context state failed    (+ RuntimeError)
    ├── TemplateError             a chat template refused the messages or failed (+ ValueError)
    ├── SessionNotFoundError      an Engine has no session of that id                (+ KeyError)
    ├── BusyError                 an Engine's queue is full, or a task waited too long in it
    ├── RpcError                  an RPC server cannot be reached or served  (+ ConnectionError)
    └── TaskTimeoutError          a task's result did not come within the timeout (+ TimeoutError)

Bad arguments stay ``ValueError`` / ``TypeError``. Errors that llama-cpp-python raises as a
builtin exception subclass that builtin too, so ``except ValueError`` keeps working for code
written against it.
"""

from __future__ import annotations

__all__ = [
    "AbiMismatchError",
    "BuildError",
    "BusyError",
    "CacheError",
    "ChecksumMismatchError",
    "ClosedError",
    "ContextError",
    "ContextOverflowError",
    "DecodeCancelled",
    "DecodeError",
    "DownloadError",
    "DownloadTimeoutError",
    "LibraryNotFoundError",
    "ManifestError",
    "ModelLoadError",
    "ModelNotFoundError",
    "NexabindError",
    "RpcError",
    "SessionNotFoundError",
    "StateError",
    "TaskTimeoutError",
    "TemplateError",
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
    """An archive member would be written outside the extraction folder, or the archive is
    larger than its limits (in what is actually read, headers included)."""


class DownloadTimeoutError(DownloadError, TimeoutError):
    """A download or a manifest read did not finish within its overall deadline."""


class CacheError(NexabindError):
    """The cache lacks what was asked for, an installed entry changed, or the cache cannot be
    written (a full disk, a staging folder on another filesystem)."""


class ModelNotFoundError(NexabindError, ValueError):
    """No such model: an unknown repository, one without a GGUF model, an unknown quantization
    or file, or (offline) a model the cache does not hold."""


class ClosedError(NexabindError):
    """A model, context, sampler chain or ``Llama`` was used after ``close()``."""


class ModelLoadError(NexabindError, ValueError):
    """A model file could not be loaded."""


class ContextError(NexabindError, ValueError):
    """A context could not be created (or its logits were read after a later decode)."""


class DecodeError(NexabindError, RuntimeError):
    """llama_decode or llama_encode returned an error."""


class DecodeCancelled(DecodeError):
    """A running decode was aborted through cancel()."""


class ContextOverflowError(NexabindError, ValueError):
    """A prompt or a generation does not fit in the context."""


class StateError(NexabindError, RuntimeError):
    """Saving or restoring a context's state failed."""


class TemplateError(NexabindError, ValueError):
    """A chat template refused the messages, or could not be rendered."""


class SessionNotFoundError(NexabindError, KeyError):
    """An Engine has no session of that id (never created, or closed)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BusyError(NexabindError):
    """An Engine's task queue is full, or a task waited in it longer than allowed."""


class RpcError(NexabindError, ConnectionError):
    """An RPC server (``rpc_servers=``, ``nexabind rpc-server``) cannot be reached or served."""


class TaskTimeoutError(NexabindError, TimeoutError):
    """A task's result did not come within the time the caller gave."""
