"""Fault paths with the fake engine's knobs: engines crashing under concurrent load."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from serving import fake_lanes_env, serving
from test_server_operations import metric_samples, value
from test_server_switching import CHAT, chat_body, sse_events

pytestmark = pytest.mark.engine

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
DIE_AFTER_TOKENS = 40


def openai_error(body: bytes) -> dict | None:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return error if isinstance(error, dict) and set(error) == OPENAI_ERROR_KEYS else None


def outcome(status: int, body: bytes, stream: bool) -> tuple[str, str]:
    """("ok" | "error" | "bad", detail) for one finished request."""
    if status != 200:
        error = openai_error(body)
        return ("error", error["code"]) if error else ("bad", f"{status} {body[:200]!r}")
    if not stream:
        return ("ok", "") if "choices" in json.loads(body) else ("bad", body[:200].decode())
    text = body.decode()
    events = sse_events(text)
    if events and "error" in events[-1]:
        return ("error", events[-1]["error"]["code"]) if set(events[-1]["error"]) == OPENAI_ERROR_KEYS \
            else ("bad", text[-300:])
    return ("ok", "") if text.rstrip().endswith("data: [DONE]") else ("bad", f"cut: {text[-300:]}")


async def crash_traffic(url: str, total: int, clients: int, killer_every: int, seed: int) -> list[tuple]:
    """`clients` keep-alive clients send `total` chat requests, a third streaming; every
    `killer_every`-th asks for enough tokens to make the engine exit mid-request."""
    rng = random.Random(seed)
    plan = [(rng.random() < 0.33, DIE_AFTER_TOKENS + 5 if i % killer_every == killer_every - 1 else rng.randint(1, 8))
            for i in range(total)]
    results = []

    async def one(http: httpx.AsyncClient, stream: bool, tokens: int) -> tuple:
        body = chat_body("a", stream, tokens)
        try:
            if stream:
                async with http.stream("POST", CHAT, json=body) as response:
                    return outcome(response.status_code, await response.aread(), True)
            response = await http.post(CHAT, json=body)
            return outcome(response.status_code, response.content, False)
        except httpx.TransportError as error:
            return ("lost", f"{type(error).__name__}: {error}")

    async def client_loop(http: httpx.AsyncClient):
        while plan:
            stream, tokens = plan.pop()
            results.append(await one(http, stream, tokens))

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
    return results


def wait_for_metric(served, name: str, expected: float, timeout: float = 10, **labels) -> None:
    deadline = time.monotonic() + timeout
    with served.client() as client:
        while (found := value(metric_samples(client.get("/metrics").text), name, **labels)) != expected:
            assert time.monotonic() < deadline, f"{name}{labels} is {found}, not {expected}"
            time.sleep(0.05)


def test_engine_crashes_under_load_end_every_request_in_an_answer_or_an_openai_error(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_DIE_AFTER_TOKENS": str(DIE_AFTER_TOKENS),
                                             "ENV_FAKE_TOKEN_DELAY": "0.005"}},
                         VLLM_ENGINE_MAX_RESTARTS="1000")
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        results = asyncio.run(crash_traffic(served.url, total=600, clients=32, killer_every=30, seed=1))
        kinds = {kind: [detail for k, detail in results if k == kind] for kind in ("ok", "error", "bad", "lost")}
        summary = {kind: len(details) for kind, details in kinds.items()}
        assert not kinds["lost"] and not kinds["bad"], (summary, kinds["lost"][:5], kinds["bad"][:5])
        assert "engine_crashed" in kinds["error"], summary         # the fault happened while requests ran
        assert set(kinds["error"]) <= {"engine_crashed", "engine_unavailable"}, summary
        assert len(kinds["ok"]) > len(results) / 4, summary
        wait_for_metric(served, "vllm_launcher_inflight_requests", 0, lane="a")
        with served.client() as client:
            starts = value(metric_samples(client.get("/metrics").text), "vllm_launcher_engine_starts_total", lane="a")
        print(f"crash traffic: {summary}, engine starts {starts:.0f}, errors {sorted(set(kinds['error']))}")
