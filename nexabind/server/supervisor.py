"""A supervised llama-server: started on a private loopback port, watched, restarted, stopped.

The flags come from the same :class:`~nexabind.server.ServeOptions` as the in-process engine
(:func:`server_argv`). Readiness is a TCP connect, then ``GET /health`` answering 200 (it
answers 503 while the model loads). A watcher thread restarts the process when it dies, with
a backoff that doubles up to a cap and resets once it has run a while; meanwhile
:attr:`Supervisor.state` is ``degraded``. :meth:`Supervisor.stop` sends SIGTERM, then SIGKILL
after a timeout. The child gets a random API key (through its environment, not its command
line), so only the gateway that holds the key can use the private port.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import secrets
import socket
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

from nexabind._build import server_binary
from nexabind.errors import NexabindError
from nexabind.server._options import ServeOptions

__all__ = ["Supervisor", "SupervisorError", "find_binary", "server_argv"]

log = logging.getLogger(__name__)


class SupervisorError(NexabindError):
    """llama-server could not be found, or did not start or become ready."""


def server_argv(binary: str | os.PathLike[str], options: ServeOptions, port: int) -> list[str]:
    """llama-server's command line for ``options``, listening on ``127.0.0.1:port``."""
    argv = [
        str(binary), "-m", str(options.model), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(options.parallel), "--alias", options.name, "--no-webui",
        "--kv-unified",
    ]  # fmt: skip
    if options.ctx_size:
        argv += ["-c", str(options.ctx_size)]
    if options.threads:
        argv += ["-t", str(options.threads), "-tb", str(options.threads)]
    if options.embedding:
        argv.append("--embedding")
    if options.rerank:
        argv.append("--reranking")
    if options.n_predict > 0:
        argv += ["-n", str(options.n_predict)]
    if options.chat_template:
        argv += ["--chat-template", options.chat_template]
    return argv


def find_binary(options: ServeOptions) -> Path:
    """``options.server_bin``, else the llama-server built into the build cache.

    Raises:
        SupervisorError: Neither exists.
    """
    if options.server_bin:
        path = Path(options.server_bin)
        if not path.is_file() or not os.access(path, os.X_OK):
            msg = f"--server-bin {path} is not an executable file; give llama-server's path"
            raise SupervisorError(msg)
        return path
    found = server_binary()
    if found is None:
        msg = (
            "no llama-server built for this llama.cpp commit; run `nexabind build --with-server` "
            "(about 20 minutes, cached), or pass --server-bin PATH"
        )
        raise SupervisorError(msg)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Supervisor:
    """Runs one llama-server and keeps it running.

    Args:
        binary: The llama-server executable.
        options: The server's options (model, slots, context, ...).
        ready_timeout: Seconds a start may take to become ready (the model loads meanwhile).
        stop_timeout: Seconds between SIGTERM and SIGKILL.
        backoff: First and longest wait before a restart, in seconds.
        stable_after: Seconds of running after which the backoff starts over.
        health_interval: Seconds between ``/health`` polls while it runs.
    """

    def __init__(
        self,
        binary: str | os.PathLike[str],
        options: ServeOptions,
        *,
        ready_timeout: float = 300.0,
        stop_timeout: float = 10.0,
        backoff: tuple[float, float] = (0.5, 30.0),
        stable_after: float = 60.0,
        health_interval: float = 2.0,
    ) -> None:
        self.binary = Path(binary)
        self.options = options
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.backoff = backoff
        self.stable_after = stable_after
        self.health_interval = health_interval
        self.api_key = secrets.token_urlsafe(24)
        self.port = 0
        self.state = "stopped"  # stopped | starting | ready | degraded
        self.restarts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._poke = threading.Event()  # check the process now
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._tail: deque[str] = deque(maxlen=30)

    @property
    def url(self) -> str:
        """Where the running llama-server listens."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The running llama-server's process id."""
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    # -- start and stop ---------------------------------------------------------------------

    def start(self) -> None:
        """Start llama-server and wait until it is ready; then keep it running.

        Raises:
            SupervisorError: It exited or was not ready within ``ready_timeout``.
        """
        self._stopping.clear()
        self._poke.clear()
        self.state = "starting"
        try:
            self._spawn_ready()
        except BaseException:
            self._kill()
            self.state = "stopped"
            raise
        self.state = "ready"
        self._watcher = threading.Thread(
            target=self._watch, name="nexabind-supervisor", daemon=True
        )
        self._watcher.start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; the watcher restarts nothing after."""
        self._stopping.set()
        self._poke.set()
        self._kill()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=self.stop_timeout + 5)
        self._watcher = None
        self.state = "stopped"

    def _kill(self) -> None:
        with self._lock:
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("llama-server (pid %d) ignored SIGTERM for %gs; killing it", proc.pid,
                        self.stop_timeout)  # fmt: skip
            proc.kill()
            proc.wait()

    def _spawn_ready(self) -> None:
        port = _free_port()
        argv = server_argv(self.binary, self.options, port)
        env = {**os.environ, "LLAMA_API_KEY": self.api_key}
        log.info("starting %s", " ".join(argv))
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, start_new_session=True,
        )  # fmt: skip
        with self._lock:
            self.proc, self.port = proc, port
        threading.Thread(target=self._drain, args=(proc,), daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout
        phase = "TCP"
        while True:
            if proc.poll() is not None:
                tail = "\n".join(self._tail)
                msg = f"llama-server exited with code {proc.returncode} while starting:\n{tail}"
                raise SupervisorError(msg)
            if self._stopping.is_set():
                msg = "stopped while llama-server was starting"
                raise SupervisorError(msg)
            if phase == "TCP" and _connects(port):
                phase = "/health"
            if phase == "/health" and _health(port) == 200:
                return
            if time.monotonic() > deadline:
                msg = (
                    f"llama-server was not ready ({phase}) within {self.ready_timeout:g} s on "
                    f"port {port}; its last lines:\n" + "\n".join(self._tail)
                )
                raise SupervisorError(msg)
            time.sleep(0.05 if phase == "TCP" else 0.1)

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self._tail.append(line)
            log.debug("llama-server: %s", line)

    # -- the watcher ------------------------------------------------------------------------

    def _watch(self) -> None:
        delay = self.backoff[0]
        started = time.monotonic()
        while not self._stopping.is_set():
            proc = self.proc
            assert proc is not None
            if proc.poll() is None:
                if self._poke.wait(self.health_interval):
                    self._poke.clear()
                if self._stopping.is_set():
                    return
                ok = _health(self.port) == 200
                if proc.poll() is None:  # still running after the check
                    self.state = "ready" if ok else "degraded"
                    if time.monotonic() - started > self.stable_after:
                        delay = self.backoff[0]
                    continue
            self.state = "degraded"
            log.warning("llama-server exited with code %s; restarting in %gs", proc.wait(),
                        delay)  # fmt: skip
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, self.backoff[1])
            try:
                self._spawn_ready()
            except SupervisorError as e:
                log.warning("llama-server restart failed: %s", e)
                continue
            self.restarts += 1
            started = time.monotonic()
            self.state = "ready"
            log.info("llama-server restarted (pid %s, port %d)", self.pid, self.port)

    def wake(self) -> None:
        """A request's connection to it broke: degraded until the watcher, checking now, finds
        it answering (or restarts it)."""
        if not self._stopping.is_set():
            self.state = "degraded"
            self._poke.set()


def _connects(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _health(port: int) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return None
