"""The gateway in front of an engine: API keys, a bounded queue with a wait timeout, the model's
state (loading, ready, unloaded after idling, degraded), shutdown, and the metrics.

Admission is first come, first served: a request takes a free slot or waits in a queue of at
most ``max_queue`` requests for ``queue_timeout`` seconds; a full queue or a wait that runs out
answers 429 with ``Retry-After``. While the model loads, after an idle unload (the request
starts the reload) or while a supervised engine restarts, requests get 503 with
``Retry-After``. Everything here runs on the server's event loop except
:meth:`Permit.release`, which the threads that run tasks call when their task ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from nexabind import openai
from nexabind.server._metrics import Metrics
from nexabind.server._options import ServeOptions

__all__ = ["Backend", "Call", "Gateway", "HTTPError", "Held", "Permit"]

log = logging.getLogger(__name__)

#: Seconds the server waits for the engine to close once it has stopped serving.
_UNLOAD_WAIT = 3.0

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "not_supported_error",
    502: "server_error",
    503: "unavailable_error",
}


def _in_daemon_thread(work: Callable[[], None]) -> asyncio.Future[None]:
    """Run ``work`` in a daemon thread: unlike ``asyncio.to_thread``, neither the event loop's
    end nor the interpreter's waits for it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():
            done.set_exception(error) if error is not None else done.set_result(None)

    def run() -> None:
        error: BaseException | None = None
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            error = e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name="nexabind-unload", daemon=True).start()
    return done


class HTTPError(Exception):
    """An answer other than success, as OpenAI's error object (``{"error": {...}}``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return openai.error(self.message, type=self.type, param=self.param, code=self.code)


class Held(Protocol):
    """Something a request holds besides its slot (a conversation), released with the slot."""

    def release(self) -> None:
        """Let the next request have it (called once, on the event loop)."""


class Permit:
    """A slot held by one request; :meth:`release` (idempotent, from any thread) gives it back,
    and with it whatever else the request holds (:attr:`held`) once no worker still uses it
    (:meth:`keep`)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._lock = threading.Lock()
        self._since = time.monotonic()
        self._users = 0
        self._held_gone = False
        self.released = False
        self.held: Held | None = None

    def release(self) -> None:
        with self._lock:
            if self.released:
                return
            self.released = True
            held = self._let_go()
        self._on_loop(self._gateway._release, time.monotonic() - self._since, held)

    def keep(self) -> Callable[[], None]:
        """Keep :attr:`held` for a worker until the returned function is called (once, from
        any thread), even if the request ends first: a worker that is still starting a task
        on a conversation must finish before the next request may have it."""
        with self._lock:
            self._users += 1
        done = threading.Event()

        def let_go() -> None:
            if done.is_set():
                return
            done.set()
            with self._lock:
                self._users -= 1
                held = self._let_go() if self.released else None
            if held is not None:
                self._on_loop(held.release)

        return let_go

    def _let_go(self) -> Held | None:
        """The held resource, if it is to be released now (under the lock)."""
        if self._users or self._held_gone:
            return None
        self._held_gone = True
        return self.held

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        g = self._gateway
        if threading.get_ident() == g.loop_thread:
            fn(*args)
        else:
            g.loop.call_soon_threadsafe(fn, *args)


class Call:
    """One admitted request as a backend sees it."""

    def __init__(self, permit: Permit, arrived: float, owner: str = "") -> None:
        self.permit = permit
        self.owner = owner  # which API key sent it (its index; "" without keys)
        self.arrived = arrived
        self.task: Any = None  # the engine's handle, to cancel it
        self.cut: str | None = None  # why the server cancelled it (its stream ends with an error)
        self.gone = False  # the client went away: a task created from now on is cancelled
        self.first_token: float | None = None


Result = dict[str, Any] | AsyncIterator[bytes]


class Backend(Protocol):
    """What the gateway needs of an engine (in-process, or a supervised llama-server)."""

    def load(self) -> None:
        """Load the model (blocking; run in a thread)."""

    def unload(self) -> None:
        """Free the model (blocking; run in a thread)."""

    def degraded(self) -> bool:
        """Whether the engine is down for now (a supervised process restarting)."""

    def failure(self) -> str | None:
        """Why the engine stopped for good, if it did (the server then exits non-zero)."""

    def status(self) -> dict[str, Any]:
        """What ``/slots`` shows."""

    def tokens_per_second(self) -> float:
        """Generated tokens per second, recently."""

    def cancel_all(self) -> None:
        """Cancel every running task (shutdown after the grace period)."""

    async def reserve(self, kind: str, body: dict[str, Any], owner: str) -> Held | None:
        """Wait (on the event loop) for what a request needs besides a slot, before it is
        admitted: a busy conversation. None: it needs nothing.

        Raises:
            HTTPError: 429, the wait ran past the queue timeout.
        """

    async def run(self, kind: str, body: dict[str, Any], raw: bytes, call: Call) -> Result:
        """Answer a checked request: a JSON dict, or SSE bytes for a stream."""


class Gateway:
    """Keys, admission, state and metrics in front of ``backend``."""

    def __init__(self, backend: Backend, options: ServeOptions, metrics: Metrics) -> None:
        self.backend = backend
        self.options = options
        self.metrics = metrics
        self.state = "loading"  # loading | ok | unloading | unloaded | error | failed
        self.error: str | None = None
        self.free = options.parallel
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.loop_thread = 0
        self._busy = 1.0  # seconds a request holds a slot, averaged (for Retry-After)
        self._load_seconds = 2.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loading: asyncio.Task[Any] | None = None
        self._keys = tuple(k.encode() for k in options.api_keys)
        self.loaded_once = False
        self.loads = 0  # loads started, and unloads (idle, or asked for), for /metrics
        self.unloads = 0
        self.on_fatal: Callable[[str], None] | None = None
        """Called when the first load fails, or the engine stops for good (the server then
        exits non-zero)."""

    # -- life -----------------------------------------------------------------------------

    async def start(self, load: bool = True) -> None:
        """Start loading the model (unless ``load`` is false: it stays unloaded until
        :meth:`load`); watch for idleness."""
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        if load:
            self.begin_load()
        else:
            self.state = "unloaded"
        if self.options.idle_unload:
            self._spawn(self._idle_watch(self.options.idle_unload))
        self._spawn(self._failure_watch())

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def begin_load(self) -> None:
        """Start loading the model, unless a load is under way."""
        if self._loading is not None and not self._loading.done():
            return
        self.state = "loading"
        self.loads += 1
        self._loading = self._spawn(self._do_load())

    async def load(self) -> None:
        """Load the model unless it is loaded; concurrent callers wait for one load.

        Raises:
            HTTPError: 503, the load failed or the model is being unloaded.
        """
        if self.state in ("unloaded", "error"):
            self.begin_load()
        if self.state == "loading" and self._loading is not None:
            await asyncio.shield(self._loading)
        if self.state != "ok":
            why = f"loading the model failed ({self.error})" if self.error else (
                f"the model is {self.state}")  # fmt: skip
            raise self._unavailable(why, self._load_seconds)

    async def unload(self) -> None:
        """Free the model (it loads again on the next request)."""
        self.state = "unloading"
        self.unloads += 1
        try:
            await asyncio.to_thread(self.backend.unload)
        finally:
            self.state = "unloaded"

    async def _do_load(self) -> None:
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(self.backend.load)
        except Exception as e:  # noqa: BLE001 - reported in /health and to each request
            self.state, self.error = "error", str(e)
            log.error("loading %s failed: %s", self.options.model, e)
            if not self.loaded_once and self.on_fatal is not None:
                self.on_fatal(str(e))
            return
        self.loaded_once = True
        self._load_seconds = time.monotonic() - t0
        self.state, self.error = "ok", None
        self.last_used = time.monotonic()
        log.info("%s loaded in %.2fs", self.options.model, self._load_seconds)

    async def _idle_watch(self, idle: float) -> None:
        while True:
            await asyncio.sleep(min(1.0, idle / 4))
            quiet = not self.in_flight and not self.waiters
            if self.state == "ok" and quiet and time.monotonic() - self.last_used >= idle:
                self.state = "unloading"
                log.info("no request for %gs: unloading %s", idle, self.options.model)
                await self.unload()

    async def _failure_watch(self) -> None:
        while self.check_failure() is None:
            await asyncio.sleep(0.25)

    def check_failure(self) -> str | None:
        """Whether the engine stopped for good; the first time it is seen, the state turns
        ``failed`` and the server is told to exit (``on_fatal``)."""
        if self.state == "failed":
            return self.error
        why = self.backend.failure() if self.state == "ok" else None
        if why is None:
            return None
        self.state, self.error = "failed", f"the engine stopped: {why}"
        log.error("%s; the server stops (exit status 1)", self.error)
        if self.on_fatal is not None:
            self.on_fatal(self.error)
        return self.error

    def begin_shutdown(self) -> None:
        """Stop admitting; waiting requests get 503; running ones get ``grace`` seconds."""
        if self.stopping:
            return
        self.stopping = True
        log.info("shutting down: %d request(s) in flight, %gs grace", self.in_flight,
                 self.options.grace)  # fmt: skip
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(self._unavailable("the server is shutting down"))
        inner = getattr(self.backend, "begin_shutdown", None)  # a router's models' gateways
        if inner is not None:
            inner()
        if self.in_flight:
            self.loop.call_later(self.options.grace, self._end_grace)

    def _end_grace(self) -> None:
        if self.in_flight:
            log.warning("grace period over: cancelling %d request(s)", self.in_flight)
            self.backend.cancel_all()

    async def close(self) -> None:
        """Free the model (the server has stopped)."""
        for t in list(self._tasks):
            t.cancel()
        if self.state in ("ok", "loading", "failed"):
            try:  # a worker deep in a tokenization holds the model: do not wait it out
                await asyncio.wait_for(_in_daemon_thread(self.backend.unload), _UNLOAD_WAIT)
            except asyncio.TimeoutError:
                log.warning("the engine did not close within %gs (a request is still "
                            "tokenizing or templating); leaving it to the process's end",
                            _UNLOAD_WAIT)  # fmt: skip
        self.state = "unloaded"

    # -- what the routes call ---------------------------------------------------------------

    def check_key(self, headers: Mapping[str, str]) -> str:
        """Which key a request carries (``Authorization: Bearer`` or ``X-Api-Key``): the key's
        index, what its conversations are named under; "" when the server takes no keys.

        Raises:
            HTTPError: 401, no configured key came.
        """
        if not self._keys:
            return ""
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key")
        if given:
            g = given.encode()
            found = [hmac.compare_digest(g, k) for k in self._keys]  # every key: constant time
            if any(found):
                return str(found.index(True))
        msg = (
            "invalid API key" if given else
            "no API key; send it as 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'"
        )  # fmt: skip
        raise HTTPError(401, msg, code="invalid_api_key")

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/health``: 200 ``ok`` when ready (or ``unloaded``: it loads on the next request),
        503 while loading, degraded, failed or shutting down."""
        self.check_failure()
        state = self.state
        if state == "ok" and self.backend.degraded():
            state = "degraded"
        if self.stopping:
            state = "stopping"
        body: dict[str, Any] = {"status": state}
        if self.error and state in ("error", "failed"):
            body["error"] = self.error
        return (200 if state in ("ok", "unloaded") else 503), body

    def _unavailable(self, why: str, seconds: float = 1.0) -> HTTPError:
        after = str(max(1, min(60, math.ceil(seconds))))
        return HTTPError(503, why, headers={"Retry-After": after})

    def _busy_after(self) -> str:
        ahead = len(self.waiters) + 1
        return str(max(1, min(60, math.ceil(self._busy * ahead / self.options.parallel))))

    async def admit(self, owner: str = "") -> Call:
        """Wait for a slot (first come, first served) and return the admitted call.

        Raises:
            HTTPError: 503 while the model is not ready (starting a load when unloaded) or
                the server stops; 429 when the queue is full or the wait ran out.
        """
        arrived = time.monotonic()
        if self.stopping:
            raise self._unavailable("the server is shutting down")
        if self.check_failure() is not None:
            raise self._unavailable(f"{self.error}; the server is stopping")
        if self.state in ("unloaded", "error"):
            failed = self.error
            self.begin_load()
            why = f"loading the model failed ({failed}); retrying" if failed else (
                "the model was unloaded after idling; it is loading again")  # fmt: skip
            raise self._unavailable(why, self._load_seconds)
        if self.state != "ok":
            raise self._unavailable(f"the model is {self.state}", self._load_seconds)
        if self.backend.degraded():
            raise self._unavailable("the engine is restarting", 2)
        if self.free > 0 and not self.waiters:
            self.free -= 1
        elif len(self.waiters) >= self.options.max_queue:
            msg = (
                f"the server is busy: {self.options.parallel} slot(s) in use and "
                f"{len(self.waiters)} request(s) waiting (--max-queue {self.options.max_queue})"
            )
            raise HTTPError(429, msg, headers={"Retry-After": self._busy_after()})
        else:
            await self._wait()
        self.in_flight += 1
        self.last_used = time.monotonic()
        with self.metrics.lock:
            self.metrics.processing += 1
        self.metrics.waited(self.last_used - arrived)
        return Call(Permit(self), arrived, owner)

    async def _wait(self) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        self.waiters.append(fut)
        with self.metrics.lock:
            self.metrics.deferred += 1
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.options.queue_timeout)
        except asyncio.TimeoutError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                return  # the slot came as the time ran out
            fut.cancel()
            self._drop(fut)
            msg = (
                f"no slot came free within {self.options.queue_timeout:g} s "
                f"(--queue-timeout); {self.options.parallel} slot(s) are busy"
            )
            raise HTTPError(429, msg, headers={"Retry-After": self._busy_after()}) from None
        except asyncio.CancelledError:  # the client went away while waiting
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release_slot()
            else:
                fut.cancel()
                self._drop(fut)
            raise
        finally:
            with self.metrics.lock:
                self.metrics.deferred -= 1

    def _drop(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(fut)

    def _release(self, seconds: float, held: Held | None = None) -> None:
        """A call ended (on the loop): count it, hand its slot (and what else it held) on."""
        if held is not None:
            held.release()
        self._busy = 0.8 * self._busy + 0.2 * seconds
        self.in_flight -= 1
        now = time.monotonic()
        self.last_used = now
        with self.metrics.lock:
            self.metrics.processing -= 1
        self._release_slot()

    def _release_slot(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1
