"""Forwarding one admitted request to its lane's engine, and the answer back to the client,
in plain ASGI (no framework between uvicorn and the engine's pool).

A request is sent through the aiohttp session of the Engine it was dispatched to (the router
hands it over with the ticket); nothing here looks an engine up. Non-streaming answers pass
through with the engine's status and body (parsed for `usage` only when requests are logged);
streams pass through byte for byte. Every admitted request ends in the engine's answer or an
explicit error: a stream that has already started ends with an SSE error event.

While a request is with its engine, the task serving it is cancelled when the client leaves
(a watch on ASGI receive: closing the upstream connection makes vLLM abort the generation) or
when the router aborts the ticket (drain timeout, engine crash); `_Exchange.why` says which,
and the request ends accordingly. No other task and no wait on several futures per request.

A request the router puts back in line (`Ticket.requeued`: none of its engine output reached
the client) has its upstream connection closed and waits for its lane again, then is sent
again; a stream that had its 200 keeps it and is kept alive meanwhile. The router is told
(`output_started`) right before the first engine output goes to the client: from then on the
request is never sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, Protocol, cast

import aiohttp
from starlette.types import Receive, Send

from .engines import Engine
from .errors import APIError
from .router import Router, Ticket

log = logging.getLogger("vllm_launcher.proxy")
request_log = logging.getLogger("vllm_launcher.requests")

# A stream still waiting for its lane after this long is answered 200 at once and kept alive
# with SSE comments (OpenAI clients ignore them; proxies see traffic and do not time out).
PROGRESS_AFTER = 2.0
PROGRESS_EVERY = 5.0
DONE_EVENT = b"data: [DONE]\n\n"          # the last event of an OpenAI stream
CLIENT_CLOSED = 499                     # nginx's code for "client closed request", for metrics
CRASH_REPORT_WAIT = 1.0                 # a broken connection may be an engine crash being noticed
EVENT_STREAM = b"text/event-stream"
# What a broken upstream raises: aiohttp's errors, its timeouts, and RuntimeError from a
# session closed as its engine exited (any other RuntimeError is a bug: _broken re-raises it).
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError)
CLIENT, ABORT, DONE = "client", "abort", "done"


class StreamFilter(Protocol):
    """What a dialect does to a streamed answer: each chunk in, what the client gets out."""

    def feed(self, chunk: bytes) -> bytes: ...

    def close(self) -> bytes: ...


class Dialect(Protocol):
    """How the answers the proxy makes itself look, and what it does to an engine's answer:
    OpenAIDialect, or the Anthropic route's (anthropic.AnthropicDialect)."""

    done_event: bytes                       # a stream whose tail this is was served in full
    upstream_headers: dict[str, str]        # the client's headers passed on to the engine
    stream_content_type: bytes | None       # a stream made here of a whole answer: its type

    def rendered(self, error: APIError) -> tuple[bytes, list[tuple[bytes, bytes]]]: ...

    def sse_error(self, error: APIError) -> bytes: ...

    def keepalive(self, text: str) -> bytes: ...

    def body(self, status: int, content: bytes) -> bytes: ...

    def stream(self) -> StreamFilter | None:
        """None, or a filter for a streamed answer."""
        ...


class OpenAIDialect:
    """OpenAI's: errors as APIError renders them, SSE comments while a stream waits, the
    engine's bytes untouched."""

    done_event = DONE_EVENT
    upstream_headers: dict[str, str] = {}
    stream_content_type: bytes | None = None

    def rendered(self, error: APIError) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        return error.rendered()

    def sse_error(self, error: APIError) -> bytes:
        return error.sse_event()

    def keepalive(self, text: str) -> bytes:
        return f": {text}\n\n".encode()

    def body(self, status: int, content: bytes) -> bytes:
        return content

    def stream(self) -> StreamFilter | None:
        return None


OPENAI: Dialect = OpenAIDialect()


async def send_error(send: Send, error: APIError, dialect: Dialect = OPENAI) -> None:
    """An APIError as a whole ASGI response."""
    body, headers = dialect.rendered(error)
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _failure(ticket: Ticket, error: BaseException) -> APIError:
    """Why an upstream connection broke: the router's reason (drain timeout, engine crash) when
    it has one or gives one within a moment, else the transport error itself."""
    if not ticket.aborted.done():
        await asyncio.wait([ticket.aborted], timeout=CRASH_REPORT_WAIT)
    return ticket.aborted.result() if ticket.aborted.done() else _upstream_error(error)


def _session(ticket: Ticket) -> aiohttp.ClientSession:
    """The pool of the engine a ticket was dispatched to (the supervisor gives every engine it
    serves one; tests' engines without one never reach the proxy)."""
    return cast(aiohttp.ClientSession, cast(Engine, ticket.engine).session)


def _broken(ticket: Ticket, error: BaseException) -> None:
    """In `except UPSTREAM_ERRORS`: re-raises a RuntimeError that is not a closed pool."""
    if isinstance(error, RuntimeError) and not _session(ticket).closed:
        raise error


def _upstream_error(error: BaseException) -> APIError:
    return APIError(502, f"the engine did not answer: {type(error).__name__}: {error}", "engine_unavailable")


class _Exchange:
    """One request between its client and its engine: the ASGI callables, the task serving
    it, and why that task was cancelled (CLIENT left, ABORT by the router) once it was."""

    __slots__ = ("ticket", "receive", "send", "task", "why", "watcher", "dialect", "started")

    def __init__(self, ticket: Ticket, receive: Receive, send: Send, dialect: Dialect = OPENAI):
        self.dialect = dialect
        self.ticket = ticket
        self.receive = receive
        self.send = send
        self.task = cast("asyncio.Task[Any]", asyncio.current_task())     # made in the request's task
        self.why: str | None = None
        self.watcher: asyncio.Future | None = None
        self.started = False                # the client has its 200 (a stream)

    def watch(self) -> None:
        """From now on the client leaving or the router aborting cancels the serving task."""
        self.watcher = asyncio.ensure_future(self.receive())
        self.watcher.add_done_callback(self._received)
        self.ticket.on_abort = self._aborted

    def _received(self, watcher: asyncio.Future) -> None:
        if not watcher.cancelled() and watcher.exception() is None and watcher.result()["type"] == "http.disconnect":
            self._stop(CLIENT)

    def _aborted(self) -> None:
        self._stop(ABORT)

    def _stop(self, why: str) -> None:
        if self.why is None:
            self.why = why
            self.task.cancel()

    def stopped(self) -> str:
        """In `except CancelledError`: why we were stopped (re-raises a cancellation that is
        not ours, e.g. the server's shutdown)."""
        if self.why in (None, DONE):
            raise asyncio.CancelledError
        self.task.uncancel()
        return self.why

    def settle(self) -> None:
        """Nothing cancels the task from now on."""
        if self.why is None:
            self.why = DONE
        self.ticket.on_abort = None
        if self.watcher is not None:
            self.watcher.cancel()

    def rewind(self) -> None:
        """Back in line: the next dispatch may be watched again."""
        self.why = None


class Forwarder:
    def __init__(self, router: Router, log_requests: bool):
        self.router = router
        self.log_requests = log_requests

    async def serve(self, receive: Receive, send: Send, path: str, lane: str, body: bytes, stream: bool,
                    content_type: str = "application/json", dialect: Dialect = OPENAI) -> None:
        """Admit the request to LANE, wait for its dispatch, forward it to PATH of its engine and
        send the answer with ASGI SEND (answers made here in DIALECT's shape)."""
        ticket = self.router.admit(lane)
        exchange = _Exchange(ticket, receive, send, dialect)
        try:
            while True:                         # once more for each time the request goes back in line
                if not ticket.decided.done() and not await self._queued(exchange, stream):
                    return
                outcome = ticket.decided.result()
                if isinstance(outcome, APIError):
                    if exchange.started:
                        self._close(ticket, outcome.status)
                        await send({"type": "http.response.body", "body": dialect.sse_error(outcome)})
                    else:
                        self._log(ticket, outcome.status)
                        await send_error(send, outcome, dialect)
                    return
                ticket.requeued = False
                exchange.watch()
                if not await self._forward(exchange, path, body, content_type, stream):
                    return
                exchange.rewind()
        except asyncio.CancelledError:
            self.router.cancel(ticket)
            self._close(ticket, CLIENT_CLOSED)
            raise
        except Exception as error:      # a bug: still an OpenAI error, and the ticket is closed
            log.exception("lane %s: request failed", lane)
            self.router.cancel(ticket)
            self._close(ticket, 500)
            exchange.settle()
            with contextlib.suppress(RuntimeError):      # not if the answer had begun
                await send_error(send, APIError(500, f"internal error: {type(error).__name__}", "internal_error"),
                                 dialect)
        finally:
            exchange.settle()

    async def _queued(self, exchange: _Exchange, stream: bool) -> bool:
        """Wait for the lane: True once decided; False when the client left (answered here). A
        stream still waiting after PROGRESS_AFTER is answered 200 and kept alive with the
        dialect's keep-alives (which are no engine output) until it is decided."""
        ticket, send = exchange.ticket, exchange.send
        disconnect = asyncio.ensure_future(exchange.receive())
        try:
            while not ticket.decided.done():        # `decided` is a new future after going back in line
                patience = None if not stream else PROGRESS_EVERY if exchange.started else PROGRESS_AFTER
                waits: list[asyncio.Future[Any]] = [ticket.decided, disconnect]
                await asyncio.wait(waits, timeout=patience, return_when=asyncio.FIRST_COMPLETED)
                if ticket.decided.done():
                    break
                if disconnect.done():
                    self.router.cancel(ticket)
                    self._close(ticket, CLIENT_CLOSED)
                    return False
                if stream:
                    if not exchange.started:
                        await send({"type": "http.response.start", "status": 200,
                                    "headers": [(b"content-type", EVENT_STREAM)]})
                        exchange.started = True
                    state = self.router.lane_state(ticket.lane).value
                    if progress := self.router.lane_progress(ticket.lane):
                        state = f"{state}, {progress}"       # e.g. "starting, waiting for cluster (1/2 nodes)"
                    waited = time.monotonic() - ticket.arrived
                    await send({"type": "http.response.body", "more_body": True, "body": exchange.dialect.keepalive(
                        f"waiting for lane {ticket.lane} ({state}, {waited:.0f} s)")})
        finally:
            disconnect.cancel()
        return True

    async def _forward(self, exchange: _Exchange, path: str, body: bytes, content_type: str, stream: bool) -> bool:
        """The engine's answer: a whole body, or a stream byte for byte; an error answer, or an
        error event once a stream has begun, if it breaks or is aborted. True when the request
        went back in line instead (its upstream closed; nothing of the engine's was sent)."""
        ticket, send, dialect = exchange.ticket, exchange.send, exchange.dialect
        started = exchange.started          # the client has its 200 (a stream that waited for its lane)
        relayed = False
        done_event = dialect.done_event
        error = upstream = None
        tail = b""                          # the stream's last bytes: has the client had [DONE]?
        try:
            if ticket.aborted.done():
                raise _Aborted
            upstream = await _session(ticket).post(path, data=body, headers={"Content-Type": content_type,
                                                                             **dialect.upstream_headers})
            if not stream or upstream.status != 200:
                content = dialect.body(upstream.status, await upstream.read())
                exchange.settle()
                if started:
                    error = _as_error(content, upstream.status)
                else:
                    self._close(ticket, upstream.status, _usage(content) if self.log_requests else None)
                    headers = [(b"content-length", b"%d" % len(content))]
                    if kind := upstream.headers.get("Content-Type"):
                        headers.append((b"content-type", kind.encode("latin-1")))
                    await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
                    await send({"type": "http.response.body", "body": content})
                    return False
            else:
                if not started:
                    stream_type = dialect.stream_content_type or upstream.headers.get(
                        "Content-Type", "text/event-stream").encode("latin-1")
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [(b"content-type", stream_type)]})
                    started = exchange.started = True
                repair = dialect.stream()
                async for chunk in upstream.content.iter_any():
                    if repair is not None and not (chunk := repair.feed(chunk)):
                        continue
                    if not relayed:             # from here on it can no longer go back in line
                        relayed = True
                        self.router.output_started(ticket)
                    # a reference to the chunk, copied only when a chunk is shorter than the event
                    tail = chunk if len(chunk) >= len(done_event) else (tail + chunk)[-len(done_event):]
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if repair is not None and (chunk := repair.close()):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except asyncio.CancelledError:
            if exchange.stopped() == CLIENT:
                # A client that leaves once it has the stream's last event was served in full.
                self._close(ticket, 200 if tail.endswith(done_event) else CLIENT_CLOSED)
                return False
            if ticket.requeued:
                return True                 # finally closes the upstream: the engine aborts it
            error = ticket.aborted.result()
        except _Aborted:
            error = ticket.aborted.result()
        except UPSTREAM_ERRORS as failure:
            _broken(ticket, failure)
            exchange.settle()
            error = await _failure(ticket, failure)
        finally:
            exchange.settle()
            if upstream is not None:
                upstream.close()            # mid-answer: the engine sees the connection go and aborts
        if error is None:
            self._close(ticket, 200)
            await send({"type": "http.response.body", "body": b""})
        elif started:
            self._close(ticket, error.status)
            await send({"type": "http.response.body", "body": dialect.sse_error(error)})
        else:
            self._close(ticket, error.status)
            await send_error(send, error, dialect)
        return False

    def _close(self, ticket: Ticket, status: int, usage: dict | None = None) -> None:
        if ticket.finished:
            return
        self.router.finish(ticket, status)
        self._log(ticket, status, usage)

    def _log(self, ticket: Ticket, status: int, usage: dict | None = None) -> None:
        if not self.log_requests:
            return
        now = time.monotonic()
        waited = (ticket.dispatched_at or now) - ticket.arrived
        tokens = f" tokens={usage.get('prompt_tokens')}+{usage.get('completion_tokens')}" if usage else ""
        request_log.info("lane=%s status=%s queue_wait=%.3fs total=%.3fs%s", ticket.lane, status, waited,
                         now - ticket.arrived, tokens,
                         extra={"lane": ticket.lane, "status": status, "queue_wait": round(waited, 4),
                                "total": round(now - ticket.arrived, 4), "usage": usage})


class _Aborted(Exception):
    """The ticket was aborted before its request went upstream."""


def _usage(content: bytes) -> dict | None:
    try:
        usage = json.loads(content).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def _as_error(content: bytes, status: int) -> APIError:
    """An engine's error answer as an APIError (for a stream that already sent its 200)."""
    try:
        error = json.loads(content).get("error", {})
        return APIError(status, str(error.get("message", content[:500])), str(error.get("code") or "engine_error"))
    except (ValueError, AttributeError):
        return APIError(status, content[:500].decode(errors="replace"), "engine_error")
