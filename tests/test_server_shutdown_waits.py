"""A waiting `POST /lanes/L/load` does not hold the server's exit: uvicorn waits for every open
request before it stops, and the load waited for ready or failed, which a lane stopped by the
shutdown never reaches (seen: `serve` still running 120 s after SIGTERM)."""

from __future__ import annotations

import threading

import httpx
import pytest

from serving import fake_lanes_env, serving

pytestmark = pytest.mark.engine


def test_sigterm_answers_a_waiting_load_and_exits(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {}, "b": {"ENV_FAKE_START_DELAY": "300"}})
    answers: list[httpx.Response] = []
    with serving(tmp_path, env, wait_ready_lane="a") as served:
        loading = threading.Thread(target=lambda: answers.append(
            httpx.post(served.url + "/lanes/b/load", timeout=120)))
        loading.start()
        served.wait_state("b", "starting")
        assert served.terminate(timeout=60) == 0
        loading.join(timeout=30)
    assert answers and answers[0].status_code == 503, answers
    assert answers[0].json()["error"]["code"] == "shutting_down"
