"""A stand-in for llama-server that misbehaves on purpose (for the supervisor's tests).

It takes llama-server's flags, answers ``/health`` on ``--port``, and reads its behaviour from
the environment: FAKE_SLOW_START (seconds before it listens), FAKE_IGNORE_TERM (1: SIGTERM does
nothing), FAKE_EXIT (exit with this code at once), FAKE_ARGV (write its argv, as JSON, there),
FAKE_ANSWER (a file whose first line is the status of the answers to POSTs, and the rest their
body, read at each request).
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import sys
import time


def main() -> None:
    argv = sys.argv[1:]
    if os.environ.get("FAKE_ARGV"):
        with open(os.environ["FAKE_ARGV"], "a") as f:
            f.write(json.dumps(argv) + "\n")
    if os.environ.get("FAKE_EXIT"):
        print("fake llama-server: failing on purpose", file=sys.stderr)
        sys.exit(int(os.environ["FAKE_EXIT"]))
    if os.environ.get("FAKE_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(float(os.environ.get("FAKE_SLOW_START", "0")))
    port = int(argv[argv.index("--port") + 1])
    key = os.environ.get("LLAMA_API_KEY", "")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/health"
            body = json.dumps({"status": "ok"} if ok else {"error": "not found"}).encode()
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            self.rfile.read(length)
            if self.headers.get("Authorization") != f"Bearer {key}":
                self.send_response(401)
                self.end_headers()
                return
            body = json.dumps({"object": "list", "data": [], "model": "fake"}).encode()
            status = 200
            if os.environ.get("FAKE_ANSWER"):
                with open(os.environ["FAKE_ANSWER"], "rb") as f:
                    first, _, body = f.read().partition(b"\n")
                status = int(first)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
