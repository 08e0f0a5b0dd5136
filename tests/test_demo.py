"""`make demo`: two tiny lanes served by real vLLM (the run's shared demo_served,
tests/real_engine.py), answering concurrent clients on both lanes across a switch each way; a
second run installs nothing again.

Issue 21 on the same server: lane beta runs with max_num_seqs 2 (lanes_env), so the launcher passes
--max-num-seqs 2 and sends its engine at most 2 requests; the rest of beta's backlog waits in the
launcher, and a lane asked for meanwhile is served too."""

from __future__ import annotations

import concurrent.futures
import contextlib
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from measurements import record
from real_engine import START_TIMEOUT, requires_vllm
from serving import metric_samples, value
from waiting import eventually

pytestmark = [pytest.mark.e2e, requires_vllm]
ROOT = Path(__file__).resolve().parent.parent


def test_second_make_demo_installs_nothing():
    stamp = ROOT / ".venv" / ".installed"
    if not stamp.exists():
        pytest.skip("the environment was not installed by `make` (.venv/.installed missing)")
    plan = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "pip" not in plan and "-m venv" not in plan, plan
    assert "vllm_launcher demo" in plan


def test_demo_serves_both_lanes_to_concurrent_clients_and_keeps_betas_backlog_in_the_launcher(demo_served):
    """8 concurrent chats for beta (a switch from alpha, the demo's first lane), and 8 for alpha
    once beta is loaded and its backlog waits in the launcher (a switch back): all 16 answered, each
    by its lane; /lanes showed the launcher-side backlog (beta ready, at most 2 in its engine, the
    rest in the launcher's queue). One test for the switches both ways, with concurrent clients, and
    the backlog: each switch is a real engine start (30-40 s)."""
    served = demo_served
    assert f"curl -s {served.url}/v1/chat/completions" in served.log()
    assert (served.log_path.parent / "demo" / "models" / "alpha" / "config.json").exists()
    if served.lanes()["alpha"]["state"] != "ready":        # run after tests that left beta loaded
        with served.client(timeout=START_TIMEOUT) as http:
            assert http.post("/lanes/alpha/load").status_code == 200
    cold_start = served.lanes()["alpha"]["last_start_seconds"]
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
        # beta's are long enough (ignore_eos) to keep a backlog visible, short enough that it drains
        # within VLLM_SWITCH_MAX_WAIT (5 s) of alpha's requests: no third switch back to beta
        response = httpx.post(served.url + "/v1/chat/completions", timeout=START_TIMEOUT * 3, json={
            "model": lane, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": tokens,
            "ignore_eos": True})
        return response.status_code, response.json().get("model")

    began = time.monotonic()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            betas = [pool.submit(ask, "beta", 128) for _ in range(8)]
            # alpha is asked for once beta is loaded and its backlog waits in the launcher
            eventually(lambda: any(s["beta"]["state"] == "ready" and s["beta"]["queue_depth"] > 0 for s in seen),
                       lambda: f"beta loaded with a backlog ({len(seen)} samples; answers so far: "
                               f"{[f.result() for f in betas if f.done()]}): {seen[-1:]}", START_TIMEOUT)
            alphas = [pool.submit(ask, "alpha", 4) for _ in range(8)]
            results = [f.result() for f in betas + alphas]
    finally:
        stop.set()
        watcher.join()
    assert results == [(200, "beta")] * 8 + [(200, "alpha")] * 8, results
    backlog = [s["beta"] for s in seen if s["beta"]["state"] == "ready" and s["beta"]["queue_depth"] > 0]
    assert backlog and all(lane["inflight"] <= 2 for lane in backlog), backlog[:5]
    assert all(s["beta"]["inflight"] <= 2 for s in seen)
    assert {lane["max_inflight"] for lane in backlog} == {2}
    lanes = served.lanes()
    assert lanes["alpha"]["state"] == "ready"
    with served.client() as http:
        samples = metric_samples(http.get("/metrics").text)
    assert value(samples, "vllm_launcher_engine_starts_total", lane="beta") >= 1
    assert value(samples, "vllm_launcher_requests_total", lane="beta", status="200") >= 8
    assert any(name.startswith("vllm:") and dict(labels).get("lane") == "alpha" for name, labels in samples)
    record(f"make demo: alpha start {cold_start:.1f} s; 8 chats for beta, then 8 for "
           f"alpha: {time.monotonic() - began:.1f} s (switch to beta {lanes['beta']['last_switch_seconds']:.1f} s, "
           f"back to alpha {lanes['alpha']['last_switch_seconds']:.1f} s); beta max_num_seqs 2, its "
           f"launcher-side queue up to {max(lane['queue_depth'] for lane in backlog)}")
