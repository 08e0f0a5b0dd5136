"""A lane's warm-up: the requests an engine answers after /health says ready and before its
lane is ready, so that the first user does not pay for what the engine does on first use
(torch and Triton compile kernels then: vLLM 0.12 on CPU took 10-19 s for its first chat and
0.02 s for the second; on gfx1151 first-use compilation is worse).

The launcher does not know a lane's task (vLLM decides it from the model and its flags), so the
engine's answers choose: the kinds below are tried in order, and the first kind whose first
request the engine accepts is the lane's warm-up, all of its requests sent. A chat goes through
the model's chat template (a model without one refuses it: 400), then a completion (a pooling
model refuses both), then the pooling kinds. A request the engine refuses (4xx, or 5xx while it
stays healthy) is logged and the next kind tried; if it refuses every kind the lane is ready
all the same. An engine that exits, stops answering /health or does not answer within the
start's deadline (VLLM_START_TIMEOUT counts from the spawn to the end of the warm-up) has
failed to start (WarmupFailed).

Warm-ups go from the supervisor to the engine over its socket, never through the router: no
user metric, queue or service time the scheduler learns sees them. The engine's own vllm:*
counters do (their prompt and generation tokens). Each carries an X-Request-Id starting
REQUEST_ID_PREFIX, so the engine's log names them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

REQUEST_ID_PREFIX = "launcher-warmup-"
TOKENS = 4          # generated per request: the first token and a few decode steps
TEXT = "Hello"
EXIT_NOTICE = 1.0   # seconds a broken connection waits for the engine's exit to be noticed

# kind -> its requests (path, body without the model); tried in this order.
KINDS: tuple[tuple[str, tuple[tuple[str, dict[str, Any]], ...]], ...] = (
    ("chat", (("/v1/chat/completions", {"messages": [{"role": "user", "content": TEXT}], "max_tokens": TOKENS}),
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": TEXT}], "max_tokens": TOKENS,
                                        "stream": True}))),
    ("completion", (("/v1/completions", {"prompt": TEXT, "max_tokens": TOKENS}),
                    ("/v1/completions", {"prompt": TEXT, "max_tokens": TOKENS, "stream": True}))),
    ("embedding", (("/v1/embeddings", {"input": TEXT}),)),
    ("score", (("/v1/score", {"text_1": TEXT, "text_2": "World"}),)),
    ("rerank", (("/v1/rerank", {"query": TEXT, "documents": ["World"]}),)),
    ("classify", (("/classify", {"input": TEXT}),)),
)


class WarmupFailed(Exception):
    """The engine died, stopped answering /health or ran out of time during its warm-up."""


@dataclass
class Warmup:
    kind: str | None = None                 # the kind the engine accepted; None: it refused every kind
    seconds: float = 0.0
    refused: list[str] = field(default_factory=list)       # "POST /v1/chat/completions: 400 <message>"

    def describe(self) -> str:
        return self.kind or "refused by the engine"


async def warm_up(client: httpx.AsyncClient, model: str, deadline: float,
                  exited: Callable[[], Awaitable[int]], mask: Callable[[str], str] = str) -> Warmup:
    """Send the warm-up through CLIENT (the engine's socket, its key in the headers) for served
    name MODEL; `deadline` is a time.monotonic() value; `exited` waits for the engine's exit
    and returns its status. Raises WarmupFailed."""
    began = time.monotonic()
    result = Warmup()
    watch = asyncio.ensure_future(exited())
    try:
        for kind, requests in KINDS:
            accepted = False
            for index, (path, body) in enumerate(requests):
                status, text = await _send(client, path, {"model": model, **body}, deadline, watch)
                if 200 <= status < 300:
                    accepted = True
                    continue
                result.refused.append(f"POST {path}: {status} {mask(text)[:300]}")
                if status >= 500:
                    await _still_healthy(client, deadline, watch, f"POST {path} answered {status}")
                if index == 0:
                    break                       # not this kind: try the next
            if accepted:
                result.kind = kind
                break
    finally:
        watch.cancel()
    result.seconds = time.monotonic() - began
    return result


async def _send(client: httpx.AsyncClient, path: str, body: dict[str, Any], deadline: float,
                watch: asyncio.Future[int]) -> tuple[int, str]:
    """(status, error text) of one warm-up request, its body read to the end (a stream too)."""
    headers = {"X-Request-Id": REQUEST_ID_PREFIX + secrets.token_hex(8)}

    async def request() -> tuple[int, str]:
        async with client.stream("POST", path, json=body, headers=headers) as response:
            text = "".join([chunk async for chunk in response.aiter_text()])
            if response.status_code < 300 and body.get("stream") and 'data: {"error"' in text:
                return 500, text[-300:]           # an error event ended the stream
            if response.status_code < 300 and (refused := _error_status(text)):
                return refused, _message(text)    # vLLM 0.12 answers some refusals 200 with an error body
            return response.status_code, _message(text) if response.status_code >= 300 else ""

    return await _bounded(request(), deadline, watch, f"POST {path}")


async def _still_healthy(client: httpx.AsyncClient, deadline: float, watch: asyncio.Future[int], after: str) -> None:
    async def health() -> tuple[int, str]:
        response = await client.get("/health")
        return response.status_code, ""

    status, _ = await _bounded(health(), deadline, watch, "GET /health")
    if status != 200:
        raise WarmupFailed(f"{after}, then /health answered {status}: the engine broke during its warm-up")


async def _bounded(coroutine: Coroutine[Any, Any, tuple[int, str]], deadline: float, watch: asyncio.Future[int],
                   what: str) -> tuple[int, str]:
    task = asyncio.ensure_future(coroutine)
    try:
        waiting: set[asyncio.Future[Any]] = {task, watch}
        done, _ = await asyncio.wait(waiting, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if watch in done:
            raise WarmupFailed(f"the engine exited with status {watch.result()} during its warm-up ({what})")
        if task not in done:
            raise WarmupFailed(f"the engine did not answer its warm-up ({what}) within VLLM_START_TIMEOUT")
        try:
            return task.result()
        except httpx.HTTPError as error:
            await asyncio.wait({watch}, timeout=EXIT_NOTICE)      # a broken connection: did it exit?
            if watch.done():
                raise WarmupFailed(f"the engine exited with status {watch.result()} during its warm-up ({what})") from None
            raise WarmupFailed(f"the engine's warm-up ({what}) failed: {error or type(error).__name__}") from None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _error_status(text: str) -> int | None:
    """The status an OpenAI-style error body carries, when a 2xx answer is one: vLLM 0.12 asked
    for a chat by a pooling model answers 200 with {"error": {"code": 400, ...}} (seen with
    `--runner pooling --convert embed`), which is a refusal, not a warm engine."""
    try:
        error = json.loads(text).get("error") if text.lstrip().startswith("{") else None
    except (ValueError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    return code if isinstance(code, int) and 400 <= code < 600 else 400


def _message(text: str) -> str:
    """The error's message from an OpenAI-style error body, else the text."""
    try:
        error = json.loads(text).get("error") if text else None
    except (ValueError, AttributeError):
        return text.strip()
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return text.strip()
