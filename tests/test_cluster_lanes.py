"""Multi-node lanes in the server, in-process with a fake cluster query (no Ray): a lane that
needs more GPUs than this machine has waits for the cluster's nodes, showing it in /lanes,
/health and the waiting streams' comments; its engine gets the cluster's environment; after
VLLM_START_TIMEOUT the start fails with a 503 naming what was missing, which is not a crash
loop, and the lane starts once the cluster has the nodes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from fake_cluster import FakeCluster, cluster_env, run_app
from serving import chat_body
from vllm_launcher import placement
from vllm_launcher.config import load_config
from vllm_launcher.engine_command import lane_launch, passed_environment
from vllm_launcher.engines import supervisor as supervisor_module
from vllm_launcher.router import Router
from waiting import eventually_async

pytestmark = pytest.mark.engine


def test_a_multi_node_lane_waits_for_the_cluster_then_serves_with_its_environment(tmp_path, fake_python, monkeypatch):
    monkeypatch.setattr(supervisor_module, "CLUSTER_POLL", 0.1)
    cluster = FakeCluster(workers=0)
    placed = []          # the lanes whose placement was computed, each time it was
    compute = placement.lane_placement
    monkeypatch.setattr(placement, "lane_placement", lambda lane, gpus: placed.append(lane.name) or compute(lane, gpus))

    async def body(client: httpx.AsyncClient, router: Router):
        await eventually_async(lambda: _state(client, "small", "ready"), "lane small ready")
        request = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body("big", max_tokens=2)))

        async def waiting():
            lanes = (await client.get("/lanes")).json()["lanes"]
            return lanes["big"] if lanes["big"]["progress"] else None

        lane = await eventually_async(waiting, "lane big shows its progress")
        health = await eventually_async(lambda: _health_progress(client), "/health shows the progress")
        assert not request.done()
        cluster.workers = 1                                   # the worker node joins
        answer = await asyncio.wait_for(request, 30)
        engine = router.lanes["big"].supervisor.engine
        environ = dict(line.split("=", 1) for line in
                       Path(f"/proc/{engine.process.process.pid}/environ").read_text().split("\0") if "=" in line)
        lanes_after = (await client.get("/lanes")).json()["lanes"]["big"]
        return lane, health, answer, environ, lanes_after

    lane, health, answer, environ, after = run_app(tmp_path, cluster_env(tmp_path, fake_python), cluster, body)
    assert lane["state"] == "starting" and lane["progress"] == "waiting for cluster (1/2 nodes)", lane
    assert health == {"big": "waiting for cluster (1/2 nodes)"}, health
    assert answer.status_code == 200, answer.text
    assert environ["RAY_ADDRESS"] == "127.0.0.1:6379" and environ["VLLM_HOST_IP"] == "127.0.0.1"
    assert environ["RAY_AUTH_MODE"] == "token" and environ["RAY_AUTH_TOKEN_PATH"].endswith("cluster-token")
    assert environ["GLOO_SOCKET_IFNAME"] == environ["NCCL_SOCKET_IFNAME"] == "lo"
    assert after["state"] == "ready" and after["progress"] is None and after["failures"] == 0
    assert sorted(placed) == ["big", "small"]       # once per lane when the server began, not per start


def test_a_cluster_short_of_nodes_fails_the_start_with_503_after_the_start_timeout_without_a_crash_loop(
        tmp_path, fake_python, monkeypatch):
    monkeypatch.setattr(supervisor_module, "CLUSTER_POLL", 0.2)
    cluster = FakeCluster(workers=0)

    async def body(client: httpx.AsyncClient, router: Router):
        await eventually_async(lambda: _state(client, "small", "ready"), "lane small ready")
        plain = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body("big", max_tokens=2)))
        streamed = await client.post("/v1/chat/completions", json=chat_body("big", stream=True, max_tokens=2))
        refused = await plain
        lanes = (await client.get("/lanes")).json()["lanes"]["big"]
        small_after = await client.post("/v1/chat/completions", json=chat_body("small", max_tokens=2))
        # Six more starts than VLLM_ENGINE_MAX_RESTARTS allows crash loops: still not failed.
        for _ in range(3):
            again = await client.post("/v1/chat/completions", json=chat_body("big", max_tokens=2))
            assert again.status_code == 503 and again.json()["error"]["code"] == "cluster_unavailable"
        still = (await client.get("/lanes")).json()["lanes"]["big"]
        cluster.workers = 1
        served = await client.post("/v1/chat/completions", json=chat_body("big", max_tokens=2))
        return refused, streamed.text, lanes, small_after, still, served

    environ = cluster_env(tmp_path, fake_python, VLLM_START_TIMEOUT="3", VLLM_ENGINE_MAX_RESTARTS="2")
    refused, stream, lane, small_after, still, served = run_app(tmp_path, environ, cluster, body)
    error = refused.json()["error"]
    assert refused.status_code == 503 and error["code"] == "cluster_unavailable", refused.text
    assert "needs 2 GPUs on 2 nodes (1 each) of the cluster" in error["message"], error
    assert "VLLM_START_TIMEOUT=3 s it had (1/2 nodes)" in error["message"], error
    assert "1 node alive" in error["message"], error
    assert ": waiting for lane big (starting, waiting for cluster (1/2 nodes)" in stream, stream
    events = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    assert events and events[-1]["error"]["code"] == "cluster_unavailable", stream
    assert lane["state"] == "stopped" and lane["failures"] == 0 and lane["progress"] is None, lane
    assert "VLLM_START_TIMEOUT" in lane["last_error"]
    assert small_after.status_code == 200
    assert still["state"] == "stopped" and still["failures"] == 0, still
    assert served.status_code == 200, served.text


async def _state(client: httpx.AsyncClient, lane: str, state: str) -> bool:
    return (await client.get("/lanes")).json()["lanes"][lane]["state"] == state


async def _health_progress(client: httpx.AsyncClient):
    return (await client.get("/health")).json().get("progress")


def test_lanes_of_one_node_never_ask_the_cluster(tmp_path, fake_python):
    cluster = FakeCluster(workers=0)
    environ = {**cluster_env(tmp_path, fake_python), "VLLM_LANE_BIG_NODES": "1"}

    async def body(client: httpx.AsyncClient, router: Router):
        await eventually_async(lambda: _state(client, "small", "ready"), "lane small ready")
        return await client.post("/v1/chat/completions", json=chat_body("big", max_tokens=2))

    answer = run_app(tmp_path, environ, cluster, body)
    assert answer.status_code == 200 and cluster.questions == 0


def test_the_default_cluster_query_asks_with_the_engines_python(tmp_path, fake_python, monkeypatch):
    config = load_config(cluster_env(tmp_path, fake_python))
    asked = {}

    def query(cluster, python, environ):
        asked.update(cluster=cluster, python=python, environ=environ)
        return FakeCluster(1)(None)

    monkeypatch.setattr(supervisor_module.clusters, "query_cluster", query)
    assert len(supervisor_module.query_cluster(lane_launch(config, "big")).alive) == 2
    assert (asked["cluster"], asked["python"]) == (config.cluster, str(fake_python))
    assert asked["environ"] == passed_environment(config.environ)     # what engines see, not the launcher's
