"""A real HTTP server on 127.0.0.1 that serves a folder and misbehaves on request.

It speaks enough HTTP for a download client: ``Range`` (one ``bytes=N-`` or ``bytes=N-M``),
``If-Range`` against its ``ETag``, ``Content-Length``. Each request is logged with the bytes
of body it sent. ``plan(path, *actions)`` queues one action per request for that path, used
in order, then it serves normally again:

- ``"500"`` / ``"404"`` / ``"503"``: answer with that status;
- ``"truncate:N"``: promise the whole body, send N bytes, drop the connection;
- ``"ignore-range"``: answer 200 with the full body even when a range was asked;
- ``"tamper"``: flip one byte in the middle of the body;
- ``"stall:S"``: send the headers, then nothing for S seconds, then the body;
- ``"slow:BPS"``: send the body at about BPS bytes per second;
- ``"drip:S"``: send the headers, then one byte of the body every S seconds;
- ``"drip-headers:S"``: send the status line and headers one byte every S seconds;
- ``"redirect:URL"``: answer 302 to URL (URL may hold ``{path}``);
- ``"body:N"``: answer 200 with N bytes of filler (made as they are sent, never held);
- ``"endless"``: answer 200 with no length and filler until the client hangs up;
- ``"big-header:N"``: answer 200 with one header line of N bytes.

A plan for ``path`` applies to GET requests; ``"HEAD <path>"`` plans the HEAD requests of a
server that answers them.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Request:
    """One request the server answered."""

    path: str
    headers: dict[str, str]
    method: str = "GET"
    port: int = 0  # the client's port: one per TCP connection
    status: int = 0
    sent: int = 0
    action: str | None = None


@dataclass
class _State:
    root: Path
    log: list[Request] = field(default_factory=list)
    plans: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    default: str | None = None


class _Handler(http.server.BaseHTTPRequestHandler):
    state: _State
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        st = self.state
        path = self.path.split("?")[0]
        # Header names as Title-Case: clients differ (httpx sends them lower-case).
        headers = {k.title(): v for k, v in self.headers.items()}
        req = Request(path, headers, self.command, port=self.client_address[1])
        with st.lock:
            st.log.append(req)
            queue = st.plans.get(path if self.command == "GET" else f"{self.command} {path}")
            action = queue.pop(0) if queue else st.default
        req.action = action
        # The client may hang up first (a timeout, a killed process): not the server's error.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._answer(req, action)

    def _status(self, req: Request, code: int, headers: dict[str, str]) -> None:
        req.status = code
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _answer(self, req: Request, action: str | None) -> None:
        kind, _, arg = (action or "").partition(":")
        if self._refuse(req, kind, arg):
            return
        file = (self.state.root / req.path.lstrip("/")).resolve()
        if not file.is_relative_to(self.state.root.resolve()) or not file.is_file():
            self._status(req, 404, {"Content-Length": "0"})
            return
        data = file.read_bytes()
        if kind == "tamper":
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        self._send(req, action, len(data), lambda start, n: data[start : start + n], etag)

    def _refuse(self, req: Request, kind: str, arg: str) -> bool:
        """Answer the status, redirect and made-up body actions; whether one was answered."""
        if kind in ("body", "endless"):
            size = int(arg) if kind == "body" else None
            length = {"Content-Length": str(size)} if size is not None else {}
            self._status(req, 200, {**length, "Connection": "close"})
            self.close_connection = True
            filler = b" " * (64 << 10)
            while size is None or req.sent < size:
                n = len(filler) if size is None else min(len(filler), size - req.sent)
                self.wfile.write(filler[:n])
                req.sent += n
            return True
        if kind == "big-header":
            self._status(req, 200, {"X-Filler": "x" * int(arg), "Content-Length": "0"})
            return True
        if kind == "drip-headers":
            req.status = 200
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}":
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(float(arg))
            return True
        if kind in ("500", "503", "404"):
            body = f"{kind} on purpose\n".encode()
            self._status(req, int(kind), {"Content-Length": str(len(body))})
            self.wfile.write(body)
            return True
        if kind == "redirect":
            target = arg.replace("{path}", req.path)
            self._status(req, 302, {"Location": target, "Content-Length": "0"})
            return True
        return False

    def _send(
        self,
        req: Request,
        action: str | None,
        size: int,
        read: Callable[[int, int], bytes],
        etag: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Serve ``size`` bytes that ``read(start, n)`` gives, honouring ``Range`` / ``If-Range``
        and the body actions (``truncate``, ``ignore-range``, ``stall``, ``slow``); a HEAD
        request gets the headers only. ``tamper`` is the caller's to apply in ``read``."""
        kind, _, arg = (action or "").partition(":")
        start, end = 0, size - 1
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range", ""))
        if_range = req.headers.get("If-Range")
        partial = rng is not None and kind != "ignore-range" and if_range in (None, etag)
        headers = {**(headers or {}), "ETag": etag, "Accept-Ranges": "bytes"}
        if partial:
            start = int(rng.group(1))
            end = int(rng.group(2)) if rng.group(2) else size - 1
            if start >= size:
                headers.update({"Content-Range": f"bytes */{size}", "Content-Length": "0"})
                self._status(req, 416, headers)
                return
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        n = end + 1 - start
        headers["Content-Length"] = str(n)
        self._status(req, 206 if partial else 200, headers)
        if self.command == "HEAD":
            return
        if kind == "stall":
            self.wfile.flush()
            time.sleep(float(arg))
        if kind == "truncate":
            n = min(n, int(arg))
        if kind == "drip":
            for i in range(n):
                self.wfile.write(read(start + i, 1))
                self.wfile.flush()
                req.sent += 1
                time.sleep(float(arg))
            return
        step = 64 << 10
        bps = float(arg) if kind == "slow" else 0.0
        for i in range(0, n, step):
            chunk = read(start + i, min(step, n - i))
            self.wfile.write(chunk)
            req.sent += len(chunk)
            if bps:
                self.wfile.flush()
                time.sleep(len(chunk) / bps)
        self.wfile.flush()
        if kind == "truncate":
            self.close_connection = True


class Server:
    """A threaded HTTP server on 127.0.0.1 serving ``root``; use as a context manager."""

    def __init__(self, root: Path) -> None:
        self.state = _State(root)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def log(self) -> list[Request]:
        """Every request answered so far."""
        return self.state.log

    def requests_for(self, suffix: str) -> list[Request]:
        """The requests whose path ends with ``suffix``."""
        return [r for r in self.state.log if r.path.endswith(suffix)]

    def plan(self, path: str, *actions: str) -> None:
        """Queue one misbehaviour per coming request to ``path``."""
        with self.state.lock:
            self.state.plans.setdefault(path, []).extend(actions)

    def always(self, action: str | None) -> None:
        """Answer every request without a plan with ``action`` (None: normally)."""
        self.state.default = action

    def start(self) -> Server:
        """Start serving in a daemon thread."""
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (connections are then refused)."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
