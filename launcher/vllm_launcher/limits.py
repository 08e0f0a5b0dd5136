"""Connection limits and timeouts of the front server, around uvicorn.

What uvicorn gives on its public surface, uvicorn.Config's options (serve.py sets them): a
keep-alive timeout after a response (timeout_keep_alive), a bound on graceful shutdown
(timeout_graceful_shutdown), and with h11 a bound on the size of a request head
(h11_max_incomplete_event_size). What it lacks: a timeout for a connection that never sends a
request, for slow headers (with httptools no size bound either) and for a slow or unfinished
body; and its `limit_concurrency` counts idle connections and then answers 503 to every
request, the served clients' too. This module adds them, the first through uvicorn's protocol
internals (_Limited says which):

- a subclass of the HTTP protocol uvicorn's "auto" picks (httptools, else h11): at most
  `max_connections` open; a new connection beyond it closes the longest-idle one (no request
  under way) or, when every one is busy, is answered 503 at once and closed; an idle
  connection is closed after `keepalive_timeout` (before its first request too); a request
  head must arrive within `header_timeout` and `MAX_HEADER_BYTES`, else 408 or 431 and close
  (431 however the head arrives: in one read, in many, or pipelined behind another request);
- an ASGI wrapper: a request body must arrive within `body_timeout` of its head, else 408
  and close; when shutdown begins, every body still being read is answered 503 at once.

The answers are OpenAI-style error bodies, always with `Connection: close`.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import h11
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .errors import APIError

log = logging.getLogger("vllm_launcher.limits")

MAX_HEADER_BYTES = 64 * 1024
# The uvicorn versions whose protocol internals _Limited was read against (python-env/uv.lock's
# and the development environment's); tests/test_uvicorn_internals.py fails on any other.
UVICORN_CHECKED = ("0.54.0", "0.55.0")
# Descriptors kept for the server itself beyond its connections: listener, logs, engine
# pipes and health checks, /proc reads. Each busy connection may hold an upstream socket too.
FD_RESERVE = 256


@dataclass(frozen=True)
class Limits:
    """The settings have no defaults here: serve._limits() fills them from the configuration
    (VLLM_MAX_CONNECTIONS, VLLM_KEEPALIVE_TIMEOUT, VLLM_HEADER_TIMEOUT, VLLM_BODY_TIMEOUT, whose
    defaults are settings.py's table); the head's bound is this module's, not a setting."""

    max_connections: int
    keepalive_timeout: float
    header_timeout: float
    body_timeout: float
    max_header_bytes: int = MAX_HEADER_BYTES


def raise_open_file_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard one (engines inherit it too); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(requested: int, open_files: int) -> int:
    """Connections the open-file limit leaves room for: each may hold an upstream socket too,
    and the server keeps FD_RESERVE for itself (so an engine can always be started)."""
    return max(1, min(requested, (open_files - FD_RESERVE) // 2))


class Connections:
    """What every connection of one server shares: the limits, shutdown, the metrics."""

    def __init__(self, limits: Limits, registry: CollectorRegistry) -> None:
        self.limits = limits
        self.shutting_down = False
        self.body_reads: set[asyncio.Timeout] = set()
        self._open: set[_Limited] = set()
        self.open_gauge = Gauge("vllm_launcher_connections", "Open client connections", registry=registry)
        self.open_gauge.set_function(lambda: len(self._open))
        Gauge("vllm_launcher_connections_limit", "Most client connections open at once",
              registry=registry).set(limits.max_connections)
        self.closed = Counter("vllm_launcher_connections_closed", "Client connections closed by the server "
                              "before the client did, by reason", ["reason"], registry=registry)
        self._closed = {reason: self.closed.labels(reason) for reason in (
            "over_limit", "evicted", "idle", "header_timeout", "header_too_large", "body_timeout", "shutdown")}

    def count(self, reason: str) -> None:
        self._closed[reason].inc()

    def begin_shutdown(self) -> None:
        """Every body still being read is answered 503 now (it is not admitted yet)."""
        self.shutting_down = True
        now = asyncio.get_running_loop().time()
        for timeout in list(self.body_reads):
            timeout.reschedule(now)

    def open_count(self) -> int:
        return len(self._open)

    def enter(self, connection: _Limited) -> int:
        """A connection opened: how many are open now."""
        self._open.add(connection)
        return len(self._open)

    def leave(self, connection: _Limited) -> None:
        self._open.discard(connection)

    def longest_idle(self, besides: _Limited) -> _Limited | None:
        """The open connection idle longest that may be closed (none with a request under way)."""
        return min((c for c in self._open if c is not besides and c.evictable()), key=lambda c: c.idle_since,
                   default=None)


def _refusal(status: int, message: str, code: str) -> bytes:
    data = json.dumps(APIError(status, message, code).body()).encode()
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\nconnection: close\r\n")
    if status == 503:
        head += "retry-after: 1\r\n"
    return head.encode() + b"\r\n" + data


IDLE, HEAD, BUSY, TAIL = "idle", "head", "busy", "tail"
# At shutdown an idle kept-alive connection stays open this long: a request its client had just
# sent on it is answered 503 shutting_down (a close would drop it), then it is closed.
SHUTDOWN_LINGER = 2.0


class _HeadTooLarge(Exception):
    """Raised in httptools' callback to stop the parser (uvicorn then calls send_400_response)."""


if TYPE_CHECKING:
    # type-checked against the protocol uvicorn's "auto" picks here (httptools is a dependency);
    # H11Protocol has the same names, tests/test_uvicorn_internals.py checks both
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _UvicornHTTP
else:
    _UvicornHTTP = object


class _Limited(_UvicornHTTP):
    """Mixed in before uvicorn's HttpToolsProtocol or H11Protocol (see protocol_class).

    uvicorn has no public surface for these limits (its Config's limit_concurrency counts idle
    connections and answers 503 to every request beyond; nothing times out a head, a body or a
    connection before its first request), so this subclass relies on the protocol's internals:
    it overrides connection_made, connection_lost, data_received, on_headers_complete (httptools'
    parser callback), on_response_complete, send_400_response, timeout_keep_alive_handler and
    shutdown (which uvicorn's Server calls on each connection), calling the originals; and it
    reads transport, loop, cycle (the current RequestResponseCycle, None before the first head;
    its response_complete and more_body), with httptools parser, url and headers, with h11 conn
    (its their_state). tests/test_uvicorn_internals.py fails when any of these changes, and
    names the uvicorn versions this was read against (UVICORN_CHECKED)."""

    shared: Connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's
        super().connection_made(transport)
        self._phase = IDLE
        self._since = time.monotonic()
        self._head_bytes = 0
        self._head_tail = b""                   # the last bytes of the head so far: its end may straddle reads
        self._refused_head = False
        self._timer: asyncio.TimerHandle | None = None
        shared = self.shared
        if shared.enter(self) > shared.limits.max_connections and not self._make_room():
            shared.count("over_limit")
            self._refuse(503, f"the server has {shared.limits.max_connections} connections open, all busy "
                              "(VLLM_MAX_CONNECTIONS); retry shortly", "too_many_connections")
            return
        self._arm(shared.limits.keepalive_timeout, self._idle_timeout)

    def _make_room(self) -> bool:
        """Close the longest-idle other connection (none with a request under way)."""
        victim = self.shared.longest_idle(besides=self)
        if victim is None:
            return False
        self.shared.count("evicted")
        victim.evict()
        return True

    def evictable(self) -> bool:
        return self._phase != BUSY and not self.transport.is_closing()

    @property
    def idle_since(self) -> float:
        """Not the loop's clock: uvloop's advances once per loop iteration, so connections
        accepted together would tie and the longest idle would be picked at random."""
        return self._since

    def evict(self) -> None:
        self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.shared.leave(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == IDLE and self.shared.shutting_down and not self._body_pending():
            self._refuse(503, "the server is shutting down; retry on another server or after its restart",
                         "shutting_down")
            return
        if self._phase == IDLE:
            if self._body_pending():            # the body of a request answered early (413, 401 ...)
                self._phase = TAIL
                self._arm(self.shared.limits.body_timeout, self._tail_timeout)
            else:
                self._phase, self._since, self._head_bytes, self._head_tail = HEAD, time.monotonic(), 0, b""
                self._arm(self.shared.limits.header_timeout, self._header_timeout)
        if self._phase == HEAD and self._head_too_large(data):
            return
        cycle = self.cycle
        super().data_received(data)
        if self._phase not in (HEAD, TAIL) or self.transport.is_closing():
            return
        if self.cycle is not cycle and self.cycle is not None and not self.cycle.response_complete:
            self._phase = BUSY                  # a head is complete: its body is the ASGI wrapper's
            self._disarm()
        elif self._phase == TAIL:
            if not self._body_pending():        # uvicorn's keep-alive timer is gone: ours instead
                self._phase, self._since = IDLE, time.monotonic()
                self._arm(self.shared.limits.keepalive_timeout, self._idle_timeout)
        else:
            self._head_bytes += len(data)
            self._head_tail = data[-3:]

    def _head_too_large(self, data: bytes) -> bool:
        """Does the head now arriving exceed the limit, in this read or with the earlier ones?
        Checked before the parser sees DATA: a head that arrives whole in one read is parsed
        and dispatched at once. (A head pipelined behind another request in the same read is
        checked by on_headers_complete.)"""
        limit = self.shared.limits.max_header_bytes
        seen = self._head_tail + data
        end = seen.find(b"\r\n\r\n", 0, limit + 4)      # no need to look further than the limit
        size = self._head_bytes + len(data) if end < 0 else self._head_bytes - len(self._head_tail) + end + 4
        if size <= limit:
            return False
        self._too_large()
        return True

    def _too_large(self) -> None:
        self.shared.count("header_too_large")
        self._refuse(431, f"the request head exceeds {self.shared.limits.max_header_bytes} bytes",
                     "headers_too_large")

    def on_headers_complete(self) -> None:
        """httptools' callback, once per head, pipelined ones too: the head's size as parsed
        (`METHOD URL HTTP/1.1`, `name: value` lines, the empty line)."""
        size = len(self.parser.get_method()) + len(self.url) + 12 + 2 \
            + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.shared.limits.max_header_bytes:
            self._refused_head = True
            raise _HeadTooLarge
        super().on_headers_complete()

    def _body_pending(self) -> bool:
        """Is a request body still arriving (its answer may be sent already)?"""
        conn = getattr(self, "conn", None)
        if isinstance(conn, h11.Connection):
            return conn.their_state is h11.SEND_BODY
        return self.cycle is not None and self.cycle.more_body

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is None or self.cycle.response_complete:
            self._phase, self._since = IDLE, time.monotonic()
            self._disarm()                      # uvicorn's keep-alive timer runs now

    def send_400_response(self, msg: str) -> None:
        """A request uvicorn cannot parse: an OpenAI error, not uvicorn's text/plain answer."""
        if self._refused_head:                  # on_headers_complete stopped the parser
            self._too_large()
            return
        self._refuse(400, f"malformed HTTP request: {msg}", "invalid_request")

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self.shared.count("idle")
        super().timeout_keep_alive_handler()

    def shutdown(self) -> None:
        if self._phase != BUSY and not self.transport.is_closing():
            self.shared.count("shutdown")
            if self._phase == IDLE:         # a request may be on its way: answered, not dropped
                self._arm(SHUTDOWN_LINGER, self._close)
                return
        super().shutdown()

    # ---------------------------------------------------------------- timers and answers

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_timeout(self) -> None:
        if self._phase == IDLE and not self.transport.is_closing():
            self.shared.count("idle")
            self._close()

    def _tail_timeout(self) -> None:
        if self._phase == TAIL and not self.transport.is_closing():
            self.shared.count("body_timeout")
            self._close()

    def _header_timeout(self) -> None:
        if self._phase == HEAD and not self.transport.is_closing():
            self.shared.count("header_timeout")
            self._refuse(408, f"the request head did not arrive within {self.shared.limits.header_timeout:g} s "
                              "(VLLM_HEADER_TIMEOUT)", "request_timeout")

    def _refuse(self, status: int, message: str, code: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(_refusal(status, message, code))
        self._close()

    def _close(self) -> None:
        self._disarm()
        self._phase = BUSY                       # nothing more happens on it
        self.transport.close()


def protocol_class(shared: Connections) -> type[asyncio.Protocol]:
    """The HTTP protocol uvicorn's "auto" picks (httptools, else h11), with the limits of `shared`."""
    base = AutoHTTPProtocol
    return cast("type[asyncio.Protocol]", type(f"Limited{base.__name__}", (_Limited, base), {"shared": shared}))


class BodyTimeout:
    """ASGI wrapper: a request body arrives within `body_timeout` of its head, or the client
    gets 408 and the connection closes; at shutdown, bodies still arriving get 503."""

    def __init__(self, app: ASGIApp, shared: Connections) -> None:
        self.app = app
        self.shared = shared

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        shared = self.shared
        deadline = asyncio.get_running_loop().time() + shared.limits.body_timeout
        body_done = False
        started = False
        refused = False

        async def timed_receive() -> Message:
            nonlocal body_done, refused
            if refused:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline) as timeout:
                    shared.body_reads.add(timeout)
                    try:
                        message = await receive()
                    finally:
                        shared.body_reads.discard(timeout)
            except TimeoutError:
                refused = True
                if shared.shutting_down:
                    error = APIError(503, "the server is shutting down", "shutting_down")
                    shared.count("shutdown")
                else:
                    error = APIError(408, f"the request body did not arrive within {shared.limits.body_timeout:g} s "
                                          "(VLLM_BODY_TIMEOUT)", "request_timeout")
                    shared.count("body_timeout")
                if not started:
                    data = error.response().body
                    await send({"type": "http.response.start", "status": error.status, "headers": [
                        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                        (b"connection", b"close")]})
                    await send({"type": "http.response.body", "body": data})
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return                          # answered already; the app's own answer goes nowhere
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not refused:
                raise
