"""llama-server behind the gateway: requests forwarded to a supervised child process.

The gateway checks keys, validates the body and admits the request exactly as for the
in-process engine; then the body goes unchanged to the child's same endpoint on its private
loopback port (with the child's own key), and its answer comes back as it is: JSON, or SSE
bytes forwarded as they arrive, unbuffered. A client that goes away closes the upstream
connection, and llama-server cancels the task. A child that dies mid-stream ends the stream
with an error event; the supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from nexabind.server._local import sse
from nexabind.server._metrics import Metrics
from nexabind.server._options import ServeOptions
from nexabind.server.gateway import Call, Held, HTTPError
from nexabind.server.supervisor import Supervisor, find_binary

__all__ = ["ForwardBackend", "upstream_body"]

log = logging.getLogger(__name__)

_PATHS = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
    "rerank": "/v1/rerank",
}


def upstream_body(kind: str, body: dict[str, Any], raw: bytes) -> bytes:
    """The body as llama-server reads it: an embedding request's ``normalize`` becomes its
    ``embd_normalize`` (2: unit length, -1: raw), and ``dimensions``, which it would ignore,
    is a 400.

    Raises:
        HTTPError: ``dimensions`` in an embedding request.
    """
    if kind != "embedding" or not {"dimensions", "normalize"} & set(body):
        return raw
    if "dimensions" in body:
        msg = (
            "'dimensions' is not served with --engine llama-server (it would ignore it); leave "
            "it out, or serve with the in-process engine"
        )
        raise HTTPError(400, msg, param="dimensions")
    data = json.loads(raw)
    data["embd_normalize"] = 2 if body["normalize"] else -1
    return json.dumps(data).encode()


def _count(value: Any) -> int:
    """A token count from the child's answer (anything else: 0)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class ForwardBackend:
    """A :class:`~nexabind.server.supervisor.Supervisor`'s llama-server, over HTTP."""

    def __init__(self, options: ServeOptions, metrics: Metrics) -> None:
        self.options = options
        self.metrics = metrics
        self.supervisor = Supervisor(find_binary(options), options)
        self.client: Any = None  # httpx.AsyncClient, made on the event loop
        self.calls: set[Call] = set()

    def load(self) -> None:
        self.supervisor.start()

    def unload(self) -> None:
        self.supervisor.stop()

    def degraded(self) -> bool:
        return self.supervisor.state != "ready"

    def failure(self) -> str | None:
        return None  # the supervisor restarts a child that dies

    def status(self) -> dict[str, Any]:
        sup = self.supervisor
        return {"engine": "llama-server", "state": sup.state, "pid": sup.pid,
                "restarts": sup.restarts}  # fmt: skip

    def tokens_per_second(self) -> float:
        return 0.0

    def cancel_all(self) -> None:
        for call in list(self.calls):
            task = call.task
            if isinstance(task, asyncio.Task):
                task.cancel()
            elif task is not None:  # a stream: closing its upstream ends it
                asyncio.get_running_loop().create_task(task.aclose())

    def _client(self) -> Any:
        import httpx

        if self.client is None:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                                            limits=limits)  # fmt: skip
        return self.client

    async def reserve(self, kind: str, body: dict[str, Any], owner: str) -> Held | None:
        return None  # llama-server keeps no conversations

    async def run(self, kind: str, body: dict[str, Any], raw: bytes, call: Call) -> Any:
        import httpx

        sup = self.supervisor
        client = self._client()
        req = client.build_request(
            "POST", sup.url + _PATHS[kind], content=upstream_body(kind, body, raw),
            headers={"Authorization": f"Bearer {sup.api_key}", "Content-Type": "application/json"},
        )  # fmt: skip
        self.calls.add(call)
        call.task = asyncio.current_task()
        try:
            resp = await client.send(req, stream=True)
        except (httpx.HTTPError, OSError) as e:
            self._done(call)
            sup.wake()
            msg = f"the llama-server engine did not answer ({type(e).__name__}); retry"
            raise HTTPError(503, msg, headers={"Retry-After": "2"}) from None
        except BaseException:
            self._done(call)
            raise
        if not body.get("stream") or resp.status_code != 200:
            try:
                data = await resp.aread()
            except httpx.HTTPError as e:
                msg = f"the llama-server engine broke off its answer ({type(e).__name__}); retry"
                raise HTTPError(503, msg, headers={"Retry-After": "2"}) from None
            finally:
                await resp.aclose()
                self._done(call)
            return self._json(resp.status_code, data)
        return self._relay(resp, call)

    def _json(self, status: int, data: bytes) -> Any:
        try:
            obj = json.loads(data)
        except ValueError:
            msg = f"the llama-server engine answered {status} with no JSON body"
            raise HTTPError(502, msg) from None
        if status != 200:
            err = obj.get("error") if isinstance(obj, dict) else None
            if not isinstance(err, dict):  # {"error": "text"}, or no error object at all
                err = {"message": err if isinstance(err, str) and err else None}
            message = err.get("message")
            kind = err.get("type")
            raise HTTPError(status, str(message or obj)[:2000],
                            type=kind if isinstance(kind, str) else None)  # fmt: skip
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict):
            self.metrics.tokens(_count(usage.get("prompt_tokens")),
                                _count(usage.get("completion_tokens")))  # fmt: skip
        return obj

    async def _relay(self, resp: Any, call: Call) -> AsyncIterator[bytes]:
        import httpx

        n = 0
        call.task = resp
        try:
            async for chunk in resp.aiter_raw():
                if call.first_token is None and b'"content":"' in chunk:
                    call.first_token = time.monotonic()
                    self.metrics.first_token(call.first_token - call.arrived)
                n += chunk.count(b'"content":"')
                yield chunk
        except (httpx.HTTPError, httpx.StreamError) as e:
            self.supervisor.wake()
            msg = f"the llama-server engine broke off the stream ({type(e).__name__})"
            yield sse(HTTPError(502, msg).body())
        finally:
            await resp.aclose()
            self.metrics.tokens(0, n)
            self._done(call)

    def _done(self, call: Call) -> None:
        self.calls.discard(call)
        call.permit.release()

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
