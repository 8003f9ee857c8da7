"""The HTTP side: Starlette routes, OpenAI's conventions, and :func:`serve` (uvicorn).

Routes: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/v1/rerank``, Anthropic's ``/v1/messages`` (and ``/v1/messages/count_tokens``) and OpenAI's
``/v1/responses`` (adapters over the chat path, :mod:`._anthropic`, :mod:`._responses`);
``GET /v1/models`` (and ``/v1/models/{id}``), ``/health`` (public), ``/slots``, ``/metrics``;
with ``--models-dir``, ``POST /models/load`` and ``/models/unload`` (llama-server's router).
Every error is OpenAI's error object (on ``/v1/messages``, Anthropic's) with a fitting status:
a body that is not JSON or fails its schema is a 400 naming the field, a body over
``max_body`` bytes a 413, an unknown route a 404; an unexpected failure is a 500 whose
traceback goes to the log, never to the client. Streams are ``text/event-stream``: ``data:
{json}`` events (the adapters' named, ``event: NAME`` first), the first delta with the
role, ``data: [DONE]`` last (or ``data: {"error": {...}}`` when the task fails midway). One
access-log line per request goes to the ``nexabind.server.access`` logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from nexabind import _nesting
from nexabind.server import _anthropic, _responses, _schema
from nexabind.server._chunks import SSEReader
from nexabind.server._conn import protocol, raise_file_limit
from nexabind.server._forward import ForwardBackend
from nexabind.server._local import LocalBackend, encode_json, to_http
from nexabind.server._metrics import Metrics
from nexabind.server._options import ServeOptions
from nexabind.server._router import Router
from nexabind.server.gateway import Backend, Gateway, HTTPError

__all__ = ["create_app", "serve"]

log = logging.getLogger(__name__)
access_log = logging.getLogger("nexabind.server.access")

_ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
    "/v1/rerank": "rerank",
    # adapters over the chat path: their requests become chat requests, and the chat answer
    # is given back in their shape
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/responses": "responses",
}
_ENDPOINTS = {
    "chat": _schema.CHAT,
    "completion": _schema.COMPLETION,
    "embedding": _schema.EMBEDDING,
    "rerank": _schema.RERANK,
}
#: The adapters: each request's translation into a chat request.
_ADAPTED: dict[str, Callable[[Any], dict[str, Any]]] = {
    "messages": _anthropic.to_chat,
    "count_tokens": functools.partial(_anthropic.to_chat, count=True),
    "responses": _responses.to_chat,
}
_RENAMED = {"messages": _anthropic.RENAMED, "count_tokens": _anthropic.RENAMED,
            "responses": _responses.RENAMED}  # fmt: skip
_ANTHROPIC = frozenset({"messages", "count_tokens"})
_KNOWN = {*_ROUTES, "/v1/models", "/health", "/slots", "/metrics", "/models/load",
          "/models/unload"}  # fmt: skip


class _ClientGone(Exception):
    """The client disconnected before its answer started."""


async def _read_body(receive: Callable[[], Awaitable[Any]], headers: Mapping[str, str],
                     limit: int) -> bytes:  # fmt: skip
    too_big = HTTPError(
        413, f"the request body is larger than {limit} bytes (--max-body)", code="body_too_large"
    )
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _ClientGone
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_big
        parts.append(chunk)
        if not msg.get("more_body"):
            return b"".join(parts)


async def _gone(receive: Callable[[], Awaitable[Any]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(receive: Callable[[], Awaitable[Any]], coro: Awaitable[Any]) -> Any:
    """Await ``coro``; when the client disconnects first, cancel it and raise _ClientGone."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_gone(receive))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()
    with contextlib.suppress(BaseException):
        await work
    raise _ClientGone


def _parse(raw: bytes, kind: str, options: ServeOptions) -> tuple[Any, dict[str, Any]]:
    """A request body as sent (read within the depth limit) and as the chat path takes it
    (an adapter's translated), checked against its schema and the server's size limits."""
    try:
        parsed = _nesting.loads(raw, what="the request body")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"the request body is not valid JSON: {e}"
        raise HTTPError(400, msg, code="invalid_json") from None
    except ValueError as e:
        raise HTTPError(400, str(e), param="body", code="invalid_json") from None
    asked, route = parsed, kind
    try:
        if kind in _ADAPTED:
            parsed, kind = _ADAPTED[kind](parsed), "chat"
        body = _schema.validate(parsed, _ENDPOINTS[kind])
        _schema.check_sizes(kind, body, options)
    except _schema.SchemaError as e:
        code = "request_too_large" if e.status == 413 else None
        param, text = e.param, str(e)
        theirs = _RENAMED.get(route, {}).get(param)
        if theirs is not None:  # an adapter's field, by its own name
            param, text = theirs, text.replace(f"'{param}'", f"'{theirs}'")
        raise HTTPError(e.status, text, param=param, code=code) from None
    return asked, body


def _answer(route: str, result: dict[str, Any], asked: Any, model: str) -> dict[str, Any]:
    """An answer in its route's shape (an adapter's from the chat completion)."""
    if route == "messages":
        return _anthropic.message(result, model)
    if route == "count_tokens":
        return {"input_tokens": result["usage"]["prompt_tokens"]}
    if route == "responses":
        return _responses.response(result, asked, model)
    return result


async def _events(
    chunks: AsyncIterator[bytes], route: str, asked: Any, model: str
) -> AsyncIterator[bytes]:
    """A chat stream as an adapter's named SSE events (``event: NAME`` and its data)."""
    shape: _anthropic.Events | _responses.Events = (
        _anthropic.Events(model) if route == "messages" else _responses.Events(asked, model)
    )
    reader = SSEReader()

    def encoded(events: list[tuple[str, dict[str, Any]]]) -> bytes:
        return b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), encode_json(data))
                        for name, data in events)  # fmt: skip

    try:
        yield encoded(shape.start)
        async for data in chunks:
            for chunk in reader.feed(data):
                if chunk is not None:
                    events = shape.feed(chunk)
                    if events:
                        yield encoded(events)
        if shape.blocks.error is None:
            yield encoded(shape.end())
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def create_app(options: ServeOptions, backend: Backend | None = None) -> Any:
    """The ASGI application for ``options`` (a Starlette app with the access log around it).

    Its ``state.gateway`` is the :class:`~nexabind.server.gateway.Gateway`.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    metrics = Metrics()
    if backend is None:
        if options.models_dirs:
            backend = Router(options, metrics)
        elif options.engine == "llama.cpp":
            backend = LocalBackend(options, metrics)
        else:
            backend = ForwardBackend(options, metrics)
    router = backend if isinstance(backend, Router) else None
    outer = options
    if router is not None:  # each model's gateway queues its requests and unloads it idle
        n_slots = options.parallel * len(router.models)
        outer = dataclasses.replace(options, parallel=n_slots, ctx_size=None, idle_unload=None)
    gateway = Gateway(backend, outer, metrics)
    started = int(time.time())

    def error(e: HTTPError, route: str = "") -> Response:
        body = _anthropic.error(e.status, e.message) if route in _ANTHROPIC else e.body()
        return Response(encode_json(body), e.status, e.headers, "application/json")

    async def generate(request: Request) -> Response:
        route = _ROUTES[request.url.path]
        kind = "chat" if route in _ADAPTED else route
        receive = request.receive
        try:
            owner = gateway.check_key(request.headers)
            try:
                raw = await asyncio.wait_for(
                    _read_body(receive, request.headers, options.max_body), options.read_timeout
                )
            except asyncio.TimeoutError:
                msg = f"the request body did not arrive within {options.read_timeout:g} s"
                raise HTTPError(408, msg, code="timeout") from None
            asked, body = await asyncio.to_thread(_parse, raw, route, options)
            if route in _ADAPTED:  # what a forwarding backend sends on
                raw = encode_json(body)
            # A busy conversation is waited for here, before a slot is taken: the wait holds
            # neither a slot nor a thread, and ends when the client leaves.
            held = await _unless_gone(receive, backend.reserve(kind, body, owner))
            try:
                call = await _unless_gone(receive, gateway.admit(owner))
            except BaseException:
                if held is not None:
                    held.release()
                raise
            call.permit.held = held
            try:
                result = await _unless_gone(receive, backend.run(kind, body, raw, call))
            except BaseException:
                call.permit.release()
                raise
        except HTTPError as e:
            return error(e, route)
        except _ClientGone:
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - a 500 without the traceback (it goes to the log)
            return error(to_http(e), route)
        name = (body.get("model") or router.default) if router is not None else options.name
        if isinstance(result, dict):  # encoded off the loop: it may be large
            result = _answer(route, result, asked, name)
            data = await asyncio.to_thread(encode_json, result)
            return Response(data, media_type="application/json")
        if route in _ADAPTED:
            result = _events(result, route, asked, name)
        return StreamingResponse(
            _guarded(result), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )  # fmt: skip

    async def _guarded(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in events:
                yield chunk
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    def guarded(handler: Callable[[Request], Any]) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            try:
                gateway.check_key(request.headers)
                return handler(request)
            except HTTPError as e:
                return error(e)

        return route

    async def health(request: Request) -> Response:
        status, body = gateway.health()
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse(body, status_code=status, headers=headers)

    def models(request: Request) -> Response:
        from nexabind import openai

        if router is not None:
            return JSONResponse(router.model_list(started))
        return JSONResponse(openai.model_list([options.name], created=started))

    def model(request: Request) -> Response:
        from nexabind import openai

        name = request.path_params["model"]
        if router is not None:
            router.find(name)
            return JSONResponse(next(m for m in router.model_list(started)["data"]
                                     if m["id"] == name))  # fmt: skip
        if name != options.name:
            msg = f"no model {name!r} here; this server serves {options.name!r}"
            raise HTTPError(404, msg, param="model", code="model_not_found")
        return JSONResponse(openai.model_list([name], created=started)["data"][0])

    def slots(request: Request) -> Response:
        _, health_body = gateway.health()
        return JSONResponse({
            **backend.status(), "state": health_body["status"], "in_flight": gateway.in_flight,
            "waiting": len(gateway.waiters), "n_parallel": options.parallel,
        })  # fmt: skip

    def metrics_text(request: Request) -> Response:
        restarts = int(backend.status().get("restarts") or 0)
        text = metrics.render(backend.tokens_per_second(), gateway.health()[1]["status"], restarts)
        if router is not None:
            text += "\n".join(router.metric_lines()) + "\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def load_or_unload(request: Request) -> Response:
        """``POST /models/load`` / ``/models/unload`` with ``{"model": NAME}``."""
        try:
            gateway.check_key(request.headers)
            if router is None:
                raise HTTPError(404, "this server serves one model; start it with --models-dir "
                                "to load and unload models", code="not_found")  # fmt: skip
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise HTTPError(400, f"the request body is not valid JSON: {e}") from None
            name = body.get("model") if isinstance(body, dict) else None
            if not isinstance(name, str):
                raise HTTPError(400, 'give the model\'s name: {"model": NAME}', param="model")
            if request.url.path.endswith("/load"):
                await router.load_model(name)
            else:
                await router.unload_model(router.find(name))
        except HTTPError as e:
            return error(e)
        return JSONResponse({"success": True})

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        what = "no route" if status == 404 else "method not allowed for"
        msg = f"{what} {request.method} {request.url.path}"
        return error(HTTPError(status, msg, code="not_found" if status == 404 else None))

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(HTTPError(500, f"internal error ({type(exc).__name__}); see the log"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()
            aclose = getattr(backend, "aclose", None)
            if aclose is not None:
                await aclose()

    routes = [Route(path, generate, methods=["POST"]) for path in _ROUTES]
    routes += [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(model), methods=["GET"]),
        Route("/slots", guarded(slots), methods=["GET"]),
        Route("/metrics", guarded(metrics_text), methods=["GET"]),
        Route("/models/load", load_or_unload, methods=["POST"]),
        Route("/models/unload", load_or_unload, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: not_found, Exception: unexpected},
    )
    app.state.gateway = gateway
    return _AccessLog(app, metrics, gateway)


class _AccessLog:
    """ASGI middleware: one log line per request, and the request counter of ``/metrics``."""

    def __init__(self, app: Any, metrics: Metrics, gateway: Gateway) -> None:
        self.app = app
        self.metrics = metrics
        self.gateway = gateway
        self.state = app.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 0
        size = 0

        async def sending(msg: Any) -> None:
            nonlocal status, size
            if msg["type"] == "http.response.start":
                status = msg["status"]
            elif msg["type"] == "http.response.body":
                size += len(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope["path"]
            ms = (time.perf_counter() - t0) * 1000
            client = scope.get("client") or ("-", 0)
            access_log.info('%s:%s "%s %s" %d %d %.1fms', client[0], client[1], scope["method"],
                            path, status or 499, size, ms)  # fmt: skip
            endpoint = path if path in _KNOWN else "other"
            self.metrics.request_done(endpoint, status or 499)


def _log_auth(options: ServeOptions) -> None:
    """Say once whether requests need a key; warn when no key guards more than loopback."""
    n = len(options.api_keys)
    if n:
        log.info("API keys: on (%d key%s)", n, "" if n == 1 else "s")
        return
    log.info("API keys: off: every client may use /v1/*, /slots and /metrics")
    try:
        loopback = ipaddress.ip_address(options.host).is_loopback
    except ValueError:
        loopback = options.host == "localhost"
    if not loopback:
        log.warning("listening on %s without API keys: anyone who reaches this address may use "
                    "the model; give --api-key or --api-key-file", options.host)  # fmt: skip


def serve(options: ServeOptions) -> int:
    """Serve until SIGTERM or SIGINT; return the exit status (0, or 1 when the model fails to load).

    On SIGTERM the server stops accepting, lets in-flight requests finish for
    ``options.grace`` seconds, cancels what is left (their streams end with an error event),
    frees the model and returns 0.
    """
    import uvicorn

    _log_auth(options)
    app = create_app(options)
    gateway: Gateway = app.state.gateway
    failed: list[str] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            loop = gateway.loop
            if loop is not None:
                loop.call_soon_threadsafe(gateway.begin_shutdown)
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                # uvicorn raises the signal again once it has shut down (the process would end
                # killed by it); a graceful stop on SIGTERM exits 0 instead.
                self._captured_signals.remove(sig)

    files = raise_file_limit()
    if files is not None and files < options.max_connections + 64:
        log.warning("the process may open %d files, fewer than --max-connections %d needs; "
                    "connections beyond will fail", files, options.max_connections)  # fmt: skip
    config = uvicorn.Config(
        app, host=options.host, port=options.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(options.grace) + 5, lifespan="on", server_header=False,
        http=protocol(options.read_timeout), limit_concurrency=options.max_connections,
        timeout_keep_alive=5,
    )  # fmt: skip
    server = Server(config)

    def fatal(why: str) -> None:
        failed.append(why)
        server.should_exit = True

    gateway.on_fatal = fatal
    server.run()
    return 1 if failed else 0
