"""The stall watchdog alone (engines/watchdog.py) against a fake engine process on its Unix
socket: the counters it reads, a slow engine that produces tokens (never probed), an engine
that stops producing while /health answers (probed, declared hung within stall timeout + poll +
probe bound), and a probe answered by a busy engine whose counter does not move (not hung)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from types import SimpleNamespace

import httpx
import pytest

from vllm_launcher.engines.process import engine_client
from vllm_launcher.engines.watchdog import Watchdog, read_progress
from waiting import eventually_async

pytestmark = pytest.mark.engine

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 40.0
vllm:generation_tokens_total{engine="1",model_name="m"} 2.0
# HELP vllm:generation_tokens_created Number of generation tokens processed.
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 100.0
"""


def test_progress_is_read_from_vllms_counters_summed_over_its_engines():
    """The names and labels of vLLM 0.12's and 0.32's v1/metrics/loggers.py (the counter
    vllm:generation_tokens exposed as _total, one sample per data-parallel engine)."""
    assert read_progress(VLLM_METRICS) == (142.0, 3.0)
    assert read_progress("# TYPE other counter\nother_total 1\n") == (None, 0.0)


class FakeEngine:
    """tests/fake_engine.py on a Unix socket, seen as the router sees an Engine."""

    def __init__(self, tmp_path, fake_python, **env: str):
        self.socket_path = str(tmp_path / "engine.sock")
        self.process = subprocess.Popen(
            [str(fake_python), "-m", "vllm.entrypoints.openai.api_server", "--model", "m", "--served-model-name",
             "m", "--uds", self.socket_path], env={"PATH": "/usr/bin:/bin", **env},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.wait()

    async def engine(self):
        client = engine_client(self.socket_path, timeout=httpx.Timeout(30.0))

        async def up() -> bool:
            try:
                return (await client.get("/health")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually_async(up, "the fake engine listening", 30)
        return SimpleNamespace(lane="a", ended=None, client=client, process=SimpleNamespace(socket_path=self.socket_path),
                               get=lambda path, timeout: client.get(path, timeout=timeout))


def watch(engine, stall: float, inflight):
    hung: list[tuple[float, str]] = []
    watchdog = Watchdog(engine, "m", stall, inflight, lambda stalled, probe: hung.append((stalled, probe)))
    return watchdog, hung, asyncio.create_task(watchdog.run())


def test_a_slow_engine_is_never_probed_and_a_stalled_one_is_declared_hung_within_the_bound(tmp_path, fake_python):
    stall = 0.5                       # poll 0.125 s, probe bound 0.5 s

    async def run():
        with FakeEngine(tmp_path, fake_python, FAKE_TOKEN_DELAY="0.1", FAKE_STALL_AFTER="2") as fake:
            engine = await fake.engine()
            running = []
            watchdog, hung, task = watch(engine, stall, lambda: len(running))
            body = {"model": "m", "prompt": "hi", "max_tokens": 25}         # 2.5 s, nothing sent until it ends
            running.append(1)
            answer = await engine.client.post("/v1/completions", json=body)
            assert answer.status_code == 200 and watchdog.probes == 0 and not hung
            running.append(2)                 # the second request: the engine stops producing
            stalled_at = time.monotonic()
            second = asyncio.create_task(engine.client.post("/v1/completions", json=body))
            await eventually_async(lambda: hung, "the watchdog declaring the engine hung", 10)
            detected = time.monotonic() - stalled_at
            assert (await engine.client.get("/health")).status_code == 200      # it still says it is healthy
            second.cancel()
            await task
            return detected, hung, watchdog.probes

    detected, hung, probes = asyncio.run(run())
    assert probes == 1 and "no answer within 0.5 s" in hung[0][1], hung
    assert stall <= detected <= stall + stall / 4 + stall + 0.5, detected     # + poll + probe bound (+ slack)
    print(f"watchdog: stall timeout {stall} s, declared hung {detected:.2f} s after the last token")


def test_a_busy_engine_whose_counter_stalls_but_answers_the_probe_is_not_hung(tmp_path, fake_python):
    """The launcher counts a request in flight that the engine never got (as in a long prefill,
    no token comes for it); the engine answers the probe: busy, not hung, watched on."""
    async def run():
        with FakeEngine(tmp_path, fake_python) as fake:
            engine = await fake.engine()
            watchdog, hung, task = watch(engine, 0.5, lambda: 1)
            await eventually_async(lambda: watchdog.probes >= 2, "two probes", 10)
            engine.ended = "stopped"
            await task
            return hung

    assert asyncio.run(run()) == []
