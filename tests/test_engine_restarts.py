"""Restart rules with the fake engine: an engine that served well before it crashed is restarted
(for ever, with back-off); only VLLM_ENGINE_MAX_RESTARTS consecutive crash loops (a failed start,
or a crash before the engine finished 3 requests) make a lane `failed`; the server's own
EMFILE never counts."""

from __future__ import annotations

import asyncio
import errno
import time

import httpx
import pytest

from serving import CHAT, chat_body, fake_lanes_env, metric_samples, serving, value
from vllm_launcher.config import load_config
from vllm_launcher.engines import sockets_dir
from vllm_launcher.engines.process import resource_error
from vllm_launcher.metrics import Metrics
from vllm_launcher.router import Router
from vllm_launcher.scheduler import LaneState
from vllm_launcher.vllm_info import VllmInfo

pytestmark = pytest.mark.engine

DIE_AFTER_TOKENS = 30          # a request for more tokens than this kills the engine mid-request


def test_an_engine_crashing_every_20_requests_keeps_serving(tmp_path, fake_python):
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_DIE_AFTER_TOKENS": str(DIE_AFTER_TOKENS)}},
                         VLLM_ENGINE_MAX_RESTARTS="2")
    crashes = 6                # three times the limit: none of them is a crash loop
    with serving(tmp_path, env, wait_ready_lane="a") as served, served.client() as client:
        for crash in range(crashes):
            for _ in range(19):
                answer = client.post(CHAT, json=chat_body("a"))      # waits for the restart if needed
                assert answer.status_code == 200, (crash, answer.text)
            killer = client.post(CHAT, json=chat_body("a", max_tokens=DIE_AFTER_TOKENS + 5))
            assert killer.status_code == 502 and killer.json()["error"]["code"] == "engine_crashed", killer.text
        assert client.post(CHAT, json=chat_body("a")).status_code == 200
        lane = served.lanes()["a"]
        assert lane["state"] == "ready" and lane["failures"] == 1 and lane["restarts"] == crashes, lane
        for _ in range(2):                    # three requests served: the last crash was no crash loop
            assert client.post(CHAT, json=chat_body("a")).status_code == 200
        assert served.lanes()["a"]["failures"] == 0
        samples = metric_samples(client.get("/metrics").text)
        assert value(samples, "vllm_launcher_engine_starts_total", lane="a") == crashes + 1


def test_a_crash_loop_fails_the_lane(tmp_path, fake_python):
    """Two failed starts, then an engine that dies on its first request: three crash loops in a
    row with VLLM_ENGINE_MAX_RESTARTS=3, so the lane is failed and says why."""
    counter = tmp_path / "starts"
    env = fake_lanes_env(fake_python, {"a": {"ENV_FAKE_FAIL_STARTS": f"2:{counter}", "ENV_FAKE_DIE_AFTER_TOKENS": "1"}},
                         VLLM_ENGINE_MAX_RESTARTS="3")
    with serving(tmp_path, env) as served, served.client() as client:
        began = time.monotonic()
        answer = client.post(CHAT, json=chat_body("a"))      # waits through two failed starts
        assert answer.status_code == 502 and answer.json()["error"]["code"] == "engine_crashed", answer.text
        lane = served.wait_state("a", "failed") if served.lanes()["a"]["state"] != "failed" else served.lanes()["a"]
        assert lane["failures"] == 3 and "exited with status 9" in lane["last_error"], lane
        assert counter.read_text() == "3"
        refused = client.post(CHAT, json=chat_body("a"))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "lane_failed"
        print(f"crash loop: lane failed after {time.monotonic() - began:.1f} s (back-off 1 + 2 s)")


def test_emfile_is_recognised_through_httpx_errors():
    try:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as error:
            raise httpx.ConnectError("[Errno 24] Too many open files") from error
    except httpx.ConnectError as wrapped:
        assert resource_error(wrapped)
    assert not resource_error(httpx.ConnectError("[Errno 111] Connection refused"))
    assert not resource_error(OSError(errno.ENOENT, "No such file"))


def test_the_servers_own_emfile_does_not_count_toward_failed(tmp_path, fake_python, monkeypatch):
    """In-process router: spawning the engine fails with EMFILE three times (more than
    VLLM_ENGINE_MAX_RESTARTS=2); the lane backs off and then starts, never `failed`."""
    environ = {**fake_lanes_env(fake_python, {"a": {}}, VLLM_ENGINE_MAX_RESTARTS="2", VLLM_STOP_TIMEOUT="5"),
               "TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    config = load_config(environ)
    real_spawn = asyncio.create_subprocess_exec
    spawns = []

    async def short_of_descriptors(*args, **kwargs):
        spawns.append(args[0])
        if len(spawns) <= 3:
            raise OSError(errno.EMFILE, "Too many open files")
        return await real_spawn(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", short_of_descriptors)

    async def run():
        metrics = Metrics()
        router = Router(config, VllmInfo("vllm", "0.32.0"), metrics, sockets=sockets_dir(tmp_path / "run"))
        states = []
        router.state_listeners.append(lambda lane, state, reason: states.append(state))
        await router.start(preload="a")
        try:
            state = await asyncio.wait_for(router.wait_lane("a", {LaneState.READY, LaneState.FAILED}), 60)
            return state, states, router.lane_status("a"), metrics
        finally:
            await router.close()

    state, states, status, metrics = asyncio.run(run())
    assert len(spawns) == 4 and state == LaneState.READY, (spawns, states, status)
    assert "failed" not in states and status["failures"] == 0
    sample = metrics.registry.get_sample_value
    assert sample("vllm_launcher_engine_starts_total", {"lane": "a"}) == 4
    assert not sample("vllm_launcher_engine_start_failures_total", {"lane": "a"})      # none counted
