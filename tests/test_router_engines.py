"""The router and a supervised fake engine in-process: a request gets the Engine it was
dispatched to, and an engine's exit reaches the scheduler and ends the requests on it before
the engine's pool is closed."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from serving import fake_lanes_env
from vllm_launcher.config import load_config
from vllm_launcher.engines import Engine, sockets_dir
from vllm_launcher.router import Router
from vllm_launcher.scheduler import LaneState
from vllm_launcher.vllm_info import VllmInfo
from waiting import eventually_async

pytestmark = pytest.mark.engine


def test_an_exit_reaches_the_scheduler_and_the_requests_before_the_pool_closes(tmp_path, fake_python):
    environ = {**fake_lanes_env(fake_python, {"a": {}}, VLLM_STOP_TIMEOUT="5"), "TMPDIR": str(tmp_path),
               "PATH": "/usr/bin:/bin"}
    config = load_config(environ)

    async def run():
        router = Router(config, VllmInfo("vllm", "0.32.0"), sockets=sockets_dir(tmp_path / "run"))
        await router.start(preload="a")
        try:
            assert await asyncio.wait_for(router.wait_lane("a", {LaneState.READY, LaneState.FAILED}), 60) \
                == LaneState.READY
            ticket = router.admit("a")
            engine = await ticket.decided
            assert isinstance(engine, Engine) and engine.lane == "a" and ticket.engine is engine
            at_close = {}
            close_pool = engine.client.aclose

            async def recording_close():
                at_close["state"] = router.lane_state("a")
                at_close["request"] = ticket.aborted.result().code if ticket.aborted.done() else None
                await close_pool()

            engine.client.aclose = recording_close
            os.killpg(engine.process.pgid, signal.SIGKILL)
            error = await asyncio.wait_for(ticket.aborted, 10)
            await eventually_async(lambda: at_close, "the engine's pool closed after its exit", 10, 0.01)
            router.finish(ticket, error.status)
            return error, at_close, engine.ended
        finally:
            await router.close()

    error, at_close, ended = asyncio.run(run())
    assert error.status == 502 and error.code == "engine_crashed" and "exited with status -9" in error.message
    assert at_close == {"state": LaneState.STOPPED, "request": "engine_crashed"}, at_close
    assert ended.startswith("engine for lane 'a' exited")
