"""A multi-node lane's server in-process with a fake cluster query (no Ray): what the cluster
answers (FakeCluster), a head's environment with a small lane and a big one of two GPUs
(cluster_env), and the app with its router driven by a test's body (run_app)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from serving import fake_lanes_env
from vllm_launcher.config import load_config
from vllm_launcher.engines import sockets_dir
from vllm_launcher.http_app import create_app
from vllm_launcher.metrics import Metrics
from vllm_launcher.placement import ClusterState, Node
from vllm_launcher.router import Router
from vllm_launcher.vllm_info import VllmInfo


class FakeCluster:
    """What the launcher's cluster query answers: a head with 1 GPU and `workers` more nodes."""

    def __init__(self, workers: int = 0):
        self.workers = workers
        self.questions = 0

    def __call__(self, launch) -> ClusterState:
        self.questions += 1
        nodes = [Node("127.0.0.1", True, True, 1.0, 2.0)]
        nodes += [Node(f"127.0.0.{2 + index}", False, True, 1.0, 2.0) for index in range(self.workers)]
        return ClusterState("127.0.0.1:6379", "2.60.0", tuple(nodes))


def cluster_env(tmp_path: Path, fake_python: Path, **server) -> dict[str, str]:
    token = tmp_path / "cluster-token"
    token.write_text("0" * 64 + "\n")
    token.chmod(0o600)
    lanes = {"small": {}, "big": {"TENSOR_PARALLEL_SIZE": "2"}}
    return {**fake_lanes_env(fake_python, lanes, VLLM_STOP_TIMEOUT="5", VLLM_SWITCH_MAX_WAIT="1", **server),
            "VLLM_CLUSTER_ROLE": "head", "VLLM_CLUSTER_INTERFACE": "lo", "VLLM_CLUSTER_TOKEN_FILE": str(token),
            "VLLM_CLUSTER_GPUS": "1", "TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}


def run_app(tmp_path: Path, environ: dict[str, str], cluster: FakeCluster, body) -> object:
    config = load_config(environ)

    async def run():
        metrics = Metrics()
        router = Router(config, VllmInfo("vllm", "0.32.0"), metrics, sockets=sockets_dir(tmp_path / "run"))
        for lane in router.lanes.values():
            lane.supervisor.cluster_query = cluster
        app = create_app(config, VllmInfo("vllm", "0.32.0"), router, metrics)
        await router.start(preload=config.default_lane)      # what the app's lifespan does
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://server",
                                         timeout=60) as client:
                return await body(client, router)
        finally:
            await router.close()

    return asyncio.run(run())
