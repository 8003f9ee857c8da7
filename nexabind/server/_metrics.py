"""The server's counters and histograms, and their Prometheus text exposition.

Updated from the event loop and from the threads that run tasks; every update takes one small
lock, and :meth:`Metrics.render` reads them under it.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Sequence

__all__ = ["Histogram", "Metrics"]

#: Bucket bounds in seconds: from one decode step of a small model to a long queue wait.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus histograms are exposed."""

    def __init__(self, bounds: Sequence[float] = SECONDS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = []
        total = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            total += n
            out.append(f'{name}_bucket{{le="{bound:g}"}} {total}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """What ``/metrics`` shows (names prefixed ``nexabind_``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.processing = 0
        self.deferred = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.queue_wait = Histogram()
        self.ttft = Histogram()

    def request_done(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def tokens(self, prompt: int, generated: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def waited(self, seconds: float) -> None:
        with self.lock:
            self.queue_wait.observe(seconds)

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def count(self, status: int) -> int:
        """Requests answered with ``status`` so far, over every endpoint."""
        with self.lock:
            return sum(n for (_, s), n in self.requests.items() if s == status)

    def render(self, tokens_per_second: float, state: str, restarts: int = 0) -> str:
        """The Prometheus text exposition (version 0.0.4)."""

        def head(name: str, kind: str, help: str) -> list[str]:
            return [f"# HELP nexabind_{name} {help}", f"# TYPE nexabind_{name} {kind}"]

        with self.lock:
            lines = head(
                "requests_total", "counter", "HTTP requests answered, by endpoint and status."
            )
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(
                    f'nexabind_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}'
                )
            lines += head("requests_processing", "gauge", "Requests holding a slot now.")
            lines.append(f"nexabind_requests_processing {self.processing}")
            lines += head("requests_deferred", "gauge", "Requests waiting in the queue for a slot.")
            lines.append(f"nexabind_requests_deferred {self.deferred}")
            lines += head("prompt_tokens_total", "counter", "Prompt tokens of finished requests.")
            lines.append(f"nexabind_prompt_tokens_total {self.prompt_tokens}")
            lines += head("generated_tokens_total", "counter", "Tokens generated.")
            lines.append(f"nexabind_generated_tokens_total {self.generated_tokens}")
            lines += head("tokens_per_second", "gauge", "Generated tokens per second, recently.")
            lines.append(f"nexabind_tokens_per_second {tokens_per_second:.2f}")
            lines += head("queue_wait_seconds", "histogram", "Time a request waited for a slot.")
            lines += self.queue_wait.lines("nexabind_queue_wait_seconds")
            lines += head(
                "time_to_first_token_seconds", "histogram",
                "Time from a request's arrival to its first generated token.",
            )  # fmt: skip
            lines += self.ttft.lines("nexabind_time_to_first_token_seconds")
            lines += head("engine_restarts_total", "counter", "Restarts of a supervised engine.")
            lines.append(f"nexabind_engine_restarts_total {restarts}")
            lines += head("ready", "gauge", "1 when the model is loaded and serving.")
            lines.append(f"nexabind_ready {1 if state == 'ok' else 0}")
        return "\n".join(lines) + "\n"
