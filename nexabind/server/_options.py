"""What ``nexabind serve`` is told: one set of options for both engines."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ENGINES", "ServeOptions"]

#: The engines behind the gateway: nexabind's in-process Engine, or a supervised llama-server.
ENGINES = ("llama.cpp", "llama-server")


@dataclass
class ServeOptions:
    """Options of a server (the ``nexabind serve`` flags).

    Attributes:
        model: The ``.gguf`` file ("" when ``models_dirs`` gives the models).
        host: Address to listen on.
        port: Port to listen on (0: any free port).
        parallel: Requests decoded at once (the engine's slots).
        ctx_size: KV cells in all, shared by the slots (None: the engine's default).
        api_keys: Keys a request must carry (``Authorization: Bearer`` or ``X-Api-Key``); none:
            no check.
        max_queue: Requests that may wait for a slot; more get 429.
        queue_timeout: Seconds a request may wait for a slot before it gets 429.
        alias: The model's name in ``/v1/models`` and in responses (default: the file's stem).
        embedding: Serve ``/v1/embeddings`` (an embedding model) instead of generation.
        rerank: Serve ``/v1/rerank`` (a rank-pooling model) instead of generation.
        idle_unload: Seconds without requests after which the model is unloaded (None: never).
        engine: ``llama.cpp`` (in-process) or ``llama-server`` (a supervised child process).
        server_bin: The llama-server executable (default: the one ``nexabind build
            --with-server`` left in the build cache).
        threads: CPU threads of the engine (None: llama.cpp's default).
        max_body: Largest request body in bytes; larger gets 413.
        grace: Seconds in-flight requests get to finish after SIGTERM before they are cancelled.
        chat_template: A chat template (jinja text or a llama.cpp built-in name) instead of the
            model's.
        lib_path: Folder of the llama.cpp libraries (the in-process engine).
        rpc: llama.cpp RPC servers (``host:port``) whose devices take layers too.
        max_sessions: Conversations (``session_id`` / ``user``) kept at once; the least recently
            used one is closed beyond that.
        max_messages: Messages a chat may hold; more get 413 before any templating.
        max_prompt_chars: Characters a chat's messages (or a completion's prompt) may hold in
            all; more get 413 before any templating or tokenizing (some tokenizers take
            time that grows with the square of a run of unusual characters).
        max_inputs: Texts one embedding request (or documents one rerank request) may hold;
            more get 413.
        max_input_chars: Characters the texts of one embedding or rerank request may hold in
            all; more get 413.
        max_connections: Open connections; a request beyond them gets 503 at once.
        read_timeout: Seconds a request's headers may take to arrive (from the connection's
            start, or the end of its previous answer: else it is closed), and then its body
            (else 408).
        n_predict: Most tokens any request generates (-1: no cap beyond the slot), as
            llama-server's ``-n``; a request's ``max_tokens`` / ``n_predict`` may ask for fewer.
        models_dirs: Folders whose ``.gguf`` files are served, each named by its file's stem
            and loaded on its first request (instead of ``model``).
        models_max: Models loaded at once (with ``models_dirs``); beyond, the least recently
            used one with no request in flight is unloaded.
        default_model: The model of a request that names none (default: the first by name).
        models_memory: GiB the loaded models may take (with ``models_dirs``; None: no budget),
            each estimated from its GGUF header (weights and KV cache) before it loads.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4
    ctx_size: int | None = None
    api_keys: tuple[str, ...] = field(default_factory=tuple)
    max_queue: int = 128
    queue_timeout: float = 60.0
    alias: str | None = None
    embedding: bool = False
    rerank: bool = False
    idle_unload: float | None = None
    engine: str = "llama.cpp"
    server_bin: str | None = None
    threads: int | None = None
    max_body: int = 8 << 20
    grace: float = 10.0
    chat_template: str | None = None
    lib_path: str | None = None
    rpc: tuple[str, ...] = ()
    max_sessions: int = 64
    max_messages: int = 2048
    max_prompt_chars: int = 1 << 17
    max_inputs: int = 2048
    max_input_chars: int = 1 << 20
    max_connections: int = 4096
    read_timeout: float = 30.0
    n_predict: int = -1
    models_dirs: tuple[str, ...] = ()
    models_max: int = 4
    default_model: str | None = None
    models_memory: float | None = None

    def __post_init__(self) -> None:
        def bad(what: str) -> None:
            raise ValueError(what)

        if self.engine not in ENGINES:
            bad(f"engine={self.engine!r} is invalid; use one of {', '.join(ENGINES)}")
        if self.parallel < 1:
            bad(f"parallel={self.parallel} is invalid; use 1 or more slots")
        if self.max_queue < 0:
            bad(f"max_queue={self.max_queue} is invalid; use 0 or more")
        if self.queue_timeout <= 0:
            bad(f"queue_timeout={self.queue_timeout} is invalid; use a number of seconds > 0")
        if self.idle_unload is not None and self.idle_unload <= 0:
            self.idle_unload = None
        if self.embedding and self.rerank:
            bad("embedding and rerank are exclusive; a server runs one kind of model")
        if not 0 <= self.port <= 65535:
            bad(f"port={self.port} is invalid; use 0 to 65535")
        if any(not isinstance(k, str) or not k.strip() for k in self.api_keys):
            bad("api_keys holds an empty key; to serve without keys, give no keys at all")
        if self.read_timeout <= 0:
            bad(f"read_timeout={self.read_timeout} is invalid; use a number of seconds > 0")
        limits = ("max_messages", "max_prompt_chars", "max_inputs", "max_input_chars")
        for name in (*limits, "max_connections"):
            if getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)} is invalid; use 1 or more")
        if self.n_predict < -1 or self.n_predict == 0:
            bad(f"n_predict={self.n_predict} is invalid; use -1 (no cap) or 1 or more tokens")
        if self.models_dirs:
            if self.model:
                bad("give one model, or models_dirs, not both")
            if self.engine != "llama.cpp" or self.alias:
                bad("models_dirs serves each model by its file's name with the llama.cpp engine; "
                    "leave out alias and engine")  # fmt: skip
            if self.models_max < 1:
                bad(f"models_max={self.models_max} is invalid; use 1 or more")
            if self.models_memory is not None and self.models_memory <= 0:
                bad(f"models_memory={self.models_memory} is invalid; use GiB > 0")
        elif not self.model:
            bad("no model: give a .gguf file, or models_dirs")
        if self.ctx_size is not None and self.ctx_size < self.parallel:
            bad(f"ctx_size={self.ctx_size} is invalid; give each of {self.parallel} slots a cell")

    @property
    def name(self) -> str:
        """The model's name for clients: the alias, else the file's stem."""
        return self.alias or Path(self.model).stem

    @property
    def generates(self) -> bool:
        """Whether the model generates text (not an embedding or rerank server)."""
        return not (self.embedding or self.rerank)
