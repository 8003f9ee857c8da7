"""Connections bounded: a deadline for a request's headers, and the process's file limit.

uvicorn closes a keep-alive connection that stays idle, but waits forever for the headers of
a request that arrive a byte at a time (slowloris), and a server at the common limit of 1024
open files stops accepting once that many such connections are open. :func:`protocol` is
uvicorn's h11 protocol with a deadline: a connection whose request headers are not complete
within ``header_timeout`` seconds of its start (or of the previous response) is closed.
:func:`raise_file_limit` lifts the soft limit of open files to the hard one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["protocol", "raise_file_limit"]

log = logging.getLogger(__name__)


def protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol (h11) that closes a connection whose headers come late."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self._in_request():
                self._disarm()  # the headers are in: the request runs on its own clock

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers have the same time

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self._in_request() and not self.transport.is_closing():
                client = "%s:%d" % self.client if self.client else "a client"  # noqa: UP031
                log.info("%s sent no complete request headers within %gs: closed", client,
                         header_timeout)  # fmt: skip
                self.transport.close()

    return HeaderDeadline


def raise_file_limit() -> int | None:
    """Lift the soft limit of open files (each connection is one) to the hard limit; return
    the limit now in force (None where the OS has no such limit)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= want:
        return None if soft == resource.RLIM_INFINITY else soft
    for limit in (want, 1 << 16, 10240):  # macOS refuses more than OPEN_MAX for the soft one
        if limit <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        except (ValueError, OSError):
            continue
        return limit
    return soft
