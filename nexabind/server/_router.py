"""Many models behind one endpoint (``nexabind serve --models-dir``).

Every ``.gguf`` in the folders is a model named by its file's stem (a split model
``NAME-00001-of-0000N.gguf`` once, as NAME; ``mmproj-*`` files are projectors, not models).
Each model has its own :class:`~nexabind.server._local.LocalBackend` (its Engine and slots)
behind its own :class:`~nexabind.server.gateway.Gateway` (its queue, its load, its idle
unload), so one model's queue never holds up another's. The router is itself a backend: the
server's gateway checks keys and counts, and :meth:`Router.reserve` picks the model by the
request's ``model`` field, loads it if need be (concurrent requests wait for one load), and
takes one of its slots; the lease it returns gives the slot back with the request's permit.

Beyond ``models_max`` loaded models, or beyond ``models_memory`` GiB (each model estimated
from its GGUF header: its weights and its KV cache), the least recently used one that no
request is using is unloaded before another loads; when every loaded model is in use, the load
is refused with a 503 and ``Retry-After``, and a model that alone exceeds the budget is refused
with a 503 before any allocation. Everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexabind import _gguf
from nexabind.engine import default_n_ctx
from nexabind.errors import ModelLoadError
from nexabind.server._local import LocalBackend
from nexabind.server._metrics import Metrics
from nexabind.server._options import ServeOptions
from nexabind.server.gateway import Call, Gateway, Held, HTTPError, Permit

__all__ = ["Router", "find_models"]

log = logging.getLogger(__name__)

_SPLIT = re.compile(r"^(?P<name>.+)-(?P<part>\d{5})-of-\d{5}$")


def find_models(dirs: tuple[str, ...]) -> dict[str, Path]:
    """The models in ``dirs`` by name (sorted): each ``.gguf`` by its stem, a split model by
    its first part's name without the part suffix; ``mmproj-*`` files left out.

    Raises:
        ValueError: a folder is missing, two files give one name, or there is no model.
    """
    found: dict[str, Path] = {}
    for d in dirs:
        folder = Path(d)
        if not folder.is_dir():
            raise ValueError(f"--models-dir {d}: no such folder")
        for path in sorted(folder.glob("*.gguf")):
            name = path.stem
            if name.startswith("mmproj"):
                continue
            split = _SPLIT.match(name)
            if split is not None:
                if int(split["part"]) != 1:
                    continue
                name = split["name"]
            if name in found:
                raise ValueError(f"two models are named {name!r}: {found[name]} and {path}")
            found[name] = path
    if not found:
        raise ValueError(f"no .gguf model in {', '.join(dirs)}")
    return dict(sorted(found.items()))


def estimate_bytes(path: Path, options: ServeOptions) -> int:
    """Memory a model takes once loaded, from its GGUF header alone: its tensors' bytes (every
    part of a split model) and an f16 KV cache of the context ``options`` give it."""
    split = _SPLIT.match(path.stem)
    parts = sorted(path.parent.glob(f"{split['name']}-*-of-*.gguf")) if split else [path]
    summaries = [_gguf.summarize(p) for p in parts]
    meta = summaries[0].metadata
    arch = meta.get("general.architecture", "")

    def num(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        return value if isinstance(value, int) else default

    n_head = num("attention.head_count")
    head = num("embedding_length") // n_head if n_head else 0
    width = num("attention.head_count_kv", n_head) * (
        num("attention.key_length", head) + num("attention.value_length", head)
    )
    n_ctx = options.ctx_size or default_n_ctx(options.parallel, num("context_length"))
    return sum(s.n_bytes for s in summaries) + num("block_count") * n_ctx * width * 2


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g}"


@dataclass(eq=False)
class _Model:
    """One model: its engine, its gateway, and the requests using it."""

    name: str
    path: Path
    backend: LocalBackend
    gateway: Gateway
    users: int = 0  # requests between choosing this model and giving its slot back
    last_used: float = 0.0
    started: bool = False
    requests: int = 0
    bytes: int | None = None  # its estimated memory, once a budget asked for it

    @property
    def status(self) -> str:
        state = self.gateway.state if self.started else "unloaded"
        return {"ok": "loaded", "loading": "loading"}.get(state, "unloaded")


@dataclass(eq=False)
class _Lease:
    """What a request holds of its model: a slot, and the conversation it continues."""

    model: _Model
    permit: Permit
    conversation: Held | None

    def release(self) -> None:
        if self.conversation is not None:
            self.conversation.release()
        self.permit.release()
        self.model.users -= 1
        self.model.last_used = time.monotonic()


class Router:
    """A backend serving every model of ``options.models_dirs``, each on its own Engine."""

    def __init__(self, options: ServeOptions, metrics: Metrics) -> None:
        self.options = options
        self.metrics = metrics
        self.models: dict[str, _Model] = {}
        for name, path in find_models(options.models_dirs).items():
            own = dataclasses.replace(options, model=str(path), alias=name, models_dirs=())
            backend = LocalBackend(own, metrics)
            self.models[name] = _Model(name, path, backend, Gateway(backend, own, Metrics()))
        self.default = options.default_model or next(iter(self.models))
        if self.default not in self.models:
            msg = f"--default-model {self.default!r} is not among the models ({self._names()})"
            raise ValueError(msg)
        self._choosing = asyncio.Lock()  # one decision at a time about what to load or unload

    def _names(self) -> str:
        return ", ".join(self.models)

    # -- Backend ----------------------------------------------------------------------------

    def load(self) -> None:
        """Nothing: each model loads on its first request."""

    def unload(self) -> None:
        """Nothing: :meth:`aclose` frees the models."""

    def degraded(self) -> bool:
        return False

    def failure(self) -> str | None:
        return None

    def status(self) -> dict[str, Any]:
        return {
            "models": {
                name: {**m.backend.status(), "status": m.status, "in_flight": m.gateway.in_flight}
                for name, m in self.models.items()
            }
        }

    def tokens_per_second(self) -> float:
        return sum(m.backend.tokens_per_second() for m in self.models.values())

    def cancel_all(self) -> None:
        for m in self.models.values():
            m.backend.cancel_all()

    async def reserve(self, kind: str, body: dict[str, Any], owner: str) -> _Lease:
        """The request's model, loaded, and one of its slots.

        Raises:
            HTTPError: 404 ``model_not_found``; 503 when its load fails or every loaded model
                is busy; 429 when its queue is full or the wait runs out.
        """
        m = self.find(body.get("model") or self.default)
        m.users += 1
        try:
            await self._ready(m)
            conversation = await m.backend.reserve(kind, body, owner)
            try:
                call = await m.gateway.admit(owner)
            except BaseException:
                if conversation is not None:
                    conversation.release()
                raise
        except BaseException:
            m.users -= 1
            raise
        m.requests += 1
        m.last_used = time.monotonic()
        return _Lease(m, call.permit, conversation)

    async def run(self, kind: str, body: dict[str, Any], raw: bytes, call: Call) -> Any:
        lease = call.permit.held
        assert isinstance(lease, _Lease), "reserve gives every request a lease"
        return await lease.model.backend.run(kind, body, raw, call)

    def begin_shutdown(self) -> None:
        """Stop admitting to every model: their waiting requests get 503."""
        for m in self.models.values():
            if m.started:
                m.gateway.begin_shutdown()

    async def aclose(self) -> None:
        """Free every loaded model (the server has stopped)."""
        for m in self.models.values():
            if m.started:
                await m.gateway.close()

    # -- loading and unloading --------------------------------------------------------------

    def find(self, name: str) -> _Model:
        """The model ``name``.

        Raises:
            HTTPError: 404 ``model_not_found``.
        """
        m = self.models.get(name)
        if m is None:
            msg = f"no model {name!r} here; this server serves {self._names()}"
            raise HTTPError(404, msg, param="model", code="model_not_found")
        return m

    async def _ready(self, m: _Model) -> None:
        """Load ``m`` unless it is loaded, unloading others to stay within ``models_max``."""
        if not m.started:
            m.started = True
            await m.gateway.start(load=False)
        if m.gateway.state == "ok":
            return
        async with self._choosing:
            if m.gateway.state in ("unloaded", "error"):
                await self._make_room(m)
                log.info("loading %s", m.name)
                m.gateway.begin_load()
        await m.gateway.load()

    async def _bytes(self, m: _Model) -> int:
        if m.bytes is None:
            own = m.backend.options
            try:
                m.bytes = await asyncio.to_thread(estimate_bytes, m.path, own)
            except ModelLoadError:
                m.bytes = 0  # its load says what is wrong with it
        return m.bytes

    async def _make_room(self, m: _Model) -> None:
        """Unload the least recently used idle models until ``m`` fits.

        Raises:
            HTTPError: 503, every loaded model is in use (with ``Retry-After``), or ``m`` alone
                is larger than the memory budget.
        """
        limit = self.options.models_max
        budget = self.options.models_memory
        loaded = [x for x in self.models.values()
                  if x is not m and x.started and x.gateway.state in ("ok", "loading")]  # fmt: skip
        need = 0
        if budget is not None:
            need = await self._bytes(m)
            if need > budget * 2**30:
                msg = (f"{m.name!r} needs about {_gib(need)} GiB (weights and KV cache), more "
                       f"than --models-memory {budget:g}")  # fmt: skip
                raise HTTPError(503, msg, param="model")

        async def over_budget() -> bool:
            if budget is None:
                return False
            used = sum([await self._bytes(x) for x in loaded])
            return need + used > budget * 2**30

        while len(loaded) >= limit or await over_budget():
            idle = [x for x in loaded if x.users == 0 and x.gateway.state == "ok"]
            if not idle:
                what = f"--models-max {limit}" if len(loaded) >= limit else (
                    f"--models-memory {budget:g}")  # fmt: skip
                msg = (f"{len(loaded)} models are loaded ({what}) and each is serving a "
                       f"request; {m.name!r} loads once one is free")  # fmt: skip
                raise HTTPError(503, msg, headers={"Retry-After": "2"})
            lru = min(idle, key=lambda x: x.last_used)
            log.info("unloading %s, the least recently used, to load %s", lru.name, m.name)
            await self.unload_model(lru)
            loaded.remove(lru)

    async def load_model(self, name: str) -> None:
        """``POST /models/load``: load ``name`` now (no-op when it is loaded)."""
        m = self.find(name)
        m.users += 1
        try:
            await self._ready(m)
        finally:
            m.users -= 1
            m.last_used = time.monotonic()

    async def unload_model(self, m: _Model) -> None:
        """Unload ``m`` (no-op unless it is loaded).

        Raises:
            HTTPError: 409, a request is using it.
        """
        if not m.started or m.gateway.state != "ok":
            return
        if m.users or m.gateway.in_flight:
            msg = f"{m.name!r} is serving a request; unload it once it is idle"
            raise HTTPError(409, msg, param="model", type="invalid_request_error")
        await m.gateway.unload()

    def model_list(self, created: int) -> dict[str, Any]:
        """``GET /v1/models``: every model, with its status (llama-server router's shape)."""
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "nexabind",
             "status": {"value": m.status}}
            for name, m in self.models.items()
        ]  # fmt: skip
        return {"object": "list", "data": data}

    def metric_lines(self) -> list[str]:
        """Per-model counters for ``/metrics``."""
        lines: list[str] = []
        for what in ("loads", "unloads", "requests"):
            lines.append(f"# TYPE nexabind_model_{what}_total counter")
            for name, m in self.models.items():
                n = m.requests if what == "requests" else getattr(m.gateway, what)
                lines.append(f'nexabind_model_{what}_total{{model="{name}"}} {n}')
        lines.append("# TYPE nexabind_model_loaded gauge")
        for name, m in self.models.items():
            lines.append(f'nexabind_model_loaded{{model="{name}"}} {int(m.status == "loaded")}')
        return lines
