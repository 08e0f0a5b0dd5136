"""The stalled-engine watchdog (issue 23 point 2): a GPU that hangs leaves the engine process
alive and its /health answering while no token comes (gfx1151 under sustained load, ROCm issue
6165; MES firmware 0x83, issue 5724). Progress is judged by the engine's own counters, not by
bytes to clients (a non-streaming request sends nothing until it ends):

* every ``poll`` seconds the engine's /metrics is read: vLLM's ``vllm:generation_tokens_total``
  (the counter ``vllm:generation_tokens`` in vLLM 0.12 and 0.32, v1/metrics/loggers.py; summed
  over its ``engine`` labels) and ``vllm:prompt_tokens_total`` (a pooling request generates
  nothing) as progress, ``vllm:num_requests_running`` as work;
* while the lane has requests in flight (or the engine says it runs some) and neither counter
  moved for ``stall_timeout`` (VLLM_ENGINE_STALL_TIMEOUT; a /metrics that does not answer is no
  progress), the engine is probed: a one-token completion (an embedding when the engine refuses
  completions: a pooling model) on a fresh connection, not through the request pool; the lane's
  dispatch limit leaves it room in the engine's batch;
* an answer within ``probe_timeout`` (min(60 s, stall_timeout)) means busy, not hung (a long
  prefill): the clock starts again. No answer: the engine is declared hung (``on_hung``); the
  router logs and counts it, and the scheduler's preemption rule and restart rule take over.

A slow engine that produces tokens is never probed. Detection takes at most
stall_timeout + poll + probe_timeout after the last token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .process import EngineProcess, engine_client

log = logging.getLogger("vllm_launcher.watchdog")

PROGRESS = ("vllm:generation_tokens_total", "vllm:prompt_tokens_total")
RUNNING = "vllm:num_requests_running"
PROBE_BOUND = 60.0          # seconds a probe may take at most, whatever the stall timeout
POLL_BOUND = 5.0            # seconds between two reads of /metrics at most
PROBE_ID = "launcher-probe-"

# What the lane's error says when an engine hangs again with nothing served since the last hang.
GPU_HANG_HINT = (
    "a GPU hang is suspected (the engine hung again at once): check the MES firmware "
    "(/sys/class/drm/card*/device/fw_version/mes_fw_version; 0x83 hangs on gfx1151, ROCm issue 5724: go "
    "back to 0x80) and boot with amdgpu.cwsr_enable=0 (ROCm issues 5590/5991; NixOS: "
    "services.vllm.strixHalo.disableCwsr); `vllm-launcher check` reads both"
)


def probe_timeout(stall_timeout: float) -> float:
    return min(PROBE_BOUND, stall_timeout)


def hung_cause(lane: str, stalled: float, probe: str, again: bool) -> str:
    cause = (f"engine for lane {lane!r} hung: no token generated for {stalled:.0f} s with requests in flight "
             f"(VLLM_ENGINE_STALL_TIMEOUT) and the one-token probe {probe}")
    return f"{cause}; {GPU_HANG_HINT}" if again else cause


def read_progress(text: str) -> tuple[float | None, float]:
    """(progress: the sum of the progress counters, None when the engine exposes none; requests
    running) from a Prometheus exposition."""
    progress: float | None = None
    running = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in PROGRESS:
                progress = (progress or 0.0) + sample.value
            elif sample.name == RUNNING:
                running += sample.value
    return progress, running


class Watched(Protocol):
    """What the watchdog reads of a ready engine (supervisor.Engine, which imports this module)."""
    lane: str
    process: EngineProcess
    client: httpx.AsyncClient
    ended: str | None

    async def get(self, path: str, timeout: float = ...) -> httpx.Response: ...


class Watchdog:
    """Watches one ready engine until it ends (``engine.ended``) or is declared hung."""

    def __init__(self, engine: Watched, served_name: str, stall_timeout: float, inflight: Callable[[], int],
                 on_hung: Callable[[float, str], None], poll: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.served_name = served_name
        self.stall_timeout = stall_timeout
        self.probe_timeout = probe_timeout(stall_timeout)
        self.poll = poll if poll is not None else min(POLL_BOUND, stall_timeout / 4)
        self.inflight = inflight
        self.on_hung = on_hung
        self.clock = clock
        self.probes = 0

    async def run(self) -> None:
        last: float | None = None
        since = self.clock()
        while self.engine.ended is None:
            await asyncio.sleep(self.poll)
            if self.engine.ended is not None:
                return
            progress, running = await self._read()
            now = self.clock()
            if progress is not None and progress != last:
                last, since = progress, now
                continue
            if not (self.inflight() > 0 or running > 0):
                since = now              # nothing to do is no stall
                continue
            if now - since < self.stall_timeout:
                continue
            stalled = now - since
            answered, what = await self._probe()
            if self.engine.ended is not None:
                return
            if answered:
                log.info("lane %s: no token for %.0f s but the probe was answered (%s): busy, not hung",
                         self.engine.lane, stalled, what)
                since = self.clock()
                continue
            self.on_hung(self.clock() - since, what)
            return

    async def _read(self) -> tuple[float | None, float]:
        try:
            response = await self.engine.get("/metrics", timeout=min(POLL_BOUND, self.stall_timeout))
            if response.status_code == 200:
                return read_progress(response.text)
        except (httpx.HTTPError, RuntimeError, ValueError):
            pass
        return None, 0.0             # no answer: no progress seen, work unknown

    async def _probe(self) -> tuple[bool, str]:
        """A one-token generation on a fresh connection: (answered in time, what happened)."""
        self.probes += 1
        headers = {**self.engine.client.headers, "X-Request-Id": f"{PROBE_ID}{self.probes}"}
        began = self.clock()
        try:
            async with engine_client(self.engine.process.socket_path, headers=headers,
                                     timeout=httpx.Timeout(self.probe_timeout)) as client:
                async with asyncio.timeout(self.probe_timeout):
                    answer = await client.post("/v1/completions", json={
                        "model": self.served_name, "prompt": "ping", "max_tokens": 1})
                    if 400 <= answer.status_code < 500:        # no completions here (a pooling model)
                        answer = await client.post("/v1/embeddings", json={"model": self.served_name,
                                                                           "input": "ping"})
        except (TimeoutError, httpx.TimeoutException):
            return False, f"had no answer within {self.probe_timeout:g} s"
        except httpx.HTTPError as error:
            return False, f"failed: {error or type(error).__name__}"
        took = self.clock() - began
        if answer.status_code >= 500:
            return False, f"was answered {answer.status_code} after {took:.1f} s"
        return True, f"answered {answer.status_code} in {took:.1f} s"
