"""A real `nexabind serve` process on 127.0.0.1 for the server tests."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """``nexabind serve MODEL ARGS...`` in a child process, ready when constructed."""

    def __init__(self, model: Path | str, *args: str, ready: bool = True, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        argv = [sys.executable, "-m", "nexabind", "serve", str(model), "--port", str(self.port),
                "--threads", "1", *args]  # fmt: skip
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        if ready:
            self.wait_health(200)

    def wait_health(self, status: int, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"server exited with {self.proc.returncode}:\n{self.output()[-3000:]}"
                raise AssertionError(msg)
            try:
                got, body = self.get("/health")
                last = (got, body)
                if got == status:
                    return body  # type: ignore[no-any-return]
            except OSError:
                pass
            time.sleep(0.05)
        msg = f"/health never answered {status} (last: {last}):\n{self.output()[-3000:]}"
        raise AssertionError(msg)

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(
                method, path, data, {"Content-Type": "application/json", **(headers or {})}
            )
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        status, _, data = self.request("GET", path, **kw)
        return status, (json.loads(data) if data.startswith((b"{", b"[")) else data.decode())

    def post(self, path: str, body: Any, **kw: Any) -> tuple[int, dict[str, str], Any]:
        status, headers, data = self.request("POST", path, body, **kw)
        return status, headers, json.loads(data) if data else None

    def open_stream(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[Any, Any]:
        """Start a streamed request; return (connection, response) to read events from."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", path, json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json", **(headers or {})})  # fmt: skip
        return conn, conn.getresponse()

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        _, text = self.get("/metrics", headers=headers)
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log_file.close()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            # SIGTERM first: a server stops what it started (a supervised llama-server).
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


def events(resp: Any) -> list[Any]:
    """Every SSE event of a response: parsed JSON, or the string ``[DONE]``."""
    out: list[Any] = []
    for line in resp:
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


def read_events(resp: Any, n: int) -> list[Any]:
    """The next ``n`` events of a stream that goes on."""
    out: list[Any] = []
    while len(out) < n:
        line = resp.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            out.append(json.loads(line[6:]))
    return out
