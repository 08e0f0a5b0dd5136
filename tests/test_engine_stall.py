"""The stalled-engine watchdog (issue 23 point 2) through the real server with fake engines that
stop producing tokens while /health and /metrics keep answering (FAKE_STALL_AFTER): the hung
engine is detected and replaced within VLLM_ENGINE_STALL_TIMEOUT + poll + probe bound (+ stop,
back-off and start); requests none of whose engine output had reached the client are answered
after the restart, a started stream ends with an SSE error, the lane serves again; an engine that
hangs again at once makes the lane suspect the GPU; a slow engine that produces is never probed.
The real vLLM's /metrics has the counters the watchdog reads."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time

import pytest

from serving import CHAT, chat_body, fake_lanes_env, metric_samples, serving, value
from vllm_launcher.config import load_config
from vllm_launcher.engine_command import build_engine_spec
from vllm_launcher.engines.watchdog import read_progress
from vllm_launcher.router import lane_policy
from vllm_launcher.vllm_info import VllmInfo
from waiting import eventually

STALL = 1.0                  # VLLM_ENGINE_STALL_TIMEOUT here: poll 0.25 s, probe bound 1 s


def hangs(served) -> float:
    with served.client() as client:
        return value(metric_samples(client.get("/metrics").text), "vllm_launcher_engine_hangs_total", lane="a")


def log_time(line: str) -> float:
    """A log line's time of day in seconds."""
    hours, minutes, seconds = re.match(r"\S+ (\d+):(\d+):(\d+,\d+)", line).groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds.replace(",", "."))


@pytest.mark.engine
def test_a_stalled_engine_is_replaced_and_its_unanswered_requests_are_answered(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_STALL_AFTER": "3", "ENV_FAKE_TOKEN_DELAY": "0.05",
                                             "ENGINE_STALL_TIMEOUT": str(STALL)}}, VLLM_STOP_TIMEOUT="2")
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client(timeout=60) as client:
        with client.stream("POST", CHAT, json=chat_body("a", stream=True, max_tokens=400)) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))     # engine output reached us
            assert "choices" in first
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                # the third request stalls the engine; neither of these has had any output
                waiting = [pool.submit(client.post, CHAT, json=chat_body("a", max_tokens=3)) for _ in range(2)]
                stalled_at = time.monotonic()
                rest = list(lines)
                cut_after = time.monotonic() - stalled_at
                answers = [future.result() for future in waiting]
        events = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
        assert events and "error" in events[-1], rest[-3:]
        error = events[-1]["error"]
        assert error["code"] == "engine_hung" and "no token generated" in error["message"], error
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        answered_after = time.monotonic() - stalled_at
        assert hangs(served) == 1
        lane = served.wait_state("a", "ready")          # serving again: the new engine answered both
        assert "hung" in lane["last_error"] and "GPU hang" not in lane["last_error"], lane
        log = served.log()
    hung_line = next(line for line in log.splitlines() if "hung: no token generated" in line)
    ready_lines = [line for line in log.splitlines() if "lane a: starting -> ready" in line]
    replaced = log_time(ready_lines[-1]) - log_time(hung_line)
    # detection: stall timeout + one poll + the probe's bound, with a second to spare on this machine
    assert cut_after <= STALL + 0.25 + 1.0 + 1.0, cut_after
    assert replaced <= 2 + 1 + 5, replaced          # SIGTERM to SIGKILL (2 s) + back-off (1 s) + a start
    print(f"stall: stream cut {cut_after:.2f} s after the stall, hung engine replaced (ready again) "
          f"{replaced:.2f} s after it was declared hung, unanswered requests answered {answered_after:.2f} s after "
          f"the stall")


@pytest.mark.engine
def test_an_engine_that_hangs_again_at_once_makes_the_lane_suspect_the_gpu(tmp_path, fake_python):
    """Every engine stalls at its first request: the request goes back in line once, hangs the
    second engine too and is failed saying so; the lane's error names the GPU checks."""
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_STALL_AFTER": "1", "ENGINE_STALL_TIMEOUT": str(STALL)}},
                         VLLM_STOP_TIMEOUT="2")
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client(timeout=60) as client:
        answer = client.post(CHAT, json=chat_body("a"))
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "hung_twice" and "hung" in error["message"], error
        assert "GPU hang is suspected" in error["message"] and "cwsr_enable=0" in error["message"], error
        assert hangs(served) == 2
        lane = served.lanes()["a"]
        assert lane["state"] != "failed" and "mes_fw_version" in lane["last_error"], lane


@pytest.mark.engine
def test_a_slow_engine_that_produces_tokens_is_never_declared_hung(tmp_path, fake_python):
    """Tokens every 0.3 s, a non-streaming answer of 4.8 s (nothing reaches the client until it
    ends), a stall timeout of 1 s: the counter moves, so the engine is never even probed."""
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_TOKEN_DELAY": "0.3", "ENGINE_STALL_TIMEOUT": str(STALL)}})
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client(timeout=60) as client:
        began = time.monotonic()
        answer = client.post(CHAT, json=chat_body("a", max_tokens=16))
        took = time.monotonic() - began
        assert answer.status_code == 200 and took >= 4 * STALL, (answer.text, took)
        assert hangs(served) == 0
        log = served.log()
    assert "probe" not in log and "hung" not in log, log[-2000:]


def test_the_engine_keeps_room_for_the_probe_beyond_the_dispatch_limit(tmp_path):
    """MAX_NUM_SEQS is the lane's dispatch limit; its engine gets one sequence more, the probe's."""
    config = load_config({"VLLM_LANES": "a", "VLLM_LANE_A_MODEL": "org/a-model", "VLLM_LANE_A_MAX_NUM_SEQS": "8"})
    argv = build_engine_spec(config, "a", VllmInfo("vllm", "0.32.0"), uds=str(tmp_path / "a.sock")).argv
    assert argv[argv.index("--max-num-seqs") + 1] == "9"
    assert lane_policy(config.lane("a"), config).max_inflight == 8


@pytest.mark.e2e
def test_real_vllm_exposes_the_counters_the_watchdog_reads(demo_served):
    """vLLM's own /metrics (re-exposed by the front server with a lane label) has the generation
    token counter and the running gauge; the counter moves with a generation."""
    served = demo_served

    def progress() -> float | None:
        with served.client() as client:
            text = client.get("/metrics").text
        assert 'vllm:num_requests_running{lane="alpha"' in text
        engine = "\n".join(line for line in text.splitlines() if 'lane="alpha"' in line or line.startswith("#"))
        return read_progress(engine)[0]

    before = progress()
    with served.client(timeout=300) as client:
        assert client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 5}).status_code == 200
    assert before is not None
    eventually(lambda: (progress() or 0) > before, "vllm:generation_tokens_total to move", 30)
