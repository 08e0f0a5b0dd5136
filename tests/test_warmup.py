"""A lane's warm-up (engines/warmup.py) with fake engines, through the real server: sent after
/health and before the lane is ready or its queue dispatched, of the lane's kind, its own phase
in /lanes and the switch-phase metric; refused: ready anyway; an engine that dies or hangs in it
failed to start; a woken lane is not warmed again. The compile cost it takes away is measured
with real vLLM 0.12 in tests/test_e2e_vllm012.py."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from serving import CHAT, chat_body, fake_lanes_env, metric_samples, serving, start_server, value
from sleep_lanes import one_awake_env

pytestmark = pytest.mark.engine

FIRST_DELAY = 2.0       # the fake engine's "compilation" on its first generation (FAKE_FIRST_DELAY)
CHAT_WARMUP = ["warmup POST /v1/chat/completions", "warmup POST /v1/chat/completions stream"]


def posts(log) -> list[str]:
    return [line for line in log.read_text().splitlines() if "POST" in line] if log.exists() else []


def timed_chat(client: httpx.Client, lane: str) -> float:
    began = time.monotonic()
    answer = client.post(CHAT, json=chat_body(lane))
    assert answer.status_code == 200 and answer.json()["model"] == lane, answer.text
    return time.monotonic() - began


def test_the_warm_up_comes_before_ready_and_before_the_queue_and_takes_the_first_use_cost(tmp_path, fake_python):
    log = tmp_path / "engine.log"
    lanes = {"a": {"ENV_FAKE_FIRST_DELAY": str(FIRST_DELAY), "ENV_FAKE_START_DELAY": "1",
                   "ENV_FAKE_PATH_LOG": str(log), "ENV_FAKE_WARMUP_LOG": str(log)},
             "b": {"ENV_FAKE_FIRST_DELAY": str(FIRST_DELAY), "WARMUP": "off", "ENV_FAKE_WARMUP_LOG": str(log)}}
    served = start_server(tmp_path, fake_lanes_env(fake_python, lanes))
    try:
        answered = {}
        queued = threading.Thread(target=lambda: answered.update(status=httpx.post(
            served.url + CHAT, json=chat_body("a"), timeout=60).status_code))
        queued.start()                                   # sent while lane a starts: it waits in the queue
        served.wait_queue("a", 1, timeout=30)
        starting = served.lanes()["a"]
        assert starting["state"] == "starting", starting
        queued.join(60)
        assert answered == {"status": 200}
        assert posts(log) == [*CHAT_WARMUP, f"POST {CHAT}"]      # warmed up, then the queue dispatched
        view = served.lanes()["a"]
        phases = view["last_start_phases"]
        assert phases["warmup_kind"] == "chat" and phases["warmup"] >= FIRST_DELAY, phases
        with served.client() as client:
            assert timed_chat(client, "a") < FIRST_DELAY / 2          # the first use was the warm-up's
            samples = metric_samples(client.get("/metrics").text)
            assert value(samples, "vllm_launcher_switch_phase_seconds_count", lane="a", phase="warmup") == 1
            assert value(samples, "vllm_launcher_switch_phase_seconds_sum", lane="a", phase="warmup") >= FIRST_DELAY
            assert value(samples, "vllm_launcher_requests_total", lane="a", status="200") == 2   # users' only
            # b, warm-up off: ready at /health, and its first user pays the first use
            assert client.post("/lanes/b/load").status_code == 200
            served.wait_state("b", "ready")
            assert served.lanes()["b"]["last_start_phases"]["warmup_kind"] == "off"
            assert timed_chat(client, "b") >= FIRST_DELAY
            assert value(metric_samples(client.get("/metrics").text), "vllm_launcher_switch_phase_seconds_count",
                         lane="b", phase="warmup") == 0
        assert "warmup POST" not in " ".join(posts(log)[3:])             # none for b
    finally:
        assert served.terminate() == 0


@pytest.mark.parametrize("task,kind,sent", [
    ("base", "completion", ["warmup POST /v1/chat/completions", "warmup POST /v1/completions",
                            "warmup POST /v1/completions stream"]),
    ("pooling", "embedding", ["warmup POST /v1/chat/completions", "warmup POST /v1/completions",
                              "warmup POST /v1/embeddings"]),
    # vLLM 0.12 answers a pooling model's chat and completion 200 with an error body (seen with
    # --runner pooling --convert embed): still refusals, not a warm engine
    ("pooling-0.12", "embedding", ["warmup POST /v1/chat/completions", "warmup POST /v1/completions",
                                   "warmup POST /v1/embeddings"]),
])
def test_a_lane_without_a_chat_template_and_a_pooling_lane_are_warmed_by_their_kind(tmp_path, fake_python, task,
                                                                                     kind, sent):
    log = tmp_path / "warmups.log"
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_TASK": task, "ENV_FAKE_WARMUP_LOG": str(log)}})
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        assert served.lanes()["a"]["last_start_phases"]["warmup_kind"] == kind
        assert posts(log) == sent
        assert "refused before " + kind in served.log()                  # the refusals are logged


def test_a_refused_warm_up_is_logged_and_the_lane_is_ready_anyway(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_WARMUP": "refuse"}})
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        assert served.lanes()["a"]["last_start_phases"]["warmup_kind"] == "refused by the engine"
        assert "the engine refused every warm-up" in served.log() and "FAKE_WARMUP=refuse" in served.log()
        assert client.post(CHAT, json=chat_body("a")).status_code == 200


@pytest.mark.parametrize("fault,said", [
    ("die", "exited with status 9 during its warm-up"),
    ("hang", "did not answer its warm-up (POST /v1/chat/completions) within VLLM_START_TIMEOUT"),
])
def test_an_engine_that_dies_or_hangs_in_its_warm_up_failed_to_start(tmp_path, fake_python, fault, said):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_WARMUP": fault}},
                         VLLM_START_TIMEOUT="4", VLLM_ENGINE_MAX_RESTARTS="1")
    with serving(tmp_path, env) as served, served.client() as client:
        began = time.monotonic()
        answer = client.post(CHAT, json=chat_body("a"), timeout=60)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "lane_failed", answer.text
        assert said in answer.json()["error"]["message"], answer.text
        assert time.monotonic() - began < 4 + 10            # the hang is bounded by VLLM_START_TIMEOUT
        lane = served.lanes()["a"]
        assert lane["state"] == "failed" and said in lane["last_error"], lane
        assert value(metric_samples(client.get("/metrics").text), "vllm_launcher_engine_start_failures_total",
                     lane="a") == 1


def test_a_lane_woken_from_sleep_is_not_warmed_again(tmp_path, fake_python):
    log = tmp_path / "warmups.log"
    env = one_awake_env(fake_python, tmp_path, ENV_FAKE_WARMUP_LOG=str(log))
    with serving(tmp_path, env) as served, served.client() as client:
        for lane in ("a", "b", "a"):
            assert client.post(CHAT, json=chat_body(lane)).status_code == 200
        lane = served.lanes()["a"]
        assert lane["state"] == "ready" and lane["last_wake_seconds"] is not None, lane
        samples = metric_samples(client.get("/metrics").text)
        assert value(samples, "vllm_launcher_engine_starts_total", lane="a") == 1
        assert value(samples, "vllm_launcher_switch_phase_seconds_count", lane="a", phase="wake") == 1
        assert posts(log) == CHAT_WARMUP                 # one start, one warm-up; the wake sent none
