"""Forwarding one admitted request to its lane's engine, and the answer back to the client.

A request is sent through the pool of the Engine it was dispatched to (the router hands it
over with the ticket); nothing here looks an engine up. Non-streaming answers pass through
with the engine's status and body; streams pass through byte for byte. Every admitted request ends in the engine's answer or an explicit error: a
stream that has already started ends with an SSE error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .errors import APIError
from .router import Router, Ticket

log = logging.getLogger("vllm_launcher.proxy")
request_log = logging.getLogger("vllm_launcher.requests")

# A stream still waiting for its lane after this long is answered 200 at once and kept alive
# with SSE comments (OpenAI clients ignore them; proxies see traffic and do not time out).
PROGRESS_AFTER = 2.0
PROGRESS_EVERY = 5.0
CLIENT_CLOSED = 499                     # nginx's code for "client closed request", for metrics
CRASH_REPORT_WAIT = 1.0                 # a broken connection may be an engine crash being noticed
PASSED_HEADERS = ("content-type",)


async def wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _first(*awaitables) -> set:
    done, _ = await asyncio.wait(awaitables, return_when=asyncio.FIRST_COMPLETED)
    return done


async def _failure(ticket: Ticket, error: Exception) -> APIError:
    """Why an upstream connection broke: the router's reason (drain timeout, engine crash) when
    it has one or gives one within a moment, else the transport error itself."""
    if not ticket.aborted.done():
        await asyncio.wait([ticket.aborted], timeout=CRASH_REPORT_WAIT)
    return ticket.aborted.result() if ticket.aborted.done() else _upstream_error(error)


def _upstream_error(error: Exception) -> APIError:
    return APIError(502, f"the engine did not answer: {type(error).__name__}: {error}", "engine_unavailable")


class Forwarder:
    def __init__(self, router: Router, log_requests: bool):
        self.router = router
        self.log_requests = log_requests

    async def handle(self, request: Request, path: str, lane: str, body: bytes, stream: bool,
                     content_type: str = "application/json") -> Response:
        outgoing = _Outgoing(path, body, content_type)
        ticket = self.router.admit(lane)
        disconnect = asyncio.ensure_future(wait_disconnect(request))
        waiters = [ticket.decided, disconnect]
        if stream and not ticket.decided.done():
            waiters.append(asyncio.ensure_future(asyncio.sleep(PROGRESS_AFTER)))    # patience
        try:
            done = await _first(*waiters) if not ticket.decided.done() else {ticket.decided}
            if disconnect in done:
                self.router.cancel(ticket)
                self._close(ticket, CLIENT_CLOSED)
                return Response(status_code=CLIENT_CLOSED)
            if not ticket.decided.done():     # a stream still waiting: answer 200 now, report progress
                disconnect.cancel()
                return StreamingResponse(self._waiting_stream(ticket, outgoing),
                                         media_type="text/event-stream")
            outcome = ticket.decided.result()
            if isinstance(outcome, APIError):
                self._log(ticket, outcome.status)
                return outcome.response()
            if stream:
                disconnect.cancel()
                return await self._stream(ticket, outgoing)
            return await self._unary(ticket, outgoing, disconnect)
        except Exception as error:      # a bug: still an OpenAI error, and the ticket is closed
            log.exception("lane %s: request failed", lane)
            self.router.cancel(ticket)
            self._close(ticket, 500)
            return APIError(500, f"internal error: {type(error).__name__}", "internal_error").response()
        finally:
            for waiter in waiters[1:]:
                waiter.cancel()

    def _request(self, ticket: Ticket, outgoing: _Outgoing) -> httpx.Request:
        return ticket.engine.client.build_request("POST", outgoing.path, content=outgoing.body,
                                    headers={"content-type": outgoing.content_type})

    async def _send(self, ticket: Ticket, request: httpx.Request, stream: bool, disconnect=None) -> httpx.Response:
        """The engine's response headers (and body unless streaming). Raises APIError on an abort,
        a crash or an unreachable engine, _ClientGone when the client disconnects first."""
        client = ticket.engine.client
        send = asyncio.ensure_future(client.send(request, stream=stream))
        waiters = [send, ticket.aborted] + ([disconnect] if disconnect is not None else [])
        done = await _first(*waiters)
        if send not in done:
            send.cancel()                   # closes the connection: vLLM aborts the generation
            await asyncio.gather(send, return_exceptions=True)
            if ticket.aborted in done:
                raise ticket.aborted.result()
            raise _ClientGone()
        try:
            return send.result()
        except httpx.HTTPError as error:
            raise await _failure(ticket, error) from error
        except RuntimeError as error:
            if not client.is_closed:
                raise
            raise await _failure(ticket, error) from error    # closed as its engine exited: the crash

    async def _unary(self, ticket: Ticket, outgoing: _Outgoing, disconnect) -> Response:
        try:
            upstream = await self._send(ticket, self._request(ticket, outgoing), stream=False, disconnect=disconnect)
        except APIError as error:
            self._close(ticket, error.status)
            return error.response()
        except _ClientGone:
            self._close(ticket, CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        self._close(ticket, upstream.status_code, _usage(upstream.content))
        return Response(upstream.content, status_code=upstream.status_code, headers=_headers(upstream))

    async def _stream(self, ticket: Ticket, outgoing: _Outgoing) -> Response:
        try:
            upstream = await self._send(ticket, self._request(ticket, outgoing), stream=True)
        except APIError as error:
            self._close(ticket, error.status)
            return error.response()
        if upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            self._close(ticket, upstream.status_code)
            return Response(content, status_code=upstream.status_code, headers=_headers(upstream))
        return StreamingResponse(self._relay(ticket, upstream), status_code=200, headers=_headers(upstream))

    async def _relay(self, ticket: Ticket, upstream: httpx.Response):
        """The engine's stream, byte for byte; an error event if it breaks or is aborted."""
        status = 200
        ticket.on_abort = lambda: asyncio.ensure_future(upstream.aclose())
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except (httpx.HTTPError, httpx.StreamError, RuntimeError) as error:
            failure = await _failure(ticket, error)
            status = failure.status
            yield failure.sse_event()
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            ticket.on_abort = None
            await upstream.aclose()
            self._close(ticket, status)

    async def _waiting_stream(self, ticket: Ticket, outgoing: _Outgoing):
        """A stream answered 200 before its lane was ready: comments while it waits, then the
        engine's stream, or an SSE error event for whatever ends it."""
        status = 200
        try:
            while not ticket.decided.done():
                state = self.router.lane_state(ticket.lane).value
                waited = time.monotonic() - ticket.arrived
                yield f": waiting for lane {ticket.lane} ({state}, {waited:.0f} s)\n\n".encode()
                await asyncio.wait([ticket.decided], timeout=PROGRESS_EVERY)
            outcome = ticket.decided.result()
            if isinstance(outcome, APIError):
                status = outcome.status
                yield outcome.sse_event()
                return
            try:
                upstream = await self._send(ticket, self._request(ticket, outgoing), stream=True)
            except APIError as error:
                status = error.status
                yield error.sse_event()
                return
            if upstream.status_code != 200:
                content = await upstream.aread()
                await upstream.aclose()
                status = upstream.status_code
                yield _as_error(content, status).sse_event()
                return
            async for chunk in self._relay(ticket, upstream):
                yield chunk
            status = None                  # _relay closed the ticket
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            if not ticket.decided.done():
                self.router.cancel(ticket)
                self._log(ticket, CLIENT_CLOSED)
            elif status is not None:
                self._close(ticket, status)

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


class _ClientGone(Exception):
    pass


@dataclass(frozen=True)
class _Outgoing:
    """What goes to the engine: a path from openai_routes.FORWARDED, the body and its type."""
    path: str
    body: bytes
    content_type: str


def _headers(upstream: httpx.Response) -> dict[str, str]:
    return {name: upstream.headers[name] for name in PASSED_HEADERS if name in upstream.headers}


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
