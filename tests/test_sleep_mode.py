"""Sleeping lanes (issue 13 What 1) with the fake engine, which speaks vLLM 0.12's sleep
endpoints: the routes match vLLM's own router; a SLEEP_LEVEL=1 lane is woken, not restarted; a
failed wake falls back to a cold start and serves; an engine that refuses --enable-sleep-mode
falls back to plain starts; the memory budget stops sleepers when a start needs the room; every
state shows in /lanes and the metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from closure_env import CLOSURE_PYTHON
from serving import CHAT, chat_body, metric_samples, serving, value
from sleep_lanes import DEVICE_GB, model_dir, one_awake_env, sleep_env
from vllm_launcher.config import ConfigError, load_config
from vllm_launcher.engine_command import build_engine_spec
from vllm_launcher.proxy import PROGRESS_AFTER
from vllm_launcher.router import lane_policy
from vllm_launcher.scheduler import LaneState
from vllm_launcher.vllm_info import VllmInfo

TESTS = Path(__file__).resolve().parent
SLEEP_ROUTES = {("/sleep", "POST"), ("/wake_up", "POST"), ("/is_sleeping", "GET")}


def starts(client, lane: str) -> float:
    return value(metric_samples(client.get("/metrics").text), "vllm_launcher_engine_starts_total", lane=lane)


def state_gauge(client, lane: str, state: str) -> float:
    return value(metric_samples(client.get("/metrics").text), "vllm_launcher_lane_state", lane=lane, state=state)


# ------------------------------------------------------------------ settings and command line


def test_sleep_level_setting_command_and_policy(tmp_path):
    model = model_dir(tmp_path, "m", 20)
    environ = {"VLLM_LANES": "a,b,c", "VLLM_MODEL": str(model), "VLLM_SLEEP_LEVEL": "1",
               "VLLM_LANE_B_SLEEP_LEVEL": "2", "VLLM_LANE_C_SLEEP_LEVEL": "0",
               "VLLM_GPU_MEMORY_UTILIZATION": "0.5", "VLLM_GPU_MEMORY_GB": str(DEVICE_GB),
               "VLLM_SLEEP_OVERHEAD_GB": "2"}
    config = load_config(environ)
    assert config.server.switch_max_wait == 120.0
    vllm = VllmInfo("vllm", "0.12.0+rocm711")
    for lane, asleep in (("a", True), ("b", True), ("c", False)):
        spec = build_engine_spec(config, lane, vllm, uds="/tmp/x.sock", api_key="k")
        assert ("--enable-sleep-mode" in spec.argv) is asleep
        assert (spec.env.get("VLLM_SERVER_DEV_MODE") == "1") is asleep
    plain = build_engine_spec(config, "a", vllm, uds="/tmp/x.sock", api_key="k", sleep_mode=False)
    assert "--enable-sleep-mode" not in plain.argv and "VLLM_SERVER_DEV_MODE" not in plain.env
    policies = {lane: lane_policy(config.lane(lane), config) for lane in "abc"}
    assert policies["a"].sleep_level == 1 and policies["a"].sleep_share == pytest.approx(0.2)   # 20 of 100 GB
    assert policies["b"].sleep_level == 2 and policies["b"].sleep_share == pytest.approx(0.02)  # 2 GB overhead
    assert policies["c"].sleep_level == 0 and policies["c"].sleep_share == 0
    for variable in ("VLLM_SLEEP_LEVEL", "VLLM_LANE_A_SLEEP_LEVEL"):
        with pytest.raises(ConfigError) as error:
            load_config({"VLLM_LANES": "a", "VLLM_MODEL": "org/m", variable: "3"})
        assert variable in str(error.value)


def test_bad_sleep_level_exits_2_naming_the_variable():
    answer = subprocess.run([sys.executable, "-m", "vllm_launcher", "config"], capture_output=True, text=True,
                            env={**os.environ, "VLLM_MODEL": "org/m", "VLLM_LANE_DEFAULT_SLEEP_LEVEL": "high"})
    assert answer.returncode == 2 and "VLLM_LANE_DEFAULT_SLEEP_LEVEL" in answer.stderr, answer


# ------------------------------------------------------------------ the fake's routes against vLLM 0.12's

VLLM_ROUTES = """
import json
from vllm.entrypoints.openai import api_server
print(json.dumps(sorted([route.path, method] for route in api_server.router.routes
                        for method in getattr(route, "methods", None) or ())))
"""


def fake_routes(dev_mode: bool, sleep_mode: bool) -> set[tuple[str, str]]:
    code = ("import json, fake_engine; app = fake_engine.build_app('s', 'm', %r); "
            "print(json.dumps(sorted([r.path, m] for r in app.routes for m in (r.methods or ()))))" % sleep_mode)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    env.pop("VLLM_SERVER_DEV_MODE", None)
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return {tuple(item) for item in json.loads(answer.stdout)}


@pytest.mark.closure
@pytest.mark.skipif(not CLOSURE_PYTHON.exists(), reason="no vLLM 0.12 closure (.venv-closure)")
def test_fake_sleep_routes_match_vllm_012_router():
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "VLLM_SERVER_DEV_MODE": "1",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_LOGGING_LEVEL": "ERROR"}
    answer = subprocess.run([str(CLOSURE_PYTHON), "-c", VLLM_ROUTES], capture_output=True, text=True, env=env,
                            timeout=300)
    assert answer.returncode == 0, answer.stderr[-3000:]
    vllm = {tuple(item) for item in json.loads(answer.stdout.strip().splitlines()[-1])}
    vllm_sleep = {(path, method) for path, method in vllm if path in {p for p, _ in SLEEP_ROUTES}}
    assert vllm_sleep == SLEEP_ROUTES, vllm_sleep
    fake = fake_routes(dev_mode=True, sleep_mode=True)
    assert {(p, m) for p, m in fake if p in {p for p, _ in SLEEP_ROUTES}} == vllm_sleep
    for dev_mode, sleep_mode in ((False, True), (True, False), (False, False)):
        assert not fake_routes(dev_mode, sleep_mode) & SLEEP_ROUTES


# ------------------------------------------------------------------ serving


@pytest.mark.engine
def test_a_level_1_lane_is_woken_not_restarted(tmp_path, fake_python):
    paths = tmp_path / "paths.log"
    env = one_awake_env(fake_python, tmp_path, ENV_FAKE_PATH_LOG=str(paths), ENV_FAKE_WAKE_DELAY=str(PROGRESS_AFTER + 0.5))
    with serving(tmp_path, env) as served, served.client() as client:
        for turn, lane in enumerate(("a", "b", "a", "b", "a")):
            answer = client.post(CHAT, json=chat_body(lane, stream=True))
            assert answer.status_code == 200 and "data: [DONE]" in answer.text, answer.text
            if turn in (2, 4):                # the waiting stream's comments say the lane wakes
                assert re.search(r": waiting for lane a \(starting, waking \(vLLM sleep mode\), \d+ s\)",
                                 answer.text), answer.text
            if lane == "b":
                lanes = served.lanes()
                assert lanes["a"]["state"] == "sleeping" and lanes["a"]["sleep"] == "level 1", lanes["a"]
                assert state_gauge(client, "a", "sleeping") == 1 and state_gauge(client, "a", "ready") == 0
                health = client.get("/health").json()
                assert health["lanes"]["a"] == "sleeping" and health["status"] == "ok", health
        assert starts(client, "a") == 1 and starts(client, "b") == 2
        lane = served.lanes()["a"]
        assert lane["state"] == "ready" and lane["last_wake_seconds"] is not None and lane["failures"] == 0, lane
        samples = metric_samples(client.get("/metrics").text)
        assert value(samples, "vllm_launcher_switch_phase_seconds_count", lane="a", phase="wake") == 2
        assert value(samples, "vllm_launcher_switch_phase_seconds_count", lane="a", phase="sleep") == 2
    calls = [line for line in paths.read_text().splitlines() if not line.startswith("GET /health")]
    assert [c for c in calls if "sleep" in c or "wake" in c] == [
        "POST /sleep?level=1", "POST /wake_up", "GET /is_sleeping"] * 2, calls


@pytest.mark.engine
def test_a_failed_wake_falls_back_to_a_cold_start(tmp_path, fake_python):
    env = one_awake_env(fake_python, tmp_path, ENV_FAKE_WAKE_FAIL="1")
    with serving(tmp_path, env) as served, served.client() as client:
        for lane in ("a", "b"):
            assert client.post(CHAT, json=chat_body(lane)).status_code == 200
        assert served.lanes()["a"]["state"] == "sleeping"
        answer = client.post(CHAT, json=chat_body("a"))          # wake fails: stopped, started cold
        assert answer.status_code == 200, answer.text
        lane = served.lanes()["a"]
        assert lane["state"] == "ready" and lane["sleep"].startswith("off (wake failed"), lane
        assert starts(client, "a") == 2 and lane["failures"] == 0
        assert client.post(CHAT, json=chat_body("b")).status_code == 200
        assert served.lanes()["a"]["state"] == "stopped"         # sleep mode off for good: stopped, not asleep


@pytest.mark.engine
def test_an_engine_refusing_sleep_mode_falls_back_to_plain_starts(tmp_path, fake_python):
    env = sleep_env(fake_python, tmp_path, {"a": {"SLEEP_LEVEL": "2", "ENV_FAKE_REFUSE_SLEEP_MODE": "1"}})
    with serving(tmp_path, env) as served, served.client() as client:
        answer = client.post(CHAT, json=chat_body("a"))
        assert answer.status_code == 200, answer.text
        lane = served.lanes()["a"]
        assert lane["sleep"].startswith("off (sleep failed: engine refused sleep mode"), lane
        assert "Sleep mode is not supported" in lane["sleep"]
        assert lane["state"] == "ready" and lane["failures"] == 0 and starts(client, "a") == 2
    assert served.log().count("refused sleep mode; the lane falls back") == 1


@pytest.mark.engine
def test_a_failed_sleep_stops_the_lane(tmp_path, fake_python):
    env = one_awake_env(fake_python, tmp_path, ENV_FAKE_SLEEP_FAIL="1")
    with serving(tmp_path, env) as served, served.client() as client:
        for lane in ("a", "b", "a"):
            assert client.post(CHAT, json=chat_body(lane)).status_code == 200
        lane = served.lanes()["a"]
        assert lane["sleep"].startswith("off (sleep failed"), lane
        assert starts(client, "a") == 2


@pytest.mark.engine
def test_the_budget_stops_sleepers_when_a_start_needs_the_room(tmp_path, fake_python):
    """Shares 0.45, sleepers 0.2 each (20 of 100 GB), budget 0.8: a sleeper beside an awake lane
    fits (0.65), two do not (0.85), so the least recently used sleeper is stopped."""
    lanes = {name: {"SLEEP_LEVEL": "1", "weights_gb": "20"} for name in ("a", "b", "c")}
    env = sleep_env(fake_python, tmp_path, lanes, VLLM_GPU_MEMORY_UTILIZATION="0.45", VLLM_GPU_MEMORY_BUDGET="0.8")
    with serving(tmp_path, env) as served, served.client() as client:
        for lane in ("a", "b"):
            assert client.post(CHAT, json=chat_body(lane)).status_code == 200
        assert {k: v["state"] for k, v in served.lanes().items()} == {"a": "sleeping", "b": "ready", "c": "stopped"}
        assert client.post(CHAT, json=chat_body("c")).status_code == 200
        states = {k: v["state"] for k, v in served.lanes().items()}
        assert states == {"a": "stopped", "b": "sleeping", "c": "ready"}, states
        for lane, state in states.items():
            assert state_gauge(client, lane, state) == 1
        assert client.post(CHAT, json=chat_body("b")).status_code == 200      # woken, not started
        assert starts(client, "b") == 1 and starts(client, "a") == 1
        samples = metric_samples(client.get("/metrics").text)
        for lane in "abc":                    # the gauge has a sample for every state of every lane
            assert [value(samples, "vllm_launcher_lane_state", lane=lane, state=state.value)
                    for state in LaneState].count(1) == 1
            assert all(("vllm_launcher_lane_state", (("lane", lane), ("state", state.value))) in samples
                       for state in LaneState)
